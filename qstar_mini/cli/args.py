"""Argument types and checks shared by the commands, and flags made from a settings dataclass.

argparse calls a ``type=`` function on the text of a flag; raising ``ArgumentTypeError`` there
becomes the command line's one-line error (exit status 2), naming the flag. Every count flag
uses one of these, so ``--max-lines -1`` or ``--thought-temperature inf`` is refused instead
of meaning something surprising.

:func:`add_dataclass_flags` makes one flag per field of a settings dataclass
(:class:`~qstar_mini.config.QuietStarConfig`, :class:`~qstar_mini.train.TrainOptions`): the
field's name is the flag, its type the flag's type, its comment in the class the flag's help and
its default the default shown there. A setting is written once, in its dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import math
import textwrap
import tokenize

from qstar_mini.errors import ConfigError


def positive_int(text: str) -> int:
    """An integer >= 1 (a number of steps, lines, thoughts)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (got {text})")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0, where 0 has a documented meaning (e.g. ``--eval-every 0``: start and end only)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0 (got {text})")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate, a temperature)."""
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 (got {text})")
    return value


def finite_float(text: str) -> float:
    """Any finite number (a loss weight may be 0)."""
    return _float(text)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number (got {text!r})") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number (got {text!r})") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
    return value


def check_device(name: str | None, flag: str = "--device") -> str | None:
    """``name`` if this machine has that torch device (None: the default), else a ConfigError.

    Nothing falls back silently: ``--device cuda`` on a machine without a GPU is refused
    rather than run on the CPU.
    """
    if name is None:
        return None
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{flag} {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {name}: no CUDA GPU is available here; use --device cpu (or leave it out)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"{flag} {name}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise ConfigError(f"{flag} {name}: only cpu, cuda and mps are supported")
    return name


# ============================================================================ flags from a dataclass

def field_comments(cls) -> dict[str, str]:
    """Each field's comment in ``cls``'s source: the comment on its line and the comment-only
    lines indented under it, joined. A comment at the fields' own indentation (a section
    heading such as ``# --- losses ---``) belongs to no field."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[str, list[str]] = {}
    current, field_col, line_start = None, None, True
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and line_start and tok.start[1] > 0 and field_col in (None, tok.start[1]):
            current, field_col = tok.string, tok.start[1]
            comments.setdefault(current, [])
        elif tok.type == tokenize.COMMENT and current is not None:
            if line_start and tok.start[1] <= (field_col or 0):
                current = None                                   # a section heading
            else:
                comments[current].append(tok.string.lstrip("#").strip())
        line_start = tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT)
    return {name: " ".join(text) for name, text in comments.items() if text}


def _shown(value) -> str:
    """A default as the help shows it: none, or a path inside the checkout relative to it."""
    from qstar_mini.paths import REPO_ROOT

    if value is None:
        return "none"
    text = str(value)
    return text[len(str(REPO_ROOT)) + 1:] if text.startswith(str(REPO_ROOT) + "/") else text


def add_dataclass_flags(parser, cls, *, types: dict | None = None, choices: dict | None = None,
                        defaults: dict | None = None, skip=()) -> list[str]:
    """One flag per field of the dataclass ``cls`` (``--n-true`` for ``n_true``), every one
    default None (unset: a YAML file or the dataclass decides). A bool field gives
    ``--name`` / ``--no-name``. types: argparse types by field (else int, float or str from the
    annotation); choices: allowed values by field; defaults: what the help shows as the default
    when it is not the dataclass's (e.g. a preset's); skip: fields with no flag. Fields with
    ``metadata={"cli": False}`` (Python objects) get none. Returns the field names given flags."""
    helps, types, choices, defaults = field_comments(cls), types or {}, choices or {}, defaults or {}
    names = []
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        default = defaults.get(f.name, f.default)
        text = f"{helps.get(f.name, f.name)} (default: {_shown(default)})".replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        kinds = {k.strip() for k in str(f.type).split("|")} - {"None"}
        if kinds == {"bool"}:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            kind = types.get(f.name) or {"int": int, "float": float}.get(next(iter(kinds)), str)
            parser.add_argument(flag, type=kind, choices=choices.get(f.name), default=None, help=text,
                                metavar=None if f.name in choices else f.name.upper())
        names.append(f.name)
    return names
