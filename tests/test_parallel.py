"""Parallel thoughts (Figure 3 masks + KV cache) equal the naive per-position loop.

For each of four architectures, eager and sdpa attention, greedy and sampled with the same
injected Gumbel noise, on a right-padded batch in float64: the same thought tokens,
allclose log-probs, allclose post-thought (talk) hidden states.
"""

import pytest
import torch

from qstar_mini.talk import naive_talk, talk_hidden
from qstar_mini.thoughts import generate_thoughts, gumbel_noise, naive_thoughts, plain_forward
from tiny_models import ARCHS, VOCAB, batch, tiny_meta, tiny_random_model

T, N, N_TRUE = 5, 2, 3


def real_entries(mask):
    """(batch, n, seq) bool of real positions."""
    return mask.bool()[:, None, :].expand(mask.shape[0], N, mask.shape[1])


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "gumbel"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_parallel_equals_naive(arch, attn, greedy):
    model, meta = tiny_random_model(arch, attn), tiny_meta()
    ids, mask = batch(lengths=(7, 5), seq=7)
    noise = None if greedy else gumbel_noise((2, N, 7, T - 2, VOCAB), torch.Generator().manual_seed(3),
                                             dtype=torch.float64)
    kw = dict(thought_temperature=1.0, reinforce_temperature=3.0, greedy=greedy, noise=noise)
    with torch.no_grad():
        _, cache = plain_forward(model, meta, ids, mask)
        par = generate_thoughts(model, meta, ids, mask, cache, T, N, extra_steps=N_TRUE - 1, **kw)
        h_par = talk_hidden(model, meta, par, ids, N_TRUE)
    ref_ids, ref_logp = naive_thoughts(model, meta, ids, mask, T, N, **kw)
    h_ref = naive_talk(model, meta, ids, mask, par.ids, N_TRUE)

    real = real_entries(mask)
    assert torch.equal(par.ids[real], ref_ids[real]), "thought tokens differ from the naive loop"
    torch.testing.assert_close(par.logprobs[real], ref_logp[real], rtol=0, atol=1e-6)
    # talk offset i exists where the teacher-forced tokens x_{j+1..j+i} are real
    lengths = mask.sum(-1)
    j = torch.arange(7)[None, :, None]
    i = torch.arange(N_TRUE)[None, None, :]
    ok = (j + i < lengths[:, None, None])[:, None].expand(2, N, 7, N_TRUE)
    torch.testing.assert_close(h_par[ok], h_ref[ok], rtol=0, atol=1e-6)
    # thoughts are well formed: forced meta-tokens at the ends, never inside
    assert bool((par.ids[..., 0] == meta.start_id).all()) and bool((par.ids[..., -1] == meta.end_id).all())
    inner = par.ids[..., 1:-1]
    assert not bool(((inner == meta.start_id) | (inner == meta.end_id)).any())


def test_sampling_differs_from_greedy_and_follows_noise():
    """The noise matters (otherwise the sampled test above would only re-test greedy)."""
    model, meta = tiny_random_model("llama"), tiny_meta()
    ids, mask = batch(lengths=(7, 7), seq=7)

    def run(**kw):
        with torch.no_grad():
            _, cache = plain_forward(model, meta, ids, mask)
            return generate_thoughts(model, meta, ids, mask, cache, T, N, **kw).ids

    g = lambda s: gumbel_noise((2, N, 7, T - 2, VOCAB), torch.Generator().manual_seed(s), dtype=torch.float64)
    assert not torch.equal(run(greedy=True), run(noise=g(0)))
    assert not torch.equal(run(noise=g(0)), run(noise=g(1)))
    assert torch.equal(run(noise=g(0)), run(noise=g(0)))
