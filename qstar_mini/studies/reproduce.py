"""The miniature reproduction: does thinking help (tier 1), and is thinking learned (tier 2)?

Everything runs on the project's tiny bases (0.8M parameters, CPU) and its digit-sum corpus,
measured on held-out answer-only lines (``31415=4``) of ``data/test.jsonl``.

**Tier 1, thinking helps** (base ``data/tiny-base``, whose visible working is always right).
Quiet-STaR and the no-thought control are trained on the same answer-only lines, for the same
steps, from the same seed. The answer digit is the hard token: without working a tiny model
cannot add five digits in one pass (about chance), with a thought it can.

**Tier 2, thinking is learned** (base ``data/tiny-base-noisy``, whose own sampled working is
right only about a third of the time). REINFORCE should raise the fraction of right thoughts,
and the rise must be caused by the reward, so the same run is repeated with

* ``no_policy``: the policy loss off (thoughts used, never taught);
* ``shuffled_reward``: rewards permuted among the thoughts of each line;
* ``no_policy_mixed``: policy off *and* the base's own working lines mixed into the data, so
  it cannot forget its working (fine-tuning on answer-only lines erodes it);

and compared with the base's own best sampling temperature (otherwise REINFORCE may only be
sharpening the distribution, which a lower temperature does for free).

Arms are defined in :data:`TIER1` / :data:`TIER2` (one :class:`Arm` each); :func:`run_tier`
trains and evaluates them for every seed, :func:`aggregate` turns per-seed numbers into
``{"mean", "std", "per_seed"}``, :func:`write_report` writes ``report.json`` and the plots.

* :func:`run_demo_pipeline`: ``make demo`` (``qstar-mini demo``), one seed.
* :func:`run_reproduction`: ``make reproduce`` (``qstar-mini reproduce reproduce``), three seeds
  and the controls.
* :func:`run_ablations`: ``qstar-mini reproduce ablations``, one seed of each of
  :data:`ABLATIONS`; :func:`run_differences` (``qstar-mini reproduce differences``) does the
  same for :data:`DIFFERENCES` on tier 1.
* :func:`run_long_part` and :func:`merge_long`: ``qstar-mini reproduce long PART --seed N`` and
  ``qstar-mini reproduce long --merge``, :data:`TIER2_LONG` over three seeds, run in pieces.

"Think only where it matters": both tiers think only before the answer digit
(``think_where="answer"``), so one position of a line thinks instead of every one (the
paper's default, ``think_where="all"``); :func:`run_reproduction` also runs tier 1 with
every position thinking, so the faithful variant is measured too.

**What was measured** is kept in one place, not here: README.md ("Results", the two main tables) and docs/reproduction.md (both tiers, every
control, the long runs, the single-seed ablations, with the commands), and in full (per seed: all-token NLL, test-line thought correctness, the base by
temperature, seconds per run) in ``docs/results/reproduce_report.json``. How long each
command takes: docs/commands.md, "How long things take". The tier-1 differences from the
official code: ``docs/differences.md``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qstar_mini.config import QuietStarConfig, tiny
from qstar_mini.data import CorpusConfig, make_splits, read_jsonl
from qstar_mini.errors import ConfigError, DataError
from qstar_mini.evaluation.token_gains import answer_only
from qstar_mini.evaluation.thought_quality import best_temperature
from qstar_mini.evaluation.arithmetic import evaluate
from qstar_mini.paths import DATA_DIR, RUNS_DIR, TINY_BASE, TINY_BASE_NOISY


@dataclass
class Arm:
    """One trained variant: a config change, where to think, which lines, shuffled rewards."""

    name: str
    changes: dict = field(default_factory=dict)     # QuietStarConfig fields changed from the tier's
    think_where: str = "answer"
    lines: str = "answer_only"                       # or "answer_only+base_working" (tier 2 control)
    shuffle_rewards: bool = False


@dataclass
class Tier:
    """A base model, a config and the arms trained from it."""

    name: str
    base: Path
    cfg: QuietStarConfig
    arms: tuple[Arm, ...]
    eval_lines: int = 500                           # held-out answer-only test lines
    temperatures: tuple[float, ...] = ()            # the base's thought correctness at these
    visible_working: bool = False                   # also the base's visible working at these
    gsm_limit: int = 0                              # GSM8K-format problems asked of quiet_star


QUIET_STAR = Arm("quiet_star")
BASELINE = Arm("baseline", {"think": False})
NO_POLICY = Arm("no_policy", {"policy_loss_weight": 0.0})
SHUFFLED = Arm("shuffled_reward", shuffle_rewards=True)
NO_POLICY_MIXED = Arm("no_policy_mixed", {"policy_loss_weight": 0.0}, lines="answer_only+base_working")
QUIET_STAR_ALL = Arm("quiet_star_all_positions", think_where="all")

# make demo: one seed, a few minutes (4 thoughts per line).
TIER1 = Tier("tier1", TINY_BASE, tiny(steps=150, n_thoughts=4, batch_size=32), (QUIET_STAR, BASELINE),
             gsm_limit=20)
TIER2 = Tier("tier2", TINY_BASE_NOISY, tiny(steps=300, n_thoughts=4, batch_size=32),
             (QUIET_STAR, NO_POLICY, SHUFFLED, BASELINE), temperatures=(0.25, 0.5, 0.75, 1.0))
# make reproduce: three seeds; tier 1 also with every position thinking (the paper's default),
# tier 2 with 8 thoughts per line (better thoughts than 4 in the ablations) and the
# cannot-forget control.
TIER1_REPRO = dataclasses.replace(TIER1, arms=(QUIET_STAR, BASELINE, QUIET_STAR_ALL))
TIER2_REPRO = dataclasses.replace(TIER2, cfg=TIER2.cfg.replace(n_thoughts=8),
                                  arms=(QUIET_STAR, NO_POLICY, SHUFFLED, NO_POLICY_MIXED, BASELINE))

# Tier 2 with a smaller LM learning rate, a 10x policy loss and three times the steps (the best
# setting of the search in docs/results/tier2_search.md), with the three thought controls
# (thinking off has no thoughts to compare). `qstar-mini reproduce long PART --seed N` runs one
# piece, `qstar-mini reproduce long --merge` makes the 3-seed report docs/reproduction.md's table is rendered from.
TIER2_LONG = dataclasses.replace(TIER2_REPRO, name="tier2_long",
                                 cfg=TIER2_REPRO.cfg.replace(lr=5e-5, policy_loss_weight=10.0, steps=900),
                                 arms=(QUIET_STAR, NO_POLICY, SHUFFLED, NO_POLICY_MIXED), visible_working=True)

# Single-seed ablations on tier 2 (run_ablations): the choices the tiers rest on.
ABLATIONS = (
    Arm("n_thoughts_8", {"n_thoughts": 8}),
    Arm("reinforce_temperature_1", {"reinforce_temperature": 1.0}),
    Arm("thought_temperature_0.5", {"thought_temperature": 0.5}),
    Arm("base_loss_weight_0", {"base_loss_weight": 0.0}),
    Arm("lm_lr_3e-4", {"lr": 3e-4}),
    Arm("mixing_logprob", {"mixing": "logprob", "mixer_bias_init": 3.0}),
    Arm("meta_init_dash", {"start_init": "-", "end_init": "-"}),
    Arm("n_true_1", {"n_true": 1}),
    Arm("thought_length_5", {"thought_length": 5}),
)

# Single-seed runs on tier 1 (run_differences): each departure of the tiny preset from the
# official code switched back to the official side, alone, then all of them together
# (docs/differences.md reports the result). The meta-token init and the decay on the
# meta-tokens are left out: the tiny preset's init texts are one token each, and its weight
# decay is 0, so there those switches change nothing.
OFFICIAL_MIXER = {"mixer_depth": 2, "mixer_bias_init": None, "mixer_sigmoid": False}
DIFFERENCES = (
    Arm("official_scoring_vocab", {"scoring_vocab": "all"}),
    Arm("official_reinforce_mean", {"reinforce_reduction": "mean"}),
    Arm("official_talk_nll_per_offset", {"talk_nll_pooling": "per_offset"}),
    Arm("official_policy_positions", {"policy_positions": "official"}),
    Arm("official_mixer_depth_2", {"mixer_depth": 2}),
    Arm("official_mixing_head", OFFICIAL_MIXER),
    Arm("official_lr_schedule", {"lr_schedule": "linear"}),
    Arm("official_all_of_these", {"scoring_vocab": "all", "reinforce_reduction": "mean",
                                  "talk_nll_pooling": "per_offset", "policy_positions": "official",
                                  "lr_schedule": "linear", **OFFICIAL_MIXER}),
)

# ----------------------------------------------------------------------------- data

def training_lines(arm: Arm, base: Path, data_dir: Path = DATA_DIR) -> list[dict]:
    """The arm's training lines: answer-only lines of ``train.jsonl``; for
    ``answer_only+base_working`` also as many working lines drawn from the base's own
    pretraining corpus (same error rate: the control neither forgets nor learns working)."""
    records = answer_only(read_jsonl(Path(data_dir) / "train.jsonl"))
    if arm.lines == "answer_only":
        return records
    if arm.lines != "answer_only+base_working":
        raise ValueError(f"unknown lines {arm.lines!r}")
    report = json.loads((Path(base) / "pretrain_report.json").read_text())
    corpus = CorpusConfig.from_dict(report["corpus"])
    working = [r for r in make_splits(corpus)["train"] if r["has_working"]][: len(records)]
    mixed = [x for pair in zip(records, working) for x in pair]            # alternate the two kinds
    return mixed


# ----------------------------------------------------------------------------- one arm, one seed

FIGURES = ("answer_nll", "answer_acc", "all_nll", "all_acc")


def run_arm(tier: Tier, arm: Arm, seed: int, out_dir: Path, *, base_model=None, test_records=None,
            progress: bool = True, steps: int | None = None) -> dict:
    """Train one arm for one seed and evaluate it on the held-out lines.

    returns: {"answer_nll", "answer_acc", "all_nll", "all_acc", "thought_correct_start",
    "thought_correct_end" (validation, during training), "thought_correct",
    "thought_correct_greedy" (test, after), "w_answer", "by_difficulty", "evals", "seconds",
    "w_by_position", "metrics" (path)}.
    """
    from qstar_mini.train import train

    cfg = tier.cfg.replace(seed=seed, **arm.changes, **({"steps": steps} if steps else {}))
    run_dir = Path(out_dir) / tier.name / f"{arm.name}-seed{seed}"
    t0 = time.perf_counter()
    result = train(cfg, tier.base, training_lines(arm, tier.base), run_dir, think_where=arm.think_where,
                   lines="all", shuffle_rewards=arm.shuffle_rewards,
                   eval_data=DATA_DIR / "validation.jsonl", eval_every=max(1, cfg.steps // 6),
                   eval_lines=500, progress=progress)
    seconds = time.perf_counter() - t0
    model, tokenizer, meta, head = result["modules"]
    records = test_records or answer_only(read_jsonl(DATA_DIR / "test.jsonl"))[: tier.eval_lines]
    gsm = read_jsonl(DATA_DIR / "gsm8k_format.jsonl") if tier.gsm_limit and arm.name == "quiet_star" else None
    ev = evaluate(model, tokenizer, meta, head, cfg, records, base_model=base_model,
                  think_where=arm.think_where, n_thoughts=4, seed=seed, gsm_records=gsm,
                  gsm_limit=tier.gsm_limit)
    own = ev["quiet_star"] if cfg.think else ev["quiet_star_no_thought"]
    out = {k: own[k] for k in FIGURES}
    out.update(
        thought_correct_start=result["evals"][0].get("thought_correct"),
        thought_correct_end=result["evals"][-1].get("thought_correct"),
        thought_correct_greedy_start=result["evals"][0].get("thought_correct_greedy"),
        thought_correct_greedy_end=result["evals"][-1].get("thought_correct_greedy"),
        seconds=round(seconds, 1), steps=cfg.steps, evals=result["evals"],
        metrics=str(run_dir / "metrics.jsonl"))
    if cfg.think:
        out.update(thought_correct=ev["quiet_star"]["thought_correct"],
                   thought_correct_greedy=ev["quiet_star"]["thought_correct_greedy"],
                   answer_acc_greedy=ev["quiet_star"].get("answer_acc_greedy"),
                   w_answer=ev["quiet_star"]["w_answer"], w_by_position=ev["w_by_position"],
                   no_thought=ev["quiet_star_no_thought"])
    out["by_difficulty"] = ev["by_difficulty"]
    if ev.get("gsm8k"):
        out["gsm8k_accuracy"] = ev["gsm8k"]["accuracy"]
        out["gsm8k_examples"] = ev["gsm8k"]["examples"]
    (run_dir / "eval.json").write_text(json.dumps({"cfg": cfg.to_dict(), "arm": dataclasses.asdict(arm),
                                                   "eval": ev}, indent=2, default=str) + "\n")
    return out


# ----------------------------------------------------------------------------- the base

def evaluate_untrained_base(tier: Tier, seed: int = 0, test_records=None) -> dict:
    """The untrained base on the held-out lines (plain prediction), and its thoughts (meta-tokens
    initialised as in training) at several sampling temperatures."""
    from qstar_mini.models.tiny import load_model
    from qstar_mini.step import prepare_model

    records = test_records or answer_only(read_jsonl(DATA_DIR / "test.jsonl"))[: tier.eval_lines]
    model, tokenizer = load_model(tier.base)
    torch.manual_seed(seed)
    meta, head = prepare_model(model, tokenizer, tier.cfg)
    ev = evaluate(model, tokenizer, meta, head, tier.cfg, records, n_thoughts=1, seed=seed)
    out = {k: ev["quiet_star_no_thought"][k] for k in FIGURES}
    if tier.temperatures:
        temps = best_temperature(model, tokenizer, meta, tier.cfg, records, tier.temperatures, seed=seed)
        out.update(thought_correct_by_temperature=temps["by_temperature"],
                   thought_correct_best_temperature=temps["best"], best_temperature=temps["best_temperature"],
                   thought_correct=temps["by_temperature"].get("1"),
                   thought_correct_greedy=temps["by_temperature"]["greedy"])
    if tier.visible_working and tier.temperatures:
        from qstar_mini.evaluation.thought_quality import visible_working_accuracy

        out["visible_working_by_temperature"] = visible_working_accuracy(
            model, tokenizer, records, tier.temperatures, seed=seed)["by_temperature"]
    return out


# ----------------------------------------------------------------------------- aggregation

def mean_std(values: list) -> dict:
    """{"mean", "std" (sample std; 0 for one seed), "per_seed"} of numbers (None kept out)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"mean": None, "std": None, "per_seed": values}
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return {"mean": round(statistics.fmean(xs), 4), "std": round(std, 4), "per_seed": values}


