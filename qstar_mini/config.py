"""One dataclass holds every setting of Quiet-STaR, named as in the paper.

Paper notation (Algorithm 1) first, the official code's name in the comment beside it:

===================  ========================  ==============================================
paper                official code             meaning
===================  ========================  ==============================================
t                    ``n_ahead`` = t + 1       thought length, *including* the two
                                               meta-tokens ``<|startofthought|>`` and
                                               ``<|endofthought|>``; t - 2 tokens are sampled
n_true               ``n_ahead_talk``          true tokens each thought is supervised on
                                               (non-myopic loss: offsets 0 .. n_true - 1)
n_thoughts           ``n_passes``              thoughts sampled per position (the reward
                                               baseline is their mean)
===================  ========================  ==============================================

Why n_ahead = t + 1: the official forward loop runs ``n_ahead + n_ahead_talk - 1`` passes and
counts the plain pass over the text as the first of them. So with ``n_ahead = 12`` it feeds
<|startofthought|>, samples n_ahead - 3 = 9 tokens and feeds <|endofthought|>: a thought of
11 ids, t = 11. Here t counts the ids of a thought, and the plain pass is separate.

Everything else (learning rates, loss weights, the embedding scale of the meta-tokens) has the
official code's name. Two presets are provided: :func:`official` (the released code's
defaults, for a 7B model on a GPU) and :func:`tiny` (the project's tiny model on a CPU).

**Where qstar_mini departs from the official code, it says so with a field.** The dataclass
defaults are the official behaviour; :func:`tiny` switches the departures the tiny
reproduction uses. ``docs/differences.md`` has the full table (paper / official code /
qstar_mini) and ``tests/test_official.py`` checks :func:`official` against numbers produced
by the official code itself.

A config is validated when it is made: an impossible value raises
:class:`~qstar_mini.errors.ConfigError` with one line naming the field and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from qstar_mini.errors import ConfigError

MIXING_MODES = ("hidden", "logprob")  # official code / paper, see qstar_mini.mixing
BASELINES = ("mean", "base", "none")  # reward baseline: mean over the n_thoughts (official "trice"),
                                      # the base prediction (official with one pass), none
HEAD_INITS = ("official", "default")  # mixing-head init: N(0, 0.02) weights, 0 biases (official) / PyTorch's
MEMORY_MODES = ("stepwise", "rescore", "rescore_checkpointed")  # see qstar_mini.fast.rescore
ATTENTION_MODES = ("auto", "mask", "blocks", "flex")  # thought steps: see qstar_mini.fast.attention
META_INITS = ("first", "mean")        # meta-token init: first token of the text (official) / mean of its tokens
SCORING_VOCABS = ("all", "text")      # scoring softmax: every column (official) / meta-token columns removed
REINFORCE_REDUCTIONS = ("mean", "sum")  # log p(T_j): mean over sampled tokens (official) / sum
TALK_NLL_POOLINGS = ("per_offset", "pooled")  # mean of per-offset means (official) / one mean over all
POLICY_POSITIONS = ("official", "real")  # see QuietStarConfig.policy_positions
LR_SCHEDULES = ("linear", "constant")  # HF Trainer warmup-then-linear-decay (official) / warmup-then-hold

#: The fields that take one of a few names, and those names.
CHOICES = {"reward_baseline": BASELINES, "attention": ATTENTION_MODES, "memory": MEMORY_MODES,
           "mixing": MIXING_MODES, "meta_init": META_INITS, "scoring_vocab": SCORING_VOCABS,
           "reinforce_reduction": REINFORCE_REDUCTIONS, "talk_nll_pooling": TALK_NLL_POOLINGS,
           "policy_positions": POLICY_POSITIONS, "lr_schedule": LR_SCHEDULES, "mixer_init": HEAD_INITS}


@dataclass
class QuietStarConfig:
    # --- Algorithm 1 inputs (paper names) -------------------------------------------------
    thought_length: int = 11          # t, official `n_ahead` - 1; includes both meta-tokens
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
    meta_init: str = "first"          # "first": the embedding of the init text's first token
                                      # (official); "mean": the mean over its tokens

    # --- mixing head -----------------------------------------------------------------------
    mixing: str = "hidden"            # "hidden" (official: mix hidden states, w weights the
                                      # thought, unbounded) or "logprob" (paper: w in [0, 1]
                                      # weights the base prediction)
    mixer_hidden: int | None = None   # width of the MLP's hidden layers; None = model width
    mixer_depth: int = 2              # hidden layers of the MLP: 2 = official `use_complex_talk_head`
    mixer_bias_init: float | None = None  # bias of the head's last layer (weights start at 0);
                                      # None = no bias (official)
    mixer_sigmoid: bool = False       # "hidden" mode only: bound w to [0, 1] (official: no)
    mixer_init: str = "official"      # the head's layers before training: "official" = every weight
                                      # N(0, 0.02), every bias 0 (transformers' _init_weights);
                                      # "default" = PyTorch's nn.Linear init. Either way the last
                                      # layer's weight starts at 0 (official: zeroed at the first call)

    # --- losses ----------------------------------------------------------------------------
    reward_baseline: str = "mean"     # official `trice_mode`: subtract the mean over thoughts;
                                      # "base": r_j = log p^talk - log p^init, the improvement over
                                      # the base prediction (official with n_passes = 1); "none"
    clamp_negative_rewards: bool = True  # official `remove_negative_rewards`
    base_loss_weight: float = 0.5     # official `original_loss_weight` (first_and_last_mode)
    policy_loss_weight: float = 1e6   # official `policy_loss_beta`
    scoring_vocab: str = "all"        # softmax that scores the text (log p^init, log p^talk):
                                      # "all" columns (official) or "text" (meta-tokens removed).
                                      # Thoughts never sample a meta-token either way.
    reinforce_reduction: str = "mean"  # log p(T_j) in REINFORCE: "mean" over the t - 2 sampled
                                      # tokens (official) or "sum" (the log-prob of the thought)
    talk_nll_pooling: str = "per_offset"  # L^NLL: "per_offset" = mean over the n_true offsets of
                                      # each offset's mean (official); "pooled" = one mean over
                                      # every valid (position, offset)
    policy_positions: str = "official"  # positions REINFORCE averages over: "official" = the
                                      # code's slice j < l - 1 - n_true, every slot counted in the
                                      # denominator (padding too); "real" = every real position
                                      # with a next token, averaged over those

    # --- memory (not in the official code; see qstar_mini.fast.rescore) ----------------------
    memory: str = "stepwise"          # "stepwise": keep the graph of every cached thought step
                                      # (fastest); "rescore": sample without graph, score in one
                                      # masked pass (no memory saver: it peaks higher than
                                      # stepwise); "rescore_checkpointed": and recompute layers
                                      # (peaks lower, slower; docs/performance.md)

    # --- attention of the thought steps (not in the official code) -----------------------
    attention: str = "auto"           # "mask": the model's attention with the Figure 3 mask (as
                                      # the paper; what the notebooks teach); "blocks": the same
                                      # numbers without the masked-out keys, the cache written in
                                      # place (qstar_mini.fast.block_attention; fastest on a CPU);
                                      # "flex": FlexAttention with the mask as a predicate (for
                                      # GPUs); "auto": blocks where the model allows it, else mask

    # --- optimiser (official quiet-star-train.py) ------------------------------------------
    lr: float = 1e-6                  # AdamW's learning rate (LM and meta-tokens)
    mixer_lr: float | None = None     # the mixing head's learning rate; None = same as lr
    weight_decay: float = 0.001       # AdamW's decoupled weight decay
    decay_meta_tokens: bool = True    # weight decay on the meta-token embeddings (HF Trainer: yes)
    decay_bias_and_norm: bool = False  # weight decay on biases and LayerNorm weights (HF Trainer: no)
    warmup_steps: int = 20            # optimiser steps of linear warmup
    lr_schedule: str = "linear"       # "linear": from 0 up to lr over warmup_steps, then down to 0
                                      # at lr_decay_steps (HF Trainer); "constant": from
                                      # lr / warmup_steps up to lr, then held
    lr_decay_steps: int = 100_000     # where "linear" reaches 0 (official `max_steps`; the run is
                                      # stopped after `kill_after` = 100 steps, so it barely decays)
    grad_clip: float = 1.0            # gradients clipped to this global norm
    seed: int = 0                     # seeds torch, the data order and the thought sampler

    def __post_init__(self) -> None:
        self.validate()

    # The official code's names, so readers of modeling_mistral.py find their way.
    @property
    def n_ahead(self) -> int:
        """Official ``n_ahead``: it counts the plain pass too, so n_ahead = t + 1."""
        return self.thought_length + 1

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

        check_field_types(self)

        for name in ("thought_length", "n_true", "n_thoughts", "seq_len", "batch_size", "steps",
                     "warmup_steps", "seed", "mixer_depth", "lr_decay_steps"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool),
                 f"{name} must be an integer (got {value!r})")
        need(self.thought_length >= 3,
             f"thought_length (t = official n_ahead - 1) must be >= 3 to hold <|startofthought|>, at "
             f"least one sampled token and <|endofthought|> (got {self.thought_length})")
        need(self.n_true >= 1, f"n_true (official n_ahead_talk) must be >= 1 (got {self.n_true})")
        need(self.seq_len >= 2, f"seq_len must be >= 2 (got {self.seq_len})")
        need(self.n_true < self.seq_len,
             f"n_true ({self.n_true}) must be smaller than seq_len ({self.seq_len}): each thought "
             f"is supervised by the next n_true true tokens of the sequence")
        need(self.n_thoughts >= 1, f"n_thoughts (official n_passes) must be >= 1 (got {self.n_thoughts})")
        for name, choices in CHOICES.items():
            need(getattr(self, name) in choices, f"{name} must be one of {choices} (got {getattr(self, name)!r})")
        need(not (self.think and self.reward_baseline == "mean" and self.n_thoughts < 2),
             f"n_thoughts must be >= 2 with reward_baseline='mean' (got {self.n_thoughts}): with one "
             f"thought its reward minus the mean is always 0; use more thoughts or reward_baseline='base' "
             f"(the improvement over the base prediction, as the official code does with n_passes = 1)")
        need(self.mixer_depth >= 1, f"mixer_depth must be >= 1 hidden layer (got {self.mixer_depth})")
        need(self.mixer_bias_init is None or isinstance(self.mixer_bias_init, (int, float)),
             f"mixer_bias_init must be a number or None for no bias (got {self.mixer_bias_init!r})")
        need(self.lr_decay_steps >= self.warmup_steps,
             f"lr_decay_steps ({self.lr_decay_steps}) must be >= warmup_steps ({self.warmup_steps})")
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
        """The config saved by :meth:`to_dict`; every field must be there (a missing one would
        silently take the official default), except those of :data:`ADDED_FIELDS`."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {**{k: v for k, v in ADDED_FIELDS.items() if k not in values}, **values}
        unknown, missing = set(values) - names, names - set(values)
        if unknown:
            raise ConfigError(f"unknown config field(s) {sorted(unknown)}; see QuietStarConfig")
        if missing:
            raise ConfigError(f"config lacks field(s) {sorted(missing)} (saved by an older qstar_mini?); "
                              f"add them to its config.json with the values the run used, or retrain")
        return cls(**values)


