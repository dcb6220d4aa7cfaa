"""The ``qstar_gsm8k_format`` lm-evaluation-harness task's functions (see the YAML beside this file):
the data, prompt, target and answer extraction are qstar_mini's own, so the harness's exact_match
is the GSM8K-format accuracy :func:`qstar_mini.evaluation.gsm8k.gsm8k_eval` computes."""

from __future__ import annotations

from qstar_mini.data import gsm8k_prompt, gsm_final_answer, read_jsonl
from qstar_mini.evaluation.gsm8k import extract_answer
from qstar_mini.paths import DATA_DIR

#: What an unanswered generation is scored as (never equal to a target, which is a number).
NO_ANSWER = "[no number]"


def load(path=None, **_ignored):
    """``{"test": Dataset}`` of the GSM8K-format file ``path`` (default data/gsm8k_format.jsonl),
    read with :func:`qstar_mini.data.read_jsonl` (one-line errors; nothing downloaded)."""
    import datasets

    records = read_jsonl(path or DATA_DIR / "gsm8k_format.jsonl", required=("question", "answer"))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(
        [{"question": r["question"], "answer": r["answer"]} for r in records])})


def prompt(doc: dict) -> str:
    return gsm8k_prompt(doc["question"])


def target(doc: dict) -> str:
    return gsm_final_answer(doc["answer"])


def answers(resps, docs):
    """Each generation's answer as :func:`qstar_mini.evaluation.gsm8k.extract_answer` reads it."""
    return [[extract_answer(r) or NO_ANSWER for r in rs] for rs in resps]
