"""Trading compute for memory: sample thoughts without a graph, then score them in one pass.

Why the step's memory grows so fast
-----------------------------------
:func:`~qstar_mini.thoughts.generate_thoughts` keeps the autograd graph of every masked step
(REINFORCE needs log p(T_j) and the NLL needs the talk hidden states, both with gradients).
At step k every layer's attention saves its keys and values for the backward pass, and with a
KV cache those are the *whole* cache so far: ``seq + m * k`` keys. Over
S = t + n_true - 1 steps the saved keys add up to about ``seq * S + m * S^2 / 2`` per layer
instead of ``seq + m * S``: memory quadratic in the thought length. (This holds for the
concatenating cache of ``attention="mask"``; ``"blocks"``, the default where the model allows
it, writes each step's keys once into preallocated buffers and saves no attention
probabilities, see :mod:`qstar_mini.fast.block_attention`.)

The alternative (``QuietStarConfig.memory``)
--------------------------------------------
``"stepwise"`` (default)
    the above: fastest. With block attention (the default where the model allows it) its
    memory is no longer the most of the three, see below.
``"rescore"``
    1. sample every T_j under ``torch.no_grad()`` with the KV cache (no graph kept), then
    2. feed the text and all S steps' tokens as *one* sequence of ``seq + m * S`` tokens,
       with :func:`qstar_mini.masks.one_pass_visibility` (the Figure 3 mask of every step at
       once, in the order the cache held them) and the same position ids. That pass, with
       gradients, gives the same log p(T_j) and talk hidden states as the stepwise graph,
       hence the same loss and gradients (tests/fast/test_rescore.py, float64). Cost: the
       generation's forward passes run twice (once without graph) and the text once more
       per thought.
``"rescore_checkpointed"``
    as ``"rescore"``, and each decoder layer of the scoring pass is recomputed during the
    backward pass (``torch.utils.checkpoint``) instead of keeping its activations. Only
    possible because that pass has no KV cache. Cost: one more forward of the scoring pass.

The single pass attends over a dense ``(seq + m * S)^2`` mask (that square of floats per row,
held during the pass), so whether it pays depends on the attention kernel. ``qstar-mini bench
--goals`` measures all three the same way (peak RSS of a fresh process; docs/performance.md):
there ``"rescore"`` peaks *higher* than the stepwise default, so it is no memory saver, only the
reference that checkpointing builds on; ``"rescore_checkpointed"`` peaks lower than the default,
at a multiple of its time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qstar_mini.errors import ModelError
from qstar_mini.lm import body, lm_head, text_log_probs
from qstar_mini.masks import check_right_padded, one_pass_position_ids, one_pass_visibility, to_additive
from qstar_mini.meta_tokens import MetaTokens
from qstar_mini.talk import shift_left


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (``model.model.layers``; GPT-2: ``transformer.h``)."""
    core = body(model)
    for name in ("layers", "h"):
        layers = getattr(core, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise ModelError(f"cannot find the decoder layers of {type(model).__name__} (looked for .layers and .h); "
                     f"use memory='rescore' without checkpointing")


@contextlib.contextmanager
def checkpointed_layers(model: nn.Module):
    """Inside this block every decoder layer is recomputed in the backward pass instead of
    storing its activations (non-reentrant ``torch.utils.checkpoint``). Restores the layers
    on exit. Do not use it for passes that write a KV cache: the recomputation would write
    it again."""
    layers = decoder_layers(model)
    saved = [layer.__dict__.get("forward") for layer in layers]      # instance-level forward, if any
    for layer in layers:
        original = layer.forward

        def forward(*args, _original=original, **kwargs):
            if not torch.is_grad_enabled():
                return _original(*args, **kwargs)
            return checkpoint(_original, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
    try:
        yield
    finally:
        for layer, old in zip(layers, saved):
            if old is None:
                del layer.forward
            else:
                layer.forward = old


@dataclass
class Rescored:
    """What the scoring pass gives, with gradients; the same as the stepwise graph's tensors.

    logprobs:  (batch, n_thoughts, m, t - 2)          log p of each sampled thought token
                                                       (= Thoughts.logprobs)
    h_thought: (batch, n_thoughts, m, n_true, hidden) post-thought hidden states
                                                       (= talk_hidden's result)
    """

    logprobs: torch.Tensor
    h_thought: torch.Tensor


def step_tokens(input_ids: torch.Tensor, thought_ids: torch.Tensor, n_true: int,
                positions: torch.Tensor | None = None) -> torch.Tensor:
    """The token each masked step feeds, in order: the t thought tokens, then n_true - 1 talk tokens.

    input_ids: (rows, seq).  thought_ids: (rows, m, t).  positions: (rows, m) or None.
    returns: (rows, t + n_true - 1, m); step k (1-based) feeds ``[:, k - 1]``.
    """
    seq = input_ids.shape[1]
    steps = [thought_ids[..., k] for k in range(thought_ids.shape[-1])]     # T_j, meta-tokens included
    for i in range(1, n_true):                                              # x_{j+i}, teacher forcing
        if positions is None:
            steps.append(shift_left(input_ids, i))
        else:
            steps.append(input_ids.gather(1, (positions + i).clamp(max=seq - 1)))
    return torch.stack(steps, dim=1)


def rescore_thoughts(model: nn.Module, meta: MetaTokens, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, thought_ids: torch.Tensor, n_true: int, *,
                     reinforce_temperature: float = 1.0, positions: torch.Tensor | None = None,
                     checkpoint_layers: bool = False) -> Rescored:
    """Score given thoughts in one masked forward pass (with gradients).

    input_ids, attention_mask: (batch, seq), right-padded.
    thought_ids: (batch, n_thoughts, m, t), e.g. ``generate_thoughts(...).ids`` made without grad.
    positions: (batch, m) thinking positions (None: all, m = seq), as given to generate_thoughts.
    checkpoint_layers: recompute each decoder layer in the backward pass (less memory than without).
    returns: :class:`Rescored` (logprobs (batch, n_thoughts, m, t - 2), h_thought
    (batch, n_thoughts, m, n_true, hidden)).
    """
    check_right_padded(attention_mask)
    batch, n_thoughts, m, t = thought_ids.shape
    seq = input_ids.shape[1]
    if (positions is None and m != seq) or (positions is not None and positions.shape != (batch, m)):
        raise ValueError(f"thought_ids cover {m} positions per row but positions is "
                         f"{None if positions is None else tuple(positions.shape)}")
    n_steps = t + n_true - 1
    rows = batch * n_thoughts
    text = input_ids.repeat_interleave(n_thoughts, 0)                        # (rows, seq)
    mask_rows = attention_mask.repeat_interleave(n_thoughts, 0)              # (rows, seq)
    pos_rows = None if positions is None else positions.repeat_interleave(n_thoughts, 0)  # (rows, m)
    ids = thought_ids.reshape(rows, m, t)
    tokens = torch.cat([text, step_tokens(text, ids, n_true, pos_rows).flatten(1)], 1)  # (rows, seq + m*S)

    dtype = model.get_input_embeddings().weight.dtype
    mask = to_additive(one_pass_visibility(mask_rows, n_steps, pos_rows), dtype)  # (rows, 1, L, L)
    position_ids = one_pass_position_ids(mask_rows, n_steps, pos_rows)      # (rows, L)
    with checkpointed_layers(model) if checkpoint_layers else contextlib.nullcontext():
        h = body(model)(inputs_embeds=meta.embed(model, tokens), attention_mask=mask,
                        position_ids=position_ids, use_cache=False).last_hidden_state  # (rows, L, hidden)
    hidden = h.shape[-1]
    h_steps = h[:, seq:].view(rows, n_steps, m, hidden)                      # step k at [:, k - 1]

    # Steps 1 .. t - 2 predict the sampled tokens s_1 .. s_{t-2} = ids[..., 1 : t - 1].
    logits = lm_head(model)(h_steps[:, : t - 2])                             # (rows, t - 2, m, vocab)
    sampled = ids[..., 1: t - 1].transpose(1, 2)                             # (rows, t - 2, m)
    logp = text_log_probs(logits, meta.ids, reinforce_temperature).gather(-1, sampled[..., None])[..., 0]
    logprobs = logp.transpose(1, 2).reshape(batch, n_thoughts, m, t - 2)
    # Step t read <|endofthought|> (offset 0); step t + i read x_{j+i} (offset i).
    h_thought = h_steps[:, t - 1:].transpose(1, 2).reshape(batch, n_thoughts, m, n_true, hidden)
    return Rescored(logprobs=logprobs, h_thought=h_thought)
