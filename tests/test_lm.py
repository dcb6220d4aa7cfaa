"""What qstar_mini asks of a causal LM (qstar_mini.lm): its body, its head, its log-probs."""

import math

import pytest
import torch

from qstar_mini.errors import ModelError
from qstar_mini.lm import body, check_supported, lm_head, text_log_probs
from tiny_models import ARCHS, VOCAB, batch, tiny_random_model


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_body_then_head_is_the_models_own_forward(arch):
    model = tiny_random_model(arch)
    ids, mask = batch(lengths=(7, 7), seq=7)
    h = body(model)(input_ids=ids).last_hidden_state                  # (b, seq, hidden)
    torch.testing.assert_close(lm_head(model)(h), model(input_ids=ids).logits, rtol=0, atol=1e-10)


def test_text_log_probs_remove_the_meta_tokens_and_renormalise():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    meta_ids = (VOCAB - 2, VOCAB - 1)
    lp = text_log_probs(logits, meta_ids)
    assert torch.isinf(lp[:, list(meta_ids)]).all()
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3, dtype=torch.float64))
    # on the text columns it is the softmax of the text logits alone, at the given temperature
    text = logits[:, : VOCAB - 2]
    torch.testing.assert_close(lp[:, : VOCAB - 2], torch.log_softmax(text, -1))
    torch.testing.assert_close(text_log_probs(logits, meta_ids, temperature=2.0)[:, : VOCAB - 2],
                               torch.log_softmax(text / 2.0, -1))


def test_half_precision_logits_give_float32_log_probs():
    lp = text_log_probs(torch.zeros(2, 8, dtype=torch.bfloat16))
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, torch.full((2, 8), -math.log(8)))


def test_a_sliding_window_shorter_than_a_thought_step_is_refused_in_one_line():
    """The Figure 3 mask replaces the model's own window: a window shorter than the longest span
    from a text key to a talk query would silently change the model, so it is refused."""
    model = tiny_random_model("mistral")
    model.config.sliding_window = 8
    check_supported(model, positions_needed=8)
    with pytest.raises(ModelError, match="sliding attention window of 8") as e:
        check_supported(model, positions_needed=9)
    assert "\n" not in str(e.value)
