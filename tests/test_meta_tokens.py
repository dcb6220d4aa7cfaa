"""Meta-tokens: added to tokenizer and model, initialised from a chosen token, and learning
``embedding_scale`` times faster under Adam (which a gradient hook would not achieve)."""

import pytest
import torch

from qstar_mini.errors import ModelError
from qstar_mini.meta_tokens import END_THOUGHT, START_THOUGHT, MetaTokens, add_meta_tokens
from qstar_mini.models.tiny import build_tokenizer, tiny_model


def small_model(tok):
    return tiny_model(tok, hidden_size=32, num_hidden_layers=1, intermediate_size=64).eval()


def test_added_to_tokenizer_and_model_and_initialised_from_text():
    tok = build_tokenizer()
    model = small_model(tok)
    table_before = model.get_input_embeddings().weight.detach().clone()
    meta = add_meta_tokens(model, tok, start_init="(", end_init="---", embedding_scale=100.0)
    assert tok.convert_ids_to_tokens([meta.start_id, meta.end_id]) == [START_THOUGHT, END_THOUGHT]
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    # a meta-token is one token, never split
    assert tok(START_THOUGHT, add_special_tokens=False)["input_ids"] == [meta.start_id]
    paren = tok("(", add_special_tokens=False)["input_ids"][0]
    dash = tok("-", add_special_tokens=False)["input_ids"][0]
    torch.testing.assert_close(meta.embeddings()[0], table_before[paren])
    # '---' is three '-' tokens here: the closest the vocabulary has is their mean = '-'
    torch.testing.assert_close(meta.embeddings()[1], table_before[dash])
    # calling it twice does not add tokens twice
    n = len(tok)
    add_meta_tokens(model, tok, "(", ")")
    assert len(tok) == n


def test_meta_tokens_do_not_change_base_predictions():
    """Adding the meta-tokens (and excluding them from every distribution) keeps the base model."""
    from qstar_mini.lm import body, lm_head, text_log_probs

    tok = build_tokenizer()
    model = small_model(tok)
    ids = tok(["31415=4", "12345=5"], return_tensors="pt")["input_ids"]
    before = torch.log_softmax(model(ids).logits, -1)
    meta = add_meta_tokens(model, tok, "(", ")")
    h = body(model)(inputs_embeds=meta.embed(model, ids)).last_hidden_state
    after = text_log_probs(lm_head(model)(h), meta.ids)[..., : before.shape[-1]]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_unknown_init_text_is_a_clear_error():
    tok = build_tokenizer()
    with pytest.raises(ModelError, match="cannot initialise a meta-token"):
        add_meta_tokens(small_model(tok), tok, start_init="\u00e9\u00e9")


def _train_embedding(scale: float, hook_scale: float = 1.0, steps: int = 20, lr: float = 1e-3):
    """Distance a meta-token embedding moves in `steps` Adam steps on a fixed linear loss."""
    init = torch.zeros(2, 8)
    meta = MetaTokens(0, 1, init, scale=scale)
    if hook_scale != 1.0:
        meta.stored.register_hook(lambda g: g * hook_scale)
    opt = torch.optim.Adam(meta.parameters(), lr=lr)
    direction = torch.linspace(-1, 1, 8)
    for _ in range(steps):
        opt.zero_grad()
        (meta.embeddings()[0] * direction).sum().backward()
        opt.step()
    return (meta.embeddings()[0] - init[0]).norm().item()


def test_embedding_scale_makes_adam_steps_scale_times_larger():
    plain = _train_embedding(scale=1.0)
    scaled = _train_embedding(scale=100.0)
    assert scaled / plain == pytest.approx(100.0, rel=1e-3)


def test_a_gradient_hook_does_not_speed_up_adam():
    """Multiplying the gradient by 100 is divided out again by Adam's normalisation."""
    plain = _train_embedding(scale=1.0)
    hooked = _train_embedding(scale=1.0, hook_scale=100.0)
    assert hooked / plain == pytest.approx(1.0, rel=1e-3)


def test_write_into_copies_learned_embeddings_to_the_model():
    tok = build_tokenizer()
    model = small_model(tok)
    meta = add_meta_tokens(model, tok, "(", ")", embedding_scale=10.0)
    with torch.no_grad():
        meta.stored.add_(1.0)
    meta.write_into(model)
    torch.testing.assert_close(model.get_input_embeddings().weight[meta.start_id], meta.embeddings()[0])
