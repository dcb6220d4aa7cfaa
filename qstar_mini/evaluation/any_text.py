"""Any text: what ``qstar-mini eval --data`` does with a JSONL file, a folder or a ``datasets`` name.

The data is a JSONL file with a text field (``--text-field``), a folder with ``<split>.jsonl`` or
a ``datasets`` name (streamed: only the first ``--lines`` records are read).
:func:`detect_data_kind` says what it is: the project's arithmetic corpus (every record has its
fields ``question``, ``has_working`` and a ``question=[(working)]answer`` text) gets
:func:`qstar_mini.evaluation.arithmetic.evaluate` and every figure there; any other text gets
:func:`evaluate_text`: per-token NLL with thinking (log p^talk at offset 0, a thought after every
token) and without (the base model's, and the trained LM's own), the gain per token, which
tokens benefit (binned by the base loss) and, when the records are GSM8K-format
``question``/``answer`` problems, the zero-shot accuracy with thinking. The arithmetic-task
figures (answer accuracy at the ``=``, thoughts right) are then omitted with a one-line note.
:func:`evaluate_plain` does the same for a plain model (no checkpoint, no thought).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from qstar_mini.data import QA_TEXT_FIELD, TEXT_FIELD_HINT, gsm_final_answer, qa_text, read_jsonl
from qstar_mini.errors import DataError
from qstar_mini.evaluation.arithmetic import _fmt
from qstar_mini.evaluation.gsm8k import gsm8k_eval
from qstar_mini.evaluation.token_gains import by_difficulty, plain_token_stats, summarize, thought_token_stats
from qstar_mini.records import encode_records, load_hf_dataset


# ----------------------------------------------------------------------------- any text: the data

ARITHMETIC, GSM8K_FORMAT, TEXT = "arithmetic", "gsm8k_format", "text"
ARITHMETIC_RULE = ("every record has the corpus's fields question (the digits of a known task), has_working and "
                   "text = question=[(working)]answer, as `qstar-mini data` writes them")
ARITHMETIC_METRICS = "arithmetic-task metrics (answer accuracy at the '=', thoughts right)"


def is_datasets_name(data) -> bool:
    """True when ``data`` names a ``datasets`` corpus (``name``, ``owner/name``,
    ``owner/name:config``) rather than a local JSONL file or folder: the rule of
    :func:`qstar_mini.records.load_records` (an existing path, a ``.jsonl``/``.json`` suffix, a
    leading ``/ . ~`` or more than one ``/`` is local)."""
    if isinstance(data, os.PathLike):
        return False
    text = str(data)
    path = Path(text).expanduser()
    return not (path.exists() or path.suffix in (".jsonl", ".json") or text.startswith(("/", ".", "~"))
                or text.count("/") > 1)


def is_gsm_record(record: dict) -> bool:
    """A GSM8K-format problem: string question and answer, the answer ending ``#### N``."""
    if not (isinstance(record.get("question"), str) and isinstance(record.get("answer"), str)):
        return False
    try:
        gsm_final_answer(record["answer"])
    except DataError:
        return False
    return True


def _is_arithmetic_record(record: dict) -> bool:
    """A line of the project's arithmetic corpus (see :data:`ARITHMETIC_RULE`)."""
    from qstar_mini.data import format_line, task_for_question

    q, text, shown = record.get("question"), record.get("text"), record.get("has_working")
    if not (isinstance(q, str) and q.isascii() and q.isdigit() and isinstance(text, str)
            and isinstance(shown, bool) and isinstance(record.get("answer"), str)):
        return False
    try:
        task_for_question(q)
    except DataError:
        return False
    working = record.get("working") if shown else None
    return (working is None or isinstance(working, str)) and text == format_line(q, working, record["answer"])