SCALARS = FIGURES + ("thought_correct_start", "thought_correct_end", "thought_correct_greedy_start",
                     "thought_correct_greedy_end", "thought_correct", "thought_correct_greedy", "w_answer",
                     "seconds", "thought_correct_best_temperature", "gsm8k_accuracy", "answer_acc_greedy")


def aggregate(per_seed: list[dict]) -> dict:
    """Per-seed results of one arm -> {figure: {"mean", "std", "per_seed"}}."""
    out = {k: mean_std([r.get(k) for r in per_seed]) for k in SCALARS if any(k in r for r in per_seed)}
    if any("best_temperature" in r for r in per_seed):
        out["best_temperature"] = [r.get("best_temperature") for r in per_seed]
        out["thought_correct_by_temperature"] = [r.get("thought_correct_by_temperature") for r in per_seed]
    return out


def aggregate_bins(per_seed_bins: list[list[dict]]) -> list[dict]:
    """by_difficulty tables of several seeds -> one table with mean/std per number."""
    rows = []
    for i, first in enumerate(per_seed_bins[0]):
        row = {"bin": first["bin"], "lo": first["lo"], "hi": first["hi"]}
        for key in first:
            if key in row or not isinstance(first[key], (int, float)) and first[key] is not None:
                continue
            row[key] = mean_std([seed[i].get(key) for seed in per_seed_bins])
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- a tier

