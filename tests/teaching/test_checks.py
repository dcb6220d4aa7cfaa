"""The exercise checks: the reference passes, typical mistakes fail with the expected message.

Each wrong implementation below is a mistake students make; the check must name it
(the ``match`` regex) rather than only say "differs".
"""

import pytest
import torch

from qstar_mini.teaching import checks
from qstar_mini.teaching.checks import CheckFailed


# ---------------------------------------------------------------------------- independent solutions
# Written with torch only, as a student would: the package's references are disabled while a
# check runs, so the right answers and the mistakes below are built from these.

def tv_solution(am, step):
    batch, seq = am.shape
    text = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None] & am.bool()[:, None, None, :]
    blocks = torch.eye(seq, dtype=torch.bool).repeat(1, step)[None, None].expand(batch, 1, seq, seq * step)
    return torch.cat([text, blocks], -1)


def spi_solution(am, step):
    batch, seq = am.shape
    return (torch.arange(seq) + step).expand(batch, seq)


def init_solution(model, tok, text, how="mean"):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rows = model.get_input_embeddings().weight.detach()[ids]
    return (rows.mean(0) if how == "mean" else rows[0]).clone(), ids


def mix_solution(head, h0, h1, w, mode="hidden"):
    w = w[..., None]
    if mode == "hidden":
        return torch.log_softmax(head((1 - w) * h0 + w * h1), -1)
    return w * torch.log_softmax(head(h0), -1) + (1 - w) * torch.log_softmax(head(h1), -1)


def targets_solution(ids, am, n_true):
    seq = ids.shape[1]
    idx = torch.arange(seq)[:, None] + 1 + torch.arange(n_true)
    inside = idx < seq
    idx = idx.clamp(max=seq - 1)
    valid = inside[None] & am.bool()[:, idx]
    return ids[:, idx].masked_fill(~valid, 0), valid


def rewards_solution(lp, valid, baseline="mean"):
    score = lp.detach().masked_fill(~valid[:, None], 0.0).sum(-1)
    return score - score.mean(1, keepdim=True) if baseline == "mean" else score


def reinforce_solution(r, lp, think, clamp_negative=True):
    r = r.detach().clamp(min=0.0) if clamp_negative else r.detach()
    logp = lp.sum(-1)
    mask = think[:, None].expand_as(logp)
    per = (-r * logp).masked_fill(~mask, 0.0)
    return per, per.sum() / mask.sum().clamp(min=1)


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
    with pytest.raises(CheckFailed, match=r"raised RuntimeError: shape mismatch in my code "
                                          r"\(in crash, line: raise RuntimeError\(.*\)\)\n  on: .*\n  hint: "):
        check(crash)


def test_checks_leave_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    checks.check_rewards(lambda lp, v: rewards_solution(lp, v, "mean"))
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------- thought mask

def mask_ref(am, step):
    return tv_solution(am, step)


def mask_no_diagonal_current(am, step):
    m = tv_solution(am, step).clone()
    seq = am.shape[1]
    m[..., seq * step:] = False                       # the current step cannot see itself
    return m


def mask_all_thoughts(am, step):
    m = tv_solution(am, step).clone()
    m[..., am.shape[1]:] = True                       # sees every position's thoughts
    return m


def mask_not_causal(am, step):
    m = tv_solution(am, step).clone()
    m[..., : am.shape[1]] = am.bool()[:, None, None, :]
    return m


def mask_no_text_diagonal(am, step):
    m = tv_solution(am, step).clone()
    seq = am.shape[1]
    m[..., :seq] &= ~torch.eye(seq, dtype=torch.bool)
    return m


def mask_ignores_padding(am, step):         # differs from the reference only in padded rows
    return tv_solution(torch.ones_like(am), step)


def mask_additive(am, step):
    v = tv_solution(am, step)
    return torch.zeros(v.shape).masked_fill(~v, torch.finfo(torch.float32).min)


def mask_no_head_axis(am, step):
    return tv_solution(am, step)[:, 0]


