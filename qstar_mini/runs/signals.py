"""Stopping cleanly: the first Ctrl-C or SIGTERM ends a run after its current step, with a checkpoint.

A first reader may skip this module: it changes when a run stops, never a number.
"""

from __future__ import annotations

import signal
import threading

import torch


class StopRequest:
    """Turn the first Ctrl-C (SIGINT) or SIGTERM into a request to stop after the current step.

    The loop then saves a checkpoint (atomically) and returns; ``--resume`` continues from it.
    A second signal stops at once. Handlers are only installed in the main thread.
    """

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:                     # asked twice: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, accelerator) -> bool:
        """Was any process asked to stop? With several processes they must all stop after the
        same step (else one would wait forever for the others' gradients), so they agree here."""
        if accelerator.num_processes > 1:
            asked = torch.tensor([float(self.signal or 0)], device=accelerator.device)
            asked = int(accelerator.reduce(asked, "max").item())
            if self.signal is None and asked:
                self.signal = asked
        return self.signal is not None

