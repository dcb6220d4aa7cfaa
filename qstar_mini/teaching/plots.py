"""Plots, for where a reader would rather look than read.

Every function returns the matplotlib ``Figure`` and, given ``path``, also saves it as a PNG
(parent folders created). In a notebook the figure shows itself (end the line with ``;``);
in a script or a test without a display the Agg backend is selected first, so nothing ever
tries to open a window.

=============================  ===============================================================
function                       shows
=============================  ===============================================================
:func:`plot_losses`            training curves from ``metrics.jsonl`` (one or several runs)
:func:`plot_eval_curves`       a held-out figure (answer NLL, right thoughts, ...) over training
:func:`plot_thought_accuracy`  the fraction of right thoughts over training (tier 2)
:func:`plot_which_tokens_benefit`  improvement binned by the base model's loss (the paper's figure)
:func:`plot_w_over_positions`  the mixing weight w at each position of a line
:func:`plot_model_bars`        answer NLL / accuracy per model, mean +- std over seeds
:func:`plot_mask`              an attention mask as a heatmap (True = may attend)
=============================  ===============================================================
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import matplotlib


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

    by_difficulty: rows from :func:`qstar_mini.evaluate.by_difficulty` (or the report's
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


def plot_mask(visible, path=None, title: str = "attention mask (dark = may attend)", block: int | None = None,
              query_labels=None, key_labels=None):
    """A boolean mask (query, key) as a heatmap; ``block`` draws a line every ``block`` keys
    (e.g. seq, to separate the text from each thought step, as in Figure 3).

    visible: 2D bool array or tensor, True = may attend.
    """
    import numpy as np

    grid = np.asarray(visible.detach().cpu() if hasattr(visible, "detach") else visible, dtype=float)
    if grid.ndim != 2:
        raise ValueError(f"plot_mask needs a 2D (query, key) mask; got shape {grid.shape}")
    q, k = grid.shape
    fig, ax = plt.subplots(figsize=(min(12, 1.5 + 0.35 * k), min(8, 1.2 + 0.35 * q)))
    ax.imshow(grid, cmap="Greys", vmin=0, vmax=1, aspect="equal", interpolation="nearest")
    if block:
        for x in range(block, k, block):
            ax.axvline(x - 0.5, color="#d62728", lw=1)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if query_labels is not None:
        ax.set_yticks(range(q), query_labels, fontsize=7)
    if key_labels is not None:
        ax.set_xticks(range(k), key_labels, fontsize=7, rotation=90)
    ax.set_title(title)
    _save(fig, path)
    return fig