def mask_text_only_blocks_missing(am, step):
    return tv_solution(am, step)[..., : am.shape[1]]


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
    checks.check_position_ids(spi_solution)
    assert "check_position_ids: passed" in capsys.readouterr().out
    expect_fail(checks.check_position_ids, lambda am, step: spi_solution(am, step) - 1, "off by -1")
    expect_fail(checks.check_position_ids, lambda am, step: spi_solution(am, step) + 1, "off by \\+1")
    expect_fail(checks.check_position_ids,
                lambda am, step: (am.shape[1] * step + torch.arange(am.shape[1])).expand_as(am),
                "index in the KV cache")
    expect_fail(checks.check_position_ids, lambda am, step: torch.arange(am.shape[1]) + step, "shape")
    expect_fail(checks.check_position_ids, lambda am, step: spi_solution(am, step).float(), "dtype")


def test_position_ids_ignores_padded_positions(capsys):
    def from_cumsum(am, step):               # differs from the reference only at padding
        return (am.cumsum(-1) - 1).clamp(min=0) + step
    checks.check_position_ids(from_cumsum)
    assert "passed" in capsys.readouterr().out


# ---------------------------------------------------------------------------- meta-token init

def meta_ref(model, tok, text):
    return init_solution(model, tok, text, "mean")[0]


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
    checks.check_meta_init(lambda m, t, x: init_solution(m, t, x, "mean"))   # the reference's tuple
    checks.check_meta_init(meta_first, how="first")                      # the official rule
    assert capsys.readouterr().out.count("check_meta_init: passed") == 3
    expect_fail(lambda fn: checks.check_meta_init(fn, how="first"), meta_ref, "averaged .* takes the first only")
    expect_fail(checks.check_meta_init, meta_with_bos, "<s>.*\n.*\n  hint: .*not to add special tokens")
    expect_fail(checks.check_meta_init, meta_first, "only the first token")
    expect_fail(checks.check_meta_init, meta_sum, "summed")
    expect_fail(checks.check_meta_init, meta_attached, "requires_grad")
    expect_fail(checks.check_meta_init, meta_view, "view into the model's embedding table")
    expect_fail(checks.check_meta_init, meta_rows, "one row per token")


# ---------------------------------------------------------------------------- mixing

def mix_ref(head, h0, h1, w):
    return mix_solution(head, h0, h1, w, "hidden")


def mix_swapped(head, h0, h1, w):
    return torch.log_softmax(head(w[..., None] * h0 + (1 - w[..., None]) * h1), -1)


def mix_logprob(head, h0, h1, w):
    w = w[..., None]
    return (1 - w) * torch.log_softmax(head(h0), -1) + w * torch.log_softmax(head(h1), -1)


def mix_paper(head, h0, h1, w):
    return mix_solution(head, h0, h1, w, "logprob")


def mix_logits(head, h0, h1, w):
    return head((1 - w[..., None]) * h0 + w[..., None] * h1)


def mix_detached_w(head, h0, h1, w):
    return mix_solution(head, h0, h1, w.detach(), "hidden")


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
    expect_fail(checks.check_mix_hidden, mix_no_broadcast, "(?s)raised RuntimeError.*trailing axis of size 1")


# ---------------------------------------------------------------------------- future targets

def targets_off_by_one(ids, am, n_true):
    seq = ids.shape[1]
    idx = torch.arange(seq)[:, None] + torch.arange(n_true)
    t, v = targets_solution(ids, am, n_true)
    return ids[:, idx.clamp(max=seq - 1)].masked_fill(~v, 0), v


def targets_no_padding(ids, am, n_true):
    t, _ = targets_solution(ids, torch.ones_like(am), n_true)
    _, v = targets_solution(ids, torch.ones_like(am), n_true)
    return t, v


def targets_no_end(ids, am, n_true):
    t, v = targets_solution(ids, am, n_true)
    return t, torch.ones_like(v)


