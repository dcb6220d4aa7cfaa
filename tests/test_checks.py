"""The exercise checks: the reference passes, typical mistakes fail with the expected message.

Each wrong implementation below is a mistake students make; the check must name it
(the ``match`` regex) rather than only say "differs".
"""

import pytest
import torch

from qstar_mini.teaching import checks
from qstar_mini.teaching.checks import CheckFailed
from qstar_mini.losses import future_targets, reinforce_loss, rewards
from qstar_mini.masks import causal_visibility, step_position_ids, thought_visibility
from qstar_mini.meta_tokens import init_embedding
from qstar_mini.mixing import mix_log_probs


def not_implemented(*args):
    raise NotImplementedError()


def expect_fail(check, fn, match):
    with pytest.raises(CheckFailed, match=match):
        check(fn)


ALL = [checks.check_thought_mask, checks.check_position_ids, checks.check_meta_init,
       checks.check_mix_hidden, checks.check_future_targets, checks.check_rewards,
       checks.check_reinforce_loss]


@pytest.mark.parametrize("check", ALL, ids=lambda c: c.__name__)
def test_not_implemented_says_so(check):
    with pytest.raises(CheckFailed, match="not implemented yet"):
        check(not_implemented)


@pytest.mark.parametrize("check", ALL, ids=lambda c: c.__name__)
def test_a_crash_is_reported_with_the_input(check):
    def crash(*args):
        raise RuntimeError("shape mismatch in my code")
    with pytest.raises(CheckFailed, match=r"raised RuntimeError: shape mismatch in my code\n  on: .*\n  hint: "):
        check(crash)


def test_checks_leave_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    checks.check_rewards(lambda lp, v: rewards(lp, v, "mean"))
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------- thought mask

def mask_ref(am, step):
    return thought_visibility(am, step)


def mask_no_diagonal_current(am, step):
    m = thought_visibility(am, step).clone()
    seq = am.shape[1]
    m[..., seq * step:] = False                       # the current step cannot see itself
    return m


def mask_all_thoughts(am, step):
    m = thought_visibility(am, step).clone()
    m[..., am.shape[1]:] = True                       # sees every position's thoughts
    return m


def mask_not_causal(am, step):
    m = thought_visibility(am, step).clone()
    m[..., : am.shape[1]] = am.bool()[:, None, None, :]
    return m


def mask_no_text_diagonal(am, step):
    m = thought_visibility(am, step).clone()
    seq = am.shape[1]
    m[..., :seq] &= ~torch.eye(seq, dtype=torch.bool)
    return m


def mask_ignores_padding(am, step):         # differs from the reference only in padded rows
    return thought_visibility(torch.ones_like(am), step)


def mask_additive(am, step):
    v = thought_visibility(am, step)
    return torch.zeros(v.shape).masked_fill(~v, torch.finfo(torch.float32).min)


def mask_no_head_axis(am, step):
    return thought_visibility(am, step)[:, 0]


def mask_text_only_blocks_missing(am, step):
    return causal_visibility(am)


def test_thought_mask(capsys):
    checks.check_thought_mask(mask_ref)
    assert "check_thought_mask: passed" in capsys.readouterr().out
    expect_fail(checks.check_thought_mask, mask_no_diagonal_current, "(?s)cannot see its own position.s thought.*including the current one")
    expect_fail(checks.check_thought_mask, mask_all_thoughts, "sees ANOTHER position's thought")
    expect_fail(checks.check_thought_mask, mask_not_causal, "sees FUTURE text")
    expect_fail(checks.check_thought_mask, mask_no_text_diagonal, "cannot see real text before it")
    expect_fail(checks.check_thought_mask, mask_additive, "additive")
    expect_fail(checks.check_thought_mask, mask_no_head_axis, "head axis")
    expect_fail(checks.check_thought_mask, mask_text_only_blocks_missing, "FOLLOWED by `step` blocks|shape")


def test_thought_mask_only_judges_real_query_rows(capsys):
    checks.check_thought_mask(mask_ignores_padding)
    assert "passed" in capsys.readouterr().out


# ---------------------------------------------------------------------------- position ids

def test_position_ids(capsys):
    checks.check_position_ids(step_position_ids)
    assert "check_position_ids: passed" in capsys.readouterr().out
    expect_fail(checks.check_position_ids, lambda am, step: step_position_ids(am, step) - 1, "off by -1")
    expect_fail(checks.check_position_ids, lambda am, step: step_position_ids(am, step) + 1, "off by \\+1")
    expect_fail(checks.check_position_ids,
                lambda am, step: (am.shape[1] * step + torch.arange(am.shape[1])).expand_as(am),
                "index in the KV cache")
    expect_fail(checks.check_position_ids, lambda am, step: torch.arange(am.shape[1]) + step, "shape")
    expect_fail(checks.check_position_ids, lambda am, step: step_position_ids(am, step).float(), "dtype")


