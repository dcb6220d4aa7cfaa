"""``qstar-mini eval`` on any text: per-token NLL with and without thinking, the gain and which
tokens benefit, the arithmetic metrics only on the arithmetic corpus, and ``datasets`` corpora
streamed (never downloaded whole). Tiny random models; seconds."""

import argparse
import json
import math

import pytest
import torch

from qstar_mini import cli
from qstar_mini.runs.checkpoint import save_checkpoint
from qstar_mini.config import tiny
from qstar_mini.data import read_jsonl
from qstar_mini.errors import DataError
from qstar_mini.cli.eval import add_eval_arguments, run_eval
from qstar_mini.evaluation.any_text import ARITHMETIC, GSM8K_FORMAT, TEXT, detect_data_kind, evaluate_text, is_datasets_name, load_eval_records
from qstar_mini.models.tiny import build_tokenizer
from qstar_mini.paths import DATA_DIR
from qstar_mini.step import prepare_model, quiet_star_step
from qstar_mini.records import encode_records, load_hf_dataset, load_records
from tiny_models import small_model

torch.set_num_threads(1)

PROSE = ["The cat sat on the mat and looked at the door.",
         "Rain fell all night, so the river rose by morning.",
         "She counted the coins twice before paying the driver.",
         "A good map shows roads, rivers and the hills between them.",
         "He opened the window; cold air filled the small room.",
         "Two trains left at noon and met near the old bridge."]


@pytest.fixture(scope="module")
def setup():
    cfg = tiny(n_thoughts=2)
    base, tok = small_model(0)
    model, _ = small_model(0)
    torch.manual_seed(5)
    with torch.no_grad():                       # no longer the base: the two predictions differ
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    meta, head = prepare_model(model, tok, cfg)
    return model, tok, meta, head, cfg, base