def targets_minus_100(ids, am, n_true):
    t, v = targets_solution(ids, am, n_true)
    return t.masked_fill(~v, -100), v


def test_future_targets(capsys):
    checks.check_future_targets(targets_solution)
    assert "check_future_targets: passed" in capsys.readouterr().out
    expect_fail(checks.check_future_targets, targets_off_by_one, "off by one: you gave x_\\{j\\+i\\}")
    expect_fail(checks.check_future_targets, targets_no_padding, "padding tokens are marked as valid")
    expect_fail(checks.check_future_targets, targets_no_end, "past the end")
    expect_fail(checks.check_future_targets, targets_minus_100, "negative")
    expect_fail(checks.check_future_targets, lambda i, a, n: targets_solution(i, a, n)[0], "return a pair")


# ---------------------------------------------------------------------------- rewards

def rewards_ref(lp, valid):
    return rewards_solution(lp, valid, "mean")


def test_rewards(capsys):
    checks.check_rewards(rewards_ref)
    assert "check_rewards: passed" in capsys.readouterr().out
    expect_fail(checks.check_rewards, lambda lp, v: rewards_solution(lp, v, "none"), "no baseline")
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
    expect_fail(checks.check_rewards, lambda lp, v: -rewards_solution(lp, v, "mean"), "sign is flipped")
    expect_fail(checks.check_rewards,
                lambda lp, v: (lambda s: s - (s.sum(1, keepdim=True) - s) / (s.shape[1] - 1))(
                    lp.detach().masked_fill(~v[:, None], 0).sum(-1)),
                "leave-one-out")
    expect_fail(checks.check_rewards, lambda lp, v: rewards_solution(lp, v, "mean")[..., None].expand(*lp.shape),
                "one per offset")


# ---------------------------------------------------------------------------- REINFORCE

def reinforce_ref(r, lp, think):
    return reinforce_solution(r, lp, think, clamp_negative=True)


def reinforce_not_detached(r, lp, think):
    per = (-r.clamp(min=0) * lp.sum(-1)).masked_fill(~think[:, None], 0.0)
    mask = think[:, None].expand_as(per).double()
    return per, (per * mask).sum() / mask.sum()


def test_reinforce_loss(capsys):
    checks.check_reinforce_loss(reinforce_ref)
    assert "check_reinforce_loss: passed" in capsys.readouterr().out
    expect_fail(checks.check_reinforce_loss, lambda r, lp, t: reinforce_solution(r, lp, t, clamp_negative=False),
                "not clamped")
    expect_fail(checks.check_reinforce_loss, reinforce_not_detached, "gradient flows into the reward")
    expect_fail(checks.check_reinforce_loss,
                lambda r, lp, t: tuple(-x for x in reinforce_solution(r, lp, t)), "sign is flipped")
    expect_fail(checks.check_reinforce_loss,
                lambda r, lp, t: reinforce_solution(r, lp, torch.ones_like(t)), "think is False got a loss")
    expect_fail(checks.check_reinforce_loss,
                lambda r, lp, t: reinforce_solution((r > 0).double(), lp, t), "only the indicator")
    expect_fail(checks.check_reinforce_loss,
                lambda r, lp, t: reinforce_solution(r, lp.mean(-1, keepdim=True), t), "mean of token log-probs")
    expect_fail(checks.check_reinforce_loss,
                lambda r, lp, t: (lambda p: (p, p.mean()))(reinforce_solution(r, lp, t)[0]), "mean over ALL entries")
    expect_fail(checks.check_reinforce_loss,
                lambda r, lp, t: (lambda p: (p, p.sum()))(reinforce_solution(r, lp, t)[0]), "is a sum")
    expect_fail(checks.check_reinforce_loss,
                lambda r, lp, t: tuple(x.detach() for x in reinforce_solution(r, lp, t)), "carries no gradient")
    expect_fail(checks.check_reinforce_loss, lambda r, lp, t: reinforce_solution(r, lp, t)[1], "return a pair")


# ---------------------------------------------------------------------------- the references are disabled