def _log(*args) -> None:
    print(*args, flush=True)


def run_tier(tier: Tier, seeds, out_dir: Path, *, progress: bool = True, log=_log) -> dict:
    """Every arm of the tier for every seed, the base, and the aggregated results."""
    from qstar_mini.models.tiny import load_model

    records = answer_only(read_jsonl(DATA_DIR / "test.jsonl"))[: tier.eval_lines]
    base_model, _ = load_model(tier.base)
    log(f"[{tier.name}] base {tier.base.name}: evaluating")
    base = evaluate_untrained_base(tier, seeds[0], records)
    results: dict[str, list[dict]] = {arm.name: [] for arm in tier.arms}
    for seed in seeds:
        for arm in tier.arms:
            log(f"[{tier.name}] {arm.name} seed {seed}: training {tier.cfg.steps} steps")
            r = run_arm(tier, arm, seed, out_dir, base_model=base_model, test_records=records, progress=progress)
            log(f"[{tier.name}] {arm.name} seed {seed}: answer NLL {r['answer_nll']:.3f}, acc {r['answer_acc']:.3f}, "
                f"thoughts right {r.get('thought_correct_start')} -> {r.get('thought_correct_end')} "
                f"({r['seconds']:.0f} s)")
            results[arm.name].append(r)
    summary = {"base": aggregate([base]), "base_detail": base, "seeds": list(seeds),
               "config": tier.cfg.to_dict(), "base_model": str(tier.base),
               "arms": {arm.name: dataclasses.asdict(arm) for arm in tier.arms}}
    for arm in tier.arms:
        summary[arm.name] = aggregate(results[arm.name])
    if "quiet_star" in results:
        summary["by_difficulty"] = aggregate_bins([r["by_difficulty"] for r in results["quiet_star"]])
    summary["_runs"] = results                       # per-seed details (evals, w) for the plots
    return summary


