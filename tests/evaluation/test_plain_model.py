"""``qstar-mini eval --model NAME_OR_FOLDER`` on a plain model (no Quiet-STaR checkpoint): only the
no-thought rows, said so; and GSM8K-format question/answer records trained and evaluated with
``--text-field question+answer``. Tiny random models; seconds."""

import argparse
import json

import pytest
import torch

from qstar_mini.runs.checkpoint import save_checkpoint
from qstar_mini.config import tiny
from qstar_mini.data import QA_TEXT_FIELD, read_jsonl
from qstar_mini.errors import CheckpointError, ConfigError, DataError
from qstar_mini.cli.eval import add_eval_arguments, is_plain_model, run_eval
from qstar_mini.evaluation.any_text import load_eval_records
from qstar_mini.paths import DATA_DIR
from qstar_mini.records import line_ids, load_records
from qstar_mini.step import prepare_model
from tiny_models import small_model

torch.set_num_threads(1)

PROSE = ["The cat sat on the mat and looked at the door.",
         "Rain fell all night, so the river rose by morning.",
         "She counted the coins twice before paying the driver."]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval-plain")
    model, tok = small_model(3)
    model.save_pretrained(path / "plain")
    tok.save_pretrained(path / "plain")
    qmodel, qtok = small_model(3)
    cfg = tiny(n_thoughts=2)
    meta, head = prepare_model(qmodel, qtok, cfg)
    save_checkpoint(path / "ck", qmodel, qtok, meta, head, cfg)
    (path / "prose.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in PROSE))
    return path, model, tok


def args_for(*argv):
    return add_eval_arguments(argparse.ArgumentParser()).parse_args([*argv, "--device", "cpu"])


def hand_nll(model, tok, texts):
    """Mean -log p of every next token of <s> text </s>, computed here from the logits."""
    total, n = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([line_ids(tok, text)])
            logp = torch.log_softmax(model(input_ids=ids).logits.float()[0, :-1], -1)
            total -= float(logp.gather(1, ids[0, 1:, None]).sum())
            n += ids.shape[1] - 1
    return total / n, n


def test_a_plain_model_is_told_from_a_checkpoint(saved):
    path = saved[0]
    assert is_plain_model(str(path / "plain")) and is_plain_model("smollm2")
    assert not is_plain_model(str(path / "ck"))            # meta-tokens, head, qstar_config.json: a checkpoint
    assert not is_plain_model(str(path / "missing"))        # a local path that is not there: refused as below


def test_eval_of_a_plain_folder_reports_only_its_no_thought_rows(saved, capsys):
    path, model, tok = saved
    out = path / "plain.json"
    assert run_eval(args_for("--model", str(path / "plain"), "--data", str(path / "prose.jsonl"),
                             "--json", str(out))) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    nll, n = hand_nll(model, tok, PROSE)
    assert result["model"]["n_tokens"] == n and result["model"]["nll"] == pytest.approx(nll, abs=1e-4)
    assert "quiet_star" not in result and result["gsm8k"] is None
    assert "a plain model (no Quiet-STaR checkpoint, no thoughts)" in printed
    assert "omitted, a plain model has no thoughts" in printed and "GSM8K-format accuracy: omitted" in printed


def test_a_plain_model_on_the_arithmetic_corpus_also_gets_the_answer_digit(saved, capsys):
    path, model, tok = saved
    run_eval(args_for("--model", str(path / "plain"), "--data", str(DATA_DIR / "test.jsonl"), "--lines", "6",
                      "--gsm8k", "", "--json", str(path / "arith.json")))
    result = json.loads((path / "arith.json").read_text())
    assert result["data"]["kind"] == "arithmetic" and result["model"]["n_answers"] == 6
    assert 0.0 <= result["model"]["answer_acc"] <= 1.0 and result["model"]["answer_nll"] > 0
    printed = capsys.readouterr().out
    assert "answer acc" in printed and "GSM8K-format accuracy: skipped (--gsm8k '')" in printed


def test_checkpoint_flags_on_a_plain_model_and_a_missing_model_are_one_line(saved):
    path = saved[0]
    with pytest.raises(ConfigError, match="--base applies to a Quiet-STaR checkpoint.*drop --base"):
        run_eval(args_for("--model", str(path / "plain"), "--base", str(path / "plain"),
                          "--data", str(path / "prose.jsonl")))
    with pytest.raises(CheckpointError, match="missing does not exist.*model folder with config.json.*smollm2"):
        run_eval(args_for("--model", str(path / "missing"), "--data", str(path / "prose.jsonl")))


# ------------------------------------------------------------------- GSM8K-format question/answer data

def test_question_answer_records_train_with_text_field_question_answer():
    gsm = DATA_DIR / "gsm8k_format.jsonl"
    with pytest.raises(DataError, match=r"line 1 has no 'text' field \(its fields: answer, question\).*"
                                        r"--text-field question\+answer"):
        load_records(gsm, text_field="text")
    records = load_records(gsm, text_field=QA_TEXT_FIELD, max_lines=3)
    raw = read_jsonl(gsm, max_records=3)
    assert [r["text"] for r in records] == [f"{r['question']}\nA: {r['answer']}" for r in raw]
    assert load_records(raw, text_field=QA_TEXT_FIELD)[0]["text"] == records[0]["text"]     # in memory too


def test_question_answer_records_evaluate_with_the_same_flag(saved):
    path = saved[0]
    records, _ = load_eval_records(DATA_DIR / "gsm8k_format.jsonl", text_field=QA_TEXT_FIELD)
    raw = read_jsonl(DATA_DIR / "gsm8k_format.jsonl")
    assert records[0]["text"] == f"{raw[0]['question']}\nA: {raw[0]['answer']}"
    with pytest.raises(DataError, match="no string 'question' and 'answer' fields.*--text-field FIELD"):
        load_eval_records(path / "prose.jsonl", text_field=QA_TEXT_FIELD)
    (path / "other.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"its fields: body.*--text-field question\+answer"):
        load_eval_records(path / "other.jsonl")