import functools  # noqa: E402
import warnings  # noqa: E402

import qstar_mini.losses  # noqa: E402
import qstar_mini.masks  # noqa: E402
import qstar_mini.meta_tokens  # noqa: E402
import qstar_mini.mixing  # noqa: E402
from qstar_mini.losses import rewards as aliased_rewards  # noqa: E402  - a notebook's import, renamed

REFERENCE_CALLERS = [
    (checks.check_thought_mask, "qstar_mini.masks.thought_visibility",
     lambda am, step: qstar_mini.masks.thought_visibility(am, step)),
    (checks.check_thought_mask, "qstar_mini.masks.thought_mask",
     lambda am, step: qstar_mini.masks.thought_mask(am, step) == 0),
    (checks.check_position_ids, "qstar_mini.masks.step_position_ids",
     lambda am, step: qstar_mini.masks.step_position_ids(am, step)),
    (checks.check_meta_init, "qstar_mini.meta_tokens.init_embedding",
     lambda m, t, x: qstar_mini.meta_tokens.init_embedding(m, t, x, "mean")),
    (checks.check_mix_hidden, "qstar_mini.mixing.mix_log_probs",
     lambda head, h0, h1, w: qstar_mini.mixing.mix_log_probs(head, h0, h1, w, "hidden")),
    (checks.check_future_targets, "qstar_mini.losses.future_targets",
     lambda i, a, n: qstar_mini.losses.future_targets(i, a, n)),
    (checks.check_rewards, "qstar_mini.losses.rewards", lambda lp, v: aliased_rewards(lp, v, "mean")),
    (checks.check_reinforce_loss, "qstar_mini.losses.reinforce_loss",
     lambda r, lp, t: qstar_mini.losses.reinforce_loss(r, lp, t)),
]


@pytest.mark.parametrize("check, qualname, student", REFERENCE_CALLERS, ids=lambda x: getattr(x, "__name__", "")[:20])
def test_calling_the_reference_fails_the_check(check, qualname, student):
    with pytest.raises(CheckFailed, match=rf"FAILED\. this exercise asks you to write it with torch only; "
                                          rf"{qualname} is disabled while your function is checked\n"):
        check(student)


def test_the_reference_itself_a_partial_a_closure_and_a_swallowed_error_all_fail():
    original = qstar_mini.losses.rewards
    expect_fail(checks.check_rewards, original, "qstar_mini.losses.rewards is disabled")
    expect_fail(checks.check_rewards, functools.partial(original, baseline="mean"), "rewards is disabled")

    def make_closure():
        ref = original
        return lambda lp, v: ref(lp, v)
    expect_fail(checks.check_rewards, make_closure(), "rewards is disabled")

    def swallowed(lp, v):                # calls the reference, catches the error, answers anyway
        try:
            return aliased_rewards(lp, v)
        except Exception:
            return rewards_solution(lp, v)
    expect_fail(checks.check_rewards, swallowed, "rewards is disabled")


def test_the_references_work_again_after_a_check():
    originals = {(qstar_mini.losses, "rewards"): qstar_mini.losses.rewards,
                 (qstar_mini.masks, "thought_visibility"): qstar_mini.masks.thought_visibility,
                 (qstar_mini.masks, "step_position_ids"): qstar_mini.masks.step_position_ids}
    expect_fail(checks.check_rewards, lambda lp, v: aliased_rewards(lp, v), "disabled")
    expect_fail(checks.check_thought_mask, lambda am, step: qstar_mini.masks.thought_visibility(am, step), "disabled")
    checks.check_end_to_end(tv_solution, spi_solution)
    for (module, attr), fn in originals.items():
        assert getattr(module, attr) is fn
    assert aliased_rewards is qstar_mini.losses.rewards and checks.rewards is qstar_mini.losses.rewards
    lp, valid = torch.zeros(2, 3, 4, 1), torch.ones(2, 4, 1, dtype=torch.bool)
    assert torch.equal(aliased_rewards(lp, valid), torch.zeros(2, 3, 4))
    assert qstar_mini.masks.thought_visibility(torch.ones(1, 3, dtype=torch.long), 1).shape == (1, 1, 3, 6)


