"""The GSM8K format: ask each question zero-shot, compare the number after ``####``.

:func:`gsm8k_eval` generates greedily (with a thought before every token for Quiet-STaR, see
:mod:`qstar_mini.inference`) and compares the first number of the answer with the number after
``####``; offline on ``data/gsm8k_format.jsonl``, or on real GSM8K with :func:`load_gsm8k`
(``datasets.load_dataset("gsm8k", "main")``, needs the network). On the course's tiny
character-level model the accuracy is about 0: the code path is what is tested, not the model.
"""

from __future__ import annotations

import re

import torch

from qstar_mini.data import gsm8k_prompt, gsm_final_answer
from qstar_mini.evaluation.token_gains import _device
from qstar_mini.inference import generate_with_thoughts, generated_text
from qstar_mini.lm import text_log_probs


# ----------------------------------------------------------------------------- GSM8K format

def load_gsm8k(split: str = "test", limit: int | None = None) -> list[dict]:
    """Real GSM8K via ``datasets`` (needs the network): records with question / answer."""
    import datasets

    ds = datasets.load_dataset("gsm8k", "main", split=split if not limit else f"{split}[:{limit}]")
    return [{"question": q, "answer": a} for q, a in zip(ds["question"], ds["answer"])]


_NUMBER = re.compile(r"-?\d[\d,]*")


def extract_answer(generation: str) -> str | None:
    """The model's answer: the number after ``####`` if it wrote one, else its first number."""
    m = re.search(r"####\s*(-?[\d,]+)", generation)
    if m:
        return m.group(1).replace(",", "")
    m = _NUMBER.search(generation)
    return m.group(0).replace(",", "") if m else None


@torch.no_grad()
def gsm8k_eval(model, tokenizer, records, *, meta=None, head=None, cfg=None, max_new_tokens: int = 6,
               limit: int | None = 50, n_examples: int = 3) -> dict:
    """Zero-shot GSM8K-format accuracy: greedy generation after the question (thinking before
    each token when meta, head and cfg are given), first number vs the number after ``####``."""
    records = records[:limit] if limit else records
    right, examples = [], []
    thinking = meta is not None and head is not None and cfg is not None
    for r in records:
        prompt = gsm8k_prompt(r["question"])
        if thinking:
            text = generated_text(generate_with_thoughts(model, tokenizer, meta, head, cfg, prompt,
                                                         max_new_tokens, greedy=True))
        else:
            text = _greedy_plain(model, tokenizer, prompt, max_new_tokens, meta)
        guess, truth = extract_answer(text), gsm_final_answer(r["answer"])
        right.append(guess == truth)
        if len(examples) < n_examples:
            examples.append({"question": r["question"], "generation": text, "predicted": guess, "answer": truth})
    return {"n": len(right), "accuracy": round(sum(right) / max(1, len(right)), 4), "thinking": thinking,
            "examples": examples}


def _greedy_plain(model, tokenizer, prompt, max_new_tokens, meta=None) -> str:
    """Greedy decoding without thoughts (meta-tokens, if the model has them, never chosen).

    The cache-free reference: a full forward pass per new token, for any model (``meta`` may be
    None, e.g. the base model); :func:`qstar_mini.inference.generate_plain` is the KV-cache
    version for models with meta-tokens, tested equal to it."""
    device = _device(model)
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = torch.tensor([ids + tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
    meta_ids = tuple(meta.ids) if meta is not None else ()
    new = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids).logits[0, -1].float()
        token = int(text_log_probs(logits, tuple(i for i in meta_ids if i < logits.shape[-1])).argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)
