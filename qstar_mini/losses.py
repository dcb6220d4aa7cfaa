"""Learn: the NLL loss, the reward and the REINFORCE loss (Algorithm 1, lines 2a, 2h-2k).

**What is log p^init_{j:j+n_true}?** Not a function to evaluate once but a tensor: for every
position j and every offset i = 0 .. n_true - 1, the base model's log-probability of the
true token x_{j+1+i}, read from the plain pass at position j + i. Shape
``(batch, seq, n_true)``; :func:`future_targets` says which of its entries exist (the last
positions of a sequence have fewer than n_true true tokens after them).

**NLL vs REINFORCE.**

* ``L^NLL`` = -log p^talk(true tokens): dense and differentiable. Its gradient flows through
  the mixed prediction into the mixing head, the LM's hidden states *after* the thought,
  and (through the attention to the thought's keys and values) the thought's hidden states.
  It teaches the model to **use** a given thought. It cannot change *which* tokens were
  sampled: sampling is not differentiable.
* ``L^REINFORCE`` = -r_j * log p(T_j | x_{<=j}, <|startofthought|>): a scalar reward r_j,
  computed with no gradient, multiplies the log-probability of the sampled thought. It
  teaches the model to **produce** thoughts that beat the other thoughts of the same position.
  Its gradient reaches the LM only through the log-probs of the sampled thought tokens.

**The reward** r_j = log p^talk(x_{j+1:j+n_true+1} | thought n) minus the mean of that over
the n_thoughts thoughts of the same position (official ``trice_mode``). The mean baseline
cancels everything the thoughts share, the base prediction included. With the official clamp
(``remove_negative_rewards``) only thoughts better than average are reinforced; with two
thoughts the centred rewards are opposite, so only the better one. With a single thought there
is no mean to take: the official code then rewards the improvement over the base prediction,
log p^talk - log p^init (``reward_baseline="base"``), so a thought is reinforced when the
mixed prediction beats the model without it.
"""

from __future__ import annotations

import torch

from qstar_mini.errors import NumericalError


def future_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor, n_true: int):
    """The true tokens each position's thought is judged on.

    input_ids, attention_mask: (batch, seq), right-padded.
    returns: targets (batch, seq, n_true) long, targets[b, j, i] = x_{j+1+i};
             valid (batch, seq, n_true) bool, False where x_{j+1+i} is past the end or padding.
    """
    batch, seq = input_ids.shape
    idx = torch.arange(seq, device=input_ids.device)[:, None] + 1 + torch.arange(n_true, device=input_ids.device)
    inside = idx < seq                                                       # (seq, n_true)
    idx = idx.clamp(max=seq - 1)
    targets = input_ids[:, idx]                                              # (batch, seq, n_true)
    valid = inside[None] & attention_mask.bool()[:, idx]
    return targets.masked_fill(~valid, 0), valid


def gather_ahead(x: torch.Tensor, n_true: int) -> torch.Tensor:
    """x at positions j, j+1, ..., j+n_true-1 for every j (zeros past the end).

    x: (batch, seq, ...).  returns: (batch, seq, n_true, ...).
    """
    seq = x.shape[1]
    idx = torch.arange(seq, device=x.device)[:, None] + torch.arange(n_true, device=x.device)
    inside = (idx < seq).to(x.dtype)
    out = x[:, idx.clamp(max=seq - 1)]                                      # (batch, seq, n_true, ...)
    return out * inside.view(1, seq, n_true, *([1] * (x.dim() - 2)))


def token_log_probs(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) from full distributions. log_probs: (..., vocab); targets: (...) long."""
    return log_probs.gather(-1, targets[..., None])[..., 0]


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of x over the True entries of valid (0 if there are none). Same shapes."""
    valid = valid.to(x.dtype)
    return (x * valid).sum() / valid.sum().clamp(min=1)


def base_nll(log_p_init_next: torch.Tensor, valid_next: torch.Tensor):
    """The plain LM loss on the text, no thought: -log p^init(x_{j+1}).

    log_p_init_next: (batch, seq) log p^init of the next true token (offset 0).
    valid_next:      (batch, seq) bool.
    returns: per-position NLL (batch, seq) (0 where invalid) and the scalar mean.
    """
    nll = -log_p_init_next.masked_fill(~valid_next, 0.0)
    return nll, masked_mean(nll, valid_next)


