"""Every figure on the course's arithmetic corpus, for one trained model: :func:`evaluate`.

:func:`evaluate` gathers :mod:`~qstar_mini.evaluation.token_gains` (answer and all-token NLL
and accuracy of base, control and Quiet-STaR, gains by difficulty, w by position),
:mod:`~qstar_mini.evaluation.thought_quality` (are the thoughts the working, at which
temperature) and, when asked, :mod:`~qstar_mini.evaluation.gsm8k`. :func:`quick_eval` is the
cheap subset run during training; :func:`format_table` prints the comparison.
"""

from __future__ import annotations

from qstar_mini.errors import DataError
from qstar_mini.evaluation.gsm8k import gsm8k_eval
from qstar_mini.evaluation.thought_quality import best_temperature, thought_correctness
from qstar_mini.evaluation.token_gains import by_difficulty, plain_token_stats, summarize, thought_token_stats, w_by_position


# ----------------------------------------------------------------------------- the evaluation

def quick_eval(model, tokenizer, meta, head, cfg, records, *, seed: int = 0, think_where: str = "all") -> dict:
    """The cheap evaluation run during training, on answer-only held-out lines.

    answer_nll / answer_acc / all_nll: the mixed prediction with one sampled thought per
    position if ``cfg.think`` (thinking where ``think_where`` says), else the plain prediction;
    w_answer: the mean w before the answer; thought_correct (one thought per line, sampled at
    temperature 1, whatever temperature training sampled at) and thought_correct_greedy: right
    working in the thought after ``=``, measured the same way for every model (also the
    control, whose meta-tokens exist but are never trained), with a generator seeded by ``seed``.
    """
    was = model.training
    model.eval()
    try:
        if cfg.think:
            st = thought_token_stats(model, tokenizer, meta, head, cfg, records, n_thoughts=1, seed=seed,
                                     think_where=think_where, temperature=1.0)
            res = summarize(st["nll"], st["correct"], st["is_answer"])
            res["w_answer"] = round(float(st["w"][st["is_answer"]].mean()), 4)
        else:
            st = plain_token_stats(model, tokenizer, records, meta.ids)
            res = summarize(st["nll"], st["correct"], st["is_answer"])
        res["thought_correct"] = thought_correctness(model, tokenizer, meta, cfg, records,
                                                     temperature=1.0, seed=seed)
        res["thought_correct_greedy"] = thought_correctness(model, tokenizer, meta, cfg, records,
                                                            greedy=True, seed=seed)
        return {k: v for k, v in res.items() if k in ("answer_nll", "answer_acc", "all_nll", "w_answer",
                                                      "thought_correct", "thought_correct_greedy")}
    finally:
        model.train(was)


