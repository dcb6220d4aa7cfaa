"""The mixing modes: each has its own branch, and an unknown one is refused, never run as another."""

import pytest
import torch
from torch import nn

from qstar_mini.config import MIXING_MODES, QuietStarConfig, official, tiny
from qstar_mini.errors import ConfigError
from qstar_mini.mixing import OFFICIAL_INIT_STD, MixingHead, mix_log_probs, mixing_weight
from qstar_mini.step import prepare_model
from tiny_models import small_model

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


def _linear_layers(head: MixingHead) -> list[nn.Linear]:
    return [m for m in head.net if isinstance(m, nn.Linear)]


def test_official_preset_head_starts_as_the_official_one():
    """official(): every head layer N(0, 0.02) with biases 0 (transformers' _init_weights, which the
    official model applies to its talk head), then the last layer zeroed (its first forward does).
    PyTorch's own init (tiny()) is U(+-1/sqrt(fan_in)): std 0.072 and 0.10 at these widths."""
    model, tok = small_model()                                    # hidden 32 (tests/tiny_models.py)
    hidden = model.config.hidden_size
    torch.manual_seed(0)
    _, head = prepare_model(model, tok, official(seq_len=16))
    first, middle, last = _linear_layers(head.requires_grad_(False))
    assert (first.weight.shape, middle.weight.shape, last.weight.shape) == ((hidden, 2 * hidden), (hidden, hidden), (1, hidden))
    for layer in (first, middle):
        n = layer.weight.numel()                                  # std of a sample std: 0.02 / sqrt(2n)
        assert abs(float(layer.weight.std()) - OFFICIAL_INIT_STD) < 5 * OFFICIAL_INIT_STD / (2 * n) ** 0.5
        assert abs(float(layer.weight.mean())) < 5 * OFFICIAL_INIT_STD / n ** 0.5
        assert bool((layer.bias == 0).all())
    assert bool((last.weight == 0).all()) and last.bias is None


def test_tiny_preset_keeps_pytorchs_init():
    model, tok = small_model()
    torch.manual_seed(0)
    _, head = prepare_model(model, tok, tiny(seq_len=16))
    first, last = _linear_layers(head.requires_grad_(False))
    bound = 1 / first.weight.shape[1] ** 0.5                      # U(-bound, bound), std bound / sqrt(3)
    assert float(first.weight.abs().max()) <= bound and float(first.weight.std()) > 0.9 * bound / 3 ** 0.5
    assert bool((first.bias != 0).all())
    assert bool((last.weight == 0).all()) and float(last.bias) == tiny().mixer_bias_init


def test_an_unknown_head_init_is_refused():
    with pytest.raises(ConfigError, match="mixer_init must be one of"):
        QuietStarConfig(mixer_init="xavier")
    with pytest.raises(ConfigError, match="unknown mixing-head init 'xavier'"):
        MixingHead(HIDDEN, init="xavier")
