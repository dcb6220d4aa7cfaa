"""The tier-2 measuring tools: the base's visible working as the bar for the answer, thoughts
judged step by step, the long tier-2 runs (``qstar-mini reproduce long``) and the search script
outside the package (``scripts/tier2_search.py``).

The training run of ``search_row`` takes about a minute (it evaluates 500 validation lines
twice): it runs only with ``QSTAR_SLOW=1 python -m pytest tests/studies/test_reproduce.py``.
"""

import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from qstar_mini.config import tiny
from qstar_mini.data import read_jsonl
from qstar_mini import cli
from qstar_mini.errors import DataError
from qstar_mini.evaluation.token_gains import answer_only
from qstar_mini.evaluation.thought_quality import running_sum_agreement, thought_correctness, thought_sum_agreement, visible_working_accuracy
from qstar_mini.studies.reproduce import TIER2_REPRO
from qstar_mini.models.tiny import evaluate_base, load_model
from qstar_mini.paths import DATA_DIR, REPO_ROOT, TINY_BASE, TINY_BASE_NOISY
from qstar_mini.step import prepare_model

torch.set_num_threads(1)
SEARCH_SCRIPT = REPO_ROOT / "scripts" / "tier2_search.py"
_spec = importlib.util.spec_from_file_location("tier2_search", SEARCH_SCRIPT)
search = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(search)


@pytest.fixture(scope="module")
def records():
    return answer_only(read_jsonl(DATA_DIR / "test.jsonl"))[:40]


# ----------------------------------------------------------------------------- running_sum_agreement

def test_running_sum_agreement_step_by_step():
    # 31415: running sums 3 4 8 9 4
    right = running_sum_agreement("31415", "34894")
    assert right == {"all": True, "last": True, "steps": [True] * 5, "carried": [True] * 5}
    carried = running_sum_agreement("31415", "35905")       # step 2 wrong, carried forward: last wrong
    assert carried["steps"] == [True, False, False, False, False] and not carried["last"]
    assert carried["carried"] == [True, False, True, True, True]
    cancelled = running_sum_agreement("31415", "35894")     # step 2 wrong, not carried: last right
    assert cancelled["last"] and not cancelled["all"]
    assert cancelled["steps"] == [True, False, True, True, True]
    assert cancelled["carried"] == [True, False, False, True, True]
    for bad in ("3489", "348944", "34a94", ""):
        assert running_sum_agreement("31415", bad) == {"all": False, "last": False, "steps": [False] * 5,
                                                       "carried": [False] * 5}


def test_running_sum_agreement_bad_question():
    with pytest.raises(DataError):
        running_sum_agreement("3x415", "34894")


# ----------------------------------------------------------------------------- thought_sum_agreement

def test_thought_sum_agreement_matches_thought_correctness(records):
    cfg = tiny(n_thoughts=2)
    model, tok = load_model(TINY_BASE_NOISY)
    torch.manual_seed(0)
    meta, _ = prepare_model(model, tok, cfg)
    for kw in (dict(greedy=True), dict(temperature=1.0, n_samples=2)):
        judged = thought_sum_agreement(model, tok, meta, cfg, records, seed=3, **kw)
        assert judged["all_right"] == thought_correctness(model, tok, meta, cfg, records, seed=3, **kw)
        assert judged["n"] == len(records) * (1 if kw.get("greedy") else 2)
        assert judged["all_right"] <= judged["last_right"] <= 1
        assert judged["last_right_not_all"] == pytest.approx(judged["last_right"] - judged["all_right"], abs=1e-3)
        assert judged["step_right"][-1] == judged["last_right"] and len(judged["carried_right"]) == 5


# ----------------------------------------------------------------------------- visible_working_accuracy

def test_visible_working_clean_base_is_right(records):
    model, tok = load_model(TINY_BASE)                      # its working is always right
    res = visible_working_accuracy(model, tok, records, temperatures=(0.5,), seed=0)
    assert set(res["by_temperature"]) == {"0.5", "greedy"} and res["n"] == len(records)
    assert res["by_temperature"]["greedy"] == {"working_correct": 1.0, "answer_acc": 1.0}
    assert res["best"]["answer_acc"] == 1.0


