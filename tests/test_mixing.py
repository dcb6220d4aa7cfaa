"""The mixing modes: each has its own branch, and an unknown one is refused, never run as another."""

import pytest
import torch
from torch import nn

from qstar_mini.config import MIXING_MODES, QuietStarConfig
from qstar_mini.errors import ConfigError
from qstar_mini.mixing import MixingHead, mix_log_probs, mixing_weight

HIDDEN, VOCAB = 8, 11


@pytest.fixture
def parts():
    torch.manual_seed(0)
    head = MixingHead(HIDDEN, bias_init=0.5)
    nn.init.normal_(head.net[-1].weight)                   # a non-zero w, so the modes differ
    lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
    h_init, h_thought = torch.randn(3, HIDDEN), torch.randn(3, HIDDEN)
    return head, lm_head, h_init, h_thought


def test_every_configurable_mode_has_its_own_branch(parts):
    head, lm_head, h_init, h_thought = parts
    results = {}
    for mode in MIXING_MODES:
        w = mixing_weight(head, h_init, h_thought, mode)
        results[mode] = mix_log_probs(lm_head, h_init, h_thought, w, mode)
        assert results[mode].shape == (3, VOCAB)
    # "hidden" renormalises (a true distribution), "logprob" does not (the paper's formula)
    assert torch.allclose(results["hidden"].exp().sum(-1), torch.ones(3), atol=1e-5)
    assert (results["logprob"].exp().sum(-1) < 1 - 1e-4).all()


@pytest.mark.parametrize("mode", ["gated", "Hidden", ""])
def test_an_unknown_mode_is_refused_by_both_functions(parts, mode):
    head, lm_head, h_init, h_thought = parts
    w = mixing_weight(head, h_init, h_thought, "logprob")
    with pytest.raises(ConfigError, match=rf"unknown mixing mode {mode!r}; valid modes: hidden, logprob$"):
        mixing_weight(head, h_init, h_thought, mode)
    with pytest.raises(ConfigError, match=rf"unknown mixing mode {mode!r}; valid modes: hidden, logprob$"):
        mix_log_probs(lm_head, h_init, h_thought, w, mode)


def test_the_config_refuses_an_unknown_mode_before_any_step():
    with pytest.raises(ConfigError, match=r"mixing must be one of \('hidden', 'logprob'\) \(got 'gated'\)"):
        QuietStarConfig(mixing="gated")