def test_an_independent_solution_passes_every_check(capsys):
    checks.check_thought_mask(tv_solution)
    checks.check_position_ids(spi_solution)
    checks.check_meta_init(lambda m, t, x: init_solution(m, t, x)[0])
    checks.check_mix_hidden(mix_solution)
    checks.check_future_targets(targets_solution)
    checks.check_rewards(rewards_solution)
    checks.check_reinforce_loss(reinforce_solution)
    checks.check_end_to_end(tv_solution, spi_solution)
    assert capsys.readouterr().out.count(": passed") == 8


# ---------------------------------------------------------------------------- hints by level

def test_a_generic_failure_names_the_mistake_without_the_formula():
    wrong = lambda lp, v: rewards_solution(lp, v) * 1.5                       # noqa: E731
    with pytest.raises(CheckFailed) as info:
        checks.check_rewards(wrong)
    msg = str(info.value)
    assert "rewards differ" in msg and "checks.hint('check_rewards', 2)" in msg
    assert "keepdim" not in msg and "masked_fill" not in msg


def test_hint_levels_grow(capsys):
    checks._hint_level.clear()
    one = checks.hint("check_rewards")
    two = checks.hint("check_rewards")
    three = checks.hint(checks.check_rewards, 3)
    assert one.count("\n") == 0 and two.count("\n") == 1 and three.count("\n") == 2
    assert "keepdim" not in two and "score.mean(dim=1, keepdim=True)" in three
    assert "hint 3/3" in capsys.readouterr().out
    for name in checks.HINTS:
        assert len(checks.HINTS[name]) == 3
    with pytest.raises(ValueError, match="no hints"):
        checks.hint("check_nothing")


# ---------------------------------------------------------------------------- common mistakes, named

def rewards_valid_without_thought_axis(lp, valid):
    score = lp.detach().masked_fill(~valid, 0.0).sum(-1)
    return score - score.mean(1, keepdim=True)


def reinforce_think_without_thought_axis(r, lp, think):
    per = (-r.detach().clamp(min=0) * lp.sum(-1)).masked_fill(~think, 0.0)
    return per, per.sum() / think.sum()


def reinforce_mean_over_positions(r, lp, think):
    per, _ = reinforce_solution(r, lp, think)
    return per, per.sum() / think.sum()


def test_common_mistakes_are_named():
    expect_fail(checks.check_rewards, rewards_valid_without_thought_axis,
                r"valid has no thought axis.*\n.*\n  hint: give valid a thought axis of size 1")
    expect_fail(checks.check_reinforce_loss, reinforce_think_without_thought_axis,
                r"think has no thought axis.*\n.*\n  hint: give think a thought axis of size 1")
    expect_fail(checks.check_reinforce_loss, reinforce_mean_over_positions,
                r"the scalar is n_thoughts = 3 times too large \(\d+\.\d{4}, expected \d+\.\d{4}\): you divided by "
                r"the number of thinking positions")
    expect_fail(checks.check_rewards,
                lambda lp, v: (lambda s: s - s.mean((1, 2), keepdim=True))(lp.detach().masked_fill(~v[:, None], 0).sum(-1)),
                "one global mean over all thoughts AND positions")
    expect_fail(checks.check_rewards,
                lambda lp, v: (lambda s: s - s.mean())(lp.detach().masked_fill(~v[:, None], 0).sum(-1)),
                "one global mean over the whole batch")
    expect_fail(checks.check_mix_hidden,
                lambda head, h0, h1, w: mix_solution(head, h0, h1, torch.sigmoid(w)), "applied a sigmoid to w\n")
    expect_fail(checks.check_position_ids, lambda am, step: spi_solution(am, step).int(),
                r"dtype torch.int32, expected torch.long \(int64\)")


