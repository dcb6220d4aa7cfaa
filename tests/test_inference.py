"""Thinking at inference: meta-tokens are never emitted, the KV-cache path agrees with training's
parallel path, and the HTML shows what it should."""

import pytest
import torch

from qstar_mini.config import tiny
from qstar_mini.inference import (decode_thought, generate_with_thoughts, generated_text, predict_with_thoughts,
                                 render_html, think_on_text, thought_is_correct)
from qstar_mini.models.tiny import build_tokenizer, tiny_model
from qstar_mini.step import prepare_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def parts():
    tok = build_tokenizer()
    model = tiny_model(tok, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64).eval()
    cfg = tiny(thought_length=5, mixer_bias_init=0.0)
    torch.manual_seed(0)
    meta, head = prepare_model(model, tok, cfg)
    with torch.no_grad():
        head.net[-1].weight.normal_(0, 0.1)            # a head that is not constant
    return model, tok, meta, head, cfg


def tempting(model, meta):
    """Make the meta-tokens the model's favourite outputs (their LM-head rows huge), so that any
    leak through the masking would show."""
    with torch.no_grad():
        out = model.get_output_embeddings().weight      # tied with the input table
        for i in meta.ids:
            out[i] = 50.0 * torch.sign(torch.randn(out.shape[1]))
    return model


def test_generation_never_emits_meta_tokens(parts):
    model, tok, meta, head, cfg = parts
    tempting(model, meta)
    ids = torch.tensor([tok("31415=")["input_ids"]])
    raw_next = model(input_ids=ids).logits[0, -1].argmax()
    assert int(raw_next) in meta.ids, "precondition: unmasked, the model would emit a meta-token"
    for greedy in (True, False):
        steps = generate_with_thoughts(model, tok, meta, head, cfg, "31415=", max_new_tokens=6, greedy=greedy,
                                       generator=torch.Generator().manual_seed(1), stop_at_eos=False)
        assert len(steps) == 6
        for s in steps:
            assert s["token_id"] not in meta.ids
            inner = s["thought_ids"][1:-1]
            assert s["thought_ids"][0] == meta.start_id and s["thought_ids"][-1] == meta.end_id
            assert len(s["thought_ids"]) == cfg.thought_length and not set(inner) & set(meta.ids)
            assert "<|" not in s["token"] + s["thought"]


def test_first_generated_token_matches_the_parallel_prediction(parts):
    """The KV-cache path of generation (think, crop, append) and the masked parallel path of
    training give the same greedy thought, w and mixed distribution at the prompt's end."""
    model, tok, meta, head, cfg = parts
    steps = generate_with_thoughts(model, tok, meta, head, cfg, "2718=", max_new_tokens=2, greedy=True)
    ids = torch.tensor([tok("2718=")["input_ids"]])
    pred = predict_with_thoughts(model, meta, head, cfg, ids, torch.ones_like(ids), 1, greedy=True)
    assert steps[0]["thought_ids"] == pred.thoughts[0, 0, -1].tolist()
    assert steps[0]["w"] == pytest.approx(float(pred.w[0, 0, -1]), abs=1e-5)
    assert steps[0]["token_id"] == int(pred.log_p_talk[0, 0, -1].argmax())
    assert steps[0]["logp_talk"] == pytest.approx(float(pred.log_p_talk[0, 0, -1, steps[0]["token_id"]]), abs=1e-4)
    # the second token too: the thought was cropped from the cache before the token was appended
    ids2 = torch.tensor([tok("2718=")["input_ids"] + [steps[0]["token_id"]]])
    pred2 = predict_with_thoughts(model, meta, head, cfg, ids2, torch.ones_like(ids2), 1, greedy=True)
    assert steps[1]["thought_ids"] == pred2.thoughts[0, 0, -1].tolist()
    assert steps[1]["w"] == pytest.approx(float(pred2.w[0, 0, -1]), abs=1e-5)


def test_think_on_text_has_one_step_per_token(parts):
    model, tok, meta, head, cfg = parts
    steps = think_on_text(model, tok, meta, head, cfg, "31415=4")
    assert [s["token"] for s in steps] == list("31415=4")
    # log p^init is the plain model's, meta-tokens excluded: computed here by one ordinary forward
    ids = [tok.bos_token_id] + tok("31415=4", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logits[:, list(meta.ids)] = float("-inf")
    plain = logits.log_softmax(-1)
    for j, s in enumerate(steps):
        lp_plain = float(plain[j, ids[j + 1]])
        assert s["token_id"] == ids[j + 1] and s["logp_init"] == pytest.approx(lp_plain, abs=1e-4)
        assert s["gain"] == pytest.approx(s["logp_talk"] - lp_plain, abs=1e-4) and s["logp_talk"] < 0
        assert len(tok(s["thought"], add_special_tokens=False)["input_ids"]) == cfg.thought_length - 2


def test_render_html(parts):
    steps = [{"token": "4", "thought": "3<4>", "w": 0.8, "gain": 1.5},
             {"token": "</s>", "thought": "12345", "w": 0.1, "gain": -0.5}]
    for color_by in ("w", "gain"):
        page = render_html(steps, color_by=color_by, prompt="31415=")
        assert page.count(" title=") == 2
        assert 'title="#0 thought: 3&lt;4&gt;' in page and "&lt;/s&gt;" in page     # escaped
        assert "<script" not in page and "31415=" in page
    assert "rgba(215, 58, 73" in render_html(steps, color_by="gain")              # red where it hurt
    with pytest.raises(ValueError):
        render_html(steps, color_by="loss")
    assert generated_text(steps) == "4"


def test_decode_and_check_a_thought():
    tok = build_tokenizer()
    ids = [90] + tok("34894", add_special_tokens=False)["input_ids"] + [91]
    assert decode_thought(tok, ids) == "34894"
    assert thought_is_correct("31415", "34894")
    assert not thought_is_correct("31415", "34895")
    assert not thought_is_correct("31415", "3489</s>")
    assert not thought_is_correct(None, "34894")


def test_generate_plain_equals_greedy_decoding_without_a_cache(parts):
    """generate_plain (KV cache, one pass per token) picks what a full forward pass over the
    growing text picks (evaluate's cache-free greedy decoding), and never a meta-token."""
    from qstar_mini.evaluation.gsm8k import _greedy_plain
    from qstar_mini.inference import generate_plain

    model, tok, meta, head, cfg = parts
    for prompt in ("31415=", "27182=(2"):
        ids = generate_plain(model, tok, meta, prompt, 6, stop_at_eos=False)
        assert len(ids) == 6 and not set(ids) & set(meta.ids)
        stopped = generate_plain(model, tok, meta, prompt, 6)
        if tok.eos_token_id in stopped:
            stopped = stopped[: stopped.index(tok.eos_token_id)]
        assert tok.decode(stopped, skip_special_tokens=True) == _greedy_plain(model, tok, prompt, 6, meta)
