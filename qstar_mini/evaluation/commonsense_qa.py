"""The CommonsenseQA format: multiple choice scored the way the official code scores it.

:func:`commonsense_qa_eval` takes the most likely of the labels A-E after the prompt
(:func:`commonsense_prompt`); real data via :func:`load_commonsense_qa` (needs the network).
On the course's tiny character-level model the score is about chance: the code path is what
is tested, not the model.
"""

from __future__ import annotations

import torch

from qstar_mini.evaluation.token_gains import _device
from qstar_mini.lm import text_log_probs


# ----------------------------------------------------------------------------- CommonsenseQA format

def load_commonsense_qa(split: str = "validation", limit: int | None = None) -> list[dict]:
    """Real CommonsenseQA via ``datasets`` (needs the network): records with question,
    choices {"label": [...], "text": [...]} and answerKey."""
    import datasets

    ds = datasets.load_dataset("tau/commonsense_qa", split=split if not limit else f"{split}[:{limit}]")
    return [{"question": r["question"], "choices": r["choices"], "answerKey": r["answerKey"]} for r in ds]


def commonsense_prompt(record: dict) -> str:
    """Zero-shot multiple choice: the question, one line per choice, then ``Answer:``."""
    options = "\n".join(f"{label}) {text}" for label, text in zip(record["choices"]["label"],
                                                                   record["choices"]["text"]))
    return f"Q: {record['question']}\n{options}\nAnswer:"


@torch.no_grad()
def next_token_log_probs(model, tokenizer, prompt: str, *, meta=None, head=None, cfg=None) -> torch.Tensor:
    """log p(next token | prompt) over the vocabulary, after a greedy thought when meta, head and
    cfg are given (the mixed prediction, Algorithm 1 line 2g), else the plain one. (vocab,)"""
    from qstar_mini.inference import think_once
    from qstar_mini.thoughts import plain_forward

    device = _device(model)
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    x = torch.tensor([ids + tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
    if meta is None or head is None or cfg is None:
        logits = model(input_ids=x).logits[0, -1].float()
        meta_ids = () if meta is None else tuple(i for i in meta.ids if i < logits.shape[-1])
        return text_log_probs(logits, meta_ids)
    h_init, cache = plain_forward(model, meta, x, torch.ones_like(x))
    _, _, log_p_talk, _ = think_once(model, meta, head, cfg, cache, h_init[:, -1], x.shape[1] - 1)
    return log_p_talk


def commonsense_qa_eval(model, tokenizer, records, *, meta=None, head=None, cfg=None,
                        limit: int | None = 50) -> dict:
    """Zero-shot CommonsenseQA-format accuracy: the choice label whose first token (`` A``..)
    gets the highest probability right after ``Answer:`` (thinking first when meta, head and
    cfg are given), as the official code scores A-E."""
    records = records[:limit] if limit else records
    right = []
    for r in records:
        log_p = next_token_log_probs(model, tokenizer, commonsense_prompt(r), meta=meta, head=head, cfg=cfg)
        labels = r["choices"]["label"]
        first = [tokenizer(" " + label, add_special_tokens=False)["input_ids"][-1] for label in labels]
        right.append(labels[int(torch.stack([log_p[i] for i in first]).argmax())] == r["answerKey"])
    return {"n": len(right), "accuracy": round(sum(right) / max(1, len(right)), 4),
            "thinking": meta is not None and head is not None and cfg is not None}
