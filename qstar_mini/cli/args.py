"""Argument types and checks shared by the commands: numbers in range, devices that exist.

argparse calls a ``type=`` function on the text of a flag; raising ``ArgumentTypeError`` there
becomes the command line's one-line error (exit status 2), naming the flag. Every count flag
uses one of these, so ``--max-lines -1`` or ``--thought-temperature inf`` is refused instead
of meaning something surprising.
"""

from __future__ import annotations

import argparse
import math

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
