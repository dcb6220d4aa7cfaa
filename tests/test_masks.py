"""The Figure 3 masks, checked against a plain-Python statement of who may see whom."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qstar_mini.errors import DataError
from qstar_mini.masks import (all_step_masks, causal_mask, causal_visibility, check_right_padded,
                              step_position_ids, thought_mask, thought_visibility, to_additive)


def expected_visibility(length: int, seq: int, step: int) -> torch.Tensor:
    """Query j of step `step` sees text key i iff i <= j and i < length; block key (m, j') iff j' == j."""
    keys = seq * (1 + step)
    out = torch.zeros(seq, keys, dtype=torch.bool)
    for j in range(seq):
        for key in range(keys):
            block, col = divmod(key, seq)
            if block == 0:
                out[j, key] = col <= j and col < length
            else:
                out[j, key] = col == j
    return out


masks_strategy = st.lists(st.integers(1, 9), min_size=1, max_size=3)


@settings(max_examples=60, deadline=None)
@given(lengths=masks_strategy, extra=st.integers(0, 3), step=st.integers(1, 5))
def test_thought_visibility_is_exactly_figure_3(lengths, extra, step):
    seq = max(lengths) + extra
    mask = (torch.arange(seq)[None] < torch.tensor(lengths)[:, None]).long()
    vis = thought_visibility(mask, step)
    assert vis.shape == (len(lengths), 1, seq, seq * (1 + step))
    for b, length in enumerate(lengths):
        assert torch.equal(vis[b, 0], expected_visibility(length, seq, step))


@settings(max_examples=40, deadline=None)
@given(lengths=masks_strategy, step=st.integers(1, 6))
def test_all_step_mask_sliced_equals_each_step(lengths, step):
    seq = max(lengths)
    mask = (torch.arange(seq)[None] < torch.tensor(lengths)[:, None]).long()
    full = all_step_masks(mask, 6)
    assert torch.equal(full[..., : seq * (1 + step)], thought_mask(mask, step))


@settings(max_examples=40, deadline=None)
@given(lengths=masks_strategy)
def test_causal_mask_and_additive_form(lengths):
    seq = max(lengths)
    mask = (torch.arange(seq)[None] < torch.tensor(lengths)[:, None]).long()
    vis = causal_visibility(mask)
    for b, length in enumerate(lengths):
        assert torch.equal(vis[b, 0], expected_visibility(length, seq, 0))
    add = causal_mask(mask, torch.float32)
    assert torch.equal(add == 0, vis)
    assert bool((add[~vis] == torch.finfo(torch.float32).min).all())
    assert bool(vis.any(-1).all()), "every query row must see at least one key (no NaN softmax)"


def test_position_ids_put_thought_token_k_after_x_j():
    mask = torch.ones(2, 5, dtype=torch.long)
    assert step_position_ids(mask, 0)[0].tolist() == [0, 1, 2, 3, 4]
    assert step_position_ids(mask, 3)[1].tolist() == [3, 4, 5, 6, 7]


def test_to_additive_bf16_uses_its_own_min():
    vis = torch.tensor([[True, False]])
    assert to_additive(vis, torch.bfloat16)[0, 1] == torch.finfo(torch.bfloat16).min


@pytest.mark.parametrize("mask, message", [
    (torch.tensor([[1, 1, 0], [0, 0, 0]]), "all padding"),
    (torch.tensor([[0, 1, 1]]), "right-padded"),
    (torch.tensor([1, 1, 1]), "shape"),
])
def test_bad_padding_is_a_clear_error(mask, message):
    with pytest.raises(DataError, match=message):
        check_right_padded(mask)
