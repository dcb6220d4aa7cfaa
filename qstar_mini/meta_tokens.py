"""The two meta-tokens, ``<|startofthought|>`` and ``<|endofthought|>`` (paper section 4.2).

Every thought is written between them: ``T_j = [<|startofthought|>, s_1 .. s_{t-2},
<|endofthought|>]``. They are new tokens, so their embeddings must be learned, and learned
quickly. Two details of the official code are reproduced here:

1. **Initialisation from an existing token.** The official code starts both embeddings from
   the embedding of ``"---"``, which in ordinary text often marks a pause or a break. It
   takes the *first* token of the text's encoding (``meta_init="first"``); when the text is
   several tokens, that is only part of it. ``meta_init="mean"`` (the tiny preset) takes the
   mean of its tokens' embeddings instead: our character-level tokenizer has no ``---``.

2. **The embedding scale.** The official code stores the meta-token embeddings divided by
   ``embedding_scale`` (100) and multiplies them back when they are used::

       e = scale * p          (p is the nn.Parameter the optimiser sees)

   Adam's step on p is about ``lr`` whatever the size of the gradient (it divides by the
   gradient's running RMS), so e moves about ``scale * lr`` per step: the meta-tokens learn
   ``scale`` times faster than the rest of the model. Multiplying the *gradient* by the scale
   (a backward hook) would not do this under Adam: the factor is divided out again.
   ``tests/test_meta_tokens.py`` shows both.
"""

from __future__ import annotations

import torch
from tokenizers import AddedToken
from torch import nn

from qstar_mini.errors import ModelError

START_THOUGHT = "<|startofthought|>"
END_THOUGHT = "<|endofthought|>"


def init_embedding(model: nn.Module, tokenizer, text: str, how: str = "first") -> tuple[torch.Tensor, list[int]]:
    """The embedding a meta-token starts from: of the first token of ``text`` (``how="first"``,
    the official code) or the mean over its tokens (``how="mean"``).

    returns: (hidden,) vector and the token ids it was made from.
    """
    if how not in ("first", "mean"):
        raise ValueError(f"unknown meta-token init {how!r}; choose 'first' or 'mean'")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids or (unk is not None and unk in ids):
        raise ModelError(f"cannot initialise a meta-token from {text!r}: the tokenizer has no token "
                         f"for it; choose text made of tokens in the vocabulary (e.g. '-')")
    if how == "first":
        ids = ids[:1]
    table = model.get_input_embeddings().weight
    return table[ids].detach().mean(0).clone(), list(ids)


def embedding_scale_of(table: nn.Module):
    """The factor an embedding module multiplies its rows by (Gemma's ``embed_scale``, sqrt of
    the width, in transformers 5), else 1. The meta-tokens' rows get the same factor, so that a
    meta-token initialised from a text looks like that text to the model, and rows written into
    the table mean the same when the saved model is loaded on its own."""
    scale = getattr(table, "embed_scale", None)
    return 1.0 if scale is None else scale


class MetaTokens(nn.Module):
    """The meta-token embeddings, stored scaled down, used scaled up.

    start_id, end_id: their ids in the (resized) vocabulary.
    stored:           nn.Parameter (2, hidden) = embeddings / scale; row 0 start, row 1 end.
    """

    def __init__(self, start_id: int, end_id: int, init: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.start_id = int(start_id)
        self.end_id = int(end_id)
        self.scale = float(scale)
        self.stored = nn.Parameter(init.detach().clone() / self.scale)   # (2, hidden)

    @property
    def ids(self) -> tuple[int, int]:
        return self.start_id, self.end_id

    def embeddings(self) -> torch.Tensor:
        """The meta-tokens' rows of the embedding table: (2, hidden) = scale * stored. (What the
        model sees is this times the embedding module's own factor, see :meth:`embed`.)"""
        return self.stored * self.scale

    def embed(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Embed token ids, taking the meta-tokens' rows from this module.

        input_ids: (...,) long.   returns: (..., hidden).
        """
        table = model.get_input_embeddings()
        e = table(input_ids)                                                # (..., hidden)
        meta = (self.embeddings() * embedding_scale_of(table)).to(e.dtype)
        e = torch.where((input_ids == self.start_id)[..., None], meta[0], e)
        e = torch.where((input_ids == self.end_id)[..., None], meta[1], e)
        return e

    @torch.no_grad()
    def write_into(self, model: nn.Module) -> None:
        """Copy the learned embeddings into the model's table (before ``save_pretrained``), so the
        saved model holds them even without this module."""
        table = model.get_input_embeddings().weight
        table[self.start_id] = self.embeddings()[0].to(table.dtype)
        table[self.end_id] = self.embeddings()[1].to(table.dtype)


def add_meta_tokens(model: nn.Module, tokenizer, start_init: str = "---", end_init: str = "---",
                    embedding_scale: float = 100.0, meta_init: str = "first") -> MetaTokens:
    """Add ``<|startofthought|>`` and ``<|endofthought|>`` to a tokenizer and its model.

    The tokenizer gets two special tokens (never split, never produced by ordinary text);
    the model's embedding table (and an untied LM head) grows by two rows; the embedding rows
    start as described above. Their LM-head rows do not matter: qstar_mini never lets the
    meta-tokens be sampled or emitted (see :func:`qstar_mini.lm.text_log_probs`). Calling it
    again on the same tokenizer reuses the existing ids.

    returns: the :class:`MetaTokens` module (train it with the model).
    """
    start_vec, _ = init_embedding(model, tokenizer, start_init, meta_init)
    end_vec, _ = init_embedding(model, tokenizer, end_init, meta_init)
    tokenizer.add_tokens([AddedToken(START_THOUGHT, special=True, normalized=False),
                          AddedToken(END_THOUGHT, special=True, normalized=False)], special_tokens=True)
    start_id = tokenizer.convert_tokens_to_ids(START_THOUGHT)
    end_id = tokenizer.convert_tokens_to_ids(END_THOUGHT)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    init = torch.stack([start_vec, end_vec])                                  # (2, hidden)
    with torch.no_grad():
        table = model.get_input_embeddings().weight
        table[start_id] = start_vec.to(table.dtype)
        table[end_id] = end_vec.to(table.dtype)
    meta = MetaTokens(start_id, end_id, init, scale=embedding_scale)
    return meta.to(model.get_input_embeddings().weight.device)
