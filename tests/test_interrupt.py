"""SIGTERM / Ctrl-C during `qstar-mini train` saves a checkpoint and exits cleanly; --resume finishes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

# One thread: two OpenMP threads on a busy 2-core machine run many times slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_then_resume_finishes(tmp_path, sig, code):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "qstar_mini", "train", "--preset", "tiny", "--steps", "40", "--batch-size", "4",
            "--think-where", "answer", "--eval-every", "0", "--eval-lines", "8", "--no-progress", "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().count('"kind": "train"') >= 3:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    stopped = state["step"]
    assert 3 <= stopped < 40
    assert not list(out.glob("checkpoint.tmp*")) and not list(out.glob(".checkpoint*"))
    # the same command with --resume continues from there to the end, no step done twice
    done = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=240, env=ENV)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 40
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"kind": "train"' in line]
    assert steps == list(range(1, 41))