def evaluate(model, tokenizer, meta, head, cfg, records, *, base_model=None, control=None,
             n_thoughts: int = 4, seed: int = 0, think_where: str = "all", thought_temperature: float = 1.0,
             gsm_records=None, gsm_limit: int = 50, temperatures=None) -> dict:
    """The full evaluation of a Quiet-STaR model on held-out ``records``.

    model, tokenizer, meta, head, cfg: the trained Quiet-STaR model (or any prepared model).
    base_model: the model it started from (plain HF model; its tokenizer shares the text ids).
    control:    (model, meta) of the no-thought control, or just its model.
    think_where: "all" (think before every token) or "answer" (only before the answer digit,
    for models trained that way); recorded in the result.
    thought_temperature: the sampling temperature of the "sampled" figures (default 1, the
    paper's; the same for every model, whatever it was trained with).
    temperatures: also measure the base's thought correctness at these temperatures (needs
    ``base_model`` to have been prepared: pass ``(model, meta)``).
    returns (keys always present, values finite or None where a model was not given)::

        {"n_lines", "quiet_star": {all_nll, all_acc, answer_nll, answer_acc, answer_nll_greedy,
          answer_acc_greedy, w_answer, w_all, thought_correct, thought_correct_greedy},
         "quiet_star_no_thought": {all_nll, all_acc, answer_nll, answer_acc},
         "base": {...} | None, "control": {...} | None,
         "by_difficulty": [{bin, n, base_nll, quiet_star_nll, control_nll, gain_vs_base, ...}],
         "w_by_position": [...], "examples": [{question, thoughts, ok}], "gsm8k": {...} | None}
    """
    records = list(records)
    if not records:
        raise DataError("evaluate needs at least one held-out line")
    was = model.training
    model.eval()
    try:
        st = thought_token_stats(model, tokenizer, meta, head, cfg, records, n_thoughts=n_thoughts, seed=seed,
                                 think_where=think_where, temperature=thought_temperature)
        gr = thought_token_stats(model, tokenizer, meta, head, cfg, records, greedy=True, seed=seed,
                                 think_where=think_where)
        q = summarize(st["nll"], st["correct"], st["is_answer"])
        g = summarize(gr["nll"], gr["correct"], gr["is_answer"])
        q.update(answer_nll_greedy=g["answer_nll"], answer_acc_greedy=g["answer_acc"],
                 all_nll_greedy=g["all_nll"],
                 w_answer=round(float(st["w"][st["is_answer"]].mean()), 4) if st["is_answer"].any() else None,
                 w_all=round(float(st["w"].nanmean()), 4))
        ok = [x for row in st["answer_thought_ok"] for x in row]
        q["thought_correct"] = round(sum(ok) / len(ok), 4) if ok else None
        okg = [x for row in gr["answer_thought_ok"] for x in row]
        q["thought_correct_greedy"] = round(sum(okg) / len(okg), 4) if okg else None
        result = {"n_lines": len(records), "think_where": think_where, "quiet_star": q,
                  "quiet_star_no_thought": summarize(st["nll_no_thought"], st["correct_no_thought"], st["is_answer"])}
        others = {"quiet_star": st["nll"]}
        base_stats = None
        if base_model is not None:
            bm, bmeta = base_model if isinstance(base_model, tuple) else (base_model, None)
            base_stats = plain_token_stats(bm, tokenizer, records, meta.ids)
            result["base"] = summarize(base_stats["nll"], base_stats["correct"], base_stats["is_answer"])
            if bmeta is not None and temperatures:
                result["base"]["thoughts"] = best_temperature(bm, tokenizer, bmeta, cfg, records, temperatures, seed=seed)
        else:
            result["base"] = None
        if control is not None:
            cm = control[0] if isinstance(control, tuple) else control
            cs = plain_token_stats(cm, tokenizer, records, meta.ids)
            result["control"] = summarize(cs["nll"], cs["correct"], cs["is_answer"])
            others["control"] = cs["nll"]
        else:
            result["control"] = None
        reference = base_stats["nll"] if base_stats is not None else st["nll_no_thought"]
        result["by_difficulty"] = by_difficulty(reference, others)
        result["by_difficulty_reference"] = "base" if base_stats is not None else "quiet_star_no_thought"
        result["w_by_position"] = w_by_position(st)
        result["examples"] = [{"question": r.get("question"), "text": r["text"], "thoughts": t, "ok": o}
                              for r, t, o in list(zip(records, st["answer_thoughts"], st["answer_thought_ok"]))[:5]]
        result["gsm8k"] = (None if gsm_records is None else
                           gsm8k_eval(model, tokenizer, gsm_records, meta=meta, head=head, cfg=cfg, limit=gsm_limit))
        return result
    finally:
        model.train(was)


# ----------------------------------------------------------------------------- printing

def format_table(result: dict) -> str:
    """A plain-text table of the evaluation's main figures."""
    rows = [("model", "answer NLL", "answer acc", "all NLL", "all acc")]
    for name in ("base", "control", "quiet_star_no_thought", "quiet_star"):
        r = result.get(name)
        if r:
            rows.append((name, *(("-" if r.get(k) is None else f"{r[k]:.3f}")
                                  for k in ("answer_nll", "answer_acc", "all_nll", "all_acc"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    q = result["quiet_star"]
    lines.append(f"thoughts at the answer: {q.get('thought_correct')} right (sampled), "
                 f"{q.get('thought_correct_greedy')} (greedy); w at the answer {q.get('w_answer')}")
    lines.append("which tokens benefit (binned by the base loss):")
    for b in result["by_difficulty"]:
        if b["n"]:
            lines.append(f"  {b['bin']:>11}  n={b['n']:5d}  base {b['base_nll']:.3f}  "
                         f"quiet-star {b.get('quiet_star_nll', float('nan')):.3f}  gain {b.get('gain_vs_base', 0):+.3f}")
    if result.get("gsm8k"):
        lines.append(f"GSM8K-format zero-shot: {result['gsm8k']['accuracy']:.3f} on {result['gsm8k']['n']}")
    if result.get("commonsense_qa"):
        lines.append(f"CommonsenseQA-format zero-shot: {result['commonsense_qa']['accuracy']:.3f} "
                     f"on {result['commonsense_qa']['n']}")
    return "\n".join(lines)


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)
