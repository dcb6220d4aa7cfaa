"""Algorithm 1 composed: mixing at initialisation, gradient routing, rewards, padding, golden values."""

import json
from pathlib import Path

import pytest
import torch

from qstar_mini.config import official, tiny
from qstar_mini.lm import body, lm_head, text_log_probs
from qstar_mini.mixing import MixingHead, mix_log_probs
from qstar_mini.models.tiny import build_tokenizer, tiny_model
from qstar_mini.step import prepare_model, quiet_star_step
from qstar_mini.thoughts import gumbel_noise

GOLDEN = Path(__file__).with_name("golden_step.json")
LINES = ["31415=4", "27182=(29790)0", "11111=5"]


def setup(cfg, seed=0, dtype=torch.float32):
    tok = build_tokenizer()
    model = tiny_model(tok, seed=seed, hidden_size=32, num_hidden_layers=2, intermediate_size=64).to(dtype)
    meta, head = prepare_model(model, tok, cfg)
    enc = tok(LINES, return_tensors="pt", padding=True)
    return tok, model, meta, head, enc["input_ids"], enc["attention_mask"]


def small(**kw):
    return tiny(seq_len=16, **kw)


def run(cfg, model, meta, head, ids, mask, seed=0, **kw):
    return quiet_star_step(model, meta, head, ids, mask, cfg, generator=torch.Generator().manual_seed(seed), **kw)


def test_at_initialisation_the_mix_is_exactly_the_base_prediction():
    cfg = small(mixing="hidden", mixer_sigmoid=False, mixer_bias_init=0.0)    # official mixing
    _, model, meta, head, ids, mask = setup(cfg)
    out = run(cfg, model, meta, head, ids, mask)
    assert bool((out.w == 0).all())
    expected = out.log_p_init[:, None].expand_as(out.log_p_talk)
    assert torch.equal(out.log_p_talk[out.valid[:, None].expand_as(out.w)],
                       expected[out.valid[:, None].expand_as(out.w)])


def test_hidden_state_mixing_equals_logit_mixing():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 30, bias=False).double()
    h0, h1 = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    w = torch.randn(5, dtype=torch.float64) * 2            # unbounded, as in the official code
    mixed = mix_log_probs(head, h0, h1, w, "hidden")
    logits = (1 - w[:, None]) * head(h0) + w[:, None] * head(h1)
    torch.testing.assert_close(mixed, torch.log_softmax(logits, -1))
    # ... and not log-prob mixing (the paper's formula), which differs when w is not 0 or 1
    logprob_mix = (1 - w[:, None]) * torch.log_softmax(head(h0), -1) + w[:, None] * torch.log_softmax(head(h1), -1)
    assert not torch.allclose(mixed, logprob_mix)


def test_paper_mixing_weights_the_base_side():
    head = torch.nn.Linear(4, 6, bias=False)
    h0, h1 = torch.randn(3, 4), torch.randn(3, 4)
    one = mix_log_probs(head, h0, h1, torch.ones(3), "logprob")
    torch.testing.assert_close(one, torch.log_softmax(head(h0), -1))       # w = 1: all base