def test_the_square_case_would_hide_the_missing_thought_axis():
    """Why the checks use batch != n_thoughts: with batch == n_thoughts the mistake runs silently."""
    valid, lp, _ = checks._loss_cases(1, sizes=((3, (5, 3, 4), 5, 2),))[0]
    assert not torch.allclose(rewards_valid_without_thought_axis(lp, valid), rewards_solution(lp, valid))
    for valid, lp, _ in checks._loss_cases(0):
        assert lp.shape[0] != lp.shape[1] and lp.shape[0] > 1


# ---------------------------------------------------------------------------- short failures

FAILING = [
    (checks.check_rewards, lambda lp, v: rewards_solution(lp, v) * 1.5),
    (checks.check_rewards, lambda lp, v: lp.masked_fill(~v[:, None], 0).sum(-1) * 1.5),   # carries grad
    (checks.check_reinforce_loss, lambda r, lp, t: (lambda p: (p * 1.5, p.sum()))(reinforce_solution(r, lp, t)[0])),
    (checks.check_reinforce_loss, lambda r, lp, t: (lambda p: (p, p.sum() * 0.3))(reinforce_solution(r, lp, t)[0])),
    (checks.check_mix_hidden, lambda head, h0, h1, w: mix_solution(head, h0, h1, w * 0.9)),
    (checks.check_meta_init, lambda m, t, x: init_solution(m, t, x)[0] * 1.1 + 0.01),
    (checks.check_position_ids, lambda am, step: spi_solution(am, step) * 2),
    (checks.check_rewards, rewards_valid_without_thought_axis),
]


@pytest.mark.parametrize("check, student", FAILING)
def test_a_failure_is_one_message_without_warnings_or_chained_cause(check, student):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckFailed) as info:
            check(student)
    err = info.value
    assert err.__cause__ is None and err.__suppress_context__
    assert str(err).startswith(f"{check.__name__}: FAILED. ") and str(err).count("\n") <= 2


