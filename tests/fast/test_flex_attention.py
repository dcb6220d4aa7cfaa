"""FlexAttention (qstar_mini.fast.flex_attention) computes exactly the masked attention of a thought step.

The predicate equals the dense Figure 3 mask entry by entry; with it, thoughts (greedy and with
shared Gumbel noise), log-probs, talk hidden states, gradients and a whole training step equal
those of the dense mask, on Mistral and Llama with grouped-query attention (4 heads, 2 KV heads),
right padding, every position thinking or only some. On CPU this is FlexAttention's eager path
(its backward is the dense gradient of the same predicate: PyTorch has no CPU flex backward);
scripts/gpu_flex_check.py runs the compiled CUDA kernel against the mask when a GPU is lent.
Float64 throughout, so "equal" means agreement to 1e-10 relative (rounding only).
"""

import importlib.util
import sys

import pytest
import torch

pytest.importorskip("torch.nn.attention.flex_attention", reason="FlexAttention needs torch >= 2.5")
from torch.nn.attention.flex_attention import create_mask  # noqa: E402

from qstar_mini.config import tiny
from qstar_mini.errors import ModelError
from qstar_mini.fast.flex_attention import NAME, figure3_visible, flex_attention_forward, structured
from qstar_mini.masks import thought_visibility
from qstar_mini.models.tiny import build_tokenizer, tiny_model
from qstar_mini.paths import REPO_ROOT
from qstar_mini.step import prepare_model, quiet_star_step
from qstar_mini.talk import talk_hidden
from qstar_mini.thoughts import generate_thoughts, gumbel_noise, plain_forward
from tiny_models import VOCAB, batch, tiny_meta, tiny_random_model

T, N, N_TRUE = 4, 2, 2
SOME = torch.tensor([[1, 3, 6], [0, 6, 2]])           # (batch, m = 3) thinking positions; 6 is padding in row 1


def test_predicate_equals_the_dense_figure3_mask():
    _, mask = batch()                                  # lengths 7 and 5: right padding
    seq = mask.shape[1]
    for positions in (None, SOME):
        m = seq if positions is None else positions.shape[1]
        visible = figure3_visible(seq, m, mask, positions)
        for step in (1, 3):
            grid = create_mask(visible, 2, 1, m, seq + m * step, device="cpu")   # (2, 1, m, keys); torch 2.6 defaults to cuda
            assert torch.equal(grid, thought_visibility(mask, step, positions)), (positions, step)


def think_and_talk(model, meta, ids, mask, attention, noise=None, positions=None):
    _, cache = plain_forward(model, meta, ids, mask)
    thoughts = generate_thoughts(model, meta, ids, mask, cache, T, N, extra_steps=N_TRUE - 1, noise=noise,
                                 greedy=noise is None, reinforce_temperature=3.0, positions=positions,
                                 attention=attention)
    return thoughts, talk_hidden(model, meta, thoughts, ids, N_TRUE)


