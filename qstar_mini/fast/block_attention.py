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
attention, values and gradients (``tests/fast/test_block_attention.py``).

**The cache without copies.** A ``DynamicCache`` grows by concatenation: step k copies the
whole cache (seq + m * k keys per layer), so S steps copy O(S^2 * m) keys, and autograd keeps
every copy's backward. :func:`step_cache` swaps each layer of the text's cache for a
:class:`StepLayer`: the text keys stay as they are, and each step's m new keys are written in
place into a buffer preallocated for all S steps, ``(rows, kv_heads, S, m, head_dim)``. Autograd
cannot differentiate through in-place writes into a tensor that earlier steps read, so the
step's attention is one :class:`_StepAttention` with a hand-written backward:

* forward saves only q, the output and the softmax's log-normaliser (the probabilities are
  recomputed in the backward, as FlashAttention does), not the ``m x seq`` probabilities;
* the text scores are computed for chunks of queries against the chunk's visible prefix of
  text keys (:func:`query_chunks`): with the causal mask, the scores right of each chunk's
  last visible key, nearly half of the ``m x seq`` rectangle, are never computed;
* the gradient of step i's keys collects from every later step that read them: each
  backward adds its share into a gradient buffer of the same layout, and step i's backward,
  which autograd runs after all later steps' (a chain of "link" outputs makes step i + 1
  depend on step i), hands the finished slot to the key projection.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass

import torch
from torch import nn

from qstar_mini.errors import ModelError

NAME = "qstar_blocks"


@dataclass(frozen=True)
class Layout:
    """The key layout of one masked step: seq text keys, then ``step`` blocks of m keys."""

    seq: int
    m: int
    step: int
    cache: object = None              # the StepCache when the step's keys live in preallocated buffers


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
        raise ModelError(f"attention implementation {NAME!r} is only valid inside qstar_mini.fast.block_attention."
                         f"structured(); load the model with attn_implementation='sdpa' or 'eager'")
    seq, m, step = layout.seq, layout.m, layout.step
    batch, heads, q_len, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    if layout.cache is not None:
        return _preallocated(module, query, key, value, attention_mask, dropout, scaling, layout)
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
def structured(model: nn.Module, seq: int, m: int, step: int, cache=None):
    """Run the model's attention as block attention for one masked step with this layout.

    cache: the step's cache; when it is a :func:`step_cache` (its layers are :class:`StepLayer`),
    the new keys go into its preallocated buffers instead of being concatenated.
    Sets ``model.config._attn_implementation`` for the duration of the block and restores it.
    """
    register()
    config = model.config
    before = config._attn_implementation
    steps = getattr(cache, "qstar_steps", None)
    token = _LAYOUT.set(Layout(seq, m, step, steps))
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
        _LAYOUT.reset(token)


# ---------------------------------------------------------------- the cache without copies

class _Steps:
    """What the StepLayers of one cache share: which layer was updated last (the attention
    function that follows reads it), the number of steps the buffers hold, and the query chunks
    of the text part (:func:`query_chunks`)."""

    def __init__(self, capacity: int, chunks: list[tuple[int, int, int]]):
        self.capacity = capacity
        self.chunks = chunks
        self.current = None


def _dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