# ----------------------------------------------------------------------------- report and plots

def _fmt(v: dict | None) -> str:
    if not isinstance(v, dict) or v.get("mean") is None:
        return "-"
    return f"{v['mean']:.3f} +- {v['std']:.3f}" if v.get("std") else f"{v['mean']:.3f}"


def format_report_table(summary: dict) -> str:
    """A plain-text table of one tier: answer NLL / accuracy and thought correctness per model."""
    names = [n for n in ("base", "baseline", "quiet_star", "no_policy", "shuffled_reward", "no_policy_mixed",
                         "quiet_star_all_positions") if n in summary]
    header = ("model", "answer NLL", "answer acc", "all NLL", "thoughts right: start", "end", "test (greedy)")
    rows = [header]
    for n in names:
        s = summary[n]
        test = "-"
        if s.get("thought_correct", {}).get("mean") is not None:
            test = f"{_fmt(s['thought_correct'])} ({_fmt(s.get('thought_correct_greedy'))})"
        rows.append((n, _fmt(s.get("answer_nll")), _fmt(s.get("answer_acc")), _fmt(s.get("all_nll")),
                     _fmt(s.get("thought_correct_start")), _fmt(s.get("thought_correct_end")), test))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if "base" in summary and summary["base"].get("thought_correct_best_temperature"):
        detail = summary.get("base_detail", {})
        lines.append(f"base thoughts: best {_fmt(summary['base']['thought_correct_best_temperature'])} "
                     f"at temperature {detail.get('best_temperature')} "
                     f"(by temperature: {detail.get('thought_correct_by_temperature')})")
    return "\n".join(lines)


