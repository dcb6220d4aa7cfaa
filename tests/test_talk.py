"""Talk (Algorithm 1, lines 2d-2e): the hidden states after a thought, at offsets 0 .. n_true - 1.

``test_parallel.py`` checks talk beside the thoughts on every architecture; here the talk pass on
its own: the meaning of each offset, and thinking at some positions only.
"""

import torch

from qstar_mini.talk import naive_talk, shift_left, talk_hidden
from qstar_mini.thoughts import generate_thoughts, plain_forward
from tiny_models import batch, tiny_meta, tiny_random_model

T, N, N_TRUE = 5, 2, 3


def test_shift_left_puts_x_j_plus_i_at_position_j():
    x = torch.arange(1, 7).view(1, 6)
    assert shift_left(x, 0).tolist() == [[1, 2, 3, 4, 5, 6]]
    assert shift_left(x, 2).tolist() == [[3, 4, 5, 6, 0, 0]]
    assert shift_left(x, 2, fill=-1).tolist() == [[3, 4, 5, 6, -1, -1]]


def _thoughts(model, meta, ids, mask, positions=None):
    _, cache = plain_forward(model, meta, ids, mask)
    return generate_thoughts(model, meta, ids, mask, cache, T, N, extra_steps=N_TRUE - 1, greedy=True,
                             positions=positions)


@torch.no_grad()
def test_offset_i_is_the_state_after_the_thought_and_i_true_tokens():
    """Offset 0 is the state at <|endofthought|>; offset i has also read x_{j+1..j+i}: the
    naive run of [x_<=j; T_j; x_{j+1:j+i}] gives the same states."""
    model, meta = tiny_random_model("llama"), tiny_meta()
    ids, mask = batch(lengths=(7, 7), seq=7)
    thoughts = _thoughts(model, meta, ids, mask)
    h = talk_hidden(model, meta, thoughts, ids, N_TRUE)                # (b, n, seq, n_true, hidden)
    assert h.shape == (2, N, 7, N_TRUE, model.config.hidden_size)
    torch.testing.assert_close(h[..., 0, :], thoughts.h_end, rtol=0, atol=0)
    ref = naive_talk(model, meta, ids, mask, thoughts.ids, N_TRUE)
    j, i = torch.arange(7)[:, None], torch.arange(N_TRUE)[None, :]
    exists = (j + i < 7)                                               # x_{j+i} is inside the line
    torch.testing.assert_close(h[:, :, exists], ref[:, :, exists], rtol=0, atol=1e-6)
    # the offsets differ: each one has read one more true token
    assert (h[..., 1, :] - h[..., 0, :]).abs().max() > 1e-3


@torch.no_grad()
def test_thinking_at_some_positions_gives_those_positions_states():
    """positions=(b, m): the talk states of the chosen positions equal the all-position pass there."""
    model, meta = tiny_random_model("mistral"), tiny_meta()
    ids, mask = batch(lengths=(7, 7), seq=7)
    full = talk_hidden(model, meta, _thoughts(model, meta, ids, mask), ids, N_TRUE)
    positions = torch.tensor([[1, 3], [2, 4]])
    some = talk_hidden(model, meta, _thoughts(model, meta, ids, mask, positions), ids, N_TRUE)
    assert some.shape[2] == 2
    for b in range(2):
        for k, j in enumerate(positions[b].tolist()):
            torch.testing.assert_close(some[b, :, k], full[b, :, j], rtol=0, atol=1e-6)
