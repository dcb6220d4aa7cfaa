"""``qstar-mini train``: its flags, the YAML file, and the call of :func:`qstar_mini.train.train`.

Settings are resolved flags first, then ``--config FILE.yaml``, then ``--preset``, then
:class:`~qstar_mini.config.QuietStarConfig`'s defaults (:func:`resolve_train_args`). The loop
itself lives in :mod:`qstar_mini.train`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields as dc_fields
from pathlib import Path

from qstar_mini.config import ATTENTION_MODES, MEMORY_MODES, MIXING_MODES, PRESETS, QuietStarConfig, preset
from qstar_mini.cli.args import check_device, finite_float, nonnegative_int, positive_float, positive_int
from qstar_mini.errors import ConfigError
from qstar_mini.paths import DATA_DIR, RUNS_DIR, TINY_BASE
from qstar_mini.records import LINES
from qstar_mini.train import THINK_WHERE, train

#: argparse types of the QuietStarConfig flags: counts >= 1, rates > 0, weights finite.
FLAG_TYPES = {"steps": positive_int, "batch_size": positive_int, "n_thoughts": positive_int,
              "thought_length": positive_int, "n_true": positive_int, "seq_len": positive_int,
              "warmup_steps": nonnegative_int, "seed": int, "lr": positive_float, "mixer_lr": positive_float,
              "thought_temperature": positive_float, "embedding_scale": positive_float,
              "policy_loss_weight": finite_float, "base_loss_weight": finite_float, "weight_decay": finite_float}

RUN_KEYS = ("model", "data", "out", "name", "think_where", "lines", "shuffle_rewards", "eval_every",
            "eval_lines", "save_every", "grad_accum", "device", "preset", "text_field", "max_lines")
CONFIG_FLAGS = ("steps", "batch_size", "lr", "mixer_lr", "seed", "n_thoughts", "thought_length",
                "n_true", "seq_len", "policy_loss_weight", "base_loss_weight", "warmup_steps", "mixing",
                "thought_temperature", "embedding_scale", "weight_decay", "memory", "attention")


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``qstar-mini train``. Unset flags are None: the YAML file, then the preset,
    then QuietStarConfig's defaults decide."""
    p = parser
    p.add_argument("--config", metavar="FILE.yaml",
                   help="YAML file: QuietStarConfig fields and/or run options (model, data, out, "
                        "think_where, lines, ...); flags override it")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="starting settings: tiny (CPU minutes) or official (the paper's code; GPU). Default tiny")
    p.add_argument("--model", default=None, help="local folder or Hugging Face name (default: data/tiny-base)")
    p.add_argument("--data", default=None,
                   help="JSONL file, folder with train.jsonl, or datasets name[:config] (default: data/)")
    p.add_argument("--text-field", default=None,
                   help="column holding the text (default: text); 'question+answer' for GSM8K-format "
                        "question/answer records: each line is the question, '\\nA: ' and the answer")
    p.add_argument("--max-lines", type=positive_int, default=None, help="use only the first N lines (N >= 1)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<name>)")
    p.add_argument("--name", default=None, help="run name under runs/ (default: train)")
    p.add_argument("--no-think", dest="think", action="store_false", default=None,
                   help="the control: same loop, plain LM loss, no thoughts")
    p.add_argument("--think-where", choices=THINK_WHERE, default=None,
                   help="all positions (the paper, default) or only the answer position")
    p.add_argument("--lines", choices=LINES, default=None, help="which lines to train on (default answer_only)")
    p.add_argument("--shuffle-rewards", action="store_true", default=None,
                   help="control: permute rewards among the thoughts of each position")
    p.add_argument("--no-policy", action="store_true", default=None,
                   help="control: REINFORCE off (policy_loss_weight = 0)")
    for name in CONFIG_FLAGS:
        kind = FLAG_TYPES.get(name, str)
        choices = {"mixing": MIXING_MODES, "memory": MEMORY_MODES, "attention": ATTENTION_MODES}.get(name)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, choices=choices,
                       help=f"QuietStarConfig.{name}")
    p.add_argument("--eval-every", type=nonnegative_int, default=None,
                   help="evaluate every N steps (default 50; 0 = only start/end)")
    p.add_argument("--eval-lines", type=positive_int, default=None, help="held-out lines per evaluation (default 200)")
    p.add_argument("--save-every", type=positive_int, default=None, help="also checkpoint every N steps")
    p.add_argument("--grad-accum", type=positive_int, default=None, help="micro-batches per optimiser step (default 1)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: CUDA if available); a device this machine lacks is refused")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint; refused if there is none or if the "
                        "model, data, lines or config differ (name them); a larger --steps extends a finished run")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, a used --out is refused)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
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
    config_names = {f.name for f in dc_fields(QuietStarConfig)}
    unknown = set(values) - config_names - set(RUN_KEYS)
    if unknown:
        raise ConfigError(f"--config: unknown setting(s) {sorted(unknown)}; use QuietStarConfig fields "
                          f"or {list(RUN_KEYS)}")
    run = {k: values[k] for k in RUN_KEYS if k in values}
    changes = {k: _yaml_number(k, v, args.config) for k, v in values.items() if k in config_names}
    for name in RUN_KEYS:
        if getattr(args, name, None) is not None:
            run[name] = getattr(args, name)
    for name in CONFIG_FLAGS + ("think",):
        if getattr(args, name, None) is not None:
            changes[name] = getattr(args, name)
    if getattr(args, "no_policy", None):
        if changes.get("think") is False:
            raise ConfigError("--no-policy with --no-think: the control has no REINFORCE to turn off; drop --no-policy")
        changes["policy_loss_weight"] = 0.0
    cfg = preset(run.pop("preset", None) or "tiny", **changes)
    return cfg, run


def run_train(args: argparse.Namespace) -> int:
    """``qstar-mini train``: train, print a one-line summary per evaluation, return 0."""
    cfg, run = resolve_train_args(args)
    check_device(run.get("device"))
    out = run.get("out") or (RUNS_DIR / (run.get("name") or "train"))
    result = train(
        cfg, run.get("model") or TINY_BASE, run.get("data") or DATA_DIR, out,
        think_where=run.get("think_where", "all"), lines=run.get("lines", "answer_only"),
        shuffle_rewards=bool(run.get("shuffle_rewards", False)),
        eval_every=run.get("eval_every", 50), eval_lines=run.get("eval_lines", 200),
        save_every=run.get("save_every"), resume=bool(getattr(args, "resume", False)),
        overwrite=bool(getattr(args, "overwrite", False)),
        grad_accum=run.get("grad_accum", 1), device=run.get("device"),
        progress=getattr(args, "progress", True), text_field=run.get("text_field", "text"),
        max_lines=run.get("max_lines"))
    for e in result["evals"]:
        shown = {k: v for k, v in e.items() if isinstance(v, (int, float))}
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    if result["interrupted"]:
        print(f"qstar-mini: interrupted ({result['interrupted']}) after step {result['steps']}; checkpoint "
              f"saved in {result['checkpoint']}; continue with the same command and --resume", file=sys.stderr)
        return 130 if result["interrupted"] == "SIGINT" else 143
    print(f"trained {result['steps']} steps in {result['seconds']:.1f} s; checkpoint: {result['checkpoint']}")
    return 0
