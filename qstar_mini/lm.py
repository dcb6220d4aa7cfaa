"""The few things qstar_mini asks of a Hugging Face causal LM, in one place.

Quiet-STaR needs the *hidden states* before the LM head (the mixing head reads them, and the
official code mixes them), so every forward pass here calls the model's body
(``model.base_model``: ``model.model`` for Llama/Mistral/Qwen2, ``model.transformer`` for
GPT-2) and applies the head (``model.get_output_embeddings()``) separately.

Inputs go in as embeddings (``inputs_embeds``) because the meta-tokens' embeddings live in
their own scaled parameter (:mod:`qstar_mini.meta_tokens`).

Supported: any causal LM whose attention accepts a custom 4D float mask together with a
``DynamicCache`` and explicit ``position_ids`` (tested: Llama, Mistral, Qwen2, GPT-2 with
eager and sdpa attention, transformers 4.57 to 5.x). Flash-attention kernels do not accept
arbitrary 4D masks.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache

from .errors import ModelError

SUPPORTED_ATTENTION = ("eager", "sdpa")


def body(model: nn.Module) -> nn.Module:
    """The transformer without its LM head (``model.base_model``)."""
    return model.base_model


def lm_head(model: nn.Module) -> nn.Module:
    """The linear map from hidden states (..., hidden) to logits (..., vocab)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ModelError(f"{type(model).__name__} has no LM head; use a *ForCausalLM model")
    return head


def input_embeddings(model: nn.Module) -> nn.Embedding:
    return model.get_input_embeddings()


def check_supported(model: nn.Module) -> None:
    """Raise :class:`ModelError` if the model's attention cannot take Quiet-STaR's 4D masks."""
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTENTION:
        raise ModelError(
            f"attention implementation {impl!r} does not accept custom 4D masks; load the model "
            f"with attn_implementation='sdpa' or 'eager' (tested: Llama, Mistral, Qwen2, GPT-2)")
    if not getattr(model.config, "is_decoder", True) and getattr(model.config, "is_encoder_decoder", False):
        raise ModelError(f"{type(model).__name__} is an encoder-decoder; Quiet-STaR needs a causal LM")


def new_cache() -> DynamicCache:
    """An empty KV cache; every forward pass appends its keys and values to it."""
    return DynamicCache()


def _cache_argument(model: nn.Module) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache`; accept both without warnings.
    params = inspect.signature(body(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward_hidden(model: nn.Module, inputs_embeds: torch.Tensor, mask: torch.Tensor,
                   position_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """One forward pass of new tokens against the cache; returns their last hidden states.

    inputs_embeds: (rows, seq, hidden)      the tokens fed now (one per position)
    mask:          (rows, 1, seq, keys)     additive 4D mask, keys = cached + seq
    position_ids:  (rows, seq)
    cache:         DynamicCache holding (rows, heads, cached, head_dim) per layer; updated in place
    returns:       (rows, seq, hidden)      after the model's final norm, before the LM head
    """
    kwargs = {_cache_argument(model): cache}
    out = body(model)(inputs_embeds=inputs_embeds, attention_mask=mask.to(inputs_embeds.dtype),
                      position_ids=position_ids, use_cache=True, **kwargs)
    return out.last_hidden_state


def text_log_probs(logits: torch.Tensor, meta_ids: tuple[int, ...] = (), temperature: float = 1.0) -> torch.Tensor:
    """log-softmax over the vocabulary with the meta-tokens removed.

    The meta-tokens are never text: they are never sampled inside a thought, never emitted at
    inference (the official README's pitfall) and never a target. Removing them from every
    distribution also means adding them does not change the base model's predictions.

    logits: (..., vocab).   returns: (..., vocab) log-probs, ``-inf`` at ``meta_ids``.
    """
    logits = logits / temperature
    if meta_ids:
        logits = logits.index_fill(-1, torch.tensor(list(meta_ids), device=logits.device), float("-inf"))
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()        # log-probs in at least float32, even under bf16 autocast
    return torch.log_softmax(logits, dim=-1)
