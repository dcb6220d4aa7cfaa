"""The course's shared training runs: trained once, then loaded by notebooks 06, 07 and 08.

Notebooks 06 (training), 07 (evaluation) and 08 (inference) all study the same small runs.
Each run's settings live here, in :data:`COURSE_RUNS`, and nowhere else;
:func:`course_run` returns the run's checkpoint folder, training it under
``runs/course/<name>`` first when no checkpoint with these settings is there::

    from qstar_mini.runs.checkpoint import load_checkpoint
    from qstar_mini.teaching.course_runs import course_run

    ck = load_checkpoint(course_run("quiet_star"))     # trained now (seconds) or loaded

Training is deterministic (fixed seed, one CPU thread), so a notebook prints the same numbers
whether the run was trained in this kernel or loaded from an earlier one (nbval checks this
both on a fresh clone, where ``runs/`` is empty, and in a developer's tree). The global random
generators are restored after training, so the cells after a ``course_run`` call do not see
whether it trained. What a run measured while training (the held-out evaluations) is read back
by :func:`course_evals`, from the checkpoint, the same either way.

=========================  ===============================================================
run                        what it is
=========================  ===============================================================
``quiet_star``             ``data/tiny-base``, 40 steps of 16 lines, thinking before the answer
``control``                the same loop with thinking off (``think=False``)
``tier2_quiet_star``       ``data/tiny-base-noisy`` (working right a third of the time): the
                           tier-2 setting of :mod:`qstar_mini.studies.reproduce`, 80 steps, one seed
``tier2_no_policy``        the same, REINFORCE off (``policy_loss_weight=0``)
``tier2_shuffled_reward``  the same, rewards shuffled among the thoughts of a line
=========================  ===============================================================

The tier-2 runs are a short, one-seed version of ``make reproduce``'s tier 2 (300 steps, three
seeds, 8 thoughts; ``docs/results/reproduce_report.json``): 80 steps of 32 lines with 4
thoughts, about a minute for the three on a 2-core CPU.
"""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qstar_mini.config import QuietStarConfig, tiny
from qstar_mini.studies.reproduce import TIER2
from qstar_mini.paths import DATA_DIR, RUNS_DIR, TINY_BASE

COURSE_DIR = RUNS_DIR / "course"
SETTINGS_FILE = "course_run.json"       # written last: a run folder without it is retrained


@dataclass(frozen=True)
class CourseRun:
    """The settings of one shared run (everything :func:`qstar_mini.train.train` is given).

    base: the base model folder.  cfg: the config (steps, seed, ...).  think_where: "answer"
    or "all".  lines: "answer_only", or "tier2": the lines of
    :func:`qstar_mini.studies.reproduce.run_arm` (:func:`~qstar_mini.studies.reproduce.training_lines`).  shuffle_rewards: the control.
    eval_every / eval_lines: held-out evaluations on ``validation.jsonl`` during training.
    """

    base: Path
    cfg: QuietStarConfig
    think_where: str = "answer"
    lines: str = "answer_only"
    shuffle_rewards: bool = False
    eval_every: int = 5
    eval_lines: int = 100

    def to_dict(self) -> dict:
        """What :data:`SETTINGS_FILE` records; a stored run is reused only if this is equal."""
        return {"base": self.base.name, "cfg": self.cfg.to_dict(), "think_where": self.think_where,
                "lines": self.lines, "shuffle_rewards": self.shuffle_rewards,
                "eval_every": self.eval_every, "eval_lines": self.eval_lines}


_TINY = tiny(steps=40, batch_size=16, seed=0)                    # t = 7, n_true = 2, 4 thoughts
_TIER2 = TIER2.cfg.replace(steps=80, seed=0)                    # make demo's tier 2, 80 of its 300 steps


def _tier2(shuffle_rewards: bool = False, **changes) -> CourseRun:
    return CourseRun(TIER2.base, _TIER2.replace(**changes), lines="tier2", shuffle_rewards=shuffle_rewards,
                     eval_every=20, eval_lines=200)


COURSE_RUNS: dict[str, CourseRun] = {
    "quiet_star": CourseRun(TINY_BASE, _TINY),
    "control": CourseRun(TINY_BASE, _TINY.replace(think=False)),
    "tier2_quiet_star": _tier2(),
    "tier2_no_policy": _tier2(policy_loss_weight=0.0),
    "tier2_shuffled_reward": _tier2(shuffle_rewards=True),
}


def _stored(run_dir: Path, spec: CourseRun) -> bool:
    """Does ``run_dir`` hold a finished run trained with ``spec``'s settings?"""
    settings = run_dir / SETTINGS_FILE
    if not settings.exists() or not (run_dir / "checkpoint" / "trainer_state.json").exists():
        return False
    try:
        return json.loads(settings.read_text()) == spec.to_dict()
    except json.JSONDecodeError:
        return False


def _train(spec: CourseRun, run_dir: Path, progress: bool) -> None:
    """Train ``spec`` into ``run_dir`` on one CPU thread, leaving the global random generators
    and the thread count as they were."""
    from qstar_mini.train import train

    if spec.lines == "tier2":
        from qstar_mini.studies.reproduce import QUIET_STAR, training_lines

        data, lines = training_lines(QUIET_STAR, spec.base), "all"      # as experiments.run_arm
    else:
        data, lines = DATA_DIR, spec.lines
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state(), torch.get_num_threads())
    torch.set_num_threads(1)                  # one thread: the same sums, in the same order, every time
    try:
        train(spec.cfg, spec.base, data, run_dir, think_where=spec.think_where, lines=lines,
              shuffle_rewards=spec.shuffle_rewards, eval_data=DATA_DIR / "validation.jsonl",
              eval_every=spec.eval_every, eval_lines=spec.eval_lines, device="cpu", progress=progress)
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        torch.set_num_threads(saved[3])
    (run_dir / SETTINGS_FILE).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")


def course_run(name: str, *, root: Path = COURSE_DIR, retrain: bool = False, progress: bool = False) -> Path:
    """The checkpoint folder of the shared run ``name`` (a key of :data:`COURSE_RUNS`).

    Trained under ``root/name`` (on the CPU, deterministic) when that folder holds no finished run
    with the same settings, or when ``retrain``; otherwise nothing is done. Load it with
    :func:`qstar_mini.runs.checkpoint.load_checkpoint`.
    """
    if name not in COURSE_RUNS:
        raise KeyError(f"no course run {name!r}; choose one of {sorted(COURSE_RUNS)}")
    spec, run_dir = COURSE_RUNS[name], Path(root) / name
    with _waiting_lock(Path(root) / f".{name}.lock"):   # two notebooks (or test workers) at once: one trains
        if retrain or not _stored(run_dir, spec):
            (run_dir / SETTINGS_FILE).unlink(missing_ok=True)
            _train(spec, run_dir, progress)
    return run_dir / "checkpoint"


@contextmanager
def _waiting_lock(path: Path):
    """Hold an exclusive ``flock`` on ``path``, waiting for whoever holds it (it trains the same
    run: once it is done, the run is found stored and loaded). Without ``fcntl`` (Windows): no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)      # released when the file is closed
        yield


def course_evals(name: str, *, root: Path = COURSE_DIR) -> list[dict]:
    """The held-out evaluations run ``name`` made while training (``{"step", "answer_nll",
    "w_answer", "thought_correct", ...}`` at step 0, every ``eval_every`` steps and the end),
    read from its checkpoint; trains it first if needed (:func:`course_run`)."""
    state = json.loads((course_run(name, root=root) / "trainer_state.json").read_text())
    return state["evals"]