def detect_data_kind(records: list[dict]) -> tuple[str, str]:
    """Which evaluation applies to ``records``, and why, in words.

    returns: ("arithmetic", why) when every record is a line of the project's arithmetic corpus
    (:data:`ARITHMETIC_RULE`: answer accuracy at the ``=`` and "thoughts right" mean something
    only there); ("gsm8k_format", why) when every record is a GSM8K-format problem
    (question, answer ending ``#### N``); else ("text", why).
    """
    n = len(records)
    arithmetic = sum(_is_arithmetic_record(r) for r in records)
    if n and arithmetic == n:
        return ARITHMETIC, f"the project's arithmetic corpus: {ARITHMETIC_RULE}"
    if n and all(is_gsm_record(r) for r in records):
        return GSM8K_FORMAT, "GSM8K-format problems: every record has question and an answer ending '#### N'"
    if arithmetic:
        return TEXT, f"general text: only {arithmetic} of {n} records are lines of the arithmetic corpus"
    return TEXT, ("general text: not the project's arithmetic corpus "
                  "(its records lack question/has_working/text 'DIGITS=ANSWER')")


def load_eval_records(data, *, split: str = "test", text_field: str = "text",
                      max_lines: int | None = None) -> tuple[list[dict], str]:
    """Held-out records for ``qstar-mini eval``, each with a non-empty string ``"text"``, and a
    description of where they came from.

    data: a JSONL file; a folder holding ``<split>.jsonl``; or a ``datasets`` name[:config],
    of which only the first ``max_lines`` records are streamed (required then; nothing else is
    downloaded). ``text_field`` names the text (copied to ``"text"``); a record without it but
    with a GSM8K-format question/answer gets text = ``question + "\\nA: " + answer`` (the prompt
    of :func:`gsm8k_prompt` followed by the worked answer, :func:`~qstar_mini.data.qa_text`), as
    does every record with ``text_field="question+answer"`` (what ``--text-field question+answer``
    trains on). Any other record is a one-line
    DataError; records with an empty text are dropped. Other fields are kept.
    """
    if is_datasets_name(data):
        rows = load_hf_dataset(str(data), split, text_field, max_lines, all_fields=True)
        source = f"datasets {str(data)!r}, split {split!r}, first {max_lines} records (streamed)"
        where = f"dataset {str(data)!r} record"
    else:
        path = Path(os.fspath(data)).expanduser()
        if path.is_dir():
            path = path / f"{split}.jsonl"
        rows = read_jsonl(path, required=(), max_records=max_lines or None)
        source, where = str(path), f"{path} record"
    records = []
    for i, r in enumerate(rows, start=1):
        text = r.get(text_field)
        if text_field == QA_TEXT_FIELD:
            if not (isinstance(r.get("question"), str) and isinstance(r.get("answer"), str)):
                raise DataError(f"{where} {i} has no string 'question' and 'answer' fields (--text-field "
                                f"{QA_TEXT_FIELD}; its fields: {', '.join(sorted(map(str, r)))}); name the "
                                f"field holding the text with --text-field FIELD")
            record = dict(r, text=qa_text(r))
        elif isinstance(text, str):
            record = r if text_field == "text" else dict(r, text=text)
        elif is_gsm_record(r):
            record = dict(r, text=qa_text(r))
        else:
            raise DataError(f"{where} {i} has no string {text_field!r} field and is no GSM8K-format "
                            f"question/answer (its fields: {', '.join(sorted(map(str, r)))}){TEXT_FIELD_HINT}")
        if record["text"].strip():
            records.append(record)
    if not records:
        raise DataError(f"{source}: no record with a non-empty {text_field!r} text")
    return records, source


# ----------------------------------------------------------------------------- any text: the evaluation

def _text_summary(nll: torch.Tensor, correct: torch.Tensor) -> dict:
    """nll: mean -log p per token (nats); ppl = exp(nll); acc: top-1 accuracy; n_tokens."""
    if nll.numel() == 0:
        return {"nll": None, "ppl": None, "acc": None, "n_tokens": 0}
    mean = float(nll.float().mean())
    return {"nll": round(mean, 4), "ppl": round(math.exp(min(mean, 700.0)), 4),
            "acc": round(float(correct.float().mean()), 4), "n_tokens": int(nll.numel())}


