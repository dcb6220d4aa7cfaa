"""Which attention computes the masked thought and talk steps (``QuietStarConfig.attention``).

All of them compute the same numbers, the Figure 3 visibility of :mod:`qstar_mini.masks`:

``"mask"``
    the model's own attention (eager or sdpa) with the dense additive mask: what the paper
    draws and the notebooks teach, and the reference the other two are tested against.
``"blocks"``
    :mod:`qstar_mini.fast.block_attention`: only the visible scores are computed (the text part,
    plus one key per earlier step), with a hand-written backward. The fastest on a CPU.
``"flex"``
    :mod:`qstar_mini.fast.flex_attention`: PyTorch's FlexAttention with the visibility written as
    a predicate over (query, key) and compiled to a block-sparse mask. Made for GPUs.

The plain pass over the text always uses the model's own attention.
"""

from __future__ import annotations

import contextlib

from torch import nn

MODES = ("mask", "blocks", "flex")


def masked_step(model: nn.Module, attention: str, seq: int, m: int, step: int, attention_mask=None,
                positions=None, cache=None):
    """Context for masked step ``step`` (1-based): keys = seq text keys, then ``step`` blocks of m.

    attention_mask: (rows, seq) the padding mask; positions: (rows, m) or None (every position
    thinks, m = seq). Only ``"flex"`` reads them (the others get the dense mask from the model).
    cache: the step's KV cache; ``"blocks"`` writes into it in place when it is a
    :func:`qstar_mini.fast.block_attention.step_cache`.
    """
    if attention == "mask":
        return contextlib.nullcontext()
    if attention == "blocks":
        from qstar_mini.fast.block_attention import structured

        return structured(model, seq, m, step, cache)
    if attention == "flex":
        from qstar_mini.fast.flex_attention import structured

        return structured(model, seq, m, step, attention_mask, positions)
    raise ValueError(f"attention must be one of {MODES} (got {attention!r})")
