"""Tokenizer, tiny config, pretraining and loading (no network, no GPU, a few seconds)."""

import json

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from qstar_mini.data import CorpusConfig, make_splits, read_jsonl
from qstar_mini.errors import ModelError
from qstar_mini.models.tiny import (BOS_ID, CHARACTERS, EOS_ID, PAD_ID, UNK_ID, build_tokenizer,
                               encode_lines, evaluate_base, lm_labels, load_model, pretrain,
                               tiny_config, tiny_model)
from qstar_mini.paths import DATA_DIR, TINY_BASE, TINY_BASE_NOISY

LINES = ["31415=(34894)4", "31415=4", "00000=(00000)0", "99999=(98765)5", "314=(348)8"]
GSM = make_splits(CorpusConfig(n_train=1, n_valid=1, n_test=1, n_gsm=30))["gsm8k_format"]
GSM_TEXTS = [r["question"] for r in GSM] + [r["answer"] for r in GSM] + [
    "Ana's 3 apples: $4, 5/2 = 2.5! Really?\n#### 7"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_one_token_per_character(tok):
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    for text in LINES + GSM_TEXTS:
        ids = tok(text)["input_ids"]
        assert ids[0] == BOS_ID and EOS_ID not in ids              # <s> added, </s> not
        assert len(ids) == len(text) + 1                           # one token per character
        assert UNK_ID not in ids, text
        assert tok.decode(ids, skip_special_tokens=True) == text   # no spaces inserted or removed
        bare = tok(text, add_special_tokens=False)["input_ids"]
        assert bare == ids[1:] and tok.decode(bare) == text
    assert tok("a~b", add_special_tokens=False)["input_ids"][1] == UNK_ID


_TOK = build_tokenizer()


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=CHARACTERS, max_size=60))
def test_tokenizer_round_trip_any_text_of_the_alphabet(text):
    ids = _TOK(text)["input_ids"]
    assert len(ids) == len(text) + 1 and UNK_ID not in ids
    assert _TOK.decode(ids, skip_special_tokens=True) == text


def test_special_tokens(tok):
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (PAD_ID, BOS_ID, EOS_ID, UNK_ID)
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"
    assert len(tok) == 4 + len(set(CHARACTERS))
    for ch in "=()+-*/#.,?!:'$ \n":
        assert tok.convert_tokens_to_ids(ch) not in (None, UNK_ID), repr(ch)
    batch = tok(["1", "123"], padding=True)
    assert batch["input_ids"][0] == [BOS_ID, tok.convert_tokens_to_ids("1"), PAD_ID, PAD_ID]


def test_tokenizer_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in LINES + GSM_TEXTS:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
        assert again.decode(again(text)["input_ids"], skip_special_tokens=True) == text
    assert again.pad_token_id == PAD_ID and again.eos_token_id == EOS_ID
    assert again.padding_side == "right"
    assert again.get_vocab() == tok.get_vocab()


def test_encode_lines_and_labels(tok):
    ids, mask = encode_lines(tok, ["12=3", "1=1"])                 # (2, seq)
    assert ids.shape == mask.shape == (2, 6)
    assert ids[0].tolist()[0] == BOS_ID and ids[0].tolist()[-1] == EOS_ID
    assert ids[1].tolist()[-2:] == [EOS_ID, PAD_ID] and mask[1].tolist() == [1, 1, 1, 1, 1, 0]
    labels = lm_labels(ids, mask)
    assert labels[1, -1] == -100 and (labels[0] == ids[0]).all()


# ----------------------------------------------------------------------------- tiny model