def test_position_ids_ignores_padded_positions(capsys):
    def from_cumsum(am, step):               # differs from the reference only at padding
        return (am.cumsum(-1) - 1).clamp(min=0) + step
    checks.check_position_ids(from_cumsum)
    assert "passed" in capsys.readouterr().out


# ---------------------------------------------------------------------------- meta-token init

def meta_ref(model, tok, text):
    return init_embedding(model, tok, text, "mean")[0]


def meta_with_bos(model, tok, text):
    ids = tok(text)["input_ids"]
    return model.get_input_embeddings().weight[ids].detach().mean(0)


def meta_first(model, tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return model.get_input_embeddings().weight[ids[0]].detach().clone()


def meta_sum(model, tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return model.get_input_embeddings().weight[ids].detach().sum(0)


def meta_attached(model, tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return model.get_input_embeddings().weight[ids].mean(0)


def meta_view(model, tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return model.get_input_embeddings().weight.detach()[ids[0]]


def meta_rows(model, tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return model.get_input_embeddings().weight[ids].detach().clone()


def test_meta_init(capsys):
    checks.check_meta_init(meta_ref)
    checks.check_meta_init(lambda m, t, x: init_embedding(m, t, x, "mean"))   # the reference's tuple
    checks.check_meta_init(meta_first, how="first")                      # the official rule
    assert capsys.readouterr().out.count("check_meta_init: passed") == 3
    expect_fail(lambda fn: checks.check_meta_init(fn, how="first"), meta_ref, "averaged .* takes the first only")
    expect_fail(checks.check_meta_init, meta_with_bos, "<s>.*\n.*\n  hint: .*add_special_tokens=False")
    expect_fail(checks.check_meta_init, meta_first, "only the first token")
    expect_fail(checks.check_meta_init, meta_sum, "summed")
    expect_fail(checks.check_meta_init, meta_attached, "requires_grad")
    expect_fail(checks.check_meta_init, meta_view, "view into the model's embedding table")
    expect_fail(checks.check_meta_init, meta_rows, "one row per token")


# ---------------------------------------------------------------------------- mixing

def mix_ref(head, h0, h1, w):
    return mix_log_probs(head, h0, h1, w, "hidden")


def mix_swapped(head, h0, h1, w):
    return torch.log_softmax(head(w[..., None] * h0 + (1 - w[..., None]) * h1), -1)


def mix_logprob(head, h0, h1, w):
    w = w[..., None]
    return (1 - w) * torch.log_softmax(head(h0), -1) + w * torch.log_softmax(head(h1), -1)


def mix_paper(head, h0, h1, w):
    return mix_log_probs(head, h0, h1, w, "logprob")


def mix_logits(head, h0, h1, w):
    return head((1 - w[..., None]) * h0 + w[..., None] * h1)


def mix_detached_w(head, h0, h1, w):
    return mix_log_probs(head, h0, h1, w.detach(), "hidden")


def mix_no_broadcast(head, h0, h1, w):
    return torch.log_softmax(head((1 - w) * h0 + w * h1), -1)


def test_mix_hidden(capsys):
    checks.check_mix_hidden(mix_ref)
    assert "check_mix_hidden: passed" in capsys.readouterr().out
    expect_fail(checks.check_mix_hidden, mix_swapped, "weighted the BASE state")
    expect_fail(checks.check_mix_hidden, mix_logprob, "mixed log-probabilities")
    expect_fail(checks.check_mix_hidden, mix_paper, "mixed log-probabilities, w on the base")
    expect_fail(checks.check_mix_hidden, mix_logits, "returned logits")
    expect_fail(checks.check_mix_hidden, mix_detached_w, "no gradient reaches w")
    expect_fail(checks.check_mix_hidden, mix_no_broadcast, "(?s)raised RuntimeError.*w\\[\\.\\.\\., None\\]")


# ---------------------------------------------------------------------------- future targets

def targets_off_by_one(ids, am, n_true):
    seq = ids.shape[1]
    idx = torch.arange(seq)[:, None] + torch.arange(n_true)
    t, v = future_targets(ids, am, n_true)
    return ids[:, idx.clamp(max=seq - 1)].masked_fill(~v, 0), v


def targets_no_padding(ids, am, n_true):
    t, _ = future_targets(ids, torch.ones_like(am), n_true)
    _, v = future_targets(ids, torch.ones_like(am), n_true)
    return t, v


def targets_no_end(ids, am, n_true):
    t, v = future_targets(ids, am, n_true)
    return t, torch.ones_like(v)


def targets_minus_100(ids, am, n_true):
    t, v = future_targets(ids, am, n_true)
    return t.masked_fill(~v, -100), v


def test_future_targets(capsys):
    checks.check_future_targets(future_targets)
    assert "check_future_targets: passed" in capsys.readouterr().out
    expect_fail(checks.check_future_targets, targets_off_by_one, "off by one: you gave x_\\{j\\+i\\}")
    expect_fail(checks.check_future_targets, targets_no_padding, "padding tokens are marked as valid")
    expect_fail(checks.check_future_targets, targets_no_end, "past the end")
    expect_fail(checks.check_future_targets, targets_minus_100, "negative")
    expect_fail(checks.check_future_targets, lambda i, a, n: future_targets(i, a, n)[0], "return a pair")


# ---------------------------------------------------------------------------- rewards

def rewards_ref(lp, valid):
    return rewards(lp, valid, "mean")


def test_rewards(capsys):
    checks.check_rewards(rewards_ref)
    assert "check_rewards: passed" in capsys.readouterr().out
    expect_fail(checks.check_rewards, lambda lp, v: rewards(lp, v, "none"), "no baseline")
    expect_fail(checks.check_rewards,
                lambda lp, v: (lambda s: s - s.mean(1, keepdim=True))(lp.masked_fill(~v[:, None], 0).sum(-1)),
                "carries gradient")
    expect_fail(checks.check_rewards,
                lambda lp, v: (lambda s: s - s.mean(1, keepdim=True))(lp.detach().sum(-1)),
                "invalid entries")
    expect_fail(checks.check_rewards,
                lambda lp, v: (lambda s: s - s.mean(2, keepdim=True))(lp.detach().masked_fill(~v[:, None], 0).sum(-1)),
                "over POSITIONS")
    expect_fail(checks.check_rewards,
                lambda lp, v: (lambda s: s - s.mean(1, keepdim=True))(lp.detach().masked_fill(~v[:, None], 0).mean(-1)),
                "averaged over the n_true offsets")
    expect_fail(checks.check_rewards, lambda lp, v: -rewards(lp, v, "mean"), "sign is flipped")
    expect_fail(checks.check_rewards,
                lambda lp, v: (lambda s: s - (s.sum(1, keepdim=True) - s) / (s.shape[1] - 1))(
                    lp.detach().masked_fill(~v[:, None], 0).sum(-1)),
                "leave-one-out")
    expect_fail(checks.check_rewards, lambda lp, v: rewards(lp, v, "mean")[..., None].expand(*lp.shape),
                "one per offset")


# ---------------------------------------------------------------------------- REINFORCE

def reinforce_ref(r, lp, think):
    return reinforce_loss(r, lp, think, clamp_negative=True)


def reinforce_not_detached(r, lp, think):
    per = (-r.clamp(min=0) * lp.sum(-1)).masked_fill(~think[:, None], 0.0)
    mask = think[:, None].expand_as(per).double()
    return per, (per * mask).sum() / mask.sum()


def test_reinforce_loss(capsys):
    checks.check_reinforce_loss(reinforce_ref)
    assert "check_reinforce_loss: passed" in capsys.readouterr().out
    expect_fail(checks.check_reinforce_loss, lambda r, lp, t: reinforce_loss(r, lp, t, clamp_negative=False),
                "not clamped")
    expect_fail(checks.check_reinforce_loss, reinforce_not_detached, "gradient flows into the reward")
    expect_fail(checks.check_reinforce_loss,
                lambda r, lp, t: tuple(-x for x in reinforce_loss(r, lp, t)), "sign is flipped")
    expect_fail(checks.check_reinforce_loss,
                lambda r, lp, t: reinforce_loss(r, lp, torch.ones_like(t)), "think is False got a loss")
    expect_fail(checks.check_reinforce_loss,
                lambda r, lp, t: reinforce_loss((r > 0).double(), lp, t), "only the indicator")
    expect_fail(checks.check_reinforce_loss,
                lambda r, lp, t: reinforce_loss(r, lp.mean(-1, keepdim=True), t), "mean of token log-probs")
    expect_fail(checks.check_reinforce_loss,
                lambda r, lp, t: (lambda p: (p, p.mean()))(reinforce_loss(r, lp, t)[0]), "mean over ALL entries")
    expect_fail(checks.check_reinforce_loss,
                lambda r, lp, t: (lambda p: (p, p.sum()))(reinforce_loss(r, lp, t)[0]), "is a sum")
    expect_fail(checks.check_reinforce_loss,
                lambda r, lp, t: tuple(x.detach() for x in reinforce_loss(r, lp, t)), "carries no gradient")
    expect_fail(checks.check_reinforce_loss, lambda r, lp, t: reinforce_loss(r, lp, t)[1], "return a pair")