def _token_gains(tokenizer, targets: torch.Tensor, gain: torch.Tensor, top: int = 8, min_count: int = 3) -> dict:
    """The token types whose summed gain (reference NLL - Quiet-STaR NLL) is largest and smallest.

    targets: (N,) token ids, gain: (N,) per token, in the same order.
    returns: {"most": [{token, n, gain_sum, gain_mean}], "least": [...]}.
    """
    rows = []
    for token in torch.unique(targets).tolist():
        inside = targets == token
        n = int(inside.sum())
        if n >= min_count:
            g = gain[inside]
            rows.append({"token": tokenizer.decode([token]), "n": n, "gain_sum": round(float(g.sum()), 4),
                         "gain_mean": round(float(g.mean()), 4)})
    rows.sort(key=lambda r: r["gain_sum"], reverse=True)
    return {"most": rows[:top], "least": rows[::-1][:top]}


@torch.no_grad()
def evaluate_text(model, tokenizer, meta, head, cfg, records, *, base_model=None, control=None,
                  n_thoughts: int = 4, seed: int = 0, thought_temperature: float = 1.0, seq_len: int = 512,
                  batch_size: int = 8, gsm_records=None, gsm_limit: int = 50) -> dict:
    """Does thinking help on *any* text? Per-token NLL with and without thinking.

    Every line is ``<s> text </s>`` (whichever of the two the tokenizer has), cut at ``seq_len``
    tokens; for every next token x_{j+1} (N tokens over all lines):

    * ``quiet_star``: -log p^talk(x_{j+1}), the mixed prediction at offset 0 after the thought T_j
      made right after x_j (Algorithm 1, line 2g, as in training; a thought after every token),
      averaged over ``n_thoughts`` thoughts sampled at ``thought_temperature``;
      ``quiet_star_greedy``: the same with the greedy thought;
    * ``quiet_star_no_thought``: the trained LM's own prediction (line 2a);
    * ``base``: the model Quiet-STaR started from (``base_model``), ``control`` likewise;

    all over the text vocabulary (the meta-tokens get probability 0). ``gain_per_token`` is the
    mean over tokens of (reference NLL - Quiet-STaR NLL), positive when thinking helped;
    ``by_difficulty`` bins the tokens by the base model's loss (the trained LM's own no-thought
    loss when no base is given) like :func:`by_difficulty`; ``token_gains`` names the token types
    the gain comes from. ``gsm8k`` (thinking) and ``gsm8k_base`` (no thinking): zero-shot
    accuracy on ``gsm_records`` (:func:`gsm8k_eval`).
    returns: {"n_lines", "seq_len", "n_thoughts", "quiet_star": {nll, ppl, acc, n_tokens, w_mean},
    "quiet_star_greedy", "quiet_star_no_thought", "base" | None, "control" | None,
    "gain_per_token": {...}, "by_difficulty": [...], "by_difficulty_reference", "token_gains",
    "gsm8k" | None, "gsm8k_base" | None}.
    """
    records = list(records)
    if not records:
        raise DataError("evaluate_text needs at least one line of text")
    was = model.training
    model.eval()
    try:
        kw = dict(seed=seed, batch_size=batch_size, seq_len=seq_len)
        st = thought_token_stats(model, tokenizer, meta, head, cfg, records, n_thoughts=n_thoughts,
                                 temperature=thought_temperature, **kw)
        gr = thought_token_stats(model, tokenizer, meta, head, cfg, records, greedy=True, **kw)
        q = _text_summary(st["nll"], st["correct"])
        q["w_mean"] = round(float(st["w"].nanmean()), 4)
        result = {"n_lines": len(records), "seq_len": seq_len, "n_thoughts": n_thoughts,
                  "thought_temperature": thought_temperature, "quiet_star": q,
                  "quiet_star_greedy": _text_summary(gr["nll"], gr["correct"]),
                  "quiet_star_no_thought": _text_summary(st["nll_no_thought"], st["correct_no_thought"])}
        others = {"quiet_star": st["nll"], "quiet_star_greedy": gr["nll"],
                  "quiet_star_no_thought": st["nll_no_thought"]}
        base = None
        if base_model is not None:
            bm = base_model[0] if isinstance(base_model, tuple) else base_model
            bs = plain_token_stats(bm, tokenizer, records, meta.ids, batch_size=batch_size, seq_len=seq_len)
            base = bs["nll"]
            result["base"] = _text_summary(bs["nll"], bs["correct"])
        else:
            result["base"] = None
        if control is not None:
            cm = control[0] if isinstance(control, tuple) else control
            cs = plain_token_stats(cm, tokenizer, records, meta.ids, batch_size=batch_size, seq_len=seq_len)
            result["control"] = _text_summary(cs["nll"], cs["correct"])
            others["control"] = cs["nll"]
        else:
            result["control"] = None
        reference = base if base is not None else st["nll_no_thought"]
        gain = {"vs_no_thought": round(float((st["nll_no_thought"] - st["nll"]).mean()), 4),
                "greedy_vs_no_thought": round(float((st["nll_no_thought"] - gr["nll"]).mean()), 4)}
        if base is not None:
            gain.update(vs_base=round(float((base - st["nll"]).mean()), 4),
                        greedy_vs_base=round(float((base - gr["nll"]).mean()), 4))
        if control is not None:
            gain["vs_control"] = round(float((others["control"] - st["nll"]).mean()), 4)
        result["gain_per_token"] = gain
        if base is None:
            others.pop("quiet_star_no_thought")          # it is the reference itself
        result["by_difficulty"] = by_difficulty(reference, others)
        result["by_difficulty_reference"] = "base" if base is not None else "quiet_star_no_thought"
        enc = encode_records(tokenizer, records, seq_len)
        targets = enc.input_ids[:, 1:][enc.attention_mask[:, 1:].bool()]       # (N,) in the stats' order
        result["token_gains"] = _token_gains(tokenizer, targets, reference - st["nll"])
        result["gsm8k"] = result["gsm8k_base"] = None
        if gsm_records:
            result["gsm8k"] = gsm8k_eval(model, tokenizer, gsm_records, meta=meta, head=head, cfg=cfg, limit=gsm_limit)
            if base_model is not None:
                result["gsm8k_base"] = gsm8k_eval(bm, tokenizer, gsm_records, limit=gsm_limit)
        return result
    finally:
        model.train(was)