# Fields added after runs had been saved, with the value those runs were made with.
ADDED_FIELDS = {"mixer_init": "default"}    # the head's init matters only before training

OFFICIAL_NAMES = {"n_ahead": "thought_length", "n_ahead_talk": "n_true", "n_passes": "n_thoughts"}


def official(**changes) -> QuietStarConfig:
    """The released code's defaults (quiet-star-train.py, modeling_mistral.py) for Mistral-7B.

    Takes the official names too: ``official(n_ahead=8)`` is ``official(thought_length=7)``
    (n_ahead counts the plain pass, see the module docstring), ``n_ahead_talk`` is n_true,
    ``n_passes`` is n_thoughts.

    With one thought per position (``n_passes=1``) the official code has no mean to subtract
    (its ``trice_mode`` needs n_passes > 1) and rewards the improvement over the base
    prediction instead: so does this preset (``reward_baseline="base"``), unless told otherwise.
    """
    for name, ours in OFFICIAL_NAMES.items():
        if name in changes:
            if ours in changes:
                raise ConfigError(f"give {name} or {ours}, not both")
            value = changes.pop(name)
            changes[ours] = value - 1 if name == "n_ahead" and isinstance(value, int) else value
    if changes.get("n_thoughts") == 1:
        changes.setdefault("reward_baseline", "base")
    return QuietStarConfig(**changes)


