"""The few things qstar_mini asks of a Hugging Face causal LM, in one place.

Quiet-STaR needs the *hidden states* before the LM head (the mixing head reads them, and the
official code mixes them), so every forward pass here calls the model's body
(``model.base_model``: ``model.model`` for Llama/Mistral/Qwen2, ``model.transformer`` for
GPT-2) and applies the head (``model.get_output_embeddings()``) separately.

Inputs go in as embeddings (``inputs_embeds``) because the meta-tokens' embeddings live in
their own scaled parameter (:mod:`qstar_mini.meta_tokens`).

Supported: any causal LM whose attention accepts a custom 4D float mask together with a
``DynamicCache`` and explicit ``position_ids``, eager or sdpa (flash-attention kernels do not
accept arbitrary 4D masks). Whether a model does is not assumed: :func:`check_supported`
refuses the known exceptions, and :mod:`qstar_mini.models.check` probes the rest against the
model's own forward. ``tests/test_conformance.py`` runs every causal-LM family of the installed
transformers through both (docs/setup.md, "Supported models").
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache

from qstar_mini.errors import ModelError

SUPPORTED_ATTENTION = ("eager", "sdpa")


def body(model: nn.Module) -> nn.Module:
    """The transformer without its LM head (``model.base_model``)."""
    return model.base_model


class ModelLogits(nn.Module):
    """The model's own map from final hidden states (..., hidden) to logits (..., vocab).

    Most causal LMs return ``lm_head(h)``. Some post-process it in their ``forward``, and
    qstar_mini, which calls the body and the head separately, must do the same or its
    log-probs would not be the model's:

    * ``logit_scale`` (Cohere): logits x scale;
    * ``logits_scaling`` (Granite): logits / scaling;
    * ``final_logit_softcapping`` (Gemma 2 and 3): cap x tanh(logits / cap).

    Anything else a model does is caught by :func:`qstar_mini.models.check.check_model`, which
    compares these logits with the model's own forward and refuses the model if they differ.
    """

    def __init__(self, head: nn.Module, config):
        super().__init__()
        self.head = head
        self.multiplier = float(getattr(config, "logit_scale", None) or 1.0)
        scaling = getattr(config, "logits_scaling", None)
        if scaling:
            self.multiplier /= float(scaling)
        self.softcap = getattr(config, "final_logit_softcapping", None) or None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(h)
        if self.multiplier != 1.0:
            logits = logits * self.multiplier
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def lm_head(model: nn.Module) -> nn.Module:
    """The map from hidden states (..., hidden) to the model's logits (..., vocab): its output
    embedding, plus whatever its forward does to the logits (:class:`ModelLogits`)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ModelError(f"{type(model).__name__} has no LM head; use a *ForCausalLM model")
    return ModelLogits(head, model.config)


def check_supported(model: nn.Module, positions_needed: int | None = None, keys_needed: int | None = None) -> None:
    """Raise :class:`ModelError` if the model's attention cannot take Quiet-STaR's 4D masks.

    positions_needed: seq_len + thought_length + n_true - 1, the longest span from a text key
    to a talk query; a sliding attention window shorter than that is refused, because the
    Figure 3 mask replaces the model's window. keys_needed: the most keys a masked step
    holds in its cache, seq_len x (thought_length + n_true), for GPT-Neo's local attention,
    whose window counts cache entries rather than positions.
    """
    config = model.config
    name = type(model).__name__
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl not in SUPPORTED_ATTENTION:
        raise ModelError(
            f"attention implementation {impl!r} does not accept custom 4D masks; load the model "
            f"with attn_implementation='sdpa' or 'eager'")
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"{name} is an encoder-decoder; Quiet-STaR needs a decoder-only causal LM")
    if (getattr(config, "alibi", False) or getattr(config, "position_embedding_type", None) == "alibi"
            or getattr(getattr(config, "attn_config", None), "alibi", False)
            or config.model_type in ("bloom", "mpt")):
        raise ModelError(f"{name} uses ALiBi position biases, which its attention derives from the mask and "
                         f"not from position ids, so thoughts would sit at the wrong distance; use a model "
                         f"with rotary or learned positions")
    window = sliding_window(config)
    if window is not None and positions_needed is not None and window < positions_needed:
        raise ModelError(f"{name} has a sliding attention window of {window} < seq_len + thought_length + "
                         f"n_true - 1 = {positions_needed}, and qstar_mini's Figure 3 mask would replace it; "
                         f"lower seq_len by at least {positions_needed - window} or use a model without one")
    local = getattr(config, "window_size", None)
    if (keys_needed is not None and isinstance(local, int) and local < keys_needed
            and "local" in (getattr(config, "attention_layers", None) or [])):
        raise ModelError(f"{name} has local attention layers whose window of {local} counts cache entries, and a "
                         f"thought step holds up to seq_len x (thought_length + n_true) = {keys_needed}; use a "
                         f"shorter seq_len or thought, or a model with global attention only")


def sliding_window(config) -> int | None:
    """The model's sliding attention window in tokens, or None if no layer uses one."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and not any("sliding" in str(kind) for kind in layer_types):
        return None
    return window


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
    if temperature != 1.0:                 # x / 1 is x: no vocab-sized pass for nothing
        logits = logits / temperature
    if meta_ids:
        logits = logits.index_fill(-1, torch.tensor(list(meta_ids), device=logits.device), float("-inf"))
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()        # log-probs in at least float32, even under bf16 autocast
    return torch.log_softmax(logits, dim=-1)
