"""Attention masks that let every position think at once (Figure 3 of the paper).

The trick
---------
A thought after *every* token would need l separate generations. Quiet-STaR instead feeds,
at thought step k, one new token for each of the l positions in a single forward pass, and
uses the attention mask so that the k-th thought token of position j sees only

* the real text up to and including x_j            (the causal part), and
* thought tokens 1 .. k of the *same* position j   (a diagonal in each earlier step's block),

and nothing of the thoughts of other positions. With a KV cache the keys of step k are the
l text tokens followed by k blocks of l thought tokens:

.. code-block:: text

    keys:      x_0 .. x_{l-1} | step 1: T_{0,1} .. T_{l-1,1} | ... | step k: T_{0,k} .. T_{l-1,k}
    query j:   1 1 .. 1 0 0   | 0 .. 1 (column j) .. 0        | ... | 0 .. 1 (column j) .. 0
               (x_i, i <= j)

Each block after the first is an identity matrix: those are the diagonals of Figure 3.
The same masks work when only some positions think (``positions``, shape (batch, m)): the
text part then has one row per thinking position, and the blocks are m x m identities.
The *talk* tokens that follow the thought (teacher forcing of the next n_true - 1 true
tokens, see :mod:`qstar_mini.talk`) are just more steps of the same kind, so one mask
builder serves both.

Position ids place thought token k of position j at position ``j + k``: exactly where it
would sit if the thought were written into the text after x_j. The naive reference in
:mod:`qstar_mini.thoughts` does literally that, and the tests check both agree.

Hugging Face convention: a float mask of shape ``(batch, 1, query_len, key_len)`` that is
added to the attention scores: 0 where a query may attend, the dtype's most negative value
where it may not. Boolean masks (True = may attend) are easier to read and to test, so each
builder has a boolean form and :func:`to_additive` converts.
"""

from __future__ import annotations

import torch

from qstar_mini.errors import DataError


def check_right_padded(attention_mask: torch.Tensor) -> None:
    """Raise :class:`DataError` unless every row is 1s then 0s and has at least one 1.

    attention_mask: (batch, seq) of 0/1.
    """
    if attention_mask.dim() != 2:
        raise DataError(f"attention_mask must have shape (batch, seq); got {tuple(attention_mask.shape)}")
    m = attention_mask.long()
    lengths = m.sum(-1)
    if bool((lengths == 0).any()):
        rows = (lengths == 0).nonzero().flatten().tolist()
        raise DataError(f"batch rows {rows} are all padding; drop empty lines before batching")
    expected = torch.arange(m.shape[1], device=m.device)[None, :] < lengths[:, None]
    if not bool((expected.long() == m).all()):
        raise DataError("attention_mask must be right-padded (1s then 0s); set tokenizer.padding_side = 'right'")


def causal_visibility(attention_mask: torch.Tensor) -> torch.Tensor:
    """Boolean causal mask with padding: query j may see key i iff i <= j and i is not padding.

    attention_mask: (batch, seq) of 0/1, right-padded.
    returns:        (batch, 1, seq, seq) bool, True = may attend.
    """
    seq = attention_mask.shape[-1]
    device = attention_mask.device
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()   # (seq, seq)
    keys_ok = attention_mask.bool()[:, None, None, :]                        # (batch, 1, 1, seq)
    return causal[None, None] & keys_ok


