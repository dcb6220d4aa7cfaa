"""The run folder: one training run's files, kept safe from the accidents that lose work.

A run folder (``--out``, default ``runs/<name>``) holds ``metrics.jsonl`` and ``checkpoint/``.
:func:`open_run` prepares it before any training starts and refuses, with one line naming
the problem and the way out, everything that would lose or mislabel work:

- an ``--out`` that cannot be written (a file, a read-only mount, a folder under a file):
  found before the model is loaded, not at the final save;
- a second run writing to the same folder at the same time (a lock held while training);
- a new run into a folder that already holds one, unless ``overwrite`` (``--overwrite``);
- ``resume`` with nothing to resume, or with settings that differ from those the run was
  started with (each difference is named); a larger ``steps`` extends a finished run.

It also repairs what a killed save leaves behind (see :func:`qstar_mini.files.write_dir_atomic`):
a complete previous checkpoint moved aside (``.checkpoint.old-PID``) is put back when the
checkpoint itself is missing, and temporary folders of dead processes are removed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qstar_mini.errors import CheckpointError, ConfigError
from qstar_mini.files import write_file_atomic

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"
LOCK_FILE = ".qstar-run.lock"

# Settings recorded in trainer_state.json that a resumed run must share with the original.
# (``steps`` may grow: that extends a run; the QuietStarConfig is compared field by field.)
RESUME_KEYS = ("model", "data", "text_field", "max_lines", "think_where", "lines", "shuffle_rewards")


def check_writable(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create the folder ``path`` (and its parents) and prove a file can be written in it.

    Raises a one-line ConfigError (``flag`` names the option) when that is impossible:
    ``path`` is a file, lies under a file, is on a read-only mount or is not ours to write.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: exists and is not a folder; choose another path")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder; choose another path")
    probe = path / f".qstar-write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write there ({e.strerror or e}); choose another path") from None
    return path


def check_file_writable(path: str | os.PathLike, flag: str) -> Path:
    """An output *file* (``--json``) that can be written, checked before the work that fills it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; give a file name")
    check_writable(path.parent if str(path.parent) else Path("."), flag)
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write there ({e.strerror or e}); choose another path") from None
    if not existed:
        path.unlink()
    return path


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_checkpoint(ckpt_dir: str | os.PathLike) -> list[str]:
    """Repair what a save killed halfway leaves next to ``ckpt_dir``; returns what was done.

    Call it only while holding the run's lock (no save of ours is then in progress).
    ``.NAME.old-PID``: the complete previous checkpoint, moved aside just before the new one
    was to take its place; put back if ``ckpt_dir`` is missing, else deleted.
    ``.NAME.*.tmp``: a half-written new checkpoint; deleted.
    """
    ckpt_dir = Path(ckpt_dir)
    parent, name, done = ckpt_dir.parent, ckpt_dir.name, []
    if not parent.is_dir():
        return done
    for old in sorted(parent.glob(f".{name}.old-*")):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _pid_alive(int(pid)) and int(pid) != os.getpid():
            continue
        if not ckpt_dir.exists() and old.is_dir():
            os.replace(old, ckpt_dir)
            done.append(f"restored the previous checkpoint from {old.name} (a save had been interrupted)")
        else:
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"removed {old.name}")
    for tmp in sorted(parent.glob(f".{name}.*.tmp")):
        shutil.rmtree(tmp, ignore_errors=True)
        done.append(f"removed the half-written {tmp.name}")
    return done


class RunLock:
    """An exclusive lock on a run folder, held while a run writes there.

    A second run on the same folder gets a one-line ConfigError instead of interleaving its
    metrics with the first. The lock is an ``flock`` on ``LOCK_FILE``: the kernel releases it
    when the process dies, so a killed run never leaves the folder locked.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LOCK_FILE
        self._file = None

    def __enter__(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:                       # Windows: no flock; run unlocked
            return self
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            self._file = None
            raise ConfigError(f"--out {self.path.parent} is in use by a running training ({holder}); "
                              f"wait for it to finish or choose another --out") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()}\n")
        self._file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()                    # closing releases the flock
            self._file = None


def _read_state(ckpt_dir: Path) -> dict:
    import json

    try:
        state = json.loads((ckpt_dir / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt_dir / STATE_FILE} cannot be read ({type(e).__name__}); "
                              f"the checkpoint is corrupt: train again without --resume") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
        raise CheckpointError(f"{ckpt_dir / STATE_FILE} has no valid 'step'; the checkpoint is corrupt: "
                              f"train again without --resume")
    return state


def resume_differences(recorded: dict, settings: dict) -> list[str]:
    """The run settings (RESUME_KEYS) that differ between a checkpoint and this command.

    A key the checkpoint did not record (an older checkpoint) is not compared.
    """
    return [f"{key} {recorded[key]!r} -> {settings[key]!r}" for key in RESUME_KEYS
            if key in recorded and key in settings and recorded[key] != settings[key]]


def holds_a_run(out_dir: Path) -> bool:
    """Whether ``out_dir`` already holds a run's files (metrics or a checkpoint)."""
    return (out_dir / METRICS_FILE).exists() or (out_dir / CHECKPOINT_DIR).exists()


