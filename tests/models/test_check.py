"""Models whose numbers qstar_mini's path would change are refused in one line, or made exact.

The cases the conformance suite (tests/test_conformance.py) found, one small test each, so a
regression names its cause: logits post-processed in forward (Gemma 2 soft-cap, Cohere's
logit_scale, Granite's logits_scaling) must come out as the model's own; a sliding window
shorter than the step, ALiBi, and an unknown change to the logits are refused; block
attention refuses what it does not implement; Gemma's scaled embeddings reach the meta-tokens.
"""

import pytest
import torch
from transformers import (BloomConfig, BloomForCausalLM, CohereConfig, CohereForCausalLM, Gemma2Config,
                          Gemma2ForCausalLM, GemmaConfig, GemmaForCausalLM, GraniteConfig, GraniteForCausalLM,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM)

from qstar_mini.config import tiny
from qstar_mini.errors import ModelError
from qstar_mini.lm import lm_head, text_log_probs
from qstar_mini.meta_tokens import init_embedding
from qstar_mini.models.tiny import build_tokenizer
from qstar_mini.step import prepare_model, quiet_star_step
from qstar_mini.thoughts import plain_forward

CFG = tiny(seq_len=8, thought_length=4, n_true=2, n_thoughts=2)


def sizes(tok) -> dict:
    return dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, head_dim=8)


def build(cls, config_cls, attn="eager", **extra):
    torch.manual_seed(0)
    tok = build_tokenizer()
    config = config_cls(**sizes(tok), **extra)
    config._attn_implementation = attn
    return cls(config).double().eval(), tok


def one_line_refusal(model, tok, cfg=CFG) -> str:
    with pytest.raises(ModelError) as err:
        prepare_model(model, tok, cfg)
    message = str(err.value)
    assert "\n" not in message
    return message


def own_log_probs_equal(model, tok) -> float:
    """Largest difference between qstar_mini's log p and the model's own, on a padded batch."""
    meta, _ = prepare_model(model, tok, CFG)
    ids = torch.tensor([[5, 9, 12, 7, 3, 8], [4, 4, 11, 6, 0, 0]])
    mask = (ids != 0).long()
    h, _ = plain_forward(model, meta, ids, mask)
    ours = text_log_probs(lm_head(model)(h))
    theirs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), -1)
    return float((ours - theirs)[mask.bool()].abs().max().detach())


@pytest.mark.parametrize("cls, config_cls, extra", [
    (Gemma2ForCausalLM, Gemma2Config, dict(final_logit_softcapping=0.5, sliding_window=64)),
    (CohereForCausalLM, CohereConfig, dict(logit_scale=3.0)),
    (GraniteForCausalLM, GraniteConfig, dict(logits_scaling=0.25)),
], ids=["gemma2-softcap", "cohere-logit_scale", "granite-logits_scaling"])
def test_logits_post_processing_is_the_models_own(cls, config_cls, extra):
    model, tok = build(cls, config_cls, **extra)
    assert own_log_probs_equal(model, tok) < 1e-10


def test_an_unknown_change_to_the_logits_is_refused():
    class Doubled(LlamaForCausalLM):                  # a forward qstar_mini cannot see into
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    model, tok = build(Doubled, LlamaConfig)
    assert "post-processes its logits" in one_line_refusal(model, tok)


def test_a_sliding_window_shorter_than_the_step_is_refused():
    model, tok = build(MistralForCausalLM, MistralConfig, sliding_window=3)
    message = one_line_refusal(model, tok)
    assert "sliding attention window of 3" in message and "lower seq_len" in message
    model, tok = build(MistralForCausalLM, MistralConfig, sliding_window=64)   # longer than the span: fine
    prepare_model(model, tok, CFG)


def test_alibi_is_refused():
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = BloomForCausalLM(BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=4)).double()
    assert "ALiBi" in one_line_refusal(model, tok)


def test_block_attention_refuses_the_soft_capped_attention_it_does_not_implement():
    model, tok = build(Gemma2ForCausalLM, Gemma2Config, attn_logit_softcapping=5.0, sliding_window=64)
    message = one_line_refusal(model, tok, CFG.replace(attention="blocks"))
    assert "softcap" in message and "attention='mask'" in message
    prepare_model(*build(Gemma2ForCausalLM, Gemma2Config, attn_logit_softcapping=5.0, sliding_window=64), CFG)


def test_meta_tokens_see_the_init_texts_embedding_under_gemmas_scaled_embeddings():
    model, tok = build(GemmaForCausalLM, GemmaConfig)
    text_id = init_embedding(model, tok, CFG.start_init, CFG.meta_init)[1][0]
    meta, head = prepare_model(model, tok, CFG)
    table = model.get_input_embeddings()
    seen = meta.embed(model, torch.tensor([meta.start_id]))                   # what the model is fed
    assert torch.allclose(seen, table(torch.tensor([text_id])), atol=1e-12)
    meta.write_into(model)                                                    # as saved: the table alone
    assert torch.allclose(table(torch.tensor([meta.start_id])), seen, atol=1e-12)
    ids = torch.tensor([[5, 9, 12, 7, 3, 8, 2, 6]])
    out = quiet_star_step(model, meta, head, ids, torch.ones_like(ids), CFG, greedy=True)
    assert torch.isfinite(out.loss)


def test_gradient_free_steps_take_the_fused_mask_for_a_few_queries_and_blocks_for_many():
    """``sampling_attention``: "auto" without a backward is the sdpa mask for rows x m <= FEW_QUERIES
    (one fused call per layer), block attention above; an explicit choice is kept, eager keeps blocks."""
    from qstar_mini.models.check import FEW_QUERIES, sampling_attention
    from qstar_mini.studies.bench import bench_model

    cfg = tiny()
    model, meta, _ = bench_model()                                        # sdpa
    assert cfg.attention == "auto"
    assert sampling_attention(model, meta, cfg, 4, FEW_QUERIES // 4) == "mask"
    assert sampling_attention(model, meta, cfg, 4, FEW_QUERIES // 4 + 1) == "blocks"
    assert sampling_attention(model, meta, cfg.replace(attention="blocks"), 1, 8) == "blocks"
    eager, meta_e, _ = bench_model(attn="eager")
    assert sampling_attention(eager, meta_e, cfg, 1, 8) == "blocks"