@pytest.fixture(scope="module")
def saved(setup, tmp_path_factory):
    model, tok, meta, head, cfg, base = setup
    path = tmp_path_factory.mktemp("eval-any-text")
    save_checkpoint(path / "ck", model, tok, meta, head, cfg)
    base.save_pretrained(path / "base")
    build_tokenizer().save_pretrained(path / "base")
    (path / "prose.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(PROSE)))
    folder = path / "folder"
    folder.mkdir()
    (folder / "test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in PROSE))
    return path


def eval_args(saved, *extra):
    parser = add_eval_arguments(argparse.ArgumentParser())
    return parser.parse_args(["--checkpoint", str(saved / "ck"), "--base", str(saved / "base"),
                              "--n-thoughts", "1", "--device", "cpu", *extra])


# ---------------------------------------------------------------------------------- the data

def test_the_arithmetic_corpus_is_detected_by_its_fields_and_format():
    kind, why = detect_data_kind(read_jsonl(DATA_DIR / "test.jsonl"))
    assert kind == ARITHMETIC and "has_working" in why
    assert detect_data_kind(read_jsonl(DATA_DIR / "gsm8k_format.jsonl"))[0] == GSM8K_FORMAT
    assert detect_data_kind([{"text": t} for t in PROSE])[0] == TEXT
    line = read_jsonl(DATA_DIR / "test.jsonl")[0]
    assert detect_data_kind([line, {"text": "hello"}]) == (TEXT, "general text: only 1 of 2 records are lines "
                                                                 "of the arithmetic corpus")
    # the fields alone are not enough: the text must be question=[(working)]answer
    assert detect_data_kind([dict(line, text="some other text")])[0] == TEXT
    assert detect_data_kind([dict(line, question="12")])[0] == TEXT          # no task has 2 digits


def test_records_from_a_file_a_folder_or_gsm_fields(saved):
    records, source = load_eval_records(saved / "prose.jsonl", text_field="body")
    assert [r["text"] for r in records] == PROSE and records[0]["id"] == 0 and source.endswith("prose.jsonl")
    assert [r["text"] for r in load_eval_records(saved / "folder", split="test")[0]] == PROSE
    assert len(load_eval_records(saved / "folder", max_lines=2)[0]) == 2
    gsm, _ = load_eval_records(DATA_DIR / "gsm8k_format.jsonl")
    first = read_jsonl(DATA_DIR / "gsm8k_format.jsonl")[0]
    assert gsm[0]["text"] == f"{first['question']}\nA: {first['answer']}"
    with pytest.raises(DataError, match="--text-field"):
        load_eval_records(saved / "prose.jsonl")                           # no "text" field there
    assert is_datasets_name("someone/corpus:main") and is_datasets_name("gsm8k")
    assert not is_datasets_name(str(saved / "prose.jsonl")) and not is_datasets_name("data/x.jsonl")


class FakeStream:
    """What ``datasets.load_dataset(..., streaming=True)`` returns, endless; counts what was read."""

    def __init__(self, rows):
        self.rows, self.read = rows, 0

    def __iter__(self):
        i = 0
        while True:
            self.read += 1
            assert self.read <= 1000, "read far past any budget: the corpus would be read whole"
            yield dict(self.rows[i % len(self.rows)], n=i)
            i += 1


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets

    calls, streams = [], []

    def fake_load_dataset(name, config=None, **kwargs):
        calls.append({"name": name, "config": config, **kwargs})
        streams.append(FakeStream([{"text": t} for t in PROSE] + [{"text": ""}]))
        return streams[-1]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")     # no reachability check: the fake needs no network
    return calls, streams


def test_a_datasets_name_is_streamed_and_only_n_records_are_read(fake_hub):
    calls, streams = fake_hub
    records = load_records("someone/corpus:main", max_lines=10)
    assert calls == [{"name": "someone/corpus", "config": "main", "split": "train", "streaming": True}]
    assert streams[0].read == 10                                   # not one record more
    assert [r["text"] for r in records] == (PROSE + PROSE)[:6] + PROSE[:3]   # the empty 7th dropped
    with pytest.raises(DataError, match="--max-lines"):           # no budget: refused, nothing opened
        load_records("someone/corpus")
    assert len(calls) == 1
    with pytest.raises(DataError, match="no column 'body'"):
        load_hf_dataset("someone/corpus", "train", "body", 3)
    rows = load_hf_dataset("someone/corpus", "test", "text", 3, all_fields=True)
    assert [r["n"] for r in rows] == [0, 1, 2] and calls[-1]["split"] == "test" and streams[-1].read == 3


def test_a_failing_datasets_name_is_one_line(monkeypatch):
    import datasets

    def offline(name, config=None, **kwargs):
        raise ConnectionError("no network\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        load_records("someone/corpus", max_lines=5)
    assert "\n" not in str(err.value) and "ConnectionError: no network" in str(err.value)


def test_an_unreachable_hub_is_refused_at_once_without_retries(monkeypatch):
    import socket

    import datasets

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("datasets would retry the Hub for half a minute")

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(datasets, "load_dataset", must_not_be_called)
    with pytest.raises(DataError, match="Hub cannot be reached.*JSONL"):
        load_records("someone/corpus", max_lines=5)


# ---------------------------------------------------------------------------------- the figures

def test_with_thinking_nll_is_the_training_steps_offset_0_prediction(setup):
    """quiet_star_greedy's per-token NLL is -log p^talk at offset 0 of Algorithm 1's step (the
    same greedy thoughts), the base's is the base model's own; the gain is their difference."""
    model, tok, meta, head, cfg, base = setup
    records = [{"text": t} for t in PROSE[:4]]
    res = evaluate_text(model, tok, meta, head, cfg, records, base_model=base, n_thoughts=2, seq_len=40)
    enc = encode_records(tok, records, 40)
    with torch.no_grad():
        out = quiet_star_step(model, meta, head, enc.input_ids, enc.attention_mask, cfg, greedy=True)
    step_nll = -out.log_p_talk[:, 0, :, 0][out.valid[..., 0]]                  # (N,)
    assert res["quiet_star_greedy"]["n_tokens"] == step_nll.numel() == res["base"]["n_tokens"]
    assert res["quiet_star_greedy"]["nll"] == pytest.approx(float(step_nll.mean()), abs=1e-4)
    with torch.no_grad():
        logits = base(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, enc.input_ids[:, 1:, None])[..., 0]
    base_nll = -lp[enc.attention_mask[:, 1:].bool()]
    assert res["base"]["nll"] == pytest.approx(float(base_nll.mean()), abs=1e-4)
    assert res["gain_per_token"]["greedy_vs_base"] == pytest.approx(float((base_nll - step_nll).mean()), abs=1e-4)
    assert res["base"]["nll"] != pytest.approx(res["quiet_star_no_thought"]["nll"], abs=1e-3)   # not the same model
    assert sum(b["n"] for b in res["by_difficulty"]) == res["base"]["n_tokens"]
    assert res["by_difficulty_reference"] == "base"
    hard = [b for b in res["by_difficulty"] if b["n"]][-1]
    assert hard["base_nll"] >= [b for b in res["by_difficulty"] if b["n"]][0]["base_nll"]
    assert res["quiet_star"]["ppl"] == pytest.approx(math.exp(res["quiet_star"]["nll"]), rel=1e-3)
    assert res["token_gains"]["most"] and res["gsm8k"] is None
    text = json.dumps(res)
    assert "answer_acc" not in text and "thought_correct" not in text       # no arithmetic metrics at all


def test_seq_len_cuts_the_lines(setup):
    model, tok, meta, head, cfg, base = setup
    res = evaluate_text(model, tok, meta, head, cfg, [{"text": PROSE[0]}], n_thoughts=1, seq_len=10)
    assert res["quiet_star"]["n_tokens"] == 9 and res["base"] is None
    assert res["by_difficulty_reference"] == "quiet_star_no_thought"


# ---------------------------------------------------------------------------------- the command

def test_eval_on_prose_states_what_applies_and_omits_the_arithmetic_metrics(saved, capsys):
    args = eval_args(saved, "--data", str(saved / "prose.jsonl"), "--text-field", "body", "--lines", "4",
                     "--json", str(saved / "prose.json"))
    assert run_eval(args) == 0
    out = capsys.readouterr().out
    assert "general text" in out and "NLL/token" in out and "gain per token" in out
    assert "arithmetic-task metrics (answer accuracy at the '=', thoughts right): omitted" in out
    assert "GSM8K-format accuracy: omitted" in out
    assert "answer NLL" not in out and "thoughts at the answer" not in out
    result = json.loads((saved / "prose.json").read_text())
    assert result["data"]["kind"] == TEXT and result["n_lines"] == 4
    assert result["base"]["n_tokens"] == sum(len(t) + 2 - 1 for t in PROSE[:4])     # <s> t </s>, char-level
    assert "answer_acc" not in json.dumps(result)


def test_eval_on_gsm8k_format_data_asks_the_problems_with_thinking(saved, capsys):
    args = eval_args(saved, "--data", str(DATA_DIR / "gsm8k_format.jsonl"), "--lines", "2", "--gsm-limit", "2",
                     "--seq-len", "64", "--json", str(saved / "gsm.json"))
    assert run_eval(args) == 0
    out = capsys.readouterr().out
    assert "GSM8K-format zero-shot with thinking" in out and "arithmetic-task metrics" in out
    result = json.loads((saved / "gsm.json").read_text())
    assert result["data"]["kind"] == GSM8K_FORMAT
    assert result["gsm8k"]["n"] == 2 and result["gsm8k"]["thinking"] is True
    assert result["gsm8k_base"]["thinking"] is False


def test_eval_on_the_arithmetic_corpus_keeps_its_table(saved, capsys):
    args = eval_args(saved, "--data", str(DATA_DIR / "test.jsonl"), "--lines", "3", "--gsm8k", "")
    assert run_eval(args) == 0
    out = capsys.readouterr().out
    assert "the project's arithmetic corpus" in out and "every metric applies" in out
    assert "answer NLL" in out and "thoughts at the answer" in out
    result = json.loads(out[out.index("\n{") + 1:])
    assert result["data"]["kind"] == ARITHMETIC and result["quiet_star"]["answer_acc"] is not None


def test_eval_streams_a_datasets_name_up_to_lines(saved, fake_hub, capsys):
    calls, streams = fake_hub
    assert run_eval(eval_args(saved, "--data", "someone/prose", "--split", "validation", "--lines", "3",
                              "--json", str(saved / "hub.json"))) == 0
    assert calls == [{"name": "someone/prose", "config": None, "split": "validation", "streaming": True}]
    assert streams[0].read == 3
    result = json.loads((saved / "hub.json").read_text())
    assert result["n_lines"] == 3 and "streamed" in result["data"]["source"]


@pytest.mark.parametrize("flags, word", [
    (["--lines", "-1"], "--lines"),
    (["--lines", "0"], "--lines"),
    (["--n-thoughts", "0"], "--n-thoughts"),
    (["--gsm-limit", "-3"], "--gsm-limit"),
    (["--batch-size", "0"], "--batch-size"),
    (["--seq-len", "1"], "--seq-len"),
    (["--seq-len", "100000"], "exceeds the model's context"),
    (["--text-field", "nope"], "--text-field"),
])
def test_impossible_eval_options_are_one_line(saved, capsys, flags, word):
    data = str(saved / "folder")
    assert cli.main(["eval", "--checkpoint", str(saved / "ck"), "--base", "", "--device", "cpu",
                     "--data", data, *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("qstar-mini: error: ") and word in err, err
