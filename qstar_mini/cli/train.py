"""``qstar-mini train``: its flags, the YAML file, and the call of :func:`qstar_mini.train.train`.

Every flag is made from a field of :class:`~qstar_mini.config.QuietStarConfig` (the algorithm)
or :class:`~qstar_mini.train.TrainOptions` (the run), with the comment beside the field as its
help: a setting and its default are written once, in their dataclass. Settings are resolved
flags first, then ``--config FILE.yaml``, then ``--preset``, then the dataclasses' defaults
(:func:`resolve_train_args`). The loop itself lives in :mod:`qstar_mini.train`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from qstar_mini.cli.args import (add_dataclass_flags, check_device, finite_float, nonnegative_int, positive_float,
                                 positive_int)
from qstar_mini.config import CHOICES, PRESETS, QuietStarConfig, preset
from qstar_mini.errors import ConfigError
from qstar_mini.paths import RUNS_DIR
from qstar_mini.records import LINES
from qstar_mini.train import THINK_WHERE, TrainOptions, train

#: argparse types beyond the annotation's: counts >= 1, rates > 0, weights finite.
FLAG_TYPES = {"steps": positive_int, "batch_size": positive_int, "n_thoughts": positive_int,
              "thought_length": positive_int, "n_true": positive_int, "seq_len": positive_int,
              "warmup_steps": nonnegative_int, "lr": positive_float, "mixer_lr": positive_float,
              "thought_temperature": positive_float, "embedding_scale": positive_float,
              "policy_loss_weight": finite_float, "base_loss_weight": finite_float, "weight_decay": finite_float,
              "max_lines": positive_int, "eval_every": nonnegative_int, "eval_lines": positive_int,
              "save_every": positive_int, "grad_accum": positive_int, "mixer_depth": positive_int,
              "mixer_hidden": positive_int, "reinforce_temperature": positive_float, "grad_clip": positive_float,
              "lr_decay_steps": nonnegative_int, "mixer_bias_init": finite_float}
#: Options of the command line alone: ``--out`` defaults to runs/<--name>, and a used folder is
#: refused unless ``--overwrite`` (so TrainOptions' ``out`` and ``overwrite`` get their own flags).
COMMAND_LINE_ONLY = ("out", "overwrite")
RUN_KEYS = ("name", "preset") + tuple(f.name for f in fields(TrainOptions)
                                      if f.metadata.get("cli") is not False and f.name not in ("resume", "overwrite"))


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``qstar-mini train``. Unset flags are None: the YAML file, then the preset,
    then the dataclasses' defaults decide."""
    p = parser
    p.add_argument("--config", metavar="FILE.yaml",
                   help="YAML file: QuietStarConfig fields and/or run options (model, data, out, "
                        "think_where, lines, ...); flags override it")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="starting settings: tiny (CPU minutes) or official (the paper's code; GPU) (default: tiny)")
    p.add_argument("--name", default=None, help="run name under runs/ (default: train)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<name>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, a used --out is refused)")
    run = p.add_argument_group("run options (qstar_mini.train.TrainOptions)")
    add_dataclass_flags(run, TrainOptions, types=FLAG_TYPES, skip=COMMAND_LINE_ONLY,
                        choices={"think_where": THINK_WHERE, "lines": LINES})
    algo = p.add_argument_group("Quiet-STaR settings (qstar_mini.config.QuietStarConfig; defaults: the tiny "
                                "preset's)")
    add_dataclass_flags(algo, QuietStarConfig, types=FLAG_TYPES, choices=CHOICES, defaults=preset("tiny").to_dict())
    algo.add_argument("--no-policy", action="store_true", default=None,
                      help="control: REINFORCE off (the same as --policy-loss-weight 0)")
    return p


def _read_yaml(path: str) -> dict:
    import yaml

    if Path(path).is_dir():
        raise ConfigError(f"--config {path} is a folder; give a YAML file")
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must hold a mapping of settings")
    return values


def _yaml_number(name: str, value, path: str):
    """A YAML value for a numeric field given as text (YAML reads ``1e-3`` as the string
    "1e-3") becomes that number; text that is no number is refused, naming the field."""
    kind = FLAG_TYPES.get(name)
    if not isinstance(value, str) or kind is None:
        return value
    try:
        return kind(value)
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"--config {path}: {name}: {e}") from None


def resolve_train_args(args: argparse.Namespace) -> tuple[QuietStarConfig, dict]:
    """(config, run options) from YAML + preset + flags, flags winning."""
    values = _read_yaml(args.config) if getattr(args, "config", None) else {}
    config_names = {f.name for f in fields(QuietStarConfig)}
    unknown = set(values) - config_names - set(RUN_KEYS)
    if unknown:
        raise ConfigError(f"--config: unknown setting(s) {sorted(unknown)}; use QuietStarConfig fields "
                          f"or {list(RUN_KEYS)}")
    options = {k: _yaml_number(k, values[k], args.config) for k in RUN_KEYS if k in values}
    changes = {k: _yaml_number(k, v, args.config) for k, v in values.items() if k in config_names}
    for name in RUN_KEYS:
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    for name in config_names:
        if getattr(args, name, None) is not None:
            changes[name] = getattr(args, name)
    if getattr(args, "no_policy", None):
        if changes.get("think") is False:
            raise ConfigError("--no-policy with --no-think: the control has no REINFORCE to turn off; drop --no-policy")
        changes["policy_loss_weight"] = 0.0
    cfg = preset(options.pop("preset", None) or "tiny", **changes)
    return cfg, options


def run_train(args: argparse.Namespace) -> int:
    """``qstar-mini train``: train, print a one-line summary per evaluation, return 0."""
    cfg, options = resolve_train_args(args)
    check_device(options.get("device"))
    name = options.pop("name", None) or "train"
    options.setdefault("out", RUNS_DIR / name)
    result = train(cfg, **options, resume=bool(getattr(args, "resume", None)),
                   overwrite=bool(getattr(args, "overwrite", False)))
    for e in result["evals"]:
        shown = {k: v for k, v in e.items() if isinstance(v, (int, float))}
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    if result["interrupted"]:
        print(f"qstar-mini: interrupted ({result['interrupted']}) after step {result['steps']}; checkpoint "
              f"saved in {result['checkpoint']}; continue with the same command and --resume", file=sys.stderr)
        return 130 if result["interrupted"] == "SIGINT" else 143
    print(f"trained {result['steps']} steps in {result['seconds']:.1f} s; checkpoint: {result['checkpoint']}")
    return 0