@contextmanager
def open_run(out_dir: str | os.PathLike, settings: dict, *, resume: bool, overwrite: bool):
    """Prepare ``out_dir`` for a run and hold its lock while the block trains; yields the
    trainer state to resume from (a dict with "step", ...) or None for a fresh run.

    settings: this command's values of RESUME_KEYS (plain JSON values).
    resume:   continue the checkpoint there (refused if there is none, or it differs).
    overwrite: allow a new run where one is; the caller deletes it with :func:`clear_run`
              when the new run starts writing.
    """
    created = not Path(out_dir).exists()
    out_dir = check_writable(out_dir)
    try:
        with RunLock(out_dir):
            yield _check_run_dir(out_dir, settings, resume=resume, overwrite=overwrite)
    except BaseException:
        if created and {p.name for p in out_dir.iterdir()} <= {LOCK_FILE}:
            shutil.rmtree(out_dir, ignore_errors=True)     # a run refused before it wrote: no trace
        raise


def _check_run_dir(out_dir: Path, settings: dict, *, resume: bool, overwrite: bool) -> dict | None:
    """open_run's repairs and checks, made while holding the lock; the state to resume or None."""
    ckpt_dir = out_dir / CHECKPOINT_DIR
    for line in recover_checkpoint(ckpt_dir):
        print(f"qstar-mini: {out_dir}: {line}", file=sys.stderr)
    if not resume:
        if holds_a_run(out_dir) and not overwrite:
            raise ConfigError(f"--out {out_dir} already holds a run; add --resume to continue it, "
                              f"--overwrite to replace it, or choose another --out")
        return None
    if not (ckpt_dir / STATE_FILE).exists():
        raise CheckpointError(f"--resume: nothing to resume in {out_dir} (no {CHECKPOINT_DIR}/{STATE_FILE}); "
                              f"check --out, or drop --resume to start a new run")
    state = _read_state(ckpt_dir)
    changed = resume_differences(state, settings)
    if changed:
        raise ConfigError(f"--resume: {ckpt_dir} was trained with other settings ({'; '.join(changed)}); "
                          f"use the original ones, or a new --out")
    return state


def clear_run(out_dir: str | os.PathLike) -> None:
    """Delete the run in ``out_dir`` (metrics and checkpoint) that ``overwrite`` replaces: called
    once the new run has loaded its data and model, so a new run that fails to start loses nothing."""
    out_dir = Path(out_dir)
    (out_dir / METRICS_FILE).unlink(missing_ok=True)
    shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)


# ============================================================================ the folder of a run in progress

@dataclass
class RunFolder:
    """Where a run writes; every path is None for a run without files (``out_dir=None``).

    out_dir: the run folder.  checkpoint: ``out_dir/checkpoint``.  metrics: ``out_dir/metrics.jsonl``.
    resuming: ``resume`` was asked and the checkpoint holds a training state to continue from.
    """

    out_dir: Path | None
    checkpoint: Path | None
    metrics: Path | None
    resuming: bool


def run_settings(opts) -> dict:
    """What ``trainer_state.json`` records of a run (its :class:`~qstar_mini.train.TrainOptions`)
    and a resumed run must share (:data:`RESUME_KEYS`): local paths made absolute, so that
    ``data`` and ``./data`` are the same; records passed in memory are not recorded."""
    def name(value):
        if isinstance(value, (str, os.PathLike)):
            return str(Path(value).resolve()) if Path(value).exists() else os.fspath(value)
        return None
    return {"model": name(opts.model), "data": name(opts.data), "text_field": opts.text_field,
            "max_lines": opts.max_lines, "think_where": opts.think_where, "lines": opts.lines,
            "shuffle_rewards": bool(opts.shuffle_rewards)}


@contextmanager
def prepare_run_folder(out_dir, settings: dict, *, resume: bool, overwrite: bool):
    """The one place :func:`qstar_mini.train.train` opens its run folder, before the data and the model are
    loaded: :func:`open_run` checks it can be written, locks it, repairs an
    interrupted save and refuses to overwrite or wrongly resume a run (main process only;
    the others only read). Yields the :class:`RunFolder`."""
    if out_dir is None:
        if resume:
            raise ConfigError("resume=True needs an out_dir holding the run to continue")
        yield RunFolder(None, None, None, False)
        return
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    if int(os.environ.get("RANK", "0")) != 0:               # other processes of a distributed run
        yield RunFolder(out_dir, ckpt_dir, out_dir / METRICS_FILE, bool(resume))
        return
    with open_run(out_dir, settings, resume=resume, overwrite=overwrite) as state:
        yield RunFolder(out_dir, ckpt_dir, out_dir / METRICS_FILE, state is not None)


def start_metrics(run_dir: RunFolder, start_step: int) -> None:
    """Create the run folder; a new run starts ``metrics.jsonl`` afresh, a resumed one keeps the
    lines up to its checkpoint's step."""
    if run_dir.metrics is None:
        return
    run_dir.out_dir.mkdir(parents=True, exist_ok=True)
    if run_dir.resuming:
        _truncate_metrics(run_dir.metrics, start_step)
    else:
        clear_run(run_dir.out_dir)         # the run overwrite replaces, kept until this one started


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the lines of steps <= last_step (a resumed run rewrites what came after); a line
    that is no JSON object (cut short by a full disk or a kill) goes too."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            keep.append(line)
    write_file_atomic(path, "".join(line + "\n" for line in keep).encode())

