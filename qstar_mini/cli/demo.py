"""``make demo``: the tiny base model answering held-out lines, with and without visible working.

What it shows is the gap Quiet-STaR sets out to fill. Each held-out question is completed twice
by greedy decoding:

* **answer at once** (prompt ``31415=``): the model must write the answer digit immediately,
  i.e. add five digits mod 10 in a single forward pass. A tiny model cannot: about chance (10%).
* **working forced** (prompt ``31415=(``): the model first writes the running sums ``34894)``
  and then the answer, which is now a copy of the last running sum: close to 100%.

Why the first mode forbids ``(``: half the training lines show their working, so after ``=`` the
single most likely next character is ``(`` (probability about 0.5, against about 0.05 for each
digit), and plain greedy decoding would show the working almost every time. Forbidding that
one token makes the model answer directly.

Later, Quiet-STaR lets the model write its working *silently*, as a thought between
``<|startofthought|>`` and ``<|endofthought|>``, and still answer right after ``=``.

Structure (each step a function, so a notebook or a later demo can reuse it):
    load_test_records  -> held-out lines (qstar_mini.data)
    load_demo_model    -> the tiny base model and its tokenizer (qstar_mini.models.tiny.load_model)
    greedy_complete    -> model.generate, greedy, optionally forbidding tokens
    complete_mode      -> one mode over all lines: Completion rows
    format_table       -> the printed table
    run_demo           -> all of the above, printed; returns the numbers
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qstar_mini.data import WORK_CLOSE, WORK_OPEN, answer_index, read_jsonl, split_path, split_prompt, working_is_correct
from qstar_mini.errors import DataError, ModelError
from qstar_mini.paths import DATA_DIR, TINY_BASE

N_LINES = 200       # held-out lines scored in each mode
N_SHOWN = 6         # of which this many are printed in the table


@dataclass(frozen=True)
class Mode:
    """How a question is put to the model."""

    name: str
    label: str
    suffix: str                 # appended to ``question=``
    forbid: tuple[str, ...]     # tokens greedy decoding may not choose


MODES = (
    Mode("direct", "answer at once", suffix="", forbid=(WORK_OPEN,)),
    Mode("working", "working forced", suffix=WORK_OPEN, forbid=()),
)


@dataclass(frozen=True)
class Completion:
    """One prompt, what the model wrote after it, and whether its answer is right."""

    question: str
    prompt: str
    completion: str
    answer: str                 # the correct answer digit

    @property
    def predicted(self) -> str | None:
        """The model's answer digit: after its last ``)`` if it wrote one, else right after ``=``."""
        text = self.prompt + self.completion
        try:
            digit = text[answer_index(text)]
        except DataError:       # nothing after "=" or ")": no answer at all
            return None
        return digit if digit.isdigit() else None

    @property
    def correct(self) -> bool:
        return self.predicted == self.answer

    @property
    def working(self) -> str | None:
        """The working the model wrote between ``(`` and ``)``, if it wrote any."""
        text = self.prompt + self.completion
        start, end = text.find(WORK_OPEN), text.find(WORK_CLOSE)
        return text[start + 1: end] if 0 <= start < end else None


# ---- the steps --------------------------------------------------------------------------------

def load_test_records(data_dir: str | Path = DATA_DIR, n: int = N_LINES) -> list[dict]:
    """The first ``n`` lines of the held-out test split (records with "question" and "answer")."""
    if n < 1:
        raise DataError(f"n must be >= 1 (got {n})")
    path = split_path("test", data_dir)
    if not path.exists() and Path(data_dir) == DATA_DIR:
        raise DataError(f"{path} does not exist; regenerate the corpus with `make data`")
    records = read_jsonl(path)[:n]
    for i, record in enumerate(records, start=1):
        if not {"question", "answer"} <= record.keys():
            raise DataError(f"{path} line {i} has no 'question' or 'answer' field; is it a test split?")
    return records


def load_demo_model(model_dir: str | Path = TINY_BASE, device=None):
    """``(model, tokenizer)``; for the default path, a missing model says how to make it."""
    from qstar_mini.models.tiny import load_model

    if Path(model_dir) == TINY_BASE and not (TINY_BASE / "config.json").exists():
        raise ModelError(f"no tiny base model in {TINY_BASE}; make it with `make pretrain` "
                         f"(a few CPU minutes)")
    return load_model(model_dir, device=device)


