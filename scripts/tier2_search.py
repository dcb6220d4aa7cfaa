"""The tier-2 hyperparameter search: one setting of tier 2, one seed, trained and appended as a row.

A research tool kept outside the package (docs/research-log.md says what it was used for and
when; docs/results/tier2_search.md holds the rows and what they showed). It imports qstar_mini
and trains with its ``studies.reproduce`` machinery:

    python scripts/tier2_search.py NAME [field=value ...] [--seed N] [--steps N]
                                   [--think-where answer|all] [--shuffle-rewards] [--lines L]

trains ``TIER2_REPRO`` (``qstar_mini.studies.reproduce``) with the QuietStarConfig fields
``field=value`` changed (values are Python literals: ``lr=5e-5``, ``clamp_negative_rewards=False``;
anything else is a string: ``mixing=hidden``), evaluates it on the 500 held-out test lines,
appends one JSON line to ``runs/tier2_search/rows.jsonl`` and prints it (without the curve).
Defaults: seed 0, 300 steps, thinking at the answer, real rewards, answer-only lines.

:func:`reward_audit` splits one training step's clamped reward by the kind of thought (all
running sums right; the last right with an earlier one wrong; the last wrong), from Python:

    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("tier2_search", "scripts/tier2_search.py")
    search = importlib.util.module_from_spec(spec); spec.loader.exec_module(search)
    search.reward_audit(model, tokenizer, meta, head, cfg, records)
"""

from __future__ import annotations

import ast
import dataclasses
import json
import sys
from pathlib import Path

import torch

from qstar_mini.config import QuietStarConfig
from qstar_mini.evaluation.token_gains import answer_only
from qstar_mini.paths import RUNS_DIR
from qstar_mini.studies.reproduce import TIER2_REPRO, Arm, Tier, run_arm

SEARCH_DIR = RUNS_DIR / "tier2_search"
SEARCH_FIGURES = ("thought_correct", "thought_correct_greedy", "answer_acc", "answer_acc_greedy", "answer_nll",
                  "w_answer", "seconds")
COMMAND = "python scripts/tier2_search.py"
USAGE = (f"usage: {COMMAND} NAME [field=value ...] [--seed N] [--steps N] [--think-where answer|all] "
         "[--shuffle-rewards] [--lines L]")


def search_row(name: str, changes: dict | None = None, seed: int = 0, steps: int = 300, *,
               think_where: str = "answer", shuffle_rewards: bool = False, lines: str = "answer_only",
               tier: Tier = TIER2_REPRO, out_dir=SEARCH_DIR, progress: bool = False) -> dict:
    """One setting of tier 2 (``tier.cfg`` with ``changes``), one seed: trained, evaluated on the
    test lines, and appended as one JSON line to ``out_dir/rows.jsonl``.
    ``shuffle_rewards``: the shuffled-reward control of that setting; ``lines``: the training
    lines (``qstar_mini.studies.reproduce.training_lines``; ``"answer_only+base_working"`` for
    the cannot-forget control).

    returns: {"name", "changes", "seed", "steps", "think_where", "thought_correct" (test, T = 1,
    4 thoughts a line), "thought_correct_greedy", "answer_acc" (after sampled thoughts),
    "answer_acc_greedy" (after the greedy thought), "answer_nll", "w_answer", "seconds",
    "curve": [{"step", "thought_correct", "thought_correct_greedy", "answer_acc"}] (validation,
    during training), "command" (the command line that reruns the row)}.
    """
    changes = dict(changes or {})
    arm = Arm(name, changes, think_where=think_where, lines=lines, shuffle_rewards=shuffle_rewards)
    r = run_arm(tier, arm, seed, out_dir, progress=progress, steps=steps)
    ev = json.loads((Path(out_dir) / tier.name / f"{name}-seed{seed}" / "eval.json").read_text())["eval"]
    row = {"name": name, "changes": changes, "seed": seed, "steps": r["steps"], "think_where": think_where,
           "shuffle_rewards": shuffle_rewards, "lines": lines, "n_thoughts": tier.cfg.replace(**changes).n_thoughts}
    row.update({k: r.get(k) for k in SEARCH_FIGURES if k in r})
    row["answer_acc_greedy"] = ev["quiet_star"].get("answer_acc_greedy")
    row["curve"] = [{k: e.get(k) for k in ("step", "thought_correct", "thought_correct_greedy", "answer_acc")}
                    for e in r["evals"]]
    args = " ".join(f"{k}={v!r}".replace(" ", "") for k, v in changes.items())
    row["command"] = (f"{COMMAND} {name} {args} --seed {seed} --steps {steps}"
                      + (f" --think-where {think_where}" if think_where != "answer" else "")
                      + (" --shuffle-rewards" if shuffle_rewards else "")
                      + (f" --lines {lines}" if lines != "answer_only" else "")).replace("  ", " ")
    out = Path(out_dir) / "rows.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


