"""One dataclass holds every setting of Quiet-STaR, named as in the paper.

Paper notation (Algorithm 1) first, the official code's name in the comment beside it:

===================  ========================  ==============================================
paper                official code             meaning
===================  ========================  ==============================================
t                    ``n_ahead``               thought length, *including* the two
                                               meta-tokens ``<|startofthought|>`` and
                                               ``<|endofthought|>``; t - 2 tokens are sampled
n_true               ``n_ahead_talk``          true tokens each thought is supervised on
                                               (non-myopic loss: offsets 0 .. n_true - 1)
n_thoughts           ``n_passes``              thoughts sampled per position (the reward
                                               baseline is their mean)
===================  ========================  ==============================================

Everything else (learning rates, loss weights, the embedding scale of the meta-tokens) has the
official code's name. Two presets are provided: :func:`official` (the released code's
defaults, for a 7B model on a GPU) and :func:`tiny` (the project's tiny model on a CPU).

A config is validated when it is made: an impossible value raises
:class:`~qstar_mini.errors.ConfigError` with one line naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import ConfigError

MIXING_MODES = ("hidden", "logprob")  # official code / paper, see qstar_mini.mixing
BASELINES = ("mean", "none")          # reward baseline: mean over the n_thoughts (official "trice")
MEMORY_MODES = ("stepwise", "rescore", "rescore_checkpointed")  # see qstar_mini.rescore
ATTENTION_MODES = ("mask", "blocks")  # thought steps: dense masked attention / qstar_mini.block_attention


@dataclass
class QuietStarConfig:
    # --- Algorithm 1 inputs (paper names) -------------------------------------------------
    thought_length: int = 12          # t, official `n_ahead`; includes both meta-tokens
    n_true: int = 4                   # n_true, official `n_ahead_talk`
    n_thoughts: int = 2               # n_thoughts, official `n_passes`
    seq_len: int = 256                # l, tokens per training sequence
    batch_size: int = 8               # b, official `full_batch_size`
    steps: int = 100                  # optimiser steps (official `kill_after`)
    think: bool = True                # False = the control: same loop, plain LM loss only

    # --- sampling thoughts -----------------------------------------------------------------
    thought_temperature: float = 1.0  # hard Gumbel argmax(logits / T + g): T = 1 is sampling
    reinforce_temperature: float = 3.0  # official `reinforce_temperature` for log p(T_j)

    # --- meta-tokens -----------------------------------------------------------------------
    start_init: str = "---"           # official `initial_start_token`: text whose embedding
    end_init: str = "---"             # official `initial_end_token`: initialises the meta-token
    embedding_scale: float = 100.0    # official `embedding_scale`: stored /scale, used *scale

    # --- mixing head -----------------------------------------------------------------------
    mixing: str = "hidden"            # "hidden" (official: mix hidden states, w weights the
                                      # thought, unbounded) or "logprob" (paper: w in [0, 1]
                                      # weights the base prediction)
    mixer_hidden: int | None = None   # width of the MLP's hidden layer; None = model width
    mixer_bias_init: float = 0.0      # bias of the head's last layer (weights start at 0)
    mixer_sigmoid: bool = False       # "hidden" mode only: bound w to [0, 1] (official: no)

    # --- losses ----------------------------------------------------------------------------
    reward_baseline: str = "mean"     # official `trice_mode`: subtract the mean over thoughts
    clamp_negative_rewards: bool = True  # official `remove_negative_rewards`
    base_loss_weight: float = 0.5     # official `original_loss_weight` (first_and_last_mode)
    policy_loss_weight: float = 1e6   # official `policy_loss_beta`

    # --- memory (not in the official code; see qstar_mini.rescore) ----------------------
    memory: str = "stepwise"          # "stepwise": keep the graph of every cached thought step
                                      # (fastest); "rescore": sample without graph, score in one
                                      # masked pass; "rescore_checkpointed": and recompute layers

    # --- attention of the thought steps (not in the official code) -----------------------
    attention: str = "mask"           # "mask": the model's attention with the Figure 3 mask (as
                                      # the paper); "blocks": the same numbers computed without
                                      # the masked-out keys (qstar_mini.block_attention; faster)

    # --- optimiser (official quiet-star-train.py) ------------------------------------------
    lr: float = 1e-6
    mixer_lr: float | None = None     # None = same as lr
    weight_decay: float = 0.001
    warmup_steps: int = 20
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    # The official code's names, so readers of modeling_mistral.py find their way.
    @property
    def n_ahead(self) -> int:
        return self.thought_length

    @property
    def n_ahead_talk(self) -> int:
        return self.n_true

    @property
    def n_passes(self) -> int:
        return self.n_thoughts

    @property
    def n_sampled(self) -> int:
        """Thought tokens actually sampled: t minus the two forced meta-tokens."""
        return self.thought_length - 2

    @property
    def n_forward_steps(self) -> int:
        """Masked forward passes after the plain one: t thought tokens, then n_true - 1 talk
        tokens (offset 0 is read at <|endofthought|>)."""
        return self.thought_length + self.n_true - 1

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name in ("thought_length", "n_true", "n_thoughts", "seq_len", "batch_size", "steps",
                     "warmup_steps", "seed"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool),
                 f"{name} must be an integer (got {value!r})")
        need(self.thought_length >= 3,
             f"thought_length (t, official n_ahead) must be >= 3 to hold <|startofthought|>, at "
             f"least one sampled token and <|endofthought|> (got {self.thought_length})")
        need(self.n_true >= 1, f"n_true (official n_ahead_talk) must be >= 1 (got {self.n_true})")
        need(self.seq_len >= 2, f"seq_len must be >= 2 (got {self.seq_len})")
        need(self.n_true < self.seq_len,
             f"n_true ({self.n_true}) must be smaller than seq_len ({self.seq_len}): each thought "
             f"is supervised by the next n_true true tokens of the sequence")
        need(self.n_thoughts >= 1, f"n_thoughts (official n_passes) must be >= 1 (got {self.n_thoughts})")
        need(self.reward_baseline in BASELINES,
             f"reward_baseline must be one of {BASELINES} (got {self.reward_baseline!r})")
        need(not (self.think and self.reward_baseline == "mean" and self.n_thoughts < 2),
             f"n_thoughts must be >= 2 with reward_baseline='mean' (got {self.n_thoughts}): with one "
             f"thought its reward minus the mean is always 0; use more thoughts or reward_baseline='none'")
        need(self.attention in ATTENTION_MODES,
             f"attention must be one of {ATTENTION_MODES} (got {self.attention!r})")
        need(self.memory in MEMORY_MODES, f"memory must be one of {MEMORY_MODES} (got {self.memory!r})")
        need(self.mixing in MIXING_MODES, f"mixing must be one of {MIXING_MODES} (got {self.mixing!r})")
        need(self.batch_size >= 1, f"batch_size must be >= 1 (got {self.batch_size})")
        need(self.steps >= 0, f"steps must be >= 0 (got {self.steps})")
        for name in ("thought_temperature", "reinforce_temperature", "embedding_scale"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and value > 0, f"{name} must be > 0 (got {value!r})")
        need(0.0 <= self.base_loss_weight <= 1.0,
             f"base_loss_weight (official original_loss_weight) must be in [0, 1] (got {self.base_loss_weight})")
        need(self.policy_loss_weight >= 0, f"policy_loss_weight must be >= 0 (got {self.policy_loss_weight})")
        need(self.lr > 0, f"lr must be > 0 (got {self.lr})")
        need(self.mixer_lr is None or self.mixer_lr > 0, f"mixer_lr must be > 0 (got {self.mixer_lr})")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0 (got {self.weight_decay})")
        need(self.grad_clip > 0, f"grad_clip must be > 0 (got {self.grad_clip})")
        need(self.mixer_hidden is None or self.mixer_hidden >= 1,
             f"mixer_hidden must be >= 1 or None (got {self.mixer_hidden})")
        need(isinstance(self.start_init, str) and self.start_init != "",
             "start_init must be a non-empty string (the text whose embedding starts <|startofthought|>)")
        need(isinstance(self.end_init, str) and self.end_init != "",
             "end_init must be a non-empty string (the text whose embedding starts <|endofthought|>)")

    def replace(self, **changes) -> "QuietStarConfig":
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown config field(s) {sorted(unknown)}; see QuietStarConfig")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "QuietStarConfig":
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown config field(s) {sorted(unknown)}; see QuietStarConfig")
        return cls(**values)


def official(**changes) -> QuietStarConfig:
    """The released code's defaults (quiet-star-train.py, modeling_mistral.py) for Mistral-7B."""
    return QuietStarConfig(**changes)


def tiny(**changes) -> QuietStarConfig:
    """Settings for the project's tiny model on a laptop CPU (minutes, not hours).

    The task's working fits a 7-token thought (``<|startofthought|>`` + 5 running sums +
    ``<|endofthought|>``). Learning rates are much larger than the official 1e-6 because the
    model is tiny and trained for a few hundred steps; the meta-tokens start from the
    embeddings of ``(`` and ``)``, the characters that open and close the visible working.
    """
    values = dict(
        thought_length=7, n_true=2, n_thoughts=4, seq_len=24, batch_size=32, steps=150,
        start_init="(", end_init=")", embedding_scale=1.0,
        policy_loss_weight=1.0, base_loss_weight=0.5,
        lr=1e-4, mixer_lr=1e-3, weight_decay=0.0, warmup_steps=10, grad_clip=1.0,
        mixing="hidden", mixer_sigmoid=True, mixer_bias_init=-3.0,
    )
    values.update(changes)
    return QuietStarConfig(**values)


PRESETS = {"official": official, "tiny": tiny}


def preset(name: str, **changes) -> QuietStarConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**changes)