# ----------------------------------------------------------------------------- a plain model

PLAIN_OMITTED = ("Quiet-STaR rows (with a sampled or greedy thought, its own no-thought prediction), gain per "
                 "token, which tokens benefit, w and thoughts right: omitted, a plain model has no thoughts "
                 "(evaluate a Quiet-STaR checkpoint for them)")


@torch.no_grad()
def evaluate_plain(model, tokenizer, records, *, kind: str = TEXT, seq_len: int = 512, batch_size: int = 8,
                   gsm_records=None, gsm_limit: int = 50) -> dict:
    """A plain model (no Quiet-STaR checkpoint, no thoughts) on held-out records: the base rows only.

    Every line is ``<s> text </s>`` cut at ``seq_len`` tokens; :func:`plain_token_stats` scores
    every next token. ``model``: {nll, ppl, acc, n_tokens} over all of them; on the arithmetic
    corpus (``kind`` "arithmetic") also ``answer_nll``/``answer_acc``/``n_answers`` at the digit
    after ``=``; ``gsm8k``: zero-shot accuracy without thinking on ``gsm_records``
    (:func:`gsm8k_eval`), None without them. The Quiet-STaR figures do not apply (:data:`PLAIN_OMITTED`).
    returns: {"n_lines", "seq_len", "model": {...}, "gsm8k" | None}.
    """
    records = list(records)
    if not records:
        raise DataError("evaluate_plain needs at least one line of text")
    was = model.training
    model.eval()
    try:
        st = plain_token_stats(model, tokenizer, records, batch_size=batch_size, seq_len=seq_len)
        row = _text_summary(st["nll"], st["correct"])
        if kind == ARITHMETIC:
            s = summarize(st["nll"], st["correct"], st["is_answer"])
            row.update(answer_nll=s["answer_nll"], answer_acc=s["answer_acc"], n_answers=s["n_answers"])
        gsm = gsm8k_eval(model, tokenizer, gsm_records, limit=gsm_limit) if gsm_records else None
        return {"n_lines": len(records), "seq_len": seq_len, "model": row, "gsm8k": gsm}
    finally:
        model.train(was)


