"""The reward baselines of Algorithm 1, line 2i (qstar_mini.losses.rewards)."""

import pytest
import torch

from qstar_mini.config import official
from qstar_mini.errors import ConfigError
from qstar_mini.losses import rewards


def cases(n_thoughts: int, seed: int = 0):
    """log p^talk (2, n, 5, 3), log p^init (2, 5, 3) and valid (2, 5, 3) with invalid entries."""
    g = torch.Generator().manual_seed(seed)
    log_p_talk = -torch.rand(2, n_thoughts, 5, 3, generator=g, dtype=torch.float64) * 4
    log_p_init = -torch.rand(2, 5, 3, generator=g, dtype=torch.float64) * 4
    valid = torch.rand(2, 5, 3, generator=g) > 0.3
    return log_p_talk, log_p_init, valid


def test_base_baseline_is_the_improvement_over_the_base_prediction():
    """r_j = sum_i (log p^talk - log p^init) over the valid offsets i (official, n_passes = 1)."""
    lp_talk, lp_init, valid = cases(1)
    r = rewards(lp_talk, valid, "base", log_p_init=lp_init)
    expected = torch.zeros(2, 1, 5, dtype=torch.float64)
    for b in range(2):
        for j in range(5):
            for i in range(3):
                if valid[b, j, i]:
                    expected[b, 0, j] += lp_talk[b, 0, j, i] - lp_init[b, j, i]
    torch.testing.assert_close(r, expected, rtol=0, atol=1e-12)
    assert bool((r > 0).any()) and bool((r < 0).any())
    none = rewards(lp_talk, valid, "none")
    assert bool((none <= 0).all())              # without the base, a reward is never positive


def test_the_mean_baseline_cancels_the_base():
    """With several thoughts, subtracting the base first changes nothing under the mean baseline."""
    lp_talk, lp_init, valid = cases(3)
    centred = rewards(lp_talk, valid, "mean")
    both = rewards(lp_talk, valid, "base", log_p_init=lp_init)
    torch.testing.assert_close(both - both.mean(1, keepdim=True), centred, rtol=0, atol=1e-12)


def test_base_baseline_needs_log_p_init_and_unknown_baselines_are_refused():
    lp_talk, _, valid = cases(1)
    with pytest.raises(ValueError, match="needs log_p_init"):
        rewards(lp_talk, valid, "base")
    with pytest.raises(ValueError, match="unknown reward baseline 'trice'"):
        rewards(lp_talk, valid, "trice")


def test_official_preset_with_one_pass_rewards_the_improvement():
    """official(n_passes=1) is the official one-pass step (reward_baseline "base"); a baseline given
    explicitly is kept; the mean baseline with one thought is still refused."""
    assert official(n_passes=1).reward_baseline == "base"
    assert official(n_thoughts=1).reward_baseline == "base"
    assert official(n_passes=1, reward_baseline="none").reward_baseline == "none"
    assert official().reward_baseline == "mean"
    with pytest.raises(ConfigError, match="reward_baseline='base'"):
        official(n_passes=1, reward_baseline="mean")
