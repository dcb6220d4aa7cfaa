"""SIGTERM / Ctrl-C (SIGINT) to a real `qstar-mini train` process: it finishes the step, saves a
checkpoint, exits cleanly with 143 / 130 and says how to continue; --resume then finishes the run.

Only what needs a real process is here: a signal from outside, the process's exit status and
stderr. The SIGTERM run's checkpoint is resumed once, in this process, through the same command
line, to show that what the signal left is usable; a Ctrl-C run resumed in a fresh process ends
bit for bit where an uninterrupted run ends (weights, optimiser state, RNG state, metrics).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qstar_mini import cli
from qstar_mini.paths import REPO_ROOT

STEPS = 12
# One thread: two OpenMP threads on a busy 2-core machine run many times slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def train_steps(metrics) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"kind": "train"' in line]


def start_training(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qstar_mini", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for_first_step(proc: subprocess.Popen, metrics) -> None:
    deadline = time.time() + 240
    while not (metrics.exists() and '"kind": "train"' in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, sig, code):
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--steps", str(STEPS), "--batch-size", "4", "--think-where", "answer",
            "--eval-every", "0", "--eval-lines", "8", "--no-progress", "--out", str(out)]
    proc = start_training(args)
    metrics = out / "metrics.jsonl"
    wait_for_first_step(proc, metrics)
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


def _tensors(ckpt) -> dict:
    """Every tensor of a checkpoint, by file and name, and the metadata of each file."""
    found = {}
    for path in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            found[path.name + ":metadata"] = f.metadata()
        found.update({f"{path.name}:{k}": v for k, v in load_file(path).items()})
    return found


def _metrics(run) -> list[dict]:
    """metrics.jsonl without the wall-clock seconds."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def test_ctrl_c_then_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path):
    """Three fresh processes: an uninterrupted run; the same run stopped by SIGINT after its first
    step; that run resumed. The two end in the same bits: every tensor (weights, meta-tokens,
    mixing head, AdamW's moments, the RNG states) equal with torch.equal, the JSON files (schedule,
    optimiser groups, trainer state) byte for byte, and the same metrics but wall-clock seconds.
    (meta_tokens.safetensors is compared by content: safetensors writes its header metadata in
    hash-map order, so its bytes may differ between two processes.)"""
    args = ["train", "--preset", "tiny", "--steps", "8", "--batch-size", "4", "--think-where", "answer",
            "--eval-every", "0", "--eval-lines", "8", "--no-progress"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    proc = start_training([*args, "--out", str(cut)])
    wait_for_first_step(proc, cut / "metrics.jsonl")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr
    assert json.loads((cut / "checkpoint" / "trainer_state.json").read_text())["step"] < 8
    for out, extra in ((cut, ["--resume"]), (whole, [])):
        done = subprocess.run([sys.executable, "-m", "qstar_mini", *args, *extra, "--out", str(out)],
                              capture_output=True, text=True, env=ENV, timeout=300)
        assert done.returncode == 0, done.stderr
    a, b = _tensors(whole / "checkpoint"), _tensors(cut / "checkpoint")
    assert a.keys() == b.keys() and any(k.startswith("optimizer") for k in a) and any(k.startswith("rng") for k in a)
    different = [k for k in a if not (torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k])]
    assert not different, different
    for name in ("optimizer.json", "scheduler.json", "trainer_state.json", "qstar_config.json", "config.json"):
        assert (whole / "checkpoint" / name).read_bytes() == (cut / "checkpoint" / name).read_bytes(), name
    assert _metrics(whole) == _metrics(cut)
