"""Every plot of the notebooks and the reports, and the coloured text of notebooks 05 and 10.

Two kinds of function. The *figure* functions make a whole figure from run records: each returns
the matplotlib ``Figure`` and, given ``path``, also saves it as a PNG (parent folders created).
The *axes* functions draw one panel on a matplotlib ``Axes`` you pass, so a notebook lays out
its own figure. In a notebook the figure shows itself (end the line with ``;``); in a script or
a test without a display the Agg backend is selected first, so nothing ever tries to open a
window. Nothing here computes anything the algorithm needs: the package's own functions do
that, these only show it.

=================================  ===========================================================
function                           shows
=================================  ===========================================================
:func:`plot_losses`                training curves from ``metrics.jsonl`` (one or several runs)
:func:`plot_eval_curves`           a held-out figure (answer NLL, right thoughts, ...) over training
:func:`plot_thought_accuracy`      the fraction of right thoughts over training (tier 2)
:func:`plot_which_tokens_benefit`  improvement binned by the base model's loss (the paper's figure)
:func:`plot_w_over_positions`      the mixing weight w at each position of a line
:func:`plot_model_bars`            answer NLL / accuracy per model, mean +- std over seeds
:func:`plot_mask`                  a Figure 3 attention mask as a heatmap, text and thought keys
                                   apart (on your ``Axes`` or a figure of its own)
:func:`plot_timings`               (axes) naive loop vs parallel thoughts, seconds per length
:func:`coloured_text`              (HTML) tokens on backgrounds coloured by a value per token
=================================  ===========================================================

:func:`read_metrics` reads a ``metrics.jsonl`` file for them.
"""
from __future__ import annotations

import html
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import torch

from qstar_mini.inference import coloured_spans


def _headless() -> bool:
    """No display and not inside a Jupyter kernel."""
    in_kernel = "ipykernel" in sys.modules
    no_display = sys.platform.startswith("linux") and not os.environ.get("DISPLAY") \
        and not os.environ.get("WAYLAND_DISPLAY")
    return no_display and not in_kernel


if _headless():
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

COLOURS = {"base": "#888888", "baseline": "#1f77b4", "control": "#1f77b4", "quiet_star": "#2ca02c",
           "no_policy": "#ff7f0e", "shuffled_reward": "#d62728", "no_policy_mixed": "#9467bd",
           "quiet_star_all_positions": "#17becf"}
MASK_COLOURS = ("#f4f4f4", "#2b6cb0")   # hidden, visible
TEXT_COLOUR, THOUGHT_COLOUR = "#2b6cb0", "#dd6b20"


def _save(fig, path) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")


def read_metrics(source) -> list[dict]:
    """Records of a ``metrics.jsonl`` file (or a list of dicts, returned as it is)."""
    if isinstance(source, (str, os.PathLike)):
        return [json.loads(line) for line in Path(source).read_text().splitlines() if line.strip()]
    return list(source)


def _runs(metrics) -> dict[str, list[dict]]:
    """{label: records}: accepts one run (path or list) or a dict of runs."""
    if isinstance(metrics, dict):
        return {k: read_metrics(v) for k, v in metrics.items()}
    return {"run": read_metrics(metrics)}


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(metrics, keys=("loss", "base_nll", "talk_nll"), path=None, smooth: int = 10,
                title: str = "training losses"):
    """Training curves: one line per (run, key), smoothed over ``smooth`` steps.

    metrics: a ``metrics.jsonl`` path, its records, or ``{run label: either}``.
    """
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, records in _runs(metrics).items():
        train = [r for r in records if r.get("kind", "train") == "train"]
        for key in keys:
            points = [(r["step"], r[key]) for r in train if r.get(key) is not None]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, _smooth(list(values), smooth), label=f"{label}: {key}",
                        color=COLOURS.get(label) if len(keys) == 1 else None)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("nats per token")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return fig


