"""Block attention (qstar_mini.fast.block_attention) computes exactly the masked attention of a thought step.

For the four architectures, eager and sdpa: thoughts, log-probs, talk hidden states and every
gradient equal those of the dense Figure 3 mask; the model's own attention is restored after
each step; misuse is refused in one line.
"""

import pytest
import torch

from qstar_mini.fast.block_attention import NAME, block_attention_forward, structured
from qstar_mini.config import tiny
from qstar_mini.errors import ModelError
from qstar_mini.models.tiny import build_tokenizer, tiny_model
from qstar_mini.step import prepare_model, quiet_star_step
from qstar_mini.talk import naive_talk, talk_hidden
from qstar_mini.thoughts import generate_thoughts, gumbel_noise, naive_thoughts, plain_forward
from tiny_models import ARCHS, VOCAB, batch, tiny_meta, tiny_random_model

T, N, N_TRUE = 5, 2, 3


def think_and_talk(model, meta, ids, mask, noise, blocks, positions=None):
    _, cache = plain_forward(model, meta, ids, mask)
    thoughts = generate_thoughts(model, meta, ids, mask, cache, T, N, extra_steps=N_TRUE - 1, noise=noise,
                                 reinforce_temperature=3.0, positions=positions, attention="blocks" if blocks else "mask")
    return thoughts, talk_hidden(model, meta, thoughts, ids, N_TRUE)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_block_attention_equals_the_masked_attention_with_gradients(arch, attn):
    model, meta = tiny_random_model(arch, attn), tiny_meta()
    ids, mask = batch()
    noise = gumbel_noise((2, N, ids.shape[1], T - 2, VOCAB), torch.Generator().manual_seed(0), dtype=torch.float64)
    real = mask.bool()[:, None, :].expand(-1, N, -1)                  # (b, n, seq)
    results = []
    for blocks in (False, True):
        thoughts, h = think_and_talk(model, meta, ids, mask, noise, blocks)
        (thoughts.logprobs[real].sum() + h[real].square().sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        results.append((thoughts, h, grads))
        assert model.config._attn_implementation == attn           # restored after every step
    (t0, h0, g0), (t1, h1, g1) = results
    assert torch.equal(t0.ids, t1.ids)
    # eager attention takes its softmax in float32 in these models, hence 1e-6
    torch.testing.assert_close(t1.logprobs[real], t0.logprobs[real], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(h1[real], h0[real], atol=1e-6, rtol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 5
    # float64 sdpa agrees to rounding; eager's float32 softmax leaves ~2e-5 of the largest gradient
    tol = 1e-4 if attn == "eager" and arch != "gpt2" else 1e-12
    for name in g0:
        scale = float(g0[name].abs().max())
        torch.testing.assert_close(g1[name], g0[name], atol=tol * scale, rtol=0, msg=name)


@pytest.mark.parametrize("positions", [None, torch.tensor([[5, 1, 6, 0, 3, 2, 4], [-1, 4, 2, 3, 0, 1, 4]])])
def test_block_attention_in_query_chunks_equals_the_masked_attention(monkeypatch, positions):
    """The text part in chunks of 3 queries (each against its visible prefix of text keys only),
    with padding and with positions in any order (one that sees no text): the numbers and
    gradients of the dense mask."""
    from qstar_mini.fast import block_attention

    monkeypatch.setattr(block_attention, "chunk_size", lambda m: 3)
    model, meta = tiny_random_model("llama", "sdpa"), tiny_meta()          # llama: grouped-query attention
    ids, mask = batch((7, 5), seq=9)
    real = mask.bool()[:, None, :].expand(-1, N, -1) if positions is None else torch.ones(2, N, 7, dtype=torch.bool)
    noise = gumbel_noise((2, N, real.shape[-1], T - 2, VOCAB), torch.Generator().manual_seed(0), dtype=torch.float64)
    results = []
    for blocks in (False, True):
        thoughts, h = think_and_talk(model, meta, ids, mask, noise, blocks, positions)
        assert blocks == all(isinstance(layer, block_attention.StepLayer) for layer in thoughts.cache.layers)
        (thoughts.logprobs[real].sum() + h[real].square().sum()).backward()
        results.append((thoughts, h, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    (t0, h0, g0), (t1, h1, g1) = results
    assert len(block_attention.query_chunks([9] * 9, 3)) == 3 and torch.equal(t0.ids, t1.ids)
    torch.testing.assert_close(t1.logprobs[real], t0.logprobs[real], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h1[real], h0[real], atol=1e-12, rtol=1e-12)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-12 * float(g0[name].abs().max()), rtol=0, msg=name)


def test_query_chunks_skip_only_keys_no_query_of_the_chunk_sees():
    from qstar_mini.fast.block_attention import query_chunks

    assert query_chunks([1, 2, 3, 4, 5], 2) == [(0, 2, 2), (2, 4, 4), (4, 5, 5)]      # the causal mask
    assert query_chunks([6, 1, 0, 0], 2) == [(0, 2, 6), (2, 4, 1)]                     # positions; none: 1 key


def test_block_attention_equals_the_naive_loop():
    model, meta = tiny_random_model("qwen2", "sdpa"), tiny_meta()
    ids, mask = batch()
    _, cache = plain_forward(model, meta, ids, mask)
    thoughts = generate_thoughts(model, meta, ids, mask, cache, T, N, extra_steps=N_TRUE - 1, greedy=True,
                                 attention="blocks")
    h = talk_hidden(model, meta, thoughts, ids, N_TRUE)
    naive_ids, naive_logprobs = naive_thoughts(model, meta, ids, mask, T, N, greedy=True)
    real = mask.bool()[:, None, :].expand(-1, N, -1)
    assert torch.equal(thoughts.ids[real], naive_ids[real])
    torch.testing.assert_close(thoughts.logprobs[real].detach(), naive_logprobs[real])
    naive_h = naive_talk(model, meta, ids, mask, naive_ids, N_TRUE)
    valid = naive_h.abs().sum(-1) > 0
    torch.testing.assert_close(h.detach()[valid], naive_h[valid])


def test_step_with_block_attention_equals_masked_step_at_some_positions():
    tok = build_tokenizer()
    model = tiny_model(tok, seed=0, hidden_size=32, num_hidden_layers=2, intermediate_size=64).double()
    cfg = tiny(seq_len=16, n_true=3)
    meta, head = prepare_model(model, tok, cfg)
    meta, head = meta.double(), head.double()
    enc = tok(["31415=4", "27182=(29790)0", "11111=5"], return_tensors="pt", padding=True)
    for positions in (None, torch.tensor([[5, 6], [5, 11], [5, -1]])):
        losses = []
        for attention in ("mask", "blocks"):
            out = quiet_star_step(model, meta, head, enc["input_ids"], enc["attention_mask"],
                                  cfg.replace(attention=attention), positions=positions,
                                  generator=torch.Generator().manual_seed(0))
            out.loss.backward()
            losses.append((out.loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
            model.zero_grad(set_to_none=True)
        torch.testing.assert_close(losses[1][0], losses[0][0])
        torch.testing.assert_close(losses[1][1], losses[0][1])


def test_block_attention_outside_a_thought_step_is_refused():
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ModelError, match="only valid inside"):
        block_attention_forward(None, q, q, q, None)
    model = tiny_random_model("llama", "sdpa")
    with structured(model, seq=3, m=3, step=2):
        assert model.config._attn_implementation == NAME
        with pytest.raises(ModelError, match="expected 3 queries and 9 keys"):
            block_attention_forward(None, q, q, q, None)            # 3 keys, not 3 + 3 * 2
    assert model.config._attn_implementation == "sdpa"


def test_blocks_write_the_steps_into_preallocated_buffers_and_backward_twice_gives_the_same_gradients():
    """The fast path is the one taken (no concatenation), and its hand-written backward clears
    its gradient buffers: a second backward of the same graph gives the same gradients."""
    from qstar_mini.fast.block_attention import StepLayer

    model, meta = tiny_random_model("llama", "sdpa"), tiny_meta()          # llama: grouped-query attention
    ids, mask = batch()
    thoughts, h = think_and_talk(model, meta, ids, mask, None, True)
    layers = thoughts.cache.layers
    assert all(isinstance(layer, StepLayer) for layer in layers) and len(layers) > 1
    assert all(layer.done == T + N_TRUE - 1 for layer in layers)            # every step went to the buffer
    assert all(layer.keys.shape[-2] == ids.shape[1] for layer in layers)    # the text keys were not grown
    loss = thoughts.logprobs.sum() + h.square().sum()
    grads = []
    for _ in range(2):
        loss.backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        model.zero_grad(set_to_none=True)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)


def test_a_finished_step_leaves_nothing_behind():
    """Once a step's outputs are dropped, its thought cache and buffers are freed. A cycle
    through autograd's graph (an autograd node holding the layer that holds the node's output)
    cannot be collected by Python: training kept every step's buffers (12 GB after 650 tier-2
    steps) until the node was given only the buffers (_StepBuffers)."""
    import gc
    import weakref

    model, meta = tiny_random_model("llama", "sdpa"), tiny_meta()
    ids, mask = batch()
    thoughts, h = think_and_talk(model, meta, ids, mask, None, True)
    (thoughts.logprobs.sum() + h.square().sum()).backward()
    watched = [weakref.ref(layer) for layer in thoughts.cache.layers]
    watched += [weakref.ref(layer.state.key_buffer) for layer in thoughts.cache.layers]
    del thoughts, h
    gc.collect()
    assert [ref() for ref in watched] == [None] * len(watched)


def test_a_step_past_the_preallocated_cache_is_refused():
    model, meta = tiny_random_model("mistral", "sdpa"), tiny_meta()
    ids, mask = batch()
    _, cache = plain_forward(model, meta, ids, mask)
    thoughts = generate_thoughts(model, meta, ids, mask, cache, T, N, greedy=True, attention="blocks")  # no extra_steps
    with pytest.raises(ModelError, match="holds 5 steps"):
        talk_hidden(model, meta, thoughts, ids, N_TRUE)


def test_auto_attention_is_blocks_where_the_model_allows_it_and_mask_where_blocks_refuses():
    """The default ``attention="auto"`` picks the fast path for an ordinary decoder and the dense
    mask for one whose attention block attention does not implement (a soft-cap): never a refusal,
    never a different number."""
    from qstar_mini.models.check import resolve_attention
    from transformers import AutoModelForCausalLM, Gemma2Config

    model, meta = tiny_random_model("mistral", "sdpa"), tiny_meta()
    assert tiny().attention == "auto" and resolve_attention(model, meta, tiny()) == "blocks"
    assert resolve_attention(model, meta, tiny(attention="mask")) == "mask"
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, attn_logit_softcapping=50.0,
                       sliding_window=64, attn_implementation="eager")
    torch.manual_seed(0)
    gemma = AutoModelForCausalLM.from_config(cfg).double()
    assert resolve_attention(gemma, tiny_meta(), tiny()) == "mask"
    with pytest.raises(ModelError, match="use attention='mask'"):             # asked for explicitly: refused
        _, cache = plain_forward(gemma, tiny_meta(), *batch())
        generate_thoughts(gemma, tiny_meta(), *batch(), cache, T, N, greedy=True, attention="blocks")