def attention_dropout(model: nn.Module) -> float:
    """The largest attention-dropout probability set on the model's attention modules (applied
    only while training): a float ``attention_dropout`` attribute
    (Llama, Mistral, ...) or an ``nn.Dropout`` named ``attn_dropout`` / ``attention_dropout`` (GPT-2)."""
    p = 0.0
    for name, module in model.named_modules():
        value = getattr(module, "attention_dropout", None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            p = max(p, float(value))
        if isinstance(module, nn.Dropout) and name.rsplit(".", 1)[-1] in ("attn_dropout", "attention_dropout"):
            p = max(p, float(module.p))
    return p


def step_cache(cache, steps: int, m: int, model: nn.Module | None = None, text_limits: list[int] | None = None):
    """Make the text's ``DynamicCache`` hold the next ``steps`` masked steps of m keys each
    in preallocated buffers (in place; returns the cache). Returned unchanged, growing by
    concatenation (the same numbers, only slower), when its layers are not plain dynamic layers
    (or transformers has no cache layers), and while ``model`` trains with attention dropout,
    which only the concatenating path implements. ``text_limits``: for each of the m queries, one
    past the last text key the mask lets it see in any row (j + 1 for the query thinking after
    position j); the attention then skips the text scores right of each query chunk's limit.
    None: every query may see every text key."""
    layers = getattr(cache, "layers", None)
    DynamicLayer = _dynamic_layer()
    if not layers or not all(isinstance(layer, DynamicLayer) and getattr(layer, "is_initialized", False)
                             for layer in layers):
        return cache
    if model is not None and model.training and attention_dropout(model) > 0:
        return cache
    seq = layers[0].keys.shape[-2]
    shared = _Steps(steps, query_chunks(text_limits or [seq] * m, chunk_size(m)))
    cache.layers = [StepLayer(layer.keys, layer.values, m, shared) for layer in layers]
    cache.qstar_steps = shared
    return cache


class _StepBuffers:
    """A StepLayer's buffers and their gradient accumulators, (rows, kv_heads, m, S, head_dim) each.

    Kept apart from the layer on purpose: each step's autograd node holds this (its backward reads
    the buffers), and the layer holds the node's link output. Were the node to hold the layer, that
    would be a cycle through autograd's C++ graph, which Python's garbage collector cannot break:
    every training step's buffers and graph would stay in memory (measured before the split:
    +20-30 MiB a step on tier 2, 12 GB after 650 steps).
    """

    __slots__ = ("key_buffer", "value_buffer", "key_grad", "value_grad")

    def __init__(self):
        self.key_buffer = self.value_buffer = self.key_grad = self.value_grad = None


class StepLayer(_dynamic_layer()):
    """One layer of :func:`step_cache`: the text keys/values, then buffers for S steps of m keys.

    keys, values: (rows, kv_heads, seq, head_dim), the text (with their graph).
    buffers (made at the first step): (rows, kv_heads, m, S, head_dim), no graph, written in place
    (a query's own keys of all steps lie together: the attention reads them without a copy).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, m: int, shared: _Steps):
        super().__init__()
        self.keys, self.values = keys, values
        self.device, self.dtype = keys.device, keys.dtype
        self.is_initialized = True
        self.m, self.shared, self.done = m, shared, 0
        self.state = _StepBuffers()          # what the backward needs; it never refers back to the layer
        self.link = None                     # the previous step's link output (see _StepAttention)

    def update(self, key_states, value_states, *args, **kwargs):
        """Hands the new keys to the attention function that follows (nothing is concatenated)."""
        if self.done >= self.shared.capacity:
            raise ModelError(f"the preallocated thought cache holds {self.shared.capacity} steps; step "
                             f"{self.done + 1} does not fit (pass extra_steps to generate_thoughts)")
        if key_states.shape[-2] != self.m:
            raise ModelError(f"a masked step feeds {self.m} tokens per row, got {key_states.shape[-2]}")
        self.shared.current = self
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] + self.m * self.done

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def buffers(self, key: torch.Tensor, value: torch.Tensor):
        state = self.state
        if state.key_buffer is None:         # keys and values may differ in width (multi-head latent attention)
            state.key_buffer = key.new_empty(key.shape[:2] + (self.m, self.shared.capacity, key.shape[-1]))
            state.value_buffer = value.new_empty(value.shape[:2] + (self.m, self.shared.capacity, value.shape[-1]))
        return state.key_buffer, state.value_buffer

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ModelError("a thought cache cannot be repeated; repeat the text's cache before step_cache()")


def _exp(s: torch.Tensor) -> torch.Tensor:
    """exp(s) for s <= 0 (scores minus their row's maximum), overwriting s. Results at or below 4x
    the smallest normal number, the masked entries among them, are exactly 0: on a CPU, exp of a
    huge negative number or one with a subnormal result takes a slow path (up to 10x), and
    subnormal probabilities slow every product after it. What is dropped is below 1e-37 (float32)
    of the row's largest probability, far under rounding. Three passes in place: clamp at
    log(smallest normal) + 1 (exp's fast path; its exp, e x the smallest normal, is then dropped),
    exp, threshold."""
    tiny = torch.finfo(s.dtype).tiny
    return nn.functional.threshold_(s.clamp_(min=math.log(tiny) + 1.0).exp_(), 4 * tiny, 0.0)


def _work_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---------------------------------------------------------------- the text part in query chunks

def query_chunks(limits: list[int], chunk: int) -> list[tuple[int, int, int]]:
    """Split the m queries of a step into chunks that attend to a prefix of the text keys.

    limits: for each query, one past the last text key it may see (the causal mask: q + 1).
    returns [(first query, end query, end key)]: chunk [a, e) needs the text keys [0, end key),
    the largest limit in it (at least 1). The scores right of a chunk's end key are masked for
    all of its queries, so they are never computed: with the causal mask and n chunks, that is
    (n - 1) / 2n of the m x seq scores (the triangle's right part, chunk by chunk)."""
    m = len(limits)
    return [(a, min(a + chunk, m), max(1, max(limits[a:a + chunk]))) for a in range(0, m, chunk)]


def chunk_size(m: int, most: int = 8, least: int = 32) -> int:
    """Queries per chunk: at most ``most`` chunks (each costs a dozen operator calls), of at least
    ``least`` queries."""
    return max(least, -(-m // most))


class _StepAttention(torch.autograd.Function):
    """Masked step k of block attention over preallocated buffers, with its own backward.

    q: (b, g, m, r, d) queries times the scale, a query's r heads of kv head g together;
    k_new, v_new: (b, g, m, d) this step's keys; k_text, v_text: (b, g, seq, d);
    text_mask: (b, 1, m, seq) additive or None; chunks: :func:`query_chunks`.
    returns out (b, g, m, r, d) and a link (0-dim) that the next step takes as ``link``.

    One softmax over [text, own] per query, its text part computed chunk by chunk against the
    chunk's visible prefix of text keys; the own part (m x step) in one go.
    """

    @staticmethod
    def forward(ctx, q, k_new, v_new, k_text, v_text, link, text_mask, chunks, layer: StepLayer, step: int):
        b, g, m, r, d = q.shape
        kb, vb = layer.buffers(k_new, v_new)
        kb[:, :, :, step - 1].copy_(k_new.detach())
        vb[:, :, :, step - 1].copy_(v_new.detach())
        k_own, v_own = kb[:, :, :, :step], vb[:, :, :, :step]                # (b, g, m, step, d) views
        s_own = q @ k_own.transpose(-1, -2)                                  # (b, g, m, r, step)
        q2, s_own2 = q.view(b, g, m * r, d), s_own.view(b, g, m * r, step)   # rows: query-major
        out_text = q.new_empty(b, g, m * r, v_text.shape[-1])
        lse = q.new_empty(b, g, m * r, 1)
        for a, e, keys in chunks:
            rows = slice(a * r, e * r)
            s = q2[:, :, rows] @ k_text[:, :, :keys].transpose(-1, -2)       # (b, g, (e - a) * r, keys)
            if text_mask is not None:
                s.view(b, g, e - a, r, keys).add_(text_mask[:, :, a:e, None, :keys])
            so = s_own2[:, :, rows]
            top = torch.maximum(s.amax(-1, keepdim=True), so.amax(-1, keepdim=True))
            p, p_own = _exp(s.sub_(top)), _exp(so.sub_(top))                 # so is s_own's own rows
            z = p.sum(-1, keepdim=True) + p_own.sum(-1, keepdim=True)
            p_own /= z
            out_text[:, :, rows] = (p @ v_text[:, :, :keys]).div_(z)
            lse[:, :, rows] = top + z.log()
        out = out_text.view(b, g, m, r, -1) + s_own @ v_own                  # s_own holds p_own now
        ctx.save_for_backward(q, k_text, v_text, out, lse)
        ctx.text_mask, ctx.chunks, ctx.state, ctx.step = text_mask, chunks, layer.state, step  # not the layer: see _StepBuffers
        ctx.link_shape = None if link is None else link.shape
        link_out = link.detach().clone() if link is not None else q.new_zeros(())
        return out, link_out

    @staticmethod
    def backward(ctx, grad_out, grad_link):
        q, k_text, v_text, out, lse = ctx.saved_tensors
        state, step, text_mask = ctx.state, ctx.step, ctx.text_mask
        b, g, m, r, d = q.shape
        k_own, v_own = state.key_buffer[:, :, :, :step], state.value_buffer[:, :, :, :step]
        grad_out = grad_out.contiguous()
        row = (grad_out * out).sum(-1, keepdim=True)                         # (b, g, m, r, 1)
        q2, go2, row2 = q.view(b, g, m * r, d), grad_out.view(b, g, m * r, -1), row.view(b, g, m * r, 1)
        dq = q.new_empty(b, g, m * r, d)
        dk_text, dv_text = torch.zeros_like(k_text), torch.zeros_like(v_text)
        for a, e, keys in ctx.chunks:
            rows = slice(a * r, e * r)
            s = q2[:, :, rows] @ k_text[:, :, :keys].transpose(-1, -2)
            if text_mask is not None:
                s.view(b, g, e - a, r, keys).add_(text_mask[:, :, a:e, None, :keys])
            p = _exp(s.sub_(lse[:, :, rows]))                                # recomputed: (b, g, rows, keys)
            ds = (go2[:, :, rows] @ v_text[:, :, :keys].transpose(-1, -2)).sub_(row2[:, :, rows]).mul_(p)
            dq[:, :, rows] = ds @ k_text[:, :, :keys]
            dk_text[:, :, :keys] += ds.transpose(-1, -2) @ q2[:, :, rows]
            dv_text[:, :, :keys] += p.transpose(-1, -2) @ go2[:, :, rows]
        p_own = _exp((q @ k_own.transpose(-1, -2)).sub_(lse.view(b, g, m, r, 1)))   # (b, g, m, r, step)
        ds_own = (grad_out @ v_own.transpose(-1, -2)).sub_(row).mul_(p_own)
        dq = dq.view(q.shape) + ds_own @ k_own
        if state.key_grad is None:
            state.key_grad = torch.zeros_like(state.key_buffer)
            state.value_grad = torch.zeros_like(state.value_buffer)
        state.key_grad[:, :, :, :step] += ds_own.transpose(-1, -2) @ q       # (b, g, m, step, d)
        state.value_grad[:, :, :, :step] += p_own.transpose(-1, -2) @ grad_out
        # every later step has added its share by now (they consumed this step's link): hand the
        # finished slot on, and clear it so that a second backward starts from zero
        dk_new = state.key_grad[:, :, :, step - 1].clone()
        dv_new = state.value_grad[:, :, :, step - 1].clone()
        state.key_grad[:, :, :, step - 1].zero_()
        state.value_grad[:, :, :, step - 1].zero_()
        dlink = None if ctx.link_shape is None else grad_out.new_zeros(ctx.link_shape)
        return dq, dk_new, dv_new, dk_text, dv_text, dlink, None, None, None, None


def _preallocated(module, query, key, value, attention_mask, dropout, scaling, layout: Layout):
    """Block attention for a :func:`step_cache`: ``key``/``value`` are this step's new keys only."""
    layer = layout.cache.current
    batch, heads, m, dim = query.shape
    if layer is None or key.shape[2] != m or m != layout.m or layer.done != layout.step - 1:
        raise ModelError(f"block attention expected this step's {layout.m} new keys after a StepLayer update "
                         f"(step {layout.step}), got {key.shape[2]} keys; use attention='mask'")
    if dropout > 0.0 and module.training:
        raise ModelError(f"block attention does not implement attention dropout ({dropout}) of "
                         f"{type(module).__name__}; use attention='mask'")
    layout.cache.current = None
    kv_heads, seq = key.shape[1], layout.seq
    if (heads % kv_heads or key.shape[-1] != dim or value.shape[:3] != key.shape[:3]
            or layer.keys.shape[:2] != key.shape[:2] or layer.values.shape[:2] != value.shape[:2]
            or (attention_mask is not None and attention_mask.shape[1] != 1)):
        raise ModelError(f"block attention cannot read the attention of {type(module).__name__} (queries "
                         f"{tuple(query.shape)}, keys {tuple(key.shape)}, mask "
                         f"{None if attention_mask is None else tuple(attention_mask.shape)}); use attention='mask'")
    group = heads // kv_heads
    work = _work_dtype(query.dtype)
    scale = dim ** -0.5 if scaling is None else scaling
    q = (query.to(work).view(batch, kv_heads, group, m, dim).transpose(2, 3) * scale).contiguous()  # (b, g, m, r, d)
    text_mask = None if attention_mask is None else attention_mask[:, :, :, :seq].to(work)
    out, layer.link = _StepAttention.apply(q, key.to(work), value.to(work), layer.keys.to(work),
                                           layer.values.to(work), layer.link, text_mask,
                                           layout.cache.chunks, layer, layout.step)
    layer.done += 1
    return out.to(query.dtype).transpose(1, 2).reshape(batch, m, heads, -1), None
