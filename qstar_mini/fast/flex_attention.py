"""The Figure 3 attention as a predicate, run by PyTorch's FlexAttention (``attention="flex"``).

:mod:`qstar_mini.masks` writes the visibility of a thought step as a dense 0/1 matrix.
FlexAttention (``torch.nn.attention.flex_attention``) takes the same visibility as a *function*
of one (query, key) pair instead, and compiles it into a block-sparse mask: tiles of the score
matrix where the function is False everywhere are never computed.

The layout of masked step k (1-based), as in :mod:`qstar_mini.masks`: the m queries are the
tokens fed now, one per thinking position; the keys are the cache,

.. code-block:: text

    key index:  0 .. seq-1       | seq + 0*m .. seq + 1*m - 1 | ... | seq + (k-1)*m .. seq + k*m - 1
    holds:      text x_0..x_{l-1} | step 1, columns 0 .. m-1   | ... | step k, columns 0 .. m-1

and query q (thinking after position p = positions[b, q], or p = q when every position thinks)

.. math::

    \\text{visible}(q, j) = \\begin{cases}
        j \\le p \\;\\wedge\\; \\text{attention\\_mask}[b, j] = 1 & j < \\text{seq} \\quad\\text{(text: causal, no padding)}\\\\
        (j - \\text{seq}) \\bmod m = q & j \\ge \\text{seq} \\quad\\text{(thoughts: its own column in every block)}
    \\end{cases}

:func:`figure3_visible` returns exactly this function; ``tests/fast/test_flex_attention.py`` and
notebook 02 check it against :func:`qstar_mini.masks.thought_visibility` entry by entry.

How it runs
-----------
:func:`structured` (used through :func:`qstar_mini.fast.attention.masked_step`) builds the step's
``BlockMask`` once and switches the model to the attention function :func:`flex_attention_forward`
(registered with Hugging Face as ``"qstar_flex"``) for that one forward pass; every layer
shares the mask. The dense additive mask the model still receives is not read.

* CUDA: ``flex_attention`` compiled once per process (module-level ``torch.compile``): a fused
  kernel that skips the invisible tiles, forward and backward.
* CPU (and other devices): FlexAttention's eager path, which materialises the scores (slow,
  but the same numbers; its "called without torch.compile" notice is silenced here because
  that is the intended use). PyTorch has no FlexAttention backward on CPU, so when a gradient
  is needed the forward is FlexAttention's and the backward differentiates the same attention
  computed densely from the *same predicate* (``create_mask`` of :func:`figure3_visible`).

Anything this function does not implement (soft-capping, attention sinks, dropout while
training, a mask per head, unknown arguments) is refused in one line: use ``attention='mask'``.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from qstar_mini.fast.block_attention import PASSIVE
from qstar_mini.errors import ModelError

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention
except ImportError as e:                        # FlexAttention arrived in torch 2.5
    raise ModelError(f"attention='flex' needs torch >= 2.5 (FlexAttention); this is torch {torch.__version__}: "
                     f"upgrade torch or use attention='blocks' or 'mask'") from e

NAME = "qstar_flex"

# Compiled lazily on the first CUDA call; dynamic=None lets dynamo make the key length dynamic
# after it has seen two (it grows by m every step), instead of compiling once per step.
_COMPILED_FLEX = torch.compile(flex_attention, dynamic=None)
_EAGER_NOTICE = "flex_attention called without torch.compile"


def figure3_visible(seq: int, m: int, attention_mask: torch.Tensor | None = None,
                    positions: torch.Tensor | None = None):
    """The Figure 3 visibility of a masked step as a FlexAttention ``mask_mod``.

    seq: text length; m: thinking positions per row (queries per step).
    attention_mask: (rows, seq) 0/1 padding mask, or None (no padding).
    positions: (rows, m) long, the position each query thinks after, or None (query q thinks
    after position q, m = seq).
    returns: ``visible(b, h, q_idx, kv_idx) -> bool tensor``; b is the row, h the head (unused:
    every head sees the same keys), q_idx in [0, m), kv_idx in [0, seq + m * step).
    """
    if positions is None and m != seq:
        raise ValueError(f"m = {m} queries need positions (rows, m); without them every position thinks (m = seq = {seq})")
    if positions is not None and positions.shape[-1] != m:
        raise ValueError(f"positions has {positions.shape[-1]} columns, expected m = {m}")
    text_ok = None if attention_mask is None else attention_mask.bool()     # (rows, seq)

    def visible(b, h, q_idx, kv_idx):
        p = q_idx if positions is None else positions[b, q_idx]   # the position query q thinks after
        is_text = kv_idx < seq
        j = kv_idx.clamp(max=seq - 1)                             # text index (clamped: safe to read)
        sees_text = is_text & (j <= p)                            # causal: x_j with j <= p ...
        if text_ok is not None:
            sees_text = sees_text & text_ok[b, j]                 # ... that is not padding
        column = (kv_idx - seq) % m                               # thought key: which column of its block
        sees_own = ~is_text & (column == q_idx)                   # its own thought, every step so far
        return sees_text | sees_own

    return visible


def step_block_mask(seq: int, m: int, step: int, attention_mask: torch.Tensor | None = None,
                    positions: torch.Tensor | None = None, device=None,
                    block_size: int | tuple[int, int] = 128) -> BlockMask:
    """The ``BlockMask`` of masked step ``step`` (1-based): m queries, seq + m * step keys.

    attention_mask: (rows, seq) or None; positions: (rows, m) or None. rows is the batch of the
    block mask (1, broadcast, when both are None).
    """
    if step < 1:
        raise ValueError(f"step must be >= 1 (got {step}); step 0 is the plain causal pass")
    rows = next((x.shape[0] for x in (attention_mask, positions) if x is not None), None)
    if device is None:
        device = next((x.device for x in (attention_mask, positions) if x is not None), "cpu")
    visible = figure3_visible(seq, m, attention_mask, positions)
    return create_block_mask(visible, rows, None, m, seq + m * step, device=device, BLOCK_SIZE=block_size)


@dataclass
class _Step:
    """What :func:`structured` knows about the current masked step."""

    seq: int
    m: int
    step: int
    block_mask: BlockMask
    _dense: torch.Tensor | None = field(default=None, repr=False)

    def dense(self) -> torch.Tensor:
        """The predicate evaluated on every (query, key): (rows or 1, 1, m, keys) bool (CPU backward)."""
        if self._dense is None:
            b = self.block_mask.kv_num_blocks.shape[0]
            q_len, kv_len = self.block_mask.seq_lengths
            self._dense = create_mask(self.block_mask.mask_mod, b, 1, q_len, kv_len,
                                      device=self.block_mask.kv_num_blocks.device)
        return self._dense


_STEP: contextvars.ContextVar[_Step | None] = contextvars.ContextVar("qstar_flex_step", default=None)


def _eager_flex(query, key, value, block_mask, scale, gqa):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_EAGER_NOTICE)
        return flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=gqa)


class _FlexForwardDenseBackward(torch.autograd.Function):
    """CPU: FlexAttention's values; the gradient of the same attention computed densely."""

    @staticmethod
    def forward(ctx, query, key, value, step: _Step, scale: float, gqa: bool):
        ctx.save_for_backward(query, key, value)
        ctx.step, ctx.scale, ctx.gqa = step, scale, gqa
        return _eager_flex(query.detach(), key.detach(), value.detach(), step.block_mask, scale, gqa)

    @staticmethod
    def backward(ctx, grad_out):
        with torch.enable_grad():
            q, k, v = (x.detach().requires_grad_() for x in ctx.saved_tensors)
            out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ctx.step.dense(),
                                                             scale=ctx.scale, enable_gqa=ctx.gqa)
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
        return (*grads, None, None, None)