@pytest.mark.parametrize("arch", ["mistral", "llama"])
def test_flex_equals_the_masked_attention_with_gradients(arch):
    model, meta = tiny_random_model(arch, "sdpa"), tiny_meta()
    ids, mask = batch()
    for positions, sampled in ((None, True), (SOME, False)):
        m = ids.shape[1] if positions is None else positions.shape[1]
        noise = gumbel_noise((2, N, m, T - 2, VOCAB), torch.Generator().manual_seed(0),
                             dtype=torch.float64) if sampled else None
        real = (mask if positions is None else mask.gather(1, positions)).bool()[:, None].expand(-1, N, -1)
        results = []
        for attention in ("mask", "flex"):
            thoughts, h = think_and_talk(model, meta, ids, mask, attention, noise, positions)
            (thoughts.logprobs[real].sum() + h[real].square().sum()).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)
            results.append((thoughts, h, grads))
            assert model.config._attn_implementation == "sdpa"            # restored after every step
        (t0, h0, g0), (t1, h1, g1) = results
        assert torch.equal(t0.ids, t1.ids)
        torch.testing.assert_close(t1.logprobs[real], t0.logprobs[real], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(h1[real], h0[real], atol=1e-10, rtol=1e-10)
        assert g0.keys() == g1.keys() and len(g0) > 5
        for name in g0:
            scale = float(g0[name].abs().max())
            torch.testing.assert_close(g1[name], g0[name], atol=1e-10 * scale, rtol=0, msg=name)


@pytest.mark.parametrize("arch", ["mistral", "llama"])
def test_training_step_with_flex_equals_the_masked_step(arch):
    tok = build_tokenizer()
    model = tiny_model(tok, arch=arch, seed=0, hidden_size=32, num_hidden_layers=2, intermediate_size=64).double()
    assert model.config.num_key_value_heads < model.config.num_attention_heads    # grouped-query attention
    cfg = tiny(seq_len=16, thought_length=4, n_true=2)
    meta, head = prepare_model(model, tok, cfg)
    meta, head = meta.double(), head.double()
    enc = tok(["31415=4", "27182=(29790)0"], return_tensors="pt", padding=True)
    for positions in (None, torch.tensor([[5, 6], [5, -1]])):
        results = []
        for attention in ("mask", "flex"):
            out = quiet_star_step(model, meta, head, enc["input_ids"], enc["attention_mask"],
                                  cfg.replace(attention=attention), positions=positions,
                                  generator=torch.Generator().manual_seed(0))
            out.loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)
            results.append((out.loss.detach(), grads))
        (l0, g0), (l1, g1) = results
        torch.testing.assert_close(l1, l0, atol=0, rtol=1e-10)
        for name in g0:
            scale = float(g0[name].abs().max())
            torch.testing.assert_close(g1[name], g0[name], atol=1e-10 * scale, rtol=0, msg=name)


class _Attention(torch.nn.Module):
    sinks = None


def test_what_flex_does_not_implement_is_refused_in_one_line():
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ModelError, match="only valid inside"):
        flex_attention_forward(_Attention(), q, q, q, None)
    model = tiny_random_model("llama", "sdpa")
    mask = torch.ones(1, 3, dtype=torch.long)
    kv = torch.zeros(1, 2, 9, 4)                                      # 3 + 3 x step 2 keys
    with structured(model, seq=3, m=3, step=2, attention_mask=mask):
        assert model.config._attn_implementation == NAME
        with pytest.raises(ModelError, match="expected 3 queries and 9 keys"):
            flex_attention_forward(_Attention(), q, q, q, None)      # 3 keys, not 3 + 3 * 2
        with pytest.raises(ModelError) as err:
            flex_attention_forward(_Attention(), q, kv, kv, None, softcap=30.0)
        assert "\n" not in str(err.value) and "softcap" in str(err.value)
        assert str(err.value).endswith("use attention='mask' (the model's own attention with the Figure 3 mask)")
        training = _Attention().train()
        with pytest.raises(ModelError, match="dropout 0.1 in training.*use attention='mask'"):
            flex_attention_forward(training, q, kv, kv, None, dropout=0.1)
        with pytest.raises(ModelError, match="cannot read.*use attention='mask'"):
            flex_attention_forward(_Attention(), q, kv, kv, torch.zeros(1, 2, 3, 9))   # a mask per head
        out, _ = flex_attention_forward(_Attention(), q, kv, kv, None, layer_idx=0, position_ids=None)
        assert out.shape == (1, 3, 2, 4)                              # passive arguments are fine
    assert model.config._attn_implementation == "sdpa"


def _gpu_check_script():
    spec = importlib.util.spec_from_file_location("gpu_flex_check", REPO_ROOT / "scripts" / "gpu_flex_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_flex_check", module)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_script_parses_and_plans_on_cpu(capsys, monkeypatch):
    script = _gpu_check_script()
    args = script.parse_args(["--dry-run", "--sizes", "tiny,100m", "--dtypes", "bfloat16"])
    assert args.sizes == ["tiny", "100m"] and args.dtypes == ["bfloat16"]
    assert script.main(["--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "100m" in plan and "flex" in plan and "blocks" in plan
    with pytest.raises(SystemExit):
        script.parse_args(["--sizes", "huge"])
    assert "'huge': choose a comma-separated list from tiny, 100m" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert script.main(["--skip", "kernel,step,timing"]) == 2                # refuses without CUDA, in one line
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--device cpu" in err
