"""The config: presets, official names beside the paper's, one-line errors for impossible values."""

import pytest

from qstar_mini.config import QuietStarConfig, official, preset, tiny
from qstar_mini.errors import ConfigError, QStarError


def test_official_names_alias_the_paper_names():
    cfg = tiny()
    assert (cfg.n_ahead, cfg.n_ahead_talk, cfg.n_passes) == (cfg.thought_length, cfg.n_true, cfg.n_thoughts)
    assert cfg.n_sampled == cfg.thought_length - 2
    assert cfg.n_forward_steps == cfg.thought_length + cfg.n_true - 1


@pytest.mark.parametrize("changes, field", [
    (dict(thought_length=2), "thought_length"),
    (dict(n_true=256, seq_len=256), "n_true"),
    (dict(n_true=0), "n_true"),
    (dict(n_thoughts=1), "n_thoughts"),
    (dict(mixing="average"), "mixing"),
    (dict(reinforce_temperature=0), "reinforce_temperature"),
    (dict(base_loss_weight=1.5), "base_loss_weight"),
    (dict(thought_length=7.0), "thought_length"),
    (dict(start_init=""), "start_init"),
])
def test_impossible_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError) as err:
        QuietStarConfig(**changes)
    message = str(err.value)
    assert field in message and "\n" not in message
    assert isinstance(err.value, (QStarError, ValueError))


def test_one_thought_is_fine_without_the_mean_baseline():
    QuietStarConfig(n_thoughts=1, reward_baseline="none")
    QuietStarConfig(n_thoughts=1, think=False)


def test_round_trip_and_unknown_fields():
    cfg = tiny(steps=3)
    assert QuietStarConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown config field"):
        cfg.replace(n_ahead=3)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
    assert preset("official") == official()
