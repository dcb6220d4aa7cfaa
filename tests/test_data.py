"""The synthetic corpus: deterministic, correct, and loud about bad input."""

import json
import re

import pytest

from qstar_mini.data import (GSM_SPLIT, TASKS, WORK_CLOSE, WORK_OPEN, CorpusConfig, answer_index,
                             make_splits, gsm_final_answer, load_split, make_record, read_jsonl,
                             split_prompt, working_is_correct, write_corpus, wrong_steps)
from qstar_mini.errors import DataError
from qstar_mini.paths import DATA_DIR

SMALL = dict(n_train=300, n_valid=40, n_test=41, n_gsm=30)
FILES = ["train.jsonl", "validation.jsonl", "test.jsonl", "gsm8k_format.jsonl", "corpus_config.json"]


def _running_sums(question):
    out, total = "", 0
    for ch in question:
        total += int(ch)
        out += str(total % 10)
    return out


# ----------------------------------------------------------------------------- determinism

def test_regeneration_is_byte_identical(tmp_path):
    cfg = CorpusConfig(working_error=0.2, **SMALL)
    a = write_corpus(tmp_path / "a", cfg)
    b = write_corpus(tmp_path / "b", CorpusConfig(working_error=0.2, **SMALL))
    assert sorted(p.name for p in a.values()) == sorted(FILES)
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes(), key
    # and a different seed gives a different corpus (so the comparison above can fail)
    c = write_corpus(tmp_path / "c", CorpusConfig(working_error=0.2, seed=1, **SMALL))
    assert c["train"].read_bytes() != a["train"].read_bytes()
    # newlines are "\n" only, config has sorted keys and round-trips
    assert b"\r" not in a["train"].read_bytes()
    cfg_json = json.loads(a["config"].read_text())
    assert list(cfg_json) == sorted(cfg_json)
    assert CorpusConfig.from_dict(cfg_json) == cfg


def test_shipped_data_equals_a_regeneration(tmp_path):
    """Fails if someone edits data/*.jsonl by hand (or changes the generator without regenerating)."""
    shipped_cfg = json.loads((DATA_DIR / "corpus_config.json").read_text())
    assert CorpusConfig.from_dict(shipped_cfg) == CorpusConfig(), "data/ must hold the default corpus"
    fresh = write_corpus(tmp_path, CorpusConfig())
    for path in fresh.values():
        assert (DATA_DIR / path.name).read_bytes() == path.read_bytes(), f"data/{path.name} differs"


# ----------------------------------------------------------------------------- content

@pytest.mark.parametrize("task", sorted(TASKS))
def test_working_and_answers_are_right_without_errors(task):
    splits = make_splits(CorpusConfig(task=task, **SMALL))
    n_digits = TASKS[task].n_digits
    for name in ("train", "validation", "test"):
        for r in splits[name]:
            q = r["question"]
            assert len(q) == n_digits and q.isdigit()
            assert r["answer"] == str(sum(map(int, q)) % 10)
            if r["has_working"]:
                assert r["working"] == _running_sums(q)
                assert r["working_correct"] is True
                assert r["text"] == f"{q}={WORK_OPEN}{r['working']}{WORK_CLOSE}{r['answer']}"
            else:
                assert r["working"] is None and r["working_correct"] is None
                assert r["text"] == f"{q}={r['answer']}"
            assert r["text"][answer_index(r["text"])] == r["answer"]


def test_fraction_of_wrong_steps_is_about_working_error():
    cfg = CorpusConfig(n_train=6000, n_valid=10, n_test=10, n_gsm=1, working_error=0.2, frac_working=1.0)
    train = make_splits(cfg)["train"]
    steps = [w for r in train for w in wrong_steps(r["question"], r["working"])]
    assert len(steps) == 6000 * 5
    assert abs(sum(steps) / len(steps) - 0.2) < 0.01
    # mistakes are carried forward: a line is correct iff none of its steps was wrong (up to a
    # rare coincidence where two mistakes cancel), and the answer after ")" is always the true one
    for r in train:
        assert r["answer"] == str(sum(map(int, r["question"])) % 10)
        assert r["working_correct"] == working_is_correct(r["question"], r["working"])
        if not any(wrong_steps(r["question"], r["working"])):
            assert r["working_correct"]
    frac_correct = sum(r["working_correct"] for r in train) / len(train)
    assert 0.8 ** 5 - 0.02 < frac_correct < 0.8 ** 5 + 0.05   # + the rare cancellations
    # validation and test working is never corrupted
    assert all(r["working_correct"] for r in make_splits(cfg)["test"] if r["has_working"])


def test_frac_working_and_answer_only_lines_in_test():
    splits = make_splits(CorpusConfig(frac_working=1.0, **SMALL))
    assert all(r["has_working"] for r in splits["train"])
    for name, n in (("validation", 40), ("test", 41)):
        with_w = sum(r["has_working"] for r in splits[name])
        assert with_w == n // 2                       # half with working, whatever frac_working
        assert n - with_w >= 1                        # answer-only held-out lines exist
    splits = make_splits(CorpusConfig(frac_working=0.25, **SMALL))
    assert sum(r["has_working"] for r in splits["train"]) == 75