def thought_visibility(attention_mask: torch.Tensor, step: int,
                       positions: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask for the queries of thought (or talk) step ``step`` >= 1.

    Keys are the seq text tokens followed by ``step`` blocks of m tokens (one block per step
    fed so far, the current one included), m = the number of thinking positions. Query q
    (thinking after position j = positions[q]) sees text x_{<=j} (minus padding) and column q
    of every block: its own earlier thought tokens and itself.

    attention_mask: (batch, seq) of 0/1, right-padded.
    positions: (batch, m) long, the positions that think; default every position (m = seq,
               positions[q] = q: Figure 3).
    returns:   (batch, 1, m, seq + m * step) bool.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1 (got {step}); step 0 is the causal mask")
    batch, seq = attention_mask.shape
    if positions is None:
        text = causal_visibility(attention_mask)                              # (batch, 1, seq, seq)
        m = seq
    else:
        keys = torch.arange(seq, device=attention_mask.device)
        text = (keys[None, None, :] <= positions[:, :, None]) & attention_mask.bool()[:, None, :]
        text = text[:, None]                                                  # (batch, 1, m, seq)
        m = positions.shape[1]
    own = torch.eye(m, dtype=torch.bool, device=attention_mask.device)        # (m, m)
    blocks = own.repeat(1, step)[None, None].expand(batch, 1, m, m * step)
    return torch.cat([text, blocks], dim=-1)


def to_additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turn a boolean mask (True = attend) into Hugging Face's additive float mask.

    visible: (..., query, key) bool.  returns: same shape, 0.0 or ``finfo(dtype).min``.
    """
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)


def causal_mask(attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive 4D causal mask, (batch, 1, seq, seq): the plain forward pass (Algorithm 1, line 1)."""
    return to_additive(causal_visibility(attention_mask), dtype)


def thought_mask(attention_mask: torch.Tensor, step: int, dtype: torch.dtype = torch.float32,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
    """Additive 4D mask for thought/talk step ``step``, (batch, 1, m, seq + m * step)."""
    return to_additive(thought_visibility(attention_mask, step, positions), dtype)


def all_step_masks(attention_mask: torch.Tensor, n_steps: int, dtype: torch.dtype = torch.float32,
                   positions: torch.Tensor | None = None) -> torch.Tensor:
    """The mask of the last step, built once; step k's mask is its first seq + m * k keys.

    Slicing instead of rebuilding the mask at every step is why this exists:
    ``full[..., : seq + m * k]`` equals :func:`thought_mask` (attention_mask, k).

    attention_mask: (batch, seq).  returns: (batch, 1, m, seq + m * n_steps).
    """
    return thought_mask(attention_mask, n_steps, dtype, positions)


def step_position_ids(attention_mask: torch.Tensor, step: int,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids of the tokens fed at step ``step`` (0 = the text itself): j + step.

    attention_mask: (batch, seq).  positions: (batch, m) thinking positions (default all).
    returns: (batch, m) long.
    """
    if positions is not None:
        return positions + step
    batch, seq = attention_mask.shape
    return (torch.arange(seq, device=attention_mask.device) + step).expand(batch, seq)


def one_pass_visibility(attention_mask: torch.Tensor, n_steps: int,
                        positions: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask for scoring the text and *all* ``n_steps`` thought/talk steps in one pass.

    The sequence is laid out exactly as the KV cache of the step-by-step generation holds it:
    the seq text tokens, then ``n_steps`` blocks of m tokens (block k = step k of every
    thinking position). The text rows are the causal mask; the rows of block k are
    :func:`thought_visibility` of step k, with the later blocks hidden. So one forward pass
    over ``seq + m * n_steps`` tokens gives every hidden state that ``n_steps`` cached passes
    give (used by :mod:`qstar_mini.fast.rescore`).

    attention_mask: (batch, seq) of 0/1, right-padded.  positions: (batch, m) or None (m = seq).
    returns: (batch, 1, seq + m * n_steps, seq + m * n_steps) bool, True = may attend.
    """
    batch, seq = attention_mask.shape
    m = seq if positions is None else positions.shape[1]
    total = seq + m * n_steps
    text = causal_visibility(attention_mask)                                     # (batch, 1, seq, seq)
    text_rows = torch.cat([text, text.new_zeros(batch, 1, seq, m * n_steps)], -1)
    last = thought_visibility(attention_mask, n_steps, positions)               # (batch, 1, m, total)
    block = torch.arange(n_steps, device=attention_mask.device).repeat_interleave(m)  # step of each column - 1
    later = torch.cat([torch.zeros(seq, dtype=torch.long, device=block.device), block + 1])  # (total,) 0 = text
    steps = torch.arange(1, n_steps + 1, device=block.device)                    # query step k
    keep = later[None, :] <= steps[:, None]                                      # (n_steps, total)
    rows = last[:, :, None] & keep[None, None, :, None, :]                       # (batch, 1, n_steps, m, total)
    return torch.cat([text_rows, rows.reshape(batch, 1, m * n_steps, total)], 2)


def one_pass_position_ids(attention_mask: torch.Tensor, n_steps: int,
                          positions: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids for :func:`one_pass_visibility`'s layout: text j at j, step k of position j at j + k.

    returns: (batch, seq + m * n_steps) long.
    """
    parts = [step_position_ids(attention_mask, 0)]
    parts += [step_position_ids(attention_mask, k, positions) for k in range(1, n_steps + 1)]
    return torch.cat(parts, dim=1)