@pytest.mark.parametrize("arch", ["mistral", "llama"])
def test_tiny_model_save_load_identical_logits(tok, tmp_path, arch):
    cfg = tiny_config(len(tok), arch=arch)
    assert cfg.model_type == arch
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    model = tiny_model(tok, arch=arch, seed=3).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.6e6 < n_params < 1.0e6
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_size < 5e6
    loaded, tok2 = load_model(tmp_path)
    assert type(loaded) is type(model)
    ids = tok2(LINES[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = model(**ids).logits
        b = loaded(**ids).logits
    assert torch.equal(a, b)
    # a different seed gives different weights (so the comparison above can fail)
    other = tiny_model(tok, arch=arch, seed=4).eval()
    with torch.no_grad():
        assert not torch.equal(other(**ids).logits, a)


def test_tiny_config_rejects_unknown_arch():
    with pytest.raises(ModelError, match="unknown arch 'gpt9'"):
        tiny_config(83, arch="gpt9")


def test_pretrain_is_deterministic_and_atomic(tmp_path):
    torch.set_num_threads(1)
    corpus = CorpusConfig(task="sum3", n_train=64, n_valid=4, n_test=10, n_gsm=1)
    kw = dict(corpus=corpus, steps=3, batch_size=8, lr=1e-3, progress=False, warmup_steps=1)
    r1 = pretrain(tmp_path / "a", seed=0, **kw)
    r2 = pretrain(tmp_path / "b", seed=0, **kw)
    r3 = pretrain(tmp_path / "c", seed=1, **kw)
    w = {k: (tmp_path / k / "model.safetensors").read_bytes() for k in "abc"}
    assert w["a"] == w["b"] and w["a"] != w["c"]
    assert r1["final_loss"] == r2["final_loss"]
    report = json.loads((tmp_path / "a" / "pretrain_report.json").read_text())
    assert report["steps"] == 3 and report["corpus"] == corpus.to_dict()
    assert report["eval"]["n_with_working"] == 5 and report["eval"]["n_answer_only"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]   # no temp dirs left
    # overwriting an existing model directory replaces it
    pretrain(tmp_path / "a", seed=1, **kw)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == w["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


# ----------------------------------------------------------------------------- loading errors

def test_load_model_missing_path():
    with pytest.raises(ModelError, match="model path /nonexistent/model does not exist") as info:
        load_model("/nonexistent/model")
    assert "\n" not in str(info.value)


def test_load_model_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        load_model(tmp_path)


def test_load_model_hub_failure_is_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore lines")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ModelError, match=r"could not be downloaded.*network\?.*OSError") as info:
        load_model("someone/some-model")
    assert "\n" not in str(info.value)


def test_load_model_sets_missing_pad_token(tmp_path):
    tok = build_tokenizer()
    tiny_model(tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("pad_token")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="no pad token"):
        _, tok2 = load_model(tmp_path)
    assert tok2.pad_token == tok2.eos_token and tok2.padding_side == "right"


# ----------------------------------------------------------------------------- the shipped bases

@pytest.fixture(scope="module")
def shipped_test_records():
    return read_jsonl(DATA_DIR / "test.jsonl")[:300]


@pytest.mark.parametrize("path", [TINY_BASE, TINY_BASE_NOISY], ids=["tiny-base", "tiny-base-noisy"])
def test_shipped_base_matches_its_report(path, shipped_test_records):
    torch.set_num_threads(1)
    model, tok = load_model(path)
    assert (path / "model.safetensors").stat().st_size < 5e6
    report = json.loads((path / "pretrain_report.json").read_text())
    reported = report["eval"]
    got = evaluate_base(model, tok, shipped_test_records, seed=0)
    assert got["n_with_working"] + got["n_answer_only"] == 300 and got["n_answer_only"] > 100
    # a few hundred lines: the recomputation agrees with the report within sampling noise
    for key in ("answer_acc_with_working", "answer_acc_answer_only", "working_correct_greedy"):
        assert abs(got[key] - reported[key]) < 0.12, (key, got[key], reported[key])
    for key in ("answer_nll_with_working", "answer_nll_answer_only"):
        assert abs(got[key] - reported[key]) < 0.25, (key, got[key], reported[key])
    # the room thinking can fill: with working the answer is (almost) always right, without ~chance
    assert got["answer_acc_with_working"] > 0.9
    assert got["answer_acc_answer_only"] < 0.3
    assert got["answer_nll_answer_only"] > got["answer_nll_with_working"] + 1.0


def test_noisy_base_writes_worse_working_than_the_clean_one():
    clean = json.loads((TINY_BASE / "pretrain_report.json").read_text())
    noisy = json.loads((TINY_BASE_NOISY / "pretrain_report.json").read_text())
    assert clean["corpus"]["working_error"] == 0.0 and clean["corpus"] == CorpusConfig().to_dict()
    assert noisy["corpus"]["working_error"] == 0.12 and noisy["corpus"]["frac_working"] == 0.8
    assert clean["eval"]["working_correct_sampled"] > 0.9
    assert noisy["eval"]["working_correct_sampled"] < clean["eval"]["working_correct_sampled"] - 0.2
