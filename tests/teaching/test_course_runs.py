"""The course's shared runs (qstar_mini.teaching.course_runs): trained once, then loaded, with
the same numbers either way (what lets notebooks 06-08 print the same outputs on a fresh clone
and in a tree that already holds runs/course). Two-step runs on the shipped tiny base; seconds."""

import json
import random

import pytest
import torch

from qstar_mini.runs.checkpoint import load_checkpoint
from qstar_mini.config import tiny
from qstar_mini.paths import TINY_BASE
from qstar_mini.teaching import course_runs
from qstar_mini.teaching.course_runs import COURSE_RUNS, SETTINGS_FILE, CourseRun, course_evals, course_run

SMALL = CourseRun(TINY_BASE, tiny(steps=2, batch_size=4, n_thoughts=2, warmup_steps=1, seed=0),
                  eval_every=1, eval_lines=8)


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setitem(COURSE_RUNS, "small", SMALL)
    return "small"


def _weights(checkpoint):
    ck = load_checkpoint(checkpoint)
    return {k: v.clone() for k, v in ck.model.state_dict().items()}, ck.head.state_dict(), ck.meta.stored.detach()


def test_trains_once_then_loads_with_the_same_numbers(small, tmp_path, monkeypatch):
    path = course_run(small, root=tmp_path)
    assert path == tmp_path / small / "checkpoint" and (tmp_path / small / SETTINGS_FILE).exists()
    evals = course_evals(small, root=tmp_path)
    assert [e["step"] for e in evals] == [0, 1, 2]
    first = _weights(path)

    def no_training(*args, **kwargs):
        raise AssertionError("a stored run with the same settings must be loaded, not trained")

    monkeypatch.setattr(course_runs, "_train", no_training)
    assert course_run(small, root=tmp_path) == path                 # loaded: no training
    assert course_evals(small, root=tmp_path) == evals
    again = _weights(path)
    assert all(torch.equal(first[0][k], again[0][k]) for k in first[0])


def test_training_is_deterministic_and_leaves_the_global_generators_alone(small, tmp_path):
    """A run trained afresh equals the stored one, and the caller's random state is untouched:
    what a notebook prints after course_run cannot tell whether it trained."""
    torch.manual_seed(123)
    random.seed(123)
    threads = torch.get_num_threads()
    before = (torch.get_rng_state(), random.getstate())
    path = course_run(small, root=tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert torch.get_num_threads() == threads
    a = _weights(path)
    b = _weights(course_run(small, root=tmp_path / "b"))
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1]) and torch.equal(a[2], b[2])
    assert course_evals(small, root=tmp_path / "a") == course_evals(small, root=tmp_path / "b")


def test_changed_settings_or_an_unfinished_run_are_trained_again(small, tmp_path, monkeypatch):
    course_run(small, root=tmp_path)
    settings = tmp_path / small / SETTINGS_FILE
    trained = []
    monkeypatch.setattr(course_runs, "_train", lambda spec, run_dir, progress: trained.append(spec.cfg.steps))
    stored = json.loads(settings.read_text())
    settings.write_text(json.dumps({**stored, "eval_lines": 9}))      # other settings: retrain
    course_run(small, root=tmp_path)
    assert trained == [2]
    course_run(small, root=tmp_path)                                  # settings file gone: retrain
    assert trained == [2, 2]
    with pytest.raises(KeyError, match="no course run"):
        course_run("nonexistent", root=tmp_path)


def test_the_course_runs_share_one_setting_each():
    """06, 07 and 08 study the same run; the tier-2 runs are make demo's tier 2, shorter."""
    from qstar_mini.studies.reproduce import TIER2

    assert COURSE_RUNS["control"].cfg == COURSE_RUNS["quiet_star"].cfg.replace(think=False)
    tier2 = {k: v for k, v in COURSE_RUNS.items() if k.startswith("tier2")}
    assert {v.base for v in tier2.values()} == {TIER2.base}
    assert COURSE_RUNS["tier2_quiet_star"].cfg == TIER2.cfg.replace(steps=80, seed=0)
    assert COURSE_RUNS["tier2_no_policy"].cfg.policy_loss_weight == 0
    assert COURSE_RUNS["tier2_shuffled_reward"].shuffle_rewards


def test_two_callers_at_once_train_the_run_once(small, tmp_path, monkeypatch):
    """Notebooks 06-08 open side by side (or pytest workers) ask for the same run together: the
    second waits for the first one's training and then loads it, instead of training it again
    or being refused by the run folder's lock."""
    import threading
    import time

    real_train, trained = course_runs._train, []

    def slow_train(spec, run_dir, progress):
        trained.append(run_dir)
        time.sleep(0.5)                        # both callers are inside course_run by now
        real_train(spec, run_dir, progress)

    monkeypatch.setattr(course_runs, "_train", slow_train)
    paths, errors = [], []

    def ask():
        try:
            paths.append(course_run(small, root=tmp_path))
        except Exception as error:             # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(trained) == 1
    assert paths == [tmp_path / small / "checkpoint"] * 2