def format_plain_table(result: dict) -> str:
    """A plain-text table of :func:`evaluate_plain`'s figures, the notes on what applies included."""
    r = result["model"]
    head, values = ["model", "NLL/token", "ppl", "acc"], ["plain (no thought)", _fmt(r["nll"], ".4f"),
                                                         _fmt(r["ppl"], ".4g"), _fmt(r["acc"])]
    if "answer_nll" in r:
        head += ["answer NLL", "answer acc"]
        values += [_fmt(r["answer_nll"]), _fmt(r["answer_acc"])]
    widths = [max(len(a), len(b)) for a, b in zip(head, values)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in (head, ["-" * w for w in widths], values)]
    lines.append(f"{r['n_tokens']} tokens in {result['n_lines']} lines (each cut at {result['seq_len']} tokens)")
    if result.get("gsm8k"):
        lines.append(f"GSM8K-format zero-shot, no thinking: {result['gsm8k']['accuracy']:.3f} on {result['gsm8k']['n']}")
    if result.get("commonsense_qa"):
        lines.append(f"CommonsenseQA-format zero-shot: {result['commonsense_qa']['accuracy']:.3f} "
                     f"on {result['commonsense_qa']['n']}")
    lines.extend(result.get("notes", []))
    return "\n".join(lines)


def format_text_table(result: dict) -> str:
    """A plain-text table of :func:`evaluate_text`'s figures, the notes on what applies included."""
    rows = [("model", "NLL/token", "ppl", "acc")]
    names = {"base": "base", "control": "control", "quiet_star_no_thought": "quiet_star_no_thought",
             "quiet_star": f"quiet_star ({result['n_thoughts']} sampled thought{'s' * (result['n_thoughts'] != 1)})",
             "quiet_star_greedy": "quiet_star (greedy thought)"}
    for key, label in names.items():
        r = result.get(key)
        if r:
            rows.append((label, _fmt(r["nll"], ".4f"), _fmt(r["ppl"], ".4g"), _fmt(r["acc"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    g = result["gain_per_token"]
    ref = result["by_difficulty_reference"]
    lines.append(f"{result['quiet_star']['n_tokens']} tokens in {result['n_lines']} lines (each cut at "
                 f"{result['seq_len']} tokens); mean w {result['quiet_star']['w_mean']}")
    if "vs_base" in g:
        lines.append(f"gain per token (base NLL - Quiet-STaR NLL): {g['vs_base']:+.4f} nats sampled, "
                     f"{g['greedy_vs_base']:+.4f} greedy; vs its own no-thought prediction {g['vs_no_thought']:+.4f}")
    else:
        lines.append(f"gain per token (no-thought NLL - Quiet-STaR NLL, no base model given): "
                     f"{g['vs_no_thought']:+.4f} nats sampled, {g['greedy_vs_no_thought']:+.4f} greedy")
    lines.append(f"which tokens benefit (binned by the {ref} loss per token):")
    for b in result["by_difficulty"]:
        if b["n"]:
            lines.append(f"  {b['bin']:>11}  n={b['n']:6d}  {ref} {b['base_nll']:.3f}  quiet-star "
                         f"{b['quiet_star_nll']:.3f}  gain {b.get('gain_vs_base', 0):+.3f}")
    most = result["token_gains"]["most"][:5]
    if most:
        lines.append("largest summed gain on the tokens: "
                     + ", ".join(f"{t['token']!r} (n={t['n']}, {t['gain_sum']:+.2f})" for t in most))
    for note in result.get("notes", []):
        lines.append(note)
    if result.get("gsm8k"):
        base = result.get("gsm8k_base")
        lines.append(f"GSM8K-format zero-shot with thinking: {result['gsm8k']['accuracy']:.3f} on "
                     f"{result['gsm8k']['n']}" + (f" (base, no thinking: {base['accuracy']:.3f})" if base else ""))
    if result.get("commonsense_qa"):
        lines.append(f"CommonsenseQA-format zero-shot: {result['commonsense_qa']['accuracy']:.3f} "
                     f"on {result['commonsense_qa']['n']}")
    return "\n".join(lines)
