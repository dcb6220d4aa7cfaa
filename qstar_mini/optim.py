"""The optimiser and its schedule: Algorithm 1, line 3 (theta <- theta - lr * sum_j grad L_j), with AdamW.

The official code trains with the Hugging Face Trainer's defaults, reproduced here: AdamW with
weight decay, biases and LayerNorm weights exempt, a linear warmup from 0 and a linear decay.
"""

from __future__ import annotations

import torch
from torch import nn


def _no_decay(module: nn.Module) -> set[int]:
    """ids of the parameters the Hugging Face Trainer exempts from weight decay: every bias and
    the weights of ``nn.LayerNorm`` modules (RMSNorm weights are decayed)."""
    exempt = {id(p) for name, p in module.named_parameters() if "bias" in name}
    for sub in module.modules():
        if isinstance(sub, nn.LayerNorm):
            exempt |= {id(p) for p in sub.parameters(recurse=False)}
    return exempt


def build_optimizer(module: nn.Module, cfg: QuietStarConfig) -> torch.optim.AdamW:
    """AdamW with three parameter groups (in this order, which checkpoints rely on):
    the LM at ``cfg.lr``, the meta-tokens at ``cfg.lr`` (their speed-up is ``embedding_scale``;
    weight decay only with ``decay_meta_tokens``), the mixing head at ``cfg.mixer_lr`` (or
    ``cfg.lr``). Without ``decay_bias_and_norm`` (the HF Trainer's rule, official) two more
    groups follow: the LM's and the head's biases and LayerNorm weights, without decay."""
    lm, head = list(module.model.parameters()), list(module.head.parameters())
    exempt = set() if cfg.decay_bias_and_norm else _no_decay(module.model) | _no_decay(module.head)
    decay = cfg.weight_decay
    groups = [
        {"params": [p for p in lm if id(p) not in exempt], "lr": cfg.lr, "weight_decay": decay},
        {"params": [module.meta.stored], "lr": cfg.lr, "weight_decay": decay if cfg.decay_meta_tokens else 0.0},
        {"params": [p for p in head if id(p) not in exempt], "lr": cfg.mixer_lr or cfg.lr, "weight_decay": decay},
    ]
    if not cfg.decay_bias_and_norm:
        groups += [{"params": [p for p in lm if id(p) in exempt], "lr": cfg.lr, "weight_decay": 0.0},
                   {"params": [p for p in head if id(p) in exempt], "lr": cfg.mixer_lr or cfg.lr, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups)


def warmup_schedule(optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_schedule="constant"``: linear warmup from lr / warmup_steps to lr over
    ``warmup_steps`` steps, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


def linear_schedule(optimizer, warmup_steps: int, decay_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_schedule="linear"``, the Hugging Face Trainer's default (official code): from 0 up to
    lr over ``warmup_steps`` (so the very first step has rate 0), then linearly down to 0 at
    ``decay_steps``."""
    def factor(s: int) -> float:
        if s < warmup_steps:
            return s / max(1, warmup_steps)
        return max(0.0, (decay_steps - s) / max(1, decay_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_schedule(optimizer, cfg: QuietStarConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule ``cfg.lr_schedule`` names."""
    if cfg.lr_schedule == "linear":
        return linear_schedule(optimizer, cfg.warmup_steps, cfg.lr_decay_steps)
    return warmup_schedule(optimizer, cfg.warmup_steps)