def plot_eval_curves(runs: dict, key: str = "thought_correct", path=None, reference: dict | None = None,
                     title: str | None = None, ylabel: str | None = None):
    """One held-out figure over training, one line per run (mean and +- std band over seeds).

    runs: {label: evaluation records with "step" and ``key``} (e.g. ``train(...)["evals"]``), or
    {label: [records per seed]}.
    reference: {label: value} horizontal lines, e.g. the base at its best temperature.
    """
    import numpy as np

    fraction = key.endswith(("_correct", "_acc", "_greedy"))
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, recs in runs.items():
        per_seed = recs if recs and isinstance(recs[0], list) else [recs]
        per_seed = [[r for r in read_metrics(s) if r.get(key) is not None] for s in per_seed]
        if not per_seed[0]:
            continue
        steps = [r["step"] for r in per_seed[0]]
        values = np.array([[r[key] for r in s][: len(steps)] for s in per_seed], dtype=float)
        mean = values.mean(0)
        ax.plot(steps, mean, marker="o", ms=3, label=label, color=COLOURS.get(label))
        if len(per_seed) > 1:
            std = values.std(0)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2, color=COLOURS.get(label))
    for label, value in (reference or {}).items():
        ax.axhline(value, ls="--", color="#444444", lw=1)
        ax.text(ax.get_xlim()[0], value, f" {label}", va="bottom", fontsize=8)
    if fraction:
        ax.set_ylim(0, 1)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(ylabel or ("fraction right" if fraction else key.replace("_", " ")))
    ax.set_title(title or key.replace("_", " "))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return fig


def plot_thought_accuracy(runs: dict, key: str = "thought_correct", path=None, reference: dict | None = None,
                          title: str = "right working in sampled thoughts (held-out)"):
    """The fraction of right thoughts at the answer position over training (tier 2); see
    :func:`plot_eval_curves` for the arguments."""
    return plot_eval_curves(runs, key, path=path, reference=reference, title=title)