def test_eval_questions_are_held_out_from_train():
    splits = make_splits(CorpusConfig(n_train=5000, n_valid=300, n_test=300, n_gsm=1))
    train_q = {r["question"] for r in splits["train"]}
    test_q = [r["question"] for r in splits["test"]]
    valid_q = [r["question"] for r in splits["validation"]]
    assert not train_q & set(test_q) and not train_q & set(valid_q)
    assert len(set(test_q) | set(valid_q)) == 600


def test_working_error_does_not_change_questions_or_test():
    clean = make_splits(CorpusConfig(**SMALL))
    noisy = make_splits(CorpusConfig(working_error=0.5, **SMALL))
    assert clean["test"] == noisy["test"]
    assert [r["question"] for r in clean["train"]] == [r["question"] for r in noisy["train"]]
    assert clean["train"] != noisy["train"]


def test_line_helpers():
    assert answer_index("31415=(34894)4") == 13
    assert answer_index("31415=4") == 6
    assert split_prompt("31415=(34894)4") == "31415="
    assert working_is_correct("31415", "34894")
    assert not working_is_correct("31415", "34895")
    assert not working_is_correct("31415", "3489")
    assert not working_is_correct("31415", "348945")
    assert working_is_correct("314", "348", "sum3")
    assert make_record("31415", None)["text"] == "31415=4"
    with pytest.raises(DataError, match="no '='"):
        split_prompt("31415")
    with pytest.raises(DataError, match="not 5 digits"):
        working_is_correct("3141", "3489")


def test_gsm_answers_end_with_the_right_number():
    gsm = make_splits(CorpusConfig(n_gsm=200, n_train=1, n_valid=1, n_test=1))[GSM_SPLIT]
    assert len(gsm) == 200
    templates = set()
    for r in gsm:
        assert set(r) == {"question", "answer"}
        assert r["question"].endswith("?")
        assert re.search(r"\n#### \d+$", r["answer"])
        n = int(gsm_final_answer(r["answer"]))
        equations = re.findall(r"(\d+)([-+*/])(\d+)=(\d+)", r["answer"])
        assert equations, r["answer"]
        for a, op, b, c in equations:                      # every step is true arithmetic
            a, b, c = int(a), int(b), int(c)
            assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] == c, r["answer"]
        assert int(equations[-1][3]) == n                  # the final number is the last result
        numbers_in_question = set(re.findall(r"\d+", r["question"]))
        assert set(equations[0][0::2][:2]) <= numbers_in_question  # operands come from the question
        templates.add(re.sub(r"\d+", "N", r["question"]).split(".")[-1])
    assert len(templates) >= 5


# ----------------------------------------------------------------------------- bad configs

@pytest.mark.parametrize("field,value,pattern", [
    ("n_train", -5, r"n_train must be >= 1 \(got -5\)"),
    ("n_valid", 0, "n_valid must be >= 1"),
    ("n_test", 2.5, "n_test must be an integer"),
    ("n_gsm", 0, "n_gsm must be >= 1"),
    ("frac_working", 1.5, r"frac_working must be in \[0, 1\]"),
    ("working_error", -0.1, r"working_error must be in \[0, 1\]"),
    ("working_error", float("nan"), "working_error must be in"),
    ("task", "sum7", "unknown task 'sum7'; known tasks: sum3, sum5"),
    ("seed", "x", "seed must be an integer"),
])
def test_bad_config_raises_and_writes_nothing(tmp_path, field, value, pattern):
    with pytest.raises(DataError, match=pattern) as info:
        CorpusConfig(**{field: value})
    assert "\n" not in str(info.value)
    cfg = CorpusConfig(**SMALL)
    setattr(cfg, field, value)              # mutated after construction: write_corpus re-checks
    out = tmp_path / "out"
    with pytest.raises(DataError, match=pattern):
        write_corpus(out, cfg)
    assert not out.exists()                  # validated before anything is created


# ----------------------------------------------------------------------------- reading

def test_read_jsonl_errors_name_file_and_line(tmp_path):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(DataError, match=f"{re.escape(str(missing))} does not exist"):
        read_jsonl(missing)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=f"{re.escape(str(empty))} is empty"):
        read_jsonl(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "1=1"}\n{"text": "2=2"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=f"{re.escape(str(bad))} line 3 is not valid JSON") as info:
        read_jsonl(bad)
    assert "\n" not in str(info.value)
    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"text": "1=1"}\n{"question": "2"}\n')
    with pytest.raises(DataError, match="line 2 has no 'text' field"):
        read_jsonl(notext)
    gsm = tmp_path / "gsm8k_format.jsonl"
    gsm.write_text('{"question": "Q?"}\n')
    with pytest.raises(DataError, match="line 1 has no 'answer' field"):
        read_jsonl(gsm)
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "1=1"}\n\n{"text": "2=2"}\n')
    assert read_jsonl(good) == [{"text": "1=1"}, {"text": "2=2"}]


def test_load_split(tmp_path):
    write_corpus(tmp_path, CorpusConfig(**SMALL))
    ds = load_split("test", tmp_path)
    assert len(ds) == 41
    assert ds[0] == read_jsonl(tmp_path / "test.jsonl")[0]
    assert len(load_split(GSM_SPLIT, tmp_path)) == 30
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_split("dev", tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_split("train", tmp_path / "nowhere")