def write_plots(summary: dict, out_dir: Path, prefix: str) -> list[str]:
    """Loss curves, which-tokens-benefit, w over positions, thought correctness, model bars."""
    import matplotlib.pyplot as plt

    from qstar_mini.teaching import plots as viz

    runs = summary["_runs"]
    paths = []

    def keep(fig, name):
        path = Path(out_dir) / f"{prefix}_{name}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(str(path))

    curves = {name: rs[0]["metrics"] for name, rs in runs.items()}
    keep(viz.plot_losses({k: v for k, v in curves.items()}, keys=("base_nll",), smooth=10,
                         title=f"{prefix}: plain LM loss on the training lines (seed {summary['seeds'][0]})"),
         "losses")
    if "quiet_star" in runs:
        keep(viz.plot_losses({"quiet_star": curves["quiet_star"]}, keys=("loss", "base_nll", "talk_nll"),
                             title=f"{prefix}: Quiet-STaR losses"), "quiet_star_losses")
    if "by_difficulty" in summary:
        keep(viz.plot_which_tokens_benefit(summary["by_difficulty"],
                                           title=f"{prefix}: which tokens benefit (binned by base loss)"),
             "which_tokens_benefit")
    if "quiet_star" in runs and runs["quiet_star"][0].get("w_by_position"):
        keep(viz.plot_w_over_positions({"quiet_star": runs["quiet_star"][0]["w_by_position"]},
                                       tokens=list("31415=4") + ["</s>"],
                                       title=f"{prefix}: w at each position (held-out 31415=4 lines)"),
             "w_over_positions")
    thinking = {k: [r["evals"] for r in rs] for k, rs in runs.items()}
    keep(viz.plot_eval_curves(thinking, "answer_nll", ylabel="nats",
                              title=f"{prefix}: answer-token NLL on held-out lines (validation)"), "answer_nll")
    ref = {}
    if summary["base"].get("thought_correct_best_temperature"):
        ref[f"base, best temperature ({summary['base_detail']['best_temperature']})"] = \
            summary["base"]["thought_correct_best_temperature"]["mean"]
    keep(viz.plot_thought_accuracy(thinking, reference=ref, title=f"{prefix}: right working in sampled "
                                   f"thoughts (validation, T=1)"), "thought_correct")
    bars = {n: summary[n] for n in ("base", "baseline", "quiet_star", "no_policy", "shuffled_reward",
                                    "no_policy_mixed") if n in summary}
    keep(viz.plot_model_bars(bars, title=f"{prefix}: held-out answer tokens (mean +- std over seeds)"), "models")
    return paths