def greedy_complete(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                    forbid: Sequence[str] = (), batch_size: int = 256) -> list[str]:
    """Greedy continuation of each prompt with ``model.generate``, stopping at ``</s>``.

    Prompts are left-padded into batches (input_ids: (batch, seq)) so that every continuation
    starts at the same position; ``forbid`` lists tokens that may never be chosen.
    Returns the continuations as text, special tokens removed.
    """
    import torch

    suppress = [tokenizer.convert_tokens_to_ids(t) for t in forbid]
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start: start + batch_size])
        enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left")
        with torch.no_grad():
            ids = model.generate(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                suppress_tokens=suppress or None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )                                                      # (batch, seq + new)
        new = ids[:, enc["input_ids"].shape[1]:].cpu()             # (batch, new)
        out += tokenizer.batch_decode(new, skip_special_tokens=True)
    return out


def complete_mode(model, tokenizer, records: Sequence[dict], mode: Mode) -> list[Completion]:
    """Complete every record's question in one mode."""
    prompts = [split_prompt(r["text"]) + mode.suffix for r in records]             # "31415=" + suffix
    longest = max(len(r["question"]) for r in records)
    # working (one running sum per digit) + ")" + answer + "</s>", with room to spare
    completions = greedy_complete(model, tokenizer, prompts, max_new_tokens=longest + 4, forbid=mode.forbid)
    return [Completion(r["question"], p, c, r["answer"]) for r, p, c in zip(records, prompts, completions)]


def format_table(rows: Sequence[Completion]) -> str:
    """A plain-text table: prompt, model completion, correct answer, right/wrong."""
    header = ("prompt", "completion", "answer", "result")
    body = [(r.prompt, r.completion, r.answer, "right" if r.correct else "wrong") for r in rows]
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)


def accuracy(rows: Sequence[Completion]) -> float:
    return sum(r.correct for r in rows) / len(rows)


# ---- the demo -----------------------------------------------------------------------------------

def run_demo(model_dir: str | Path = TINY_BASE, n: int = N_LINES, show: int = N_SHOWN,
             data_dir: str | Path = DATA_DIR, device=None, timings: bool = True) -> dict:
    """Load the tiny base, complete ``n`` held-out lines in both modes, print a table of the
    first ``show`` questions, both accuracies and (if ``timings``) how long each step took.

    Returns ``{"n": n, "direct": {...}, "working": {...}}``, each mode with "accuracy" and
    "seconds" (the working mode also "working_correct": the fraction of its running sums that
    were all right).
    """
    from transformers.utils import logging as hf_logging

    records = load_test_records(data_dir, n)           # cheap, and fails before the model loads
    hf_logging.disable_progress_bar()                  # a 1 MB model needs no "Loading weights" bar
    t0 = time.perf_counter()
    model, tokenizer = load_demo_model(model_dir, device=device)
    load_seconds = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())

    print(f"model: {model_dir} ({type(model).__name__}, {n_params:,} parameters)")
    print(f"held-out test lines: {len(records)} from {split_path('test', data_dir)}\n")

    results, rows = {"n": len(records)}, {}
    for mode in MODES:
        t0 = time.perf_counter()
        rows[mode.name] = complete_mode(model, tokenizer, records, mode)
        results[mode.name] = {"accuracy": accuracy(rows[mode.name]), "seconds": time.perf_counter() - t0}
    own = [r.working for r in rows["working"]]
    results["working"]["working_correct"] = sum(
        w is not None and working_is_correct(r["question"], w) for r, w in zip(records, own)) / len(records)

    shown = [row for i in range(min(show, len(records))) for row in (rows["direct"][i], rows["working"][i])]
    print(format_table(shown))
    print()
    for mode in MODES:
        acc = results[mode.name]["accuracy"]
        print(f"{mode.label:>15} ({mode.name}): accuracy {acc:6.1%} on {len(records)} held-out lines")
    print(f"{'':>15}  its working was entirely right in {results['working']['working_correct']:.1%} of them")
    print("(chance is 10%; the gap between the two is the room a silent thought can fill)")
    if timings:
        print(f"\ntimings: load {load_seconds:.2f} s, "
              + ", ".join(f"{m.name} {results[m.name]['seconds']:.2f} s" for m in MODES))
    return results