def test_ipython_shows_only_the_message():
    """What the shell shows (a terminal prints it, a kernel sends it as the error's traceback)."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shown = []
    try:
        assert checks._register_ipython(shell)
        shell._showtraceback = lambda etype, value, stb: shown.append(shell.InteractiveTB.stb2text(stb))
        shell.user_ns.update(checks=checks, student=lambda lp, v: rewards_solution(lp, v) * 1.5)
        result = shell.run_cell("checks.check_rewards(student)")
    finally:
        InteractiveShell.clear_instance()
    assert isinstance(result.error_in_exec, CheckFailed) and len(shown) == 1
    text = shown[0].strip()
    assert text.startswith("CheckFailed: check_rewards: FAILED. rewards differ")
    assert "Traceback" not in text and "checks.py" not in text and text.count("\n") == 2


# ---------------------------------------------------------------------------- end to end

def test_end_to_end_passes_with_correct_pieces(capsys):
    checks.check_end_to_end(tv_solution, spi_solution)
    assert "check_end_to_end: passed" in capsys.readouterr().out


def test_end_to_end_names_a_wrong_mask():
    def sees_all_thoughts(am, step):
        m = tv_solution(am, step).clone()
        m[..., am.shape[1]:] = True
        return m
    expect_fail(lambda fn: checks.check_end_to_end(fn, spi_solution), sees_all_thoughts,
                r"your mask is wrong: with it, the parallel thoughts .*naive loop's.*your position ids alone give the right "
                r"thoughts\n.*\n  hint: run check_thought_mask")


def test_end_to_end_names_wrong_position_ids_and_unusable_pieces():
    def kv_cache_index(am, step):
        return (am.shape[1] * step + torch.arange(am.shape[1])).expand_as(am)
    expect_fail(lambda fn: checks.check_end_to_end(tv_solution, fn), kv_cache_index,
                "your position ids are wrong: .*your mask alone gives the right thoughts")
    expect_fail(lambda fn: checks.check_end_to_end(fn, spi_solution), lambda am, step: tv_solution(am, step).float(),
                "your mask function returned dtype torch.float32.*run check_thought_mask first")
    # worded like every check's stub message: the student copy's test requires "check_...: not implemented yet"
    expect_fail(lambda fn: checks.check_end_to_end(fn, spi_solution), not_implemented,
                r"^check_end_to_end: not implemented yet \(your mask function is not implemented yet\)")
    expect_fail(lambda fn: checks.check_end_to_end(tv_solution, fn), not_implemented,
                r"^check_end_to_end: not implemented yet \(your position-id function")
    expect_fail(lambda fn: checks.check_end_to_end(fn, spi_solution), qstar_mini.masks.thought_visibility,
                "qstar_mini.masks.thought_visibility is disabled")
    expect_fail(lambda fn: checks.check_end_to_end(tv_solution, fn),
                lambda am, step: qstar_mini.masks.step_position_ids(am, step),
                "qstar_mini.masks.step_position_ids is disabled")


@pytest.mark.parametrize("call", [
    lambda seed: checks.check_thought_mask(tv_solution, seed=seed),
    lambda seed: checks.check_position_ids(spi_solution, seed=seed),
    lambda seed: checks.check_end_to_end(tv_solution, spi_solution, seed=seed),
    lambda seed: checks.check_meta_init(init_solution, seed=seed),
    lambda seed: checks.check_mix_hidden(mix_solution, seed=seed),
    lambda seed: checks.check_future_targets(targets_solution, seed=seed),
    lambda seed: checks.check_rewards(rewards_solution, seed=seed),
    lambda seed: checks.check_reinforce_loss(reinforce_solution, seed=seed),
], ids=["mask", "position_ids", "end_to_end", "meta_init", "mix_hidden", "targets", "rewards", "reinforce"])
def test_a_check_leaves_the_global_random_state_alone(call, capsys):
    """A notebook's outputs after a check cell must not depend on how many checks ran (hidden tests
    run only in the autograder): no check draws from torch's global generator."""
    torch.manual_seed(0)
    expected = torch.rand(4)
    for seed in (0, 11):
        torch.manual_seed(0)
        call(seed)
        assert torch.equal(torch.rand(4), expected)


# ---------------------------------------------------------------------------- inputs drawn at check time, the guarded module

def test_a_drawn_seed_is_named_and_repeats_the_failure(capsys):
    import re

    answers = {}
    for valid, lp, _ in checks._loss_cases(0):                        # what seed 0 asks, and nothing else
        answers[lp.numpy().tobytes()] = rewards_solution(lp, valid)

    def table(lp, valid):
        return answers.get(lp.detach().numpy().tobytes(), torch.zeros(lp.shape[:3], dtype=lp.dtype)).clone()

    with pytest.raises(CheckFailed, match=r"^check_rewards: FAILED on inputs drawn at random now "
                                          r"\(checks\.check_rewards\(\.\.\., seed=\d+\) repeats them\)\. ") as info:
        checks.check_rewards(table)
    seed = int(re.search(r"seed=(\d+)", str(info.value)).group(1))
    with pytest.raises(CheckFailed, match="rewards differ"):
        checks.check_rewards(table, seed=seed)
    checks.check_rewards(rewards_solution, seed=None)
    assert re.search(r"check_rewards: passed \(.*, seed \d+\)", capsys.readouterr().out)


def test_the_checks_module_gives_its_own_checks_and_keeps_its_class():
    import types

    real = checks.check_rewards
    vars(checks)["check_rewards"] = print                     # what `checks.check_rewards = print` does
    try:
        assert checks.check_rewards is real
        with pytest.raises(CheckFailed, match="checks.check_rewards was replaced or removed in this notebook"):
            checks.check_rewards(rewards_solution)
    finally:
        vars(checks)["check_rewards"] = real
    with pytest.raises(AttributeError, match="cannot be changed"):
        checks.__class__ = types.ModuleType
    assert type(checks) is not types.ModuleType
