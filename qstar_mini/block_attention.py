"""The Figure 3 attention without the zeros: what the thought mask computes, done in O(seq + k).

At thought (or talk) step k the queries are m tokens, one per thinking position, and the keys
are the cache: seq text tokens, then k blocks of m thought tokens. The mask of
:mod:`qstar_mini.masks` lets query q see the text up to its position and *one* key per block
(its own thought's column). A dense attention kernel still multiplies every query with all
``seq + m * k`` keys and throws most scores away: over a step's t + n_true - 1 masked passes
that is most of the attention work (``qstar-mini bench`` profiles it).

Block attention computes only what the mask lets through, with the same numbers:

.. code-block:: text

    scores_text = q . K_text^T + text part of the mask     (m x seq: the causal text part)
    scores_own  = q . K_own                                (m x k: the diagonals, one per block)
    p           = softmax([scores_text, scores_own])       (one softmax over both)
    out         = p_text @ V_text + p_own . V_own

It is registered as a Hugging Face attention implementation and switched on only inside
:func:`structured`, i.e. only for the masked thought/talk steps that have this layout
(``generate_thoughts(..., attention="blocks")``, ``QuietStarConfig.attention = "blocks"``).
Everything else keeps the model's own attention. Tested equal to the masked sdpa/eager
attention, values and gradients (``tests/test_block_attention.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ModelError

NAME = "qstar_blocks"


@dataclass(frozen=True)
class Layout:
    """The key layout of one masked step: seq text keys, then ``step`` blocks of m keys."""

    seq: int
    m: int
    step: int


# Keyword arguments an attention function may receive that do not change its result here:
# bookkeeping, and a sliding window that prepare_model has already checked is longer than the
# step's span. Anything else (soft-capping, attention sinks, ...) is refused, not ignored.
PASSIVE = frozenset({"position_ids", "use_cache", "cache_position", "past_key_values", "past_key_value",
                     "position_embeddings", "output_attentions", "layer_idx", "sliding_window", "is_causal"})

_LAYOUT: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("qstar_block_layout", default=None)


def block_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs):
    """A Hugging Face attention function (same signature and output as ``sdpa_attention_forward``).

    query: (batch, heads, m, head_dim); key, value: (batch, kv_heads, seq + m * step, head_dim)
    attention_mask: (batch, 1, m, seq + m * step) additive; only its first seq columns are read
    (the own-thought columns are always visible, the others never).
    returns: (batch, m, heads, head_dim), None.
    """
    extra = sorted(k for k, v in kwargs.items() if v is not None and v is not False and k not in PASSIVE)
    if getattr(module, "sinks", None) is not None:
        extra.append("sinks")
    if extra:
        raise ModelError(f"block attention does not implement {', '.join(extra)} of {type(module).__name__}; "
                         f"use attention='mask' (the model's own attention with the Figure 3 mask)")
    layout = _LAYOUT.get()
    if layout is None:
        raise ModelError(f"attention implementation {NAME!r} is only valid inside qstar_mini.block_attention."
                         f"structured(); load the model with attn_implementation='sdpa' or 'eager'")
    seq, m, step = layout.seq, layout.m, layout.step
    batch, heads, q_len, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    if q_len != m or keys != seq + m * step:
        raise ModelError(f"block attention expected {m} queries and {seq + m * step} keys "
                         f"(seq {seq} + {m} x step {step}), got {q_len} and {keys}")
    if (heads % kv_heads or key.shape[-1] != dim or value.shape[:3] != key.shape[:3]
            or (attention_mask is not None and attention_mask.shape[1] != 1)):
        # e.g. a mask per head that the model computes from its inputs (Doge): more than Figure 3
        raise ModelError(f"block attention cannot read the attention of {type(module).__name__} (queries "
                         f"{tuple(query.shape)}, keys {tuple(key.shape)}, mask "
                         f"{None if attention_mask is None else tuple(attention_mask.shape)}); use attention='mask'")
    scale = dim ** -0.5 if scaling is None else scaling
    group = heads // kv_heads                                       # grouped-query attention
    q = query.view(batch, kv_heads, group, m, dim) * scale          # (b, g, r, m, d), scaled once
    # split, not slices: a slice's backward zero-fills a gradient of the whole cache, split's does not
    k_text, k_own = key.split([seq, m * step], dim=2)               # (b, g, seq, d), (b, g, m*step, d)
    v_text, v_own = value.split([seq, m * step], dim=2)
    k_own, v_own = k_own.unflatten(2, (step, m)), v_own.unflatten(2, (step, m))  # (b, g, step, m, d)

    s_text = torch.einsum("bgrmd,bgsd->bgrms", q, k_text)           # (b, g, r, m, seq)
    if attention_mask is not None:
        s_text = s_text + attention_mask[:, :, None, :, :seq].to(s_text.dtype)   # (b, 1, 1, m, seq)
    s_own = torch.einsum("bgrmd,bgkmd->bgrmk", q, k_own)            # (b, g, r, m, step)
    scores = torch.cat([s_text, s_own], dim=-1)
    p = torch.softmax(scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores, -1)
    p = p.to(query.dtype)
    if dropout > 0.0 and module.training:
        p = nn.functional.dropout(p, p=dropout)
    p_text, p_own = p.split([seq, step], dim=-1)
    out = (torch.einsum("bgrms,bgsd->bgrmd", p_text, v_text)
           + torch.einsum("bgrmk,bgkmd->bgrmd", p_own, v_own))       # (b, g, r, m, d)
    return out.reshape(batch, heads, m, dim).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``"qstar_blocks"`` a Hugging Face attention implementation (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, block_attention_forward)


@contextlib.contextmanager
def structured(model: nn.Module, seq: int, m: int, step: int):
    """Run the model's attention as block attention for one masked step with this layout.

    Sets ``model.config._attn_implementation`` for the duration of the block and restores it.
    """
    register()
    config = model.config
    before = config._attn_implementation
    token = _LAYOUT.set(Layout(seq, m, step))
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
        _LAYOUT.reset(token)