def tiny(**changes) -> QuietStarConfig:
    """Settings for the project's tiny model on a laptop CPU (minutes, not hours).

    The task's working fits a 7-token thought (``<|startofthought|>`` + 5 running sums +
    ``<|endofthought|>``). Learning rates are much larger than the official 1e-6 because the
    model is tiny and trained for a few hundred steps; the meta-tokens start from the
    embeddings of ``(`` and ``)``, the characters that open and close the visible working.

    It also takes qstar_mini's side of every switchable difference from the official code
    (``docs/differences.md``): a one-hidden-layer mixing head with a bias and PyTorch's
    default init, bounded w, the
    meta-tokens out of the scoring softmax, the summed log p(T_j), one pooled talk NLL,
    REINFORCE over every real position, the warmup-then-hold schedule and no decay on the
    meta-tokens.
    """
    values = dict(
        thought_length=7, n_true=2, n_thoughts=4, seq_len=24, batch_size=32, steps=150,
        start_init="(", end_init=")", embedding_scale=1.0, meta_init="mean",
        policy_loss_weight=1.0, base_loss_weight=0.5,
        lr=1e-4, mixer_lr=1e-3, weight_decay=0.0, warmup_steps=10, grad_clip=1.0,
        mixing="hidden", mixer_sigmoid=True, mixer_bias_init=-3.0, mixer_depth=1,
        scoring_vocab="text", reinforce_reduction="sum", talk_nll_pooling="pooled",
        policy_positions="real", lr_schedule="constant", decay_meta_tokens=False,
        decay_bias_and_norm=True, mixer_init="default",
    )
    values.update(changes)
    return QuietStarConfig(**values)


PRESETS = {"official": official, "tiny": tiny}


def preset(name: str, **changes) -> QuietStarConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**changes)


# What a field's annotation accepts, and its name in an error: an int is a float too; a bool is neither.
FIELD_TYPES = {"int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
               "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
               "bool": (lambda v: isinstance(v, bool), "true or false"),
               "str": (lambda v: isinstance(v, str), "a string"),
               "None": (lambda v: v is None, "null")}


def check_field_types(cfg: QuietStarConfig) -> None:
    """Every field of ``cfg`` of its annotated type (``float | None``: a number or None), else a
    one-line ConfigError naming the field: ``"lr": "fast"`` in a saved config is refused here,
    before a comparison fails on it far away."""
    for f in dataclasses.fields(cfg):
        kinds = [k.strip() for k in str(f.type).split("|")]
        value = getattr(cfg, f.name)
        if all(k in FIELD_TYPES for k in kinds) and not any(FIELD_TYPES[k][0](value) for k in kinds):
            wanted = " or ".join(FIELD_TYPES[k][1] for k in kinds)
            raise ConfigError(f"config field {f.name} must be {wanted}, not {value!r}")