def run_flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, step: _Step, scale: float) -> torch.Tensor:
    """FlexAttention of one step: compiled on CUDA, eager elsewhere (dense backward on CPU).

    query: (rows, heads, m, d); key, value: (rows, kv_heads, keys, d).  returns (rows, heads, m, d).
    """
    gqa = query.shape[1] != key.shape[1]
    if query.device.type == "cuda":
        return _COMPILED_FLEX(query, key, value, block_mask=step.block_mask, scale=scale, enable_gqa=gqa)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value)):
        return _FlexForwardDenseBackward.apply(query, key, value, step, scale, gqa)
    return _eager_flex(query, key, value, step.block_mask, scale, gqa)


def flex_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """A Hugging Face attention function (same signature and output as ``sdpa_attention_forward``).

    query: (rows, heads, m, head_dim); key, value: (rows, kv_heads, seq + m * step, head_dim)
    attention_mask: (rows, 1, m, seq + m * step) additive, shape-checked but not read: the
    step's ``BlockMask`` (built by :func:`structured` from the same padding mask) replaces it.
    returns: (rows, m, heads, head_dim), None.
    """
    extra = sorted(k for k, v in kwargs.items() if v is not None and v is not False and k not in PASSIVE)
    if getattr(module, "sinks", None) is not None:
        extra.append("sinks")
    if dropout > 0.0 and getattr(module, "training", False):
        extra.append(f"attention dropout {dropout:g} in training")
    if extra:
        raise ModelError(f"flex attention does not implement {', '.join(extra)} of {type(module).__name__}; "
                         f"use attention='mask' (the model's own attention with the Figure 3 mask)")
    step = _STEP.get()
    if step is None:
        raise ModelError(f"attention implementation {NAME!r} is only valid inside qstar_mini.fast.flex_attention."
                         f"structured(); load the model with attn_implementation='sdpa' or 'eager'")
    seq, m, k = step.seq, step.m, step.step
    rows, heads, q_len, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    if q_len != m or keys != seq + m * k:
        raise ModelError(f"flex attention expected {m} queries and {seq + m * k} keys "
                         f"(seq {seq} + {m} x step {k}), got {q_len} and {keys}")
    mask_rows = step.block_mask.kv_num_blocks.shape[0]
    if (heads % kv_heads or key.shape[-1] != dim or value.shape[:3] != key.shape[:3]
            or mask_rows not in (1, rows)
            or (attention_mask is not None and attention_mask.shape[1] != 1)):
        # e.g. a mask per head that the model computes from its inputs (Doge): more than Figure 3
        raise ModelError(f"flex attention cannot read the attention of {type(module).__name__} (queries "
                         f"{tuple(query.shape)}, keys {tuple(key.shape)}, mask "
                         f"{None if attention_mask is None else tuple(attention_mask.shape)}, block mask rows "
                         f"{mask_rows}); use attention='mask'")
    scale = dim ** -0.5 if scaling is None else float(scaling)
    out = run_flex(query, key, value, step, scale)                  # (rows, heads, m, d)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``"qstar_flex"`` a Hugging Face attention implementation (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, flex_attention_forward)


@contextlib.contextmanager
def structured(model: nn.Module, seq: int, m: int, step: int, attention_mask: torch.Tensor | None = None,
               positions: torch.Tensor | None = None):
    """Run the model's attention as FlexAttention with the Figure 3 predicate for one masked step.

    seq: text keys; m: queries (thinking positions per row); step: 1-based, so the cache holds
    seq + m * step keys. attention_mask: (rows, seq) padding mask; positions: (rows, m) or None.
    Builds the step's ``BlockMask`` once (all layers share it), sets
    ``model.config._attn_implementation`` for the duration of the block and restores it.
    """
    register()
    device = model.get_input_embeddings().weight.device
    block_mask = step_block_mask(seq, m, step, attention_mask, positions, device=device)
    config = model.config
    before = config._attn_implementation
    token = _STEP.set(_Step(seq, m, step, block_mask))
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
        _STEP.reset(token)
