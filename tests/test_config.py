"""The config: presets, official names beside the paper's, one-line errors for impossible values."""

import pytest

from qstar_mini.config import QuietStarConfig, official, preset, tiny
from qstar_mini.errors import ConfigError, QStarError


def test_official_names_map_to_the_paper_names():
    cfg = tiny()
    # n_ahead counts the plain pass: the official loop runs n_ahead + n_ahead_talk - 1 passes
    # in all, of which 1 is the plain pass, t feed the thought and n_true - 1 the talk tokens.
    assert (cfg.n_ahead, cfg.n_ahead_talk, cfg.n_passes) == (cfg.thought_length + 1, cfg.n_true, cfg.n_thoughts)
    assert cfg.n_sampled == cfg.thought_length - 2 == cfg.n_ahead - 3
    assert 1 + cfg.n_forward_steps == cfg.n_ahead + cfg.n_ahead_talk - 1


def test_official_preset_is_the_released_training_script():
    cfg = official()
    assert (cfg.n_ahead, cfg.n_ahead_talk, cfg.n_passes) == (12, 4, 2)
    assert cfg.n_sampled == 9                       # start + 9 sampled + end = 11 ids
    assert official(n_ahead=6, n_ahead_talk=3, n_passes=3) == official(thought_length=5, n_true=3, n_thoughts=3)
    with pytest.raises(ConfigError, match="n_ahead or thought_length"):
        official(n_ahead=6, thought_length=5)


def test_tiny_takes_qstar_minis_side_of_every_difference():
    defaults, small = official(), tiny()
    switched = {"meta_init": "mean", "scoring_vocab": "text", "reinforce_reduction": "sum",
                "talk_nll_pooling": "pooled", "policy_positions": "real", "lr_schedule": "constant",
                "mixer_depth": 1, "decay_meta_tokens": False}
    for name, value in switched.items():
        assert getattr(small, name) == value != getattr(defaults, name), name


def test_a_saved_config_missing_a_field_is_refused():
    values = tiny().to_dict()
    del values["scoring_vocab"]
    with pytest.raises(ConfigError, match=r"lacks field\(s\) \['scoring_vocab'\]"):
        QuietStarConfig.from_dict(values)


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
    (dict(meta_init="last"), "meta_init"),
    (dict(scoring_vocab="none"), "scoring_vocab"),
    (dict(reinforce_reduction="max"), "reinforce_reduction"),
    (dict(talk_nll_pooling="median"), "talk_nll_pooling"),
    (dict(policy_positions="every"), "policy_positions"),
    (dict(lr_schedule="cosine"), "lr_schedule"),
    (dict(mixer_depth=0), "mixer_depth"),
    (dict(lr_decay_steps=5), "lr_decay_steps"),
])
def test_impossible_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError) as err:
        QuietStarConfig(**changes)
    message = str(err.value)
    assert field in message and "\n" not in message
    assert isinstance(err.value, (QStarError, ValueError))


def test_one_thought_is_fine_without_the_mean_baseline():
    """One thought is refused only with the mean baseline (its reward minus the mean is always 0);
    without a baseline, or without thinking (the control), the config is built and keeps it."""
    with pytest.raises(ConfigError, match="n_thoughts must be >= 2 with reward_baseline='mean'"):
        QuietStarConfig(n_thoughts=1)
    for changes in (dict(reward_baseline="none"), dict(think=False)):
        cfg = QuietStarConfig(n_thoughts=1, **changes)
        assert cfg.n_thoughts == cfg.n_passes == 1
        assert QuietStarConfig.from_dict(cfg.to_dict()) == cfg


def test_round_trip_and_unknown_fields():
    cfg = tiny(steps=3)
    assert QuietStarConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown config field"):
        cfg.replace(n_ahead=3)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")
    assert preset("official") == official()
