"""Small plotting helpers for notebooks 01-05: mask heatmaps, timing curves, coloured text.

Every function takes plain tensors or lists and draws on a matplotlib ``Axes`` you pass (or
returns a string of HTML), so a notebook cell stays one line and ends with ``;``. Nothing here
computes anything the algorithm needs: the package's own functions do that, these only show it.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import torch

MASK_COLOURS = ("#f4f4f4", "#2b6cb0")   # hidden, visible
TEXT_COLOUR, THOUGHT_COLOUR = "#2b6cb0", "#dd6b20"


def key_labels(seq: int, step: int, text: Sequence[str] | None = None) -> list[str]:
    """Names of the keys of thought step ``step``: x_0 .. x_{seq-1}, then T(j,k) for each block.

    T(j,k) is thought token k of position j (k = 1 is <|startofthought|>)."""
    text = list(text) if text is not None else [f"x{i}" for i in range(seq)]
    return text + [f"T{j},{k}" for k in range(1, step + 1) for j in range(seq)]


def plot_mask(ax, visible: torch.Tensor, seq: int, title: str | None = None, query: int | None = None,
              text: Sequence[str] | None = None, labels: bool = True) -> None:
    """Heatmap of one boolean mask (query, key): blue = may attend.

    visible: (query, key) bool with key = seq * (1 + steps); the thought blocks are separated by
    vertical lines and coloured orange, the text part blue. ``query`` outlines one row.
    """
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    v = visible.detach().to("cpu", torch.int64).numpy()
    n_q, n_k = v.shape
    steps = n_k // seq - 1
    colour = np.where(np.arange(n_k) < seq, 1, 2)[None, :] * v            # 0 hidden, 1 text, 2 thought
    ax.imshow(colour, cmap=ListedColormap([MASK_COLOURS[0], TEXT_COLOUR, THOUGHT_COLOUR]), vmin=0, vmax=2,
              interpolation="nearest", aspect="equal")
    for s in range(1, steps + 1):
        ax.axvline(s * seq - 0.5, color="black", lw=1)
    ax.set_xticks(range(n_k))
    ax.set_yticks(range(n_q))
    if labels:
        ax.set_xticklabels(key_labels(seq, steps, text), rotation=90, fontsize=7)
        rows = list(text) if text is not None else [f"x{j}" for j in range(n_q)]
        ax.set_yticklabels([f"T{j},{steps}" for j in range(n_q)] if steps else rows, fontsize=7)
    else:
        ax.set_xticklabels([])
        ax.set_yticklabels([])
    ax.set_xticks(np.arange(-0.5, n_k, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n_q, 1), minor=True)
    ax.grid(which="minor", color="white", lw=0.5)
    ax.tick_params(which="minor", length=0)
    if query is not None:
        ax.add_patch(Rectangle((-0.5, query - 0.5), n_k, 1, fill=False, ec="crimson", lw=2))
    ax.set_xlabel("keys: text" if not steps else "keys: text | one block per thought step")
    ax.set_ylabel("queries")
    if title:
        ax.set_title(title, fontsize=10)


def plot_timings(ax, lengths: Sequence[int], naive: Sequence[float], parallel: Sequence[float]) -> None:
    """Seconds per call against sequence length, both methods, with the ratio written on each point."""
    ax.plot(lengths, naive, "o-", label="naive: one position at a time")
    ax.plot(lengths, parallel, "o-", label="parallel: Figure 3 masks + KV cache")
    for x, a, b in zip(lengths, naive, parallel):
        ax.annotate(f"{a / b:.0f}x", (x, a), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length l")
    ax.set_ylabel("seconds per batch of thoughts")
    ax.legend(fontsize=8)


def _hex(rgba) -> str:
    r, g, b = (int(round(255 * c)) for c in rgba[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def coloured_text(tokens: Sequence[str], values: Sequence[float | None], vmax: float | None = None,
                  cmap: str = "RdYlGn", fmt: str = "{:+.2f}", caption: str = "") -> str:
    """HTML: each token on a background coloured by its value (red < 0 < green); ``None`` = grey.

    Hovering a token shows its value. Values (and ``vmax``) are rounded with ``fmt`` before anything
    is drawn, so the HTML is the same wherever the values agree to that precision.
    """
    from matplotlib import colormaps

    shown = [None if v is None else float(fmt.format(v)) for v in values]
    scale = abs(float(fmt.format(vmax))) if vmax else max([abs(v) for v in shown if v is not None], default=0.0)
    scale = scale or 1.0                                     # all zero: any scale gives the middle colour
    cm = colormaps[cmap]
    spans = []
    for tok, v in zip(tokens, shown):
        text = html.escape(tok).replace(" ", "&nbsp;") or "&nbsp;"
        if v is None:
            style, title = "background:#e2e2e2;color:#777", "no value"
        else:
            style = f"background:{_hex(cm(0.5 + 0.5 * max(-1.0, min(1.0, v / scale))))}"
            title = fmt.format(v)
        spans.append(f'<span title="{title}" style="{style};padding:2px 3px;margin:1px;'
                     f'font-family:monospace;border-radius:3px">{text}</span>')
    cap = f'<div style="font-size:80%;color:#555">{html.escape(caption)}</div>' if caption else ""
    return f'<div style="line-height:2">{"".join(spans)}</div>{cap}'