def talk_nll(log_p_talk: torch.Tensor, valid: torch.Tensor, pooling: str = "pooled"):
    """Algorithm 1, line 2h: L^NLL_j = -log p^talk(x_{j+1:j+n_true+1}), non-myopic.

    log_p_talk: (batch, n_thoughts, seq, n_true) log p^talk of the true tokens.
    valid:      (batch, seq, n_true) bool from :func:`future_targets`.
    pooling:    "pooled": one mean over every valid (thought, position, offset) entry;
                "per_offset": the mean over the n_true offsets of each offset's own mean (the
                official code: later offsets have fewer valid positions, so their entries
                weigh a little more).
    returns: per-entry NLL (batch, n_thoughts, seq, n_true) and the scalar loss.
    """
    valid = valid[:, None].expand_as(log_p_talk)
    nll = -log_p_talk.masked_fill(~valid, 0.0)
    if pooling == "pooled":
        return nll, masked_mean(nll, valid)
    if pooling != "per_offset":
        raise ValueError(f"unknown talk NLL pooling {pooling!r}; choose 'pooled' or 'per_offset'")
    per_offset = [masked_mean(nll[..., i], valid[..., i]) for i in range(nll.shape[-1])]
    return nll, torch.stack(per_offset).mean()


def rewards(log_p_talk: torch.Tensor, valid: torch.Tensor, baseline: str = "mean",
            log_p_init: torch.Tensor | None = None) -> torch.Tensor:
    """Algorithm 1, line 2i: r_j, one reward per thought, carrying no gradient.

    log_p_talk: (batch, n_thoughts, seq, n_true).  valid: (batch, seq, n_true).
    log_p_init: (batch, seq, n_true) log p^init of the same true tokens; needed for "base".
    returns: r (batch, n_thoughts, seq): the thought's total log p^talk of the true tokens,
    minus a baseline:
      "mean": the mean over the thoughts of the same position (official ``trice_mode``);
      "base": the base prediction's total, sum_i (log p^talk - log p^init): the improvement
              the thought brings (the official code with one pass, ``n_passes = 1``, where
              there is no mean to take);
      "none": nothing.
    """
    score = log_p_talk.detach().masked_fill(~valid[:, None], 0.0).sum(-1)    # (batch, n_thoughts, seq)
    if baseline == "mean":
        return score - score.mean(dim=1, keepdim=True)
    if baseline == "base":
        if log_p_init is None:
            raise ValueError("reward baseline 'base' needs log_p_init (batch, seq, n_true)")
        base = log_p_init.detach().masked_fill(~valid, 0.0).sum(-1)         # (batch, seq)
        return score - base[:, None]
    if baseline != "none":
        raise ValueError(f"unknown reward baseline {baseline!r}; choose 'mean', 'base' or 'none'")
    return score


def reinforce_loss(r: torch.Tensor, thought_logprobs: torch.Tensor, trained: torch.Tensor,
                   clamp_negative: bool = True, reduction: str = "sum",
                   counted: torch.Tensor | None = None):
    """Algorithm 1, line 2j: L^REINFORCE_j = -r_j * 1[r_j > 0] * log p(T_j | x_{<=j}, <|startofthought|>).

    r:                (batch, n_thoughts, seq) rewards (detached here again, to be safe).
    thought_logprobs: (batch, n_thoughts, seq, t - 2) per sampled token, with graph.
    trained:          (batch, seq) bool, positions whose thought is trained (real, with a target).
    reduction:        log p(T_j) as the "sum" of its tokens' log-probs (the thought's
                      log-probability) or their "mean" (the official code: the same direction,
                      t - 2 times smaller, so its policy weight means something else).
    counted:          (batch, seq) bool, the entries the mean divides by; default ``trained``.
                      The official code counts padding too (see ``policy_positions``).
    returns: per-thought loss (batch, n_thoughts, seq) and the scalar mean.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"unknown REINFORCE reduction {reduction!r}; choose 'sum' or 'mean'")
    r = r.detach()
    if clamp_negative:
        r = r.clamp(min=0.0)
    log_p_thought = thought_logprobs.sum(-1) if reduction == "sum" else thought_logprobs.mean(-1)
    mask = trained[:, None].expand_as(log_p_thought)
    loss = (-r * log_p_thought).masked_fill(~mask, 0.0)
    counted = mask if counted is None else counted[:, None].expand_as(log_p_thought)
    return loss, loss.sum() / counted.to(loss.dtype).sum().clamp(min=1)


def combined_loss(base: torch.Tensor, talk: torch.Tensor, policy: torch.Tensor,
                  base_weight: float, policy_weight: float) -> torch.Tensor:
    """Algorithm 1, line 2k, with the official weights:
    ``base_weight * L^base + (1 - base_weight) * L^NLL + policy_weight * L^REINFORCE``."""
    return base_weight * base + (1.0 - base_weight) * talk + policy_weight * policy


def check_finite(step: int | None = None, **tensors: torch.Tensor) -> None:
    """Stop with a :class:`NumericalError` naming the tensor if any holds NaN or inf."""
    for name, value in tensors.items():
        if value is not None and not bool(torch.isfinite(value.detach()).all()):
            where = f" at step {step}" if step is not None else ""
            raise NumericalError(f"{name} has NaN or inf{where}; lower the learning rate or the "
                                 f"policy_loss_weight, or check the data")
