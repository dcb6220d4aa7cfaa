"""Algorithm 1, composed: one Quiet-STaR step on a mini-batch, every intermediate kept.

Read :func:`quiet_star_step` top to bottom: each block is one line of Algorithm 1, in order,
calling the function of this package that implements it. The result is a
:class:`StepOutput` whose ``loss`` is ready for ``loss.backward()`` and an optimiser step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import torch
from torch import nn

from qstar_mini.config import QuietStarConfig
from qstar_mini.errors import ConfigError, ModelError, QStarError
from qstar_mini.lm import check_supported, lm_head, text_log_probs
from qstar_mini.losses import (base_nll, check_finite, combined_loss, future_targets, gather_ahead,
                     reinforce_loss, rewards, talk_nll, token_log_probs)
from qstar_mini.meta_tokens import MetaTokens, add_meta_tokens
from qstar_mini.mixing import MixingHead, mix_log_probs, mixing_weight
from qstar_mini.fast.rescore import rescore_thoughts
from qstar_mini.models.check import check_model, resolve_attention, sampling_attention
from qstar_mini.talk import talk_hidden
from qstar_mini.thoughts import generate_thoughts, plain_forward


def prepare_model(model: nn.Module, tokenizer, cfg: QuietStarConfig) -> tuple[MetaTokens, MixingHead]:
    """Make a causal LM ready for Quiet-STaR: add the meta-tokens, build the mixing head.

    Refuses (:class:`~qstar_mini.errors.ModelError`, one line) a model whose numbers through
    qstar_mini's path would not be its own: known features first (attention that cannot take
    4D masks, ALiBi, a sliding window shorter than the step's span), then a small probe against
    the model's own forward (:func:`qstar_mini.models.check.check_model`). Returns (meta, head);
    train both with the model (``head`` on the model's device and dtype).
    """
    needed = cfg.seq_len + cfg.thought_length + cfg.n_true - 1
    check_supported(model, needed, cfg.seq_len * (cfg.thought_length + cfg.n_true))
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0 and needed > limit:
        raise ConfigError(f"seq_len + thought_length + n_true - 1 = {needed} positions exceed the model's "
                          f"context of {limit}; lower seq_len to at most {limit - needed + cfg.seq_len}")
    try:
        meta = add_meta_tokens(model, tokenizer, cfg.start_init, cfg.end_init, cfg.embedding_scale, cfg.meta_init)
        check_model(model, meta, cfg)
    except (QStarError, torch.OutOfMemoryError):
        raise
    except Exception as e:        # anything else inside transformers: this model does not run our way
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise ModelError(f"{type(model).__name__} does not run on qstar_mini's path ({type(e).__name__}: {first}); "
                         f"this architecture is not supported (docs/setup.md, 'Supported models')") from None
    weight = model.get_input_embeddings().weight
    head = MixingHead(weight.shape[1], cfg.mixer_hidden, cfg.mixer_bias_init, cfg.mixer_depth, cfg.mixer_init)
    return meta, head.to(weight.device, weight.dtype)


def scoring_ids(meta: MetaTokens, cfg: QuietStarConfig) -> tuple[int, ...]:
    """The columns removed from the softmax that scores the text: the meta-tokens for
    ``scoring_vocab="text"``, none for the official ``"all"``."""
    return meta.ids if cfg.scoring_vocab == "text" else ()


def policy_entries(cfg: QuietStarConfig, trained: torch.Tensor, seq: int, positions: torch.Tensor | None):
    """Which thoughts REINFORCE trains, and which entries its mean divides by.

    trained: (b, m) bool, the trained positions (thinking positions with a true next token).
    returns (trained, counted): for ``policy_positions="real"`` both are ``trained`` (counted
    None: the same). For ``"official"`` the official code's slice: only positions
    j < l - 1 - n_true (one short of the last full window) are trained, and the mean divides
    by all of those slots, padding included.
    """
    if cfg.policy_positions != "official":
        return trained, None
    j = torch.arange(seq, device=trained.device)[None] if positions is None else positions
    counted = (j < seq - 1 - cfg.n_true).expand_as(trained)
    return trained & counted, counted


def at_positions(x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """x read at the thinking positions: (b, l, ...) -> (b, m, ...); all positions if None."""
    if positions is None:
        return x
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    return x[rows, positions.clamp(min=0)]


@dataclass
class StepOutput:
    """Every tensor of one step; shapes with b = batch, n = n_thoughts, l = seq, t, n_true.

    h_init:           (b, l, hidden)             line 1: plain hidden states
    log_p_init:       (b, l, n_true)             line 2a: log p^init of the true x_{j+1+i}
    thoughts:         (b, n, l, t)               lines 2b-c: T_j, ids incl. meta-tokens
    thought_logprobs: (b, n, l, t - 2)           log p of each sampled thought token
    h_thought:        (b, n, l, n_true, hidden)  line 2d: post-thought hidden states
    w:                (b, n, l, n_true)          line 2f: mixing weight (see qstar_mini.mixing)
    log_p_talk:       (b, n, l, n_true)          line 2g: mixed log p of the true tokens
    nll:              (b, n, l, n_true)          line 2h: -log_p_talk, 0 where invalid
    rewards:          (b, n, l)                  line 2i: r_j (no gradient)
    reinforce:        (b, n, l)                  line 2j: per-thought REINFORCE loss
    valid:            (b, l, n_true)             which (j, i) have a true token x_{j+1+i}
    policy_trained:   (b, l) bool                line 2j: the thoughts REINFORCE trains
    policy_counted:   (b, l) bool                the entries its mean divides by (see
                                                 :func:`policy_entries`); with rewards and
                                                 thought_logprobs, all a reward control needs
    base_nll, talk_nll, policy_loss: scalars;  loss: line 2k, the scalar to backpropagate.
    positions:        (b, m) or None             thinking positions when only some think; then
                                                 every "l" above except in h_init and
                                                 log_p_init is m
    With ``think=False`` only h_init, log_p_init, valid, base_nll and loss are set.
    """

    h_init: torch.Tensor
    log_p_init: torch.Tensor
    valid: torch.Tensor
    base_nll: torch.Tensor
    loss: torch.Tensor
    thoughts: torch.Tensor | None = None
    thought_logprobs: torch.Tensor | None = None
    h_thought: torch.Tensor | None = None
    w: torch.Tensor | None = None
    log_p_talk: torch.Tensor | None = None
    nll: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    reinforce: torch.Tensor | None = None
    talk_nll: torch.Tensor | None = None
    policy_loss: torch.Tensor | None = None
    policy_trained: torch.Tensor | None = None
    policy_counted: torch.Tensor | None = None
    positions: torch.Tensor | None = None

    def shapes(self) -> dict[str, tuple]:
        """{name: shape} of every tensor held (scalars as ())."""
        return {f.name: tuple(getattr(self, f.name).shape) for f in fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}


def quiet_star_step(model: nn.Module, meta: MetaTokens, head: MixingHead, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor, cfg: QuietStarConfig, *, greedy: bool = False,
                    noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                    trained_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                    step: int | None = None) -> StepOutput:
    """One step of Algorithm 1 on a batch X = input_ids (batch, seq), right-padded.

    Which positions think (default: every real position with a next token, as in the paper):
    positions:  (batch, m) long, think only after these (``-1``: no thought on that row slot).
                Only m thoughts per row are generated: the fast way to "think where it
                matters", e.g. at the answer. The seq axis of the thought tensors has length m.
    trained_mask: (batch, seq) bool, generate at every position but train only these: the
                slow reference that ``positions`` is tested against (tests/test_step.py: the
                same thoughts give the same loss); training itself passes ``positions``.
    noise / generator / greedy: how thoughts are sampled (see qstar_mini.thoughts).
    """
    n_true = cfg.n_true
    targets, valid = future_targets(input_ids, attention_mask, n_true)      # (b, l, n_true)

    # 1. h_init <- hidden states of X
    h_init, cache = plain_forward(model, meta, input_ids, attention_mask)   # (b, l, hidden)

    # 2a. log p^init_{j:j+n_true}: the base log-probs of the next n_true true tokens
    # The plain pass at position j + i predicts x_{j+1+i}, so log p^init of offset i at j is
    # the next-token log-prob at j + i: compute it once per position, then look ahead.
    log_p_next = token_log_probs(text_log_probs(lm_head(model)(h_init), scoring_ids(meta, cfg)),
                                 targets[..., 0])                           # (b, l)
    log_p_init = gather_ahead(log_p_next, n_true)                           # (b, l, n_true)
    _, base = base_nll(log_p_init[..., 0], valid[..., 0])
    if not cfg.think:
        check_finite(step, base_nll=base)
        return StepOutput(h_init=h_init, log_p_init=log_p_init, valid=valid, base_nll=base, loss=base)

    # 2b-c. T_j <- [<|startofthought|>, t - 2 sampled tokens, <|endofthought|>], for all j at once
    index_positions = None if positions is None else positions.clamp(min=0)   # -1 slots masked below
    stepwise = cfg.memory == "stepwise"
    m = input_ids.shape[1] if positions is None else positions.shape[1]
    attention = (resolve_attention(model, meta, cfg) if stepwise
                 else sampling_attention(model, meta, cfg, input_ids.shape[0] * cfg.n_thoughts, m))
    with contextlib.nullcontext() if stepwise else torch.no_grad():        # see qstar_mini.fast.rescore
        thoughts = generate_thoughts(
            model, meta, input_ids, attention_mask, cache, cfg.thought_length, cfg.n_thoughts,
            extra_steps=n_true - 1 if stepwise else 0, thought_temperature=cfg.thought_temperature,
            reinforce_temperature=cfg.reinforce_temperature, greedy=greedy, noise=noise,
            generator=generator, positions=index_positions, attention=attention)

    # 2d. h^thought_{j:j+n_true} <- hidden states of [X_{:j}; T_j; X_{j+1:j+n_true}] (teacher forcing)
    if stepwise:
        h_thought = talk_hidden(model, meta, thoughts, input_ids, n_true)  # (b, n, m, n_true, hidden)
        thought_logprobs = thoughts.logprobs                               # (b, n, m, t - 2)
    else:   # the same two tensors from one masked pass over the text and every step's tokens
        scored = rescore_thoughts(model, meta, input_ids, attention_mask, thoughts.ids, n_true,
                                  reinforce_temperature=cfg.reinforce_temperature, positions=index_positions,
                                  checkpoint_layers=cfg.memory == "rescore_checkpointed")
        h_thought, thought_logprobs = scored.h_thought, scored.logprobs

    # From here on, text tensors are read at the thinking positions (all of them: m = l).
    targets, valid = at_positions(targets, positions), at_positions(valid, positions)  # (b, m, n_true)
    if positions is not None:
        valid = valid & (positions >= 0)[..., None]
    trained = valid[..., 0] if trained_mask is None else valid[..., 0] & trained_mask.bool()  # (b, m)
    talk_valid = valid & trained[..., None]                                 # (b, m, n_true)
    policy_trained, counted = policy_entries(cfg, trained, input_ids.shape[1], positions)  # (b, m) each
    counted = policy_trained if counted is None else counted

    # 2e-g. w <- mixing_head(h_init, h_thought); log p^talk = mix of base and post-thought
    h_init_ahead = at_positions(gather_ahead(h_init, n_true), positions)[:, None].expand_as(h_thought)
    w = mixing_weight(head, h_init_ahead, h_thought, cfg.mixing, cfg.mixer_sigmoid)  # (b, n, m, n_true)
    log_p_talk_full = mix_log_probs(lm_head(model), h_init_ahead, h_thought, w, cfg.mixing, scoring_ids(meta, cfg))
    log_p_talk = token_log_probs(log_p_talk_full, targets[:, None].expand(w.shape))  # (b, n, m, n_true)

    # 2h. L^NLL_j <- -log p^talk(X_{j+1:j+n_true+1})
    nll, talk = talk_nll(log_p_talk, talk_valid, cfg.talk_nll_pooling)

    # 2i. r_j <- log p^talk(true tokens) - mean over the thoughts of the same position
    #     (or - log p^init(true tokens): reward_baseline="base", the official one-pass reward)
    r = rewards(log_p_talk, talk_valid, cfg.reward_baseline,
                log_p_init=at_positions(log_p_init, positions))             # (b, n, m)

    # 2j. L^REINFORCE_j <- -r_j * 1[r_j > 0] * log p(T_j | X_{:j}, <|startofthought|>)
    reinforce, policy = reinforce_loss(r, thought_logprobs, policy_trained, cfg.clamp_negative_rewards,
                                       cfg.reinforce_reduction, counted=counted)

    # 2k. L_j <- L^NLL_j + L^REINFORCE_j (plus the official 0.5 * base NLL)
    loss = combined_loss(base, talk, policy, cfg.base_loss_weight, cfg.policy_loss_weight)
    check_finite(step, base_nll=base, talk_nll=talk, reward=r, w=w, loss=loss)

    return StepOutput(h_init=h_init, log_p_init=log_p_init, valid=valid, base_nll=base, loss=loss,
                      thoughts=thoughts.ids, thought_logprobs=thought_logprobs, h_thought=h_thought,
                      w=w, log_p_talk=log_p_talk, nll=nll, rewards=r, reinforce=reinforce,
                      talk_nll=talk, policy_loss=policy, policy_trained=policy_trained,
                      policy_counted=counted, positions=positions)