def test_thinking_off_is_the_base_models_own_lm_loss():
    tok = build_tokenizer()
    model = tiny_model(tok, seed=0, hidden_size=32, num_hidden_layers=2, intermediate_size=64)
    enc = tok(LINES, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    hf_loss = model(**enc, labels=labels).loss                  # before the meta-tokens exist
    cfg = small(think=False)
    meta, head = prepare_model(model, tok, cfg)
    out = quiet_star_step(model, meta, head, enc["input_ids"], enc["attention_mask"], cfg)
    torch.testing.assert_close(out.loss, hf_loss, rtol=0, atol=1e-6)
    assert out.thoughts is None


def grads(loss, params):
    gs = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


def test_nll_reaches_mixing_head_and_lm_policy_reaches_only_the_lm():
    cfg = small()
    _, model, meta, head, ids, mask = setup(cfg)
    out = run(cfg, model, meta, head, ids, mask)
    head_params, lm_params = list(head.parameters()), list(model.parameters())
    nll_head, nll_lm = grads(out.talk_nll, head_params), grads(out.talk_nll, lm_params)
    # at initialisation the last layer is zero, so only it receives gradient at first
    assert nll_head[-2].abs().sum() > 0 and nll_head[-1].abs().sum() > 0, "NLL must train the mixing head"
    assert sum(g.abs().sum() for g in nll_lm) > 0, "NLL must train the LM"
    assert out.policy_loss.abs() > 0
    pol_head = grads(out.policy_loss, head_params)
    assert all(g.abs().sum() == 0 for g in pol_head), "REINFORCE must not reach the mixing head"
    assert not out.rewards.requires_grad, "the reward must carry no gradient"


def test_reinforce_gradient_is_reward_times_grad_log_p_of_the_sampled_thought():
    """Recompute log p(T_j) by re-scoring every thought as plain text: same gradient."""
    cfg = small(n_thoughts=2, thought_length=4, n_true=2)
    _, model, meta, head, ids, mask = setup(cfg, dtype=torch.float64)
    out = run(cfg, model, meta, head, ids, mask)
    params = list(model.parameters())
    g_step = grads(out.policy_loss, params)
    r = out.rewards.clamp(min=0)
    think = out.valid[..., 0]
    terms, count = [], 0
    for b in range(ids.shape[0]):
        for n in range(cfg.n_thoughts):
            for j in range(ids.shape[1]):
                if not think[b, j]:
                    continue
                count += 1
                seq = torch.cat([ids[b, : j + 1], out.thoughts[b, n, j, :-1]])
                h = body(model)(inputs_embeds=meta.embed(model, seq[None])).last_hidden_state[0]
                logp = text_log_probs(lm_head(model)(h), meta.ids, cfg.reinforce_temperature)
                start = j + 1                                     # index of <|startofthought|>
                sampled = out.thoughts[b, n, j, 1:-1]
                lp = logp[start: start + len(sampled)].gather(-1, sampled[:, None]).sum()
                terms.append(-r[b, n, j] * lp)
    reference = torch.stack(terms).sum() / (count * 1.0)
    g_ref = grads(reference, params)
    for a, b in zip(g_step, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_two_thoughts_get_opposite_rewards_and_only_the_better_is_reinforced():
    cfg = small(n_thoughts=2)
    _, model, meta, head, ids, mask = setup(cfg)
    out = run(cfg, model, meta, head, ids, mask)
    torch.testing.assert_close(out.rewards[:, 0], -out.rewards[:, 1])
    worse = out.rewards <= 0
    assert bool((out.reinforce[worse] == 0).all())
    better = (out.rewards > 0) & out.valid[..., 0][:, None]
    assert bool((out.reinforce[better] != 0).all())
    off = run(cfg.replace(clamp_negative_rewards=False), model, meta, head, ids, mask)
    assert bool((off.reinforce[worse & out.valid[..., 0][:, None] & (out.rewards < 0)] != 0).all())


def test_padding_never_leaks_into_losses_or_rewards():
    cfg = small()
    _, model, meta, head, ids, mask = setup(cfg)
    noise = gumbel_noise((ids.shape[0], cfg.n_thoughts, ids.shape[1], cfg.n_sampled, len(build_tokenizer()) + 2),
                         torch.Generator().manual_seed(5))
    a = quiet_star_step(model, meta, head, ids, mask, cfg, noise=noise)
    garbage = ids.masked_fill(mask == 0, 7)                  # change only padded tokens
    b = quiet_star_step(model, meta, head, garbage, mask, cfg, noise=noise)
    for name in ("loss", "base_nll", "talk_nll", "policy_loss"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-6)
    real = mask.bool()[:, None].expand_as(a.rewards)
    torch.testing.assert_close(a.rewards[real], b.rewards[real], rtol=0, atol=1e-6)
    assert bool((a.rewards[~real] == 0).all()) and bool((a.reinforce[~real] == 0).all())
    assert bool((a.nll[~a.valid[:, None].expand_as(a.nll)] == 0).all())


def test_meta_tokens_move_embedding_scale_times_faster_in_a_real_step():
    moved = {}
    for scale in (1.0, 100.0):
        cfg = small(embedding_scale=scale)
        _, model, meta, head, ids, mask = setup(cfg)
        before = meta.embeddings().detach().clone()
        opt = torch.optim.Adam(list(model.parameters()) + list(meta.parameters()) + list(head.parameters()), lr=1e-4)
        run(cfg, model, meta, head, ids, mask).loss.backward()
        opt.step()
        moved[scale] = (meta.embeddings().detach() - before).norm().item()
    assert moved[100.0] / moved[1.0] == pytest.approx(100.0, rel=0.02)


def golden_values():
    cfg = small()
    torch.manual_seed(0)
    _, model, meta, head, ids, mask = setup(cfg)
    out = run(cfg, model, meta, head, ids, mask, seed=123)
    return {
        "loss": out.loss.item(), "base_nll": out.base_nll.item(), "talk_nll": out.talk_nll.item(),
        "policy_loss": out.policy_loss.item(),
        "thoughts_row0": out.thoughts[0, 0, 3].tolist(),
        "w_mean": out.w[out.valid[:, None].expand_as(out.w)].mean().item(),
        "rewards_sum_abs": out.rewards.abs().sum().item(),
    }


def test_golden_regression_one_step():
    """Fixed seed, tiny model, one step: the loss and a few intermediates match stored values.
    Regenerate (only after an intended change) with: python tests/test_step.py"""
    stored = json.loads(GOLDEN.read_text())
    now = golden_values()
    assert now["thoughts_row0"] == stored["thoughts_row0"]
    for key in ("loss", "base_nll", "talk_nll", "policy_loss", "w_mean", "rewards_sum_abs"):
        assert now[key] == pytest.approx(stored[key], rel=1e-4, abs=1e-6), key


def test_official_preset_matches_the_released_code():
    cfg = official()
    assert (cfg.n_ahead, cfg.n_ahead_talk, cfg.n_passes) == (12, 4, 2)
    assert (cfg.embedding_scale, cfg.reinforce_temperature, cfg.clamp_negative_rewards) == (100.0, 3.0, True)
    assert (cfg.base_loss_weight, cfg.policy_loss_weight, cfg.lr, cfg.weight_decay) == (0.5, 1e6, 1e-6, 0.001)
    assert (cfg.warmup_steps, cfg.grad_clip, cfg.mixing, cfg.mixer_sigmoid) == (20, 1.0, "hidden", False)


def test_thinking_at_some_positions_equals_all_positions_restricted():
    """positions=(b, m) makes only m thoughts per row; they and their losses equal the
    all-positions step read at those positions (greedy thoughts, so both make the same ones)."""
    cfg = small(n_thoughts=2)
    _, model, meta, head, ids, mask = setup(cfg, dtype=torch.float64)
    positions = torch.tensor([[5, 1], [0, 3], [2, -1]])               # -1: no second thought on row 2
    full = quiet_star_step(model, meta, head, ids, mask, cfg, greedy=True)
    some = quiet_star_step(model, meta, head, ids, mask, cfg, greedy=True, positions=positions)
    rows = torch.arange(3)[:, None]
    p = positions.clamp(min=0)
    used = positions >= 0
    assert some.thoughts.shape == (3, 2, 2, cfg.thought_length)
    assert torch.equal(some.thoughts.transpose(1, 2)[used], full.thoughts.transpose(1, 2)[rows, p][used])
    for name in ("thought_logprobs", "h_thought", "w", "log_p_talk", "rewards"):
        a = getattr(some, name).transpose(1, 2)[used]
        b = getattr(full, name).transpose(1, 2)[rows, p][used]
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=name)
    # the loss equals the all-positions step that trains only those positions
    think_mask = torch.zeros_like(mask, dtype=torch.bool)
    think_mask[rows.expand_as(p)[used], p[used]] = True
    masked = quiet_star_step(model, meta, head, ids, mask, cfg, greedy=True, trained_mask=think_mask)
    for name in ("loss", "talk_nll", "policy_loss"):
        torch.testing.assert_close(getattr(some, name), getattr(masked, name), rtol=0, atol=1e-9, msg=name)


def test_paper_logprob_mixing_trains_with_finite_gradients():
    cfg = small(mixing="logprob", mixer_bias_init=3.0)
    _, model, meta, head, ids, mask = setup(cfg)
    out = run(cfg, model, meta, head, ids, mask)
    assert bool(((out.w > 0) & (out.w < 1)).all())                # w weights the base, in (0, 1)
    out.loss.backward()
    for p in list(model.parameters()) + list(head.parameters()) + list(meta.parameters()):
        assert p.grad is None or bool(torch.isfinite(p.grad).all())
    assert head.net[-1].bias.grad.abs() > 0


if __name__ == "__main__":       # regenerate golden_step.json after an intended change: python tests/test_step.py
    GOLDEN.write_text(json.dumps(golden_values(), indent=1, sort_keys=True) + "\n")
    print(GOLDEN.read_text())