def plot_which_tokens_benefit(by_difficulty: list[dict], path=None,
                              title: str = "which tokens benefit (binned by the base model's loss)"):
    """Bars: mean loss improvement of Quiet-STaR over the base (and over the control) per bin.

    by_difficulty: rows from :func:`qstar_mini.evaluation.token_gains.by_difficulty` (or the report's
    ``by_difficulty``, whose values may be ``{"mean": ...}`` dicts).
    """
    import numpy as np

    rows = [r for r in by_difficulty if r.get("n")]

    def value(r, key):
        v = r.get(key)
        return v.get("mean") if isinstance(v, dict) else v

    gains = [k for k in ("gain_vs_base", "gain_vs_control") if any(value(r, k) is not None for r in rows)]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    x = np.arange(len(rows))
    width = 0.8 / max(1, len(gains))
    for i, key in enumerate(gains):
        heights = [value(r, key) or 0.0 for r in rows]
        errs = [(r.get(key) or {}).get("std", 0.0) if isinstance(r.get(key), dict) else 0.0 for r in rows]
        ax.bar(x + (i - (len(gains) - 1) / 2) * width, heights, width, yerr=errs,
               label=key.replace("_", " "), color=["#2ca02c", "#1f77b4"][i % 2], alpha=0.85)
    ax.set_xticks(x, [f"{r['bin']}\nn={value(r, 'n'):.0f}" for r in rows], fontsize=8)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("base model's loss on the token (nats)")
    ax.set_ylabel("loss improvement (nats)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)
    return fig


def plot_w_over_positions(w_by_position, tokens: list[str] | None = None, path=None,
                          title: str = "mixing weight w at each position"):
    """w (the thought's weight) per position j, i.e. when predicting token j + 1.

    w_by_position: a list of values, or {label: list}. tokens: names for the x ticks (the
    token *predicted* at each position).
    """
    series = w_by_position if isinstance(w_by_position, dict) else {"w": w_by_position}
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for label, values in series.items():
        xs = [j for j, v in enumerate(values) if v is not None]
        ax.plot(xs, [values[j] for j in xs], marker="o", label=label, color=COLOURS.get(label))
    if tokens is not None:
        ax.set_xticks(range(len(tokens)), tokens)
        ax.set_xlabel("next token (predicted after thinking at the previous position)")
    else:
        ax.set_xlabel("position j")
    ax.set_ylabel("w")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    _save(fig, path)
    return fig


def plot_model_bars(summary: dict, metrics=("answer_nll", "answer_acc"), path=None,
                    title: str = "held-out answer tokens (mean +- std over seeds)"):
    """One panel per metric, one bar per model, error bars = std over seeds.

    summary: {model: {metric: {"mean": m, "std": s}} or {metric: value}}.
    """
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    axes = [axes] if len(metrics) == 1 else list(axes)
    names = [n for n in summary if summary[n]]
    for ax, metric in zip(axes, metrics):
        means, stds = [], []
        for n in names:
            v = summary[n].get(metric)
            means.append((v.get("mean") if isinstance(v, dict) else v) or 0.0)
            stds.append((v.get("std") if isinstance(v, dict) else 0.0) or 0.0)
        ax.bar(range(len(names)), means, yerr=stds, color=[COLOURS.get(n, "#777777") for n in names], capsize=3)
        ax.set_xticks(range(len(names)), [n.replace("_", "\n") for n in names], fontsize=8)
        ax.set_title(metric.replace("_", " "))
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return fig


def key_labels(seq: int, step: int, text: Sequence[str] | None = None) -> list[str]:
    """Names of the keys of thought step ``step``: x_0 .. x_{seq-1}, then T(j,k) for each block.

    T(j,k) is thought token k of position j (k = 1 is <|startofthought|>)."""
    text = list(text) if text is not None else [f"x{i}" for i in range(seq)]
    return text + [f"T{j},{k}" for k in range(1, step + 1) for j in range(seq)]


def plot_mask(ax, visible, seq: int, title: str | None = None, query: int | None = None,
              text: Sequence[str] | None = None, labels: bool = True, path=None):
    """Heatmap of one boolean mask (query, key): blue = may attend to text, orange = to a thought.

    ax: the ``Axes`` to draw on, or ``None`` for a figure of its own sized to the mask.
    visible: (query, key) bool tensor or array, key = seq * (1 + steps); the thought blocks are
    separated by vertical lines. ``query`` outlines one row; ``text`` names the text keys.
    returns: the Figure drawn on (also saved as a PNG at ``path`` if given).
    """
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    v = torch.as_tensor(visible).detach().to("cpu", torch.int64).numpy()
    if v.ndim != 2:
        raise ValueError(f"plot_mask needs a 2D (query, key) mask; got shape {tuple(v.shape)}")
    n_q, n_k = v.shape
    if ax is None:
        _, ax = plt.subplots(figsize=(min(12, 1.5 + 0.35 * n_k), min(8, 1.2 + 0.35 * n_q)))
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
    _save(ax.figure, path)
    return ax.figure


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


# ---- coloured text (HTML) ------------------------------------------------------------------------

#: How :func:`coloured_text` draws one token: a rounded chip, its value on hover.
CHIP = ('<span title="{title}" style="{style};padding:2px 3px;margin:1px;font-family:monospace;'
        'border-radius:3px">{text}</span>')


def _hex(rgba) -> str:
    r, g, b = (int(round(255 * c)) for c in rgba[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def coloured_text(tokens: Sequence[str], values: Sequence[float | None], vmax: float | None = None,
                  cmap: str = "RdYlGn", fmt: str = "{:+.2f}", caption: str = "") -> str:
    """HTML: each token on a background coloured by its value (red < 0 < green); ``None`` = grey.

    Hovering a token shows its value. Values (and ``vmax``) are rounded with ``fmt`` before anything
    is drawn, so the HTML is the same wherever the values agree to that precision. The tokens are
    drawn by :func:`qstar_mini.inference.coloured_spans`, as :func:`~qstar_mini.inference.render_html`
    draws generated text.
    """
    from matplotlib import colormaps

    shown = [None if v is None else float(fmt.format(v)) for v in values]
    scale = abs(float(fmt.format(vmax))) if vmax else max([abs(v) for v in shown if v is not None], default=0.0)
    scale = scale or 1.0                                     # all zero: any scale gives the middle colour
    cm = colormaps[cmap]
    styles = ["background:#e2e2e2;color:#777" if v is None else
              f"background:{_hex(cm(0.5 + 0.5 * max(-1.0, min(1.0, v / scale))))}" for v in shown]
    titles = ["no value" if v is None else fmt.format(v) for v in shown]
    cap = f'<div style="font-size:80%;color:#555">{html.escape(caption)}</div>' if caption else ""
    return f'<div style="line-height:2">{coloured_spans(tokens, styles, titles, CHIP)}</div>{cap}'
