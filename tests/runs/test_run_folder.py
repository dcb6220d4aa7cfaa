"""The run folder's safety rules (qstar_mini.runs.folder): locks, overwrite, resume checks, recovery."""

import json
import multiprocessing as mp
import os

import pytest

from qstar_mini.errors import CheckpointError, ConfigError
from qstar_mini.runs.folder import (CHECKPOINT_DIR, METRICS_FILE, STATE_FILE, RunLock, check_file_writable,
                             check_writable, clear_run, open_run, recover_checkpoint)

SETTINGS = {"model": "data/tiny-base", "data": "data", "think_where": "all", "lines": "answer_only",
            "shuffle_rewards": False, "text_field": "text", "max_lines": None}


def _finished_run(out, step=4, **recorded):
    ckpt = out / CHECKPOINT_DIR
    ckpt.mkdir(parents=True)
    (ckpt / STATE_FILE).write_text(json.dumps({"step": step, **SETTINGS, **recorded}))
    (out / METRICS_FILE).write_text('{"step": 1}\n')
    return ckpt


def test_a_new_run_into_a_used_folder_is_refused_and_nothing_is_deleted(tmp_path):
    ckpt = _finished_run(tmp_path)
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*--overwrite"):
        with open_run(tmp_path, SETTINGS, resume=False, overwrite=False):
            pass
    assert (tmp_path / METRICS_FILE).read_text() == '{"step": 1}\n' and (ckpt / STATE_FILE).exists()


def test_overwrite_lets_a_new_run_in_and_clear_run_deletes_the_old_one(tmp_path):
    _finished_run(tmp_path)
    with open_run(tmp_path, SETTINGS, resume=False, overwrite=True) as state:
        assert state is None
        assert (tmp_path / METRICS_FILE).exists()          # kept until the new run starts writing
        clear_run(tmp_path)
    assert not (tmp_path / METRICS_FILE).exists() and not (tmp_path / CHECKPOINT_DIR).exists()


def test_resume_with_nothing_to_resume_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        with open_run(tmp_path / "typo", SETTINGS, resume=True, overwrite=False):
            pass


def test_resume_names_every_setting_that_differs(tmp_path):
    _finished_run(tmp_path)
    other = dict(SETTINGS, model="data/tiny-base-noisy", think_where="answer")
    with pytest.raises(ConfigError, match="model 'data/tiny-base' -> 'data/tiny-base-noisy'; think_where"):
        with open_run(tmp_path, other, resume=True, overwrite=False):
            pass
    with open_run(tmp_path, SETTINGS, resume=True, overwrite=False) as state:
        assert state["step"] == 4


def test_resume_refuses_a_state_without_a_valid_step(tmp_path):
    ckpt = _finished_run(tmp_path)
    for bad in ({}, {"step": "3"}, [1, 2], {"step": -1}):
        (ckpt / STATE_FILE).write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match="step"):
            with open_run(tmp_path, SETTINGS, resume=True, overwrite=False):
                pass


def test_an_interrupted_save_is_repaired(tmp_path):
    # killed between the two renames: the complete old checkpoint sits in .checkpoint.old-PID
    ckpt = _finished_run(tmp_path)
    dead_pid = 2 ** 22 + 12345                      # above pid_max's default: no such process
    os.replace(ckpt, tmp_path / f".{CHECKPOINT_DIR}.old-{dead_pid}")
    (tmp_path / f".{CHECKPOINT_DIR}.abc.tmp").mkdir()
    with open_run(tmp_path, SETTINGS, resume=True, overwrite=False) as state:
        assert state["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT_DIR, METRICS_FILE, ".qstar-run.lock"])


def test_leftovers_are_removed_when_the_checkpoint_is_there(tmp_path):
    _finished_run(tmp_path)
    (tmp_path / f".{CHECKPOINT_DIR}.old-{2 ** 22 + 1}").mkdir()
    (tmp_path / f".{CHECKPOINT_DIR}.x1.tmp").mkdir()
    done = recover_checkpoint(tmp_path / CHECKPOINT_DIR)
    assert len(done) == 2 and not list(tmp_path.glob(".checkpoint.*"))


def _hold_lock(path, ready, release):
    with RunLock(path):
        ready.set()
        release.wait(30)


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_holds_it(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(ConfigError, match=f"in use by a running training \\(pid {holder.pid}\\)"):
            with open_run(tmp_path, SETTINGS, resume=False, overwrite=False):
                pass
    finally:
        release.set()
        holder.join(30)
    with open_run(tmp_path, SETTINGS, resume=False, overwrite=False):   # free again once it ended
        pass


@pytest.mark.parametrize("where", ["file", "under_file", "proc"])
def test_unwritable_outputs_are_refused_before_any_work(tmp_path, where):
    target = {"file": tmp_path / "f", "under_file": tmp_path / "f" / "run", "proc": "/proc/qstar"}[where]
    (tmp_path / "f").write_text("keep")
    with pytest.raises(ConfigError, match="--out"):
        check_writable(target)
    assert (tmp_path / "f").read_text() == "keep"


def test_a_read_only_folder_is_refused(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes through read-only permissions")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="cannot write"):
            check_writable(ro / "run")
    finally:
        ro.chmod(0o700)


def test_an_output_file_is_checked_without_touching_an_existing_one(tmp_path):
    existing = tmp_path / "r.json"
    existing.write_text("old")
    assert check_file_writable(existing, "--json") == existing and existing.read_text() == "old"
    check_file_writable(tmp_path / "new.json", "--json")
    assert not (tmp_path / "new.json").exists()
    with pytest.raises(ConfigError, match="--json .* is a folder"):
        check_file_writable(tmp_path, "--json")
    with pytest.raises(ConfigError, match="--json"):
        check_file_writable("/proc/qstar.json", "--json")