@torch.no_grad()
def reward_audit(model, tokenizer, meta, head, cfg: QuietStarConfig, records: list[dict], *, seed: int = 0,
                 batch_size: int = 64) -> dict:
    """Where REINFORCE's reward goes: one training step's rewards (Algorithm 1, line 2i; thinking
    at the answer, ``cfg.n_thoughts`` thoughts a line, no update) on answer-only ``records``,
    each thought judged by :func:`qstar_mini.evaluation.thought_quality.running_sum_agreement`.

    The clamped reward max(r_j, 0) is what line 2j multiplies log p(T_j) by (with
    ``cfg.clamp_negative_rewards``): its mass split by the kind of thought shows whether the
    reward pays for right working or for thoughts that only end on the answer, or for neither.
    returns: {"thoughts": {"all_right", "last_right_not_all", "last_wrong"} (fractions of the
    thoughts), "positive_reward_share": the same three kinds' shares of the clamped reward mass,
    "positive_reward_rate": per kind, the fraction of its thoughts with r_j > 0,
    "groups_all_wrong_paid": the fraction of the clamped reward mass paid in groups (one line's
    n_thoughts) where no thought is right, "n_thoughts", "n_lines"}.
    """
    from qstar_mini.evaluation.thought_quality import running_sum_agreement
    from qstar_mini.inference import decode_thought
    from qstar_mini.records import encode_records
    from qstar_mini.step import quiet_star_step

    records = [r for r in answer_only(records) if r.get("question")]
    if not records:
        raise ValueError("reward_audit needs answer-only lines with a 'question' (31415=4)")
    enc = encode_records(tokenizer, records, cfg.seq_len)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    kinds, paid, positive, group_right = [], [], [], []
    was = model.training
    model.eval()
    try:
        for start in range(0, len(records), batch_size):
            sl = slice(start, min(len(records), start + batch_size))
            seq = int(enc.attention_mask[sl].sum(1).max())
            ids, mask = enc.input_ids[sl, :seq].to(device), enc.attention_mask[sl, :seq].to(device)
            out = quiet_star_step(model, meta, head, ids, mask, cfg, generator=generator,
                                  positions=enc.think_pos[sl, None].to(device))
            r = out.rewards[:, :, 0]                                           # (b, n): one position a line
            for i, q in enumerate(enc.questions[sl]):
                judged = [running_sum_agreement(q, decode_thought(tokenizer, out.thoughts[i, k, 0]))
                          for k in range(r.shape[1])]
                kinds += ["all_right" if j["all"] else "last_right_not_all" if j["last"] else "last_wrong"
                          for j in judged]
                paid += r[i].clamp(min=0).tolist()
                positive += (r[i] > 0).tolist()
                group_right += [any(j["all"] for j in judged)] * len(judged)
    finally:
        model.train(was)
    total = sum(paid) or 1.0
    names = ("all_right", "last_right_not_all", "last_wrong")
    count = {k: sum(1 for x in kinds if x == k) for k in names}
    return {"thoughts": {k: round(count[k] / len(kinds), 4) for k in names},
            "positive_reward_share": {k: round(sum(p for p, x in zip(paid, kinds) if x == k) / total, 4)
                                      for k in names},
            "positive_reward_rate": {k: (round(sum(p for p, x in zip(positive, kinds) if x == k) / count[k], 4)
                                         if count[k] else None) for k in names},
            "groups_all_wrong_paid": round(sum(p for p, g in zip(paid, group_right) if not g) / total, 4),
            "n_thoughts": cfg.n_thoughts, "n_lines": len(records)}


def parse_search_args(argv: list[str]) -> dict:
    """``NAME [field=value ...] [--seed N] [--steps N] [--think-where answer|all] [--shuffle-rewards]
    [--lines L]`` -> the keyword arguments of :func:`search_row`; values are Python literals
    (``lr=2e-4``, ``clamp_negative_rewards=False``), anything else a string (``mixing=hidden``)."""
    if not argv or argv[0].startswith("-"):
        raise SystemExit(USAGE)
    kwargs, changes, rest = {"name": argv[0]}, {}, list(argv[1:])
    while rest:
        item = rest.pop(0)
        if item == "--shuffle-rewards":
            kwargs["shuffle_rewards"] = True
        elif item in ("--seed", "--steps", "--think-where", "--lines"):
            if not rest:
                raise SystemExit(f"{item} needs a value")
            value = rest.pop(0)
            key = item[2:].replace("-", "_")
            kwargs[key] = value if key in ("think_where", "lines") else int(value)
        elif "=" in item:
            key, value = item.split("=", 1)
            try:
                changes[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                changes[key] = value                                       # a plain string, e.g. mixing=hidden
        else:
            raise SystemExit(f"search: cannot read {item!r}; give config changes as field=value")
    tier_fields = {f.name for f in dataclasses.fields(QuietStarConfig)}
    unknown = sorted(set(changes) - tier_fields)
    if unknown:
        raise SystemExit(f"search: unknown config field(s) {unknown}; see qstar_mini.config.QuietStarConfig")
    kwargs["changes"] = changes
    return kwargs


def main(argv: list[str]) -> int:
    """Train one row (one thread, as every row of the search was) and print it without its curve."""
    kwargs = parse_search_args(argv)
    torch.set_num_threads(1)
    row = search_row(**kwargs)
    print(json.dumps({k: v for k, v in row.items() if k != "curve"}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
