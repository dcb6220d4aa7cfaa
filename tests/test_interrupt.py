"""SIGTERM / Ctrl-C (SIGINT) to a real `qstar-mini train` process: it finishes the step, saves a
checkpoint, exits cleanly with 143 / 130 and says how to continue; --resume then finishes the run.

Only what needs a real process is here: a signal from outside, the process's exit status and
stderr. That a resumed run equals an uninterrupted one is tested in-process in test_train.py
(test_interrupted_then_resumed_equals_uninterrupted); here the SIGTERM run's checkpoint is resumed
once, in this process, through the same command line, to show that what the signal left is usable.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from qstar_mini import cli
from qstar_mini.paths import REPO_ROOT

STEPS = 12
# One thread: two OpenMP threads on a busy 2-core machine run many times slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def train_steps(metrics) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"kind": "train"' in line]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, sig, code):
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--steps", str(STEPS), "--batch-size", "4", "--think-where", "answer",
            "--eval-every", "0", "--eval-lines", "8", "--no-progress", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "qstar_mini", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and '"kind": "train"' in metrics.read_text()):    # the first step is done
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    stopped = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert 1 <= stopped < STEPS                       # stopped early, after a whole step
    assert train_steps(metrics) == list(range(1, stopped + 1))
    assert not list(out.glob("checkpoint.tmp*")) and not list(out.glob(".checkpoint*"))
    if sig == signal.SIGTERM:
        # the same command with --resume continues from the checkpoint to the end, no step done twice
        threads = torch.get_num_threads()
        torch.set_num_threads(1)                      # as in the process above, for the same reason
        try:
            assert cli.main([*args, "--resume"]) == 0
        finally:
            torch.set_num_threads(threads)
        assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == STEPS
        assert train_steps(metrics) == list(range(1, STEPS + 1))