def test_visible_working_greedy_agrees_with_evaluate_base(records):
    model, tok = load_model(TINY_BASE_NOISY)                # its working is often wrong
    ours = visible_working_accuracy(model, tok, records, temperatures=(), seed=0)["by_temperature"]["greedy"]
    theirs = evaluate_base(model, tok, records, seed=0)
    assert ours["working_correct"] == theirs["working_correct_greedy"]
    assert ours["answer_acc"] == theirs["answer_acc_after_greedy_working"]
    assert ours["working_correct"] < 1.0


def test_visible_working_of_a_model_with_meta_tokens_is_the_plain_models(records):
    """prepare_model adds the meta-tokens, initialised from `(` and `)`: sampled visible working
    must not write <|endofthought|> where `)` belongs (it did, half the time: 0.35 instead of
    0.74 right at T = 0.25 on the noisy base)."""
    plain, tok = load_model(TINY_BASE)
    prepared, tok2 = load_model(TINY_BASE)
    prepare_model(prepared, tok2, tiny(meta_init="first", start_init="(", end_init=")"))
    assert len(tok2) == len(tok) + 2
    a = visible_working_accuracy(plain, tok, records, temperatures=(1.0,), seed=3)["by_temperature"]
    b = visible_working_accuracy(prepared, tok2, records, temperatures=(1.0,), seed=3)["by_temperature"]
    assert a == b and a["1"]["working_correct"] == 1.0


def test_visible_working_needs_questions():
    model, tok = load_model(TINY_BASE)
    with pytest.raises(DataError, match="question"):
        visible_working_accuracy(model, tok, [{"text": "hello"}])


# ----------------------------------------------------------------------------- the search script

def test_parse_search_args():
    parse_search_args = search.parse_search_args
    got = parse_search_args(["long", "clamp_negative_rewards=False", "lr=2e-4", "mixing=hidden",
                             "--seed", "2", "--steps", "900", "--think-where", "all", "--shuffle-rewards",
                             "--lines", "answer_only+base_working"])
    assert got == {"name": "long", "seed": 2, "steps": 900, "think_where": "all", "shuffle_rewards": True,
                   "lines": "answer_only+base_working",
                   "changes": {"clamp_negative_rewards": False, "lr": 2e-4, "mixing": "hidden"}}
    with pytest.raises(SystemExit, match="unknown config field"):
        parse_search_args(["x", "n_thought=4"])
    with pytest.raises(SystemExit, match="usage"):
        parse_search_args([])
    with pytest.raises(SystemExit, match="field=value"):
        parse_search_args(["x", "lr"])
    with pytest.raises(SystemExit, match="needs a value"):
        parse_search_args(["x", "--steps"])


@pytest.mark.skipif(os.environ.get("QSTAR_SLOW") != "1", reason="about a minute; set QSTAR_SLOW=1")
def test_search_row_writes_a_row(tmp_path):
    tier = dataclasses.replace(TIER2_REPRO, eval_lines=8, cfg=TIER2_REPRO.cfg.replace(batch_size=4, n_thoughts=2))
    row = search.search_row("t", {"lr": 2e-4}, seed=0, steps=1, tier=tier, out_dir=tmp_path)
    saved = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert saved == [row]
    assert row["changes"] == {"lr": 2e-4} and row["steps"] == 1 and row["n_thoughts"] == 2
    assert row["shuffle_rewards"] is False
    assert [c["step"] for c in row["curve"]] == [0, 1]
    assert 0 <= row["thought_correct"] <= 1 and 0 <= row["answer_acc_greedy"] <= 1
    assert row["command"] == "python scripts/tier2_search.py t lr=0.0002 --seed 0 --steps 1"