def report_from(summaries: dict[str, dict], seeds, seconds: float, command: str) -> dict:
    """report.json: the tier-2 arms at the top level (base, baseline, quiet_star, no_policy,
    shuffled_reward, by_difficulty), every tier in full under "tiers"."""
    main = summaries.get("tier2") or summaries.get("tier1")
    clean = {name: {k: v for k, v in s.items() if k != "_runs"} for name, s in summaries.items()}
    report = {"command": command, "seeds": list(seeds), "seconds": round(seconds, 1),
              "config": main["config"], "measured_on": "held-out answer-only lines of data/test.jsonl "
              "(thought_correct_start/end: validation answer-only lines, one sampled thought each at T=1)"}
    for key in ("base", "baseline", "quiet_star", "no_policy", "shuffled_reward", "no_policy_mixed",
                "by_difficulty"):
        if key in main:
            report[key] = main[key]
    report["tiers"] = clean
    return report


def write_report(report: dict, out_dir: Path) -> Path:
    path = Path(out_dir) / "report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


# ----------------------------------------------------------------------------- the two entry points

def _run(tiers: list[Tier], seeds, out_dir, command: str, progress: bool) -> dict:
    torch.set_num_threads(1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summaries, plots = {}, []
    for tier in tiers:
        summaries[tier.name] = run_tier(tier, seeds, out_dir, progress=progress)
        plots += write_plots(summaries[tier.name], out_dir, tier.name)
        print(f"\n== {tier.name}: {tier.base.name}, {tier.cfg.steps} steps, seeds {list(seeds)} ==")
        print(format_report_table(summaries[tier.name]))
        sys.stdout.flush()
    report = report_from(summaries, seeds, time.perf_counter() - t0, command)
    report["plots"] = plots
    path = write_report(report, out_dir)
    print(f"\nreport: {path} ({report['seconds']:.0f} s)")
    return report


def run_demo_pipeline(out_dir=RUNS_DIR / "demo", seeds=(0,), *, progress: bool = True,
                      tiers: tuple[Tier, ...] | None = None) -> dict:
    """``make demo``: tier 1 (Quiet-STaR vs control vs base) and tier 2 (with the policy-off and
    shuffled-reward controls and the base's best temperature) for one seed; writes
    ``report.json`` and PNG plots to ``out_dir`` and prints the tables."""
    tiers = list(tiers) if tiers is not None else [TIER1, TIER2]
    return _run(tiers, seeds, out_dir, "make demo (qstar_mini.studies.reproduce.run_demo_pipeline)", progress)


def run_reproduction(seeds=(0, 1, 2), out_dir=RUNS_DIR / "reproduce", *, progress: bool = False) -> dict:
    """``make reproduce``: both tiers over three seeds, with every control (its time: docs/commands.md,
    "How long things take")."""
    return _run([TIER1_REPRO, TIER2_REPRO], seeds, out_dir,
                "make reproduce (qstar_mini.studies.reproduce.run_reproduction)", progress)


def run_ablations(out_dir=RUNS_DIR / "ablations", seed: int = 0, arms=ABLATIONS, *, tier: Tier = TIER2,
                  progress: bool = False) -> dict:
    """One seed of each ablation (default :data:`ABLATIONS` on tier 2) next to the tier's
    default; prints one JSON line per arm and writes ``<tier>_ablations.json`` (the measured
    figures: README.md "Results" and docs/reproduction.md)."""
    torch.set_num_threads(1)
    out_dir = Path(out_dir)
    tier = dataclasses.replace(tier, arms=(QUIET_STAR, *arms))
    rows = {}
    for arm in tier.arms:
        r = run_arm(tier, arm, seed, out_dir, progress=progress)
        rows[arm.name] = {k: r.get(k) for k in ("answer_nll", "answer_acc", "thought_correct_start",
                                                 "thought_correct_end", "thought_correct",
                                                 "thought_correct_greedy", "w_answer", "seconds")}
        rows[arm.name]["changes"] = arm.changes
        print(arm.name, json.dumps(rows[arm.name]))
        sys.stdout.flush()
    (out_dir / f"{tier.name}_ablations.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def run_differences(out_dir=RUNS_DIR / "differences", seed: int = 0) -> dict:
    """:data:`DIFFERENCES` on tier 1, one seed, next to the tiny preset (``tier1_ablations.json``)."""
    return run_ablations(out_dir, seed, DIFFERENCES, tier=TIER1)


# ----------------------------------------------------------------------------- the best setting, 3 seeds

LONG_DIR = RUNS_DIR / "tier2_long"
LONG_COMMAND = "qstar-mini reproduce long"
LONG_KEEP = ("answer_nll", "answer_acc", "answer_acc_greedy", "thought_correct", "thought_correct_greedy",
             "thought_correct_start", "thought_correct_end", "w_answer", "seconds", "steps", "evals")


def run_long_part(part: str, seed: int = 0, out_dir=LONG_DIR, *, progress: bool = False) -> dict:
    """One piece of :data:`TIER2_LONG`, so that pieces can run side by side (one CPU thread each):
    ``part`` = an arm's name (trained for ``seed`` and evaluated on the test lines) or ``"base"``
    (the untrained base by temperature, hidden thought and visible working). Writes
    ``out_dir/<part>-seed<seed>.json`` (the base: ``base.json``); :func:`merge_long` reads them."""
    torch.set_num_threads(1)
    out_dir = Path(out_dir)
    arms = {arm.name: arm for arm in TIER2_LONG.arms}
    if part == "base":
        result, path = evaluate_untrained_base(TIER2_LONG, seed), out_dir / "base.json"
    elif part in arms:
        r = run_arm(TIER2_LONG, arms[part], seed, out_dir, progress=progress)
        result, path = {k: r.get(k) for k in LONG_KEEP}, out_dir / f"{part}-seed{seed}.json"
    else:
        raise ConfigError(f"long: unknown part {part!r}; choose 'base' or one of {sorted(arms)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"part": part, "seed": seed, "result": result}, indent=2, default=str) + "\n")
    return result


def merge_long(out_dir=LONG_DIR, seeds=(0, 1, 2)) -> dict:
    """The pieces :func:`run_long_part` wrote -> one report (``out_dir/report.json``): per arm,
    every figure as {"mean", "std", "per_seed"} and the validation curves of each seed; the base
    by temperature. A missing piece is named, never skipped."""
    out_dir = Path(out_dir)
    needed = [out_dir / "base.json"] + [out_dir / f"{arm.name}-seed{s}.json" for arm in TIER2_LONG.arms
                                        for s in seeds]
    missing = [p.name for p in needed if not p.exists()]
    if missing:
        raise DataError(f"long --merge: {len(missing)} piece(s) missing in {out_dir}: {', '.join(missing)}; "
                        f"run each with {LONG_COMMAND} PART --seed N --out {out_dir}")
    read = lambda p: json.loads(p.read_text())["result"]                      # noqa: E731
    report = {"command": f"{LONG_COMMAND} PART --seed N (each arm and seed, and base), "
                         f"then {LONG_COMMAND} --merge", "seeds": list(seeds), "config": TIER2_LONG.cfg.to_dict(),
              "base_model": str(TIER2_LONG.base.name), "base": read(out_dir / "base.json"), "arms": {}}
    for arm in TIER2_LONG.arms:
        per_seed = [read(out_dir / f"{arm.name}-seed{s}.json") for s in seeds]
        entry = aggregate(per_seed)                           # every figure of LONG_KEEP is one of SCALARS
        entry["steps"] = per_seed[0]["steps"]
        entry["curves"] = [[{k: e.get(k) for k in ("step", "thought_correct", "thought_correct_greedy",
                                                    "answer_acc")} for e in r["evals"]] for r in per_seed]
        entry["arm"] = dataclasses.asdict(arm)
        report["arms"][arm.name] = entry
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


LONG_LABELS = {"quiet_star": "**Quiet-STaR** (lr 5e-5, policy loss weight 10, 900 steps)",
               "no_policy": "control: policy loss off",
               "shuffled_reward": "control: rewards shuffled among a line's thoughts",
               "no_policy_mixed": "control: policy off, the base's working lines mixed in (cannot forget)"}


def format_long_table(report: dict) -> str:
    """docs/reproduction.md's table of the long tier-2 runs, from :func:`merge_long`'s report: the base at every sampling
    temperature (hidden thought; visible working, then its answer) and the arms over the seeds
    (mean ± sample std, per seed in brackets). Figures on the test lines."""
    def ms(v):
        if not isinstance(v, dict) or v.get("mean") is None:
            return "-"
        per = ", ".join(f"{x:.3f}" for x in v["per_seed"] if x is not None)
        return f"{v['mean']:.3f} ± {v['std']:.3f} ({per})" if len(v["per_seed"]) > 1 else f"{v['mean']:.3f}"

    base = report["base"]
    hidden, visible = base["thought_correct_by_temperature"], base.get("visible_working_by_temperature", {})
    keys = list(hidden)
    f = lambda x: "-" if x is None else f"{x:.3f}"                               # noqa: E731
    head = " | ".join(("greedy" if k == "greedy" else f"T = {k}") for k in keys)
    lines = [f"| the untrained base, by sampling temperature | {head} |",
             "| --- |" + " --- |" * len(keys),
             "| hidden thought after `=`: all running sums right | "
             + " | ".join(f(hidden[k]) for k in keys) + " |"]
    if visible:
        lines.append("| visible working `q=(`...`)`: all sums right | "
                     + " | ".join(f(visible[k]["working_correct"]) for k in keys) + " |")
        lines.append("| visible working, then its answer: answer right | "
                     + " | ".join(f(visible[k]["answer_acc"]) for k in keys) + " |")
    lines += ["", f"| trained ({len(report['seeds'])} seeds) | right thoughts, T = 1 | right thoughts, greedy "
              "| answer right after sampled thoughts | after the greedy thought |",
              "| --- | --- | --- | --- | --- |"]
    for name, entry in report["arms"].items():
        lines.append(f"| {LONG_LABELS.get(name, name)} | {ms(entry['thought_correct'])} | "
                     f"{ms(entry['thought_correct_greedy'])} | {ms(entry['answer_acc'])} | "
                     f"{ms(entry['answer_acc_greedy'])} |")
    return "\n".join(lines)


def plot_long(report: dict, path) -> str:
    """Right thoughts on the validation lines over training, mean over seeds (band: min-max),
    T = 1 solid, greedy dashed, one colour per arm; the base's greedy figure as a line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, entry) in enumerate(report["arms"].items()):
        colour = f"C{i}"
        steps = [e["step"] for e in entry["curves"][0]]
        for key, style in (("thought_correct", "-o"), ("thought_correct_greedy", "--")):
            runs = [[e[key] for e in curve] for curve in entry["curves"]]
            mean = [statistics.fmean(v) for v in zip(*runs)]
            ax.plot(steps, mean, style, ms=3, color=colour,
                    label=f"{name} ({'T = 1' if key == 'thought_correct' else 'greedy'})")
            ax.fill_between(steps, [min(v) for v in zip(*runs)], [max(v) for v in zip(*runs)],
                            color=colour, alpha=0.12)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"right thoughts (validation, mean of {len(report['seeds'])} seeds)")
    ax.set_ylim(0, 1)
    ax.set_title("tier 2, the search's best setting: the reward's sharpening stops below the base's greedy")
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(path)