def test_the_search_script_runs_as_a_script_outside_the_package():
    """`python scripts/tier2_search.py ...` from any folder: the usage, and a bad field named, exit 1."""
    for argv, words in (([], "usage: python scripts/tier2_search.py NAME"),
                        (["x", "n_thought=4"], "unknown config field(s) ['n_thought']")):
        done = subprocess.run([sys.executable, str(SEARCH_SCRIPT), *argv], capture_output=True, text=True,
                              cwd=REPO_ROOT / "docs", timeout=300)
        assert done.returncode == 1 and words in done.stderr, done.stderr[-2000:]
    assert not hasattr(search, "plot_search_curves")           # nothing called it: not carried over


def test_reward_audit_splits_the_reward(records):
    reward_audit = search.reward_audit
    cfg = tiny(n_thoughts=4)
    model, tok = load_model(TINY_BASE_NOISY)
    torch.manual_seed(0)
    meta, head = prepare_model(model, tok, cfg)
    res = reward_audit(model, tok, meta, head, cfg, records[:16], seed=0, batch_size=8)
    assert res["n_lines"] == 16 and res["n_thoughts"] == 4
    kinds = ("all_right", "last_right_not_all", "last_wrong")
    assert set(res["thoughts"]) == set(kinds) == set(res["positive_reward_share"])
    assert sum(res["thoughts"].values()) == pytest.approx(1.0, abs=1e-3)
    assert sum(res["positive_reward_share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert all(0 <= v <= 1 for v in res["positive_reward_share"].values())    # the clamped reward only
    assert 0 <= res["groups_all_wrong_paid"] <= 1
    # the same thoughts as thought_sum_agreement would judge: the base's are right about a third of the time
    assert 0.1 < res["thoughts"]["all_right"] < 0.7
    with pytest.raises(ValueError, match="answer-only"):
        reward_audit(model, tok, meta, head, cfg, [r | {"has_working": True} for r in records[:2]])


# ----------------------------------------------------------------------------- the long runs' 3-seed table

def _fake_long_pieces(out, seeds=(0, 1, 2)):
    """Pieces as run_long_part writes them, with made-up figures (known means) and 2-point curves."""
    from qstar_mini.studies.reproduce import TIER2_LONG

    base = {"thought_correct_by_temperature": {"0.25": 0.7, "1": 0.3, "greedy": 0.77},
            "visible_working_by_temperature": {k: {"working_correct": 0.5, "answer_acc": 0.8}
                                               for k in ("0.25", "1", "greedy")}}
    (out / "base.json").write_text(json.dumps({"part": "base", "seed": 0, "result": base}))
    for i, arm in enumerate(TIER2_LONG.arms):
        for s in seeds:
            r = {"thought_correct": 0.1 * i + 0.01 * s, "thought_correct_greedy": 0.5, "answer_acc": 0.6,
                 "answer_acc_greedy": None if arm.name == "no_policy" else 0.7, "steps": 900, "seconds": 10.0,
                 "evals": [{"step": 0, "thought_correct": 0.3, "thought_correct_greedy": 0.7, "answer_acc": 0.1},
                           {"step": 900, "thought_correct": 0.4 + s / 100, "thought_correct_greedy": 0.8,
                            "answer_acc": 0.5}]}
            (out / f"{arm.name}-seed{s}.json").write_text(json.dumps({"part": arm.name, "seed": s, "result": r}))


def test_long_merge_averages_the_seeds_and_renders_the_readme_table(tmp_path):
    from qstar_mini.studies.reproduce import format_long_table, merge_long, plot_long

    _fake_long_pieces(tmp_path)
    report = merge_long(tmp_path)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    shuffled = report["arms"]["shuffled_reward"]["thought_correct"]            # 0.20, 0.21, 0.22
    assert shuffled["mean"] == pytest.approx(0.21) and shuffled["std"] == pytest.approx(0.01)
    assert shuffled["per_seed"] == pytest.approx([0.2, 0.21, 0.22])
    assert [len(c) for c in report["arms"]["quiet_star"]["curves"]] == [2, 2, 2]
    table = format_long_table(report)
    assert "| hidden thought after `=`: all running sums right | 0.700 | 0.300 | 0.770 |" in table
    assert "| visible working, then its answer: answer right | 0.800 | 0.800 | 0.800 |" in table
    assert "0.210 ± 0.010 (0.200, 0.210, 0.220)" in table
    no_policy = next(line for line in table.splitlines() if line.startswith("| control: policy loss off"))
    assert no_policy.endswith("| - |")                                          # no figure: a dash, not 0
    assert plot_long(report, tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 1000


def test_long_merge_names_a_missing_piece(tmp_path):
    from qstar_mini.studies.reproduce import merge_long

    _fake_long_pieces(tmp_path)
    (tmp_path / "shuffled_reward-seed1.json").unlink()
    with pytest.raises(DataError, match=r"1 piece\(s\) missing .*shuffled_reward-seed1.json.*reproduce long PART"):
        merge_long(tmp_path)


def test_qstar_mini_reproduce_long_merge(tmp_path, capsys):
    """`qstar-mini reproduce long --merge --out DIR`: report.json written, README's table printed, the
    curves drawn; a missing piece is one line, exit status 2."""
    from qstar_mini.studies.reproduce import format_long_table

    _fake_long_pieces(tmp_path)
    assert cli.main(["reproduce", "long", "--merge", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert out.startswith(format_long_table(report) + "\n")
    assert (tmp_path / "tier2_long_thought_correct.png").stat().st_size > 1000
    assert report["command"].startswith("qstar-mini reproduce long PART --seed N")
    (tmp_path / "base.json").unlink()
    assert cli.main(["reproduce", "long", "--merge", "--out", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("qstar-mini: error: long --merge: 1 piece(s) missing") and "base.json" in line


def test_qstar_mini_reproduce_actions_call_the_study(tmp_path, monkeypatch, capsys):
    """Each action runs its study function with --out and --seed (the functions are stubbed: each
    trains for minutes; the long pieces' own code runs in the test above)."""
    from qstar_mini.studies import reproduce

    calls = []

    def stub(name):
        @functools.wraps(getattr(reproduce, name))            # the parser reads the defaults from the signature
        def record(*args, **kwargs):
            calls.append((name, args, kwargs))
            return {}
        return record

    for name in ("run_demo_pipeline", "run_reproduction", "run_ablations", "run_differences", "run_long_part"):
        monkeypatch.setattr(reproduce, name, stub(name))
    out = str(tmp_path / "o")
    for argv in (["demo", "--out", out], ["reproduce", "--out", out], ["ablations", "--out", out, "--seed", "3"],
                 ["differences", "--out", out], ["long", "no_policy", "--seed", "2", "--out", out]):
        assert cli.main(["reproduce", *argv]) == 0, capsys.readouterr().err
    o = tmp_path / "o"
    assert calls == [("run_demo_pipeline", (), {"out_dir": o}), ("run_reproduction", (), {"out_dir": o}),
                     ("run_ablations", (o, 3), {}), ("run_differences", (o, 0), {}),
                     ("run_long_part", ("no_policy", 2, o), {})]


def test_reproduction_page_long_table_is_the_committed_report_rendered():
    """docs/reproduction.md's table of the long tier-2 runs is made from
    docs/results/tier2_long_report.json by format_long_table (``qstar-mini reproduce long --merge``
    prints it), not typed."""
    from qstar_mini.studies.reproduce import TIER2_LONG, format_long_table
    from qstar_mini.paths import REPO_ROOT

    report = json.loads((REPO_ROOT / "docs/results/tier2_long_report.json").read_text())
    page = (REPO_ROOT / "docs" / "reproduction.md").read_text()
    start, end = "<!-- tier2-long: start -->\n", "\n<!-- tier2-long: end -->"
    assert start in page and end in page
    assert page.split(start, 1)[1].split(end, 1)[0] == format_long_table(report)
    assert report["seeds"] == [0, 1, 2] and set(report["arms"]) == {arm.name for arm in TIER2_LONG.arms}
    assert report["config"] == TIER2_LONG.cfg.to_dict()
