"""Evaluation: does thinking help, where, and are the thoughts any good?

On held-out lines (by default the answer-only lines of the test split, ``31415=4``), for
every token x_{j+1} of every line:

* **base**: -log p(x_{j+1}) under the model Quiet-STaR started from (no training at all);
* **control**: the same under the model trained with the same loop and thinking off;
* **quiet_star**: the mixed prediction log p^talk after a thought T_j (Algorithm 1, line 2g),
  with sampled thoughts (averaged over ``n_thoughts`` samples per position) and with a greedy
  thought; accuracy = argmax of the prediction is the true token;
* **quiet_star_no_thought**: the trained LM's own prediction without a thought (line 2a).

Answer-token figures (the digit after ``=``, the token thinking is for) are reported on
their own; ``all_*`` covers every next-token prediction of the line, ``</s>`` included.

**Which tokens benefit** (the paper's Figure: gains concentrate on difficult tokens): every
token is put in a bin by the *base* model's loss on it, and each bin reports the mean loss
of base, control and Quiet-STaR and the improvements.

**Are the thoughts right?** The thought at the answer position, decoded between the
meta-tokens, should be the working (the five running sums mod 10): ``thought_correct`` is
the fraction of sampled thoughts (temperature ``cfg.thought_temperature``) that are, and
``thought_correct_greedy`` that of the greedy thought. :func:`thought_correctness` also
measures a model at other temperatures (the base's best temperature is the bar a
REINFORCE-trained model must clear to be more than sharpened).

**GSM8K format.** :func:`gsm8k_eval` asks each question zero-shot, generates greedily (with
thoughts for Quiet-STaR) and compares the first number of the answer with the number after
``####``; offline on ``data/gsm8k_format.jsonl``, or on real GSM8K with
:func:`load_gsm8k` (``datasets.load_dataset("gsm8k", "main")``, needs the network).
:func:`commonsense_qa_eval` scores CommonsenseQA-format multiple choice the way the official
code does (the most likely of the labels A-E after the prompt); real data via
:func:`load_commonsense_qa`. A character-level model of 0.8M parameters trained on digit sums
scores about 0 (GSM8K) or chance (CommonsenseQA) there: the code path is what is tested here,
not the tiny model.

**Any text.** ``qstar-mini eval --data`` takes any JSONL file with a text field
(``--text-field``), a folder with ``<split>.jsonl`` or a ``datasets`` name (streamed: only the
first ``--lines`` records are read). :func:`detect_data_kind` says what the data is: the
project's arithmetic corpus (every record has its fields ``question``, ``has_working`` and a
``question=[(working)]answer`` text) gets :func:`evaluate` and every figure above; any other
text gets :func:`evaluate_text`: per-token NLL with thinking (log p^talk at offset 0, a thought
after every token) and without (the base model's, and the trained LM's own), the gain per
token, which tokens benefit (binned by the base loss) and, when the records are GSM8K-format
``question``/``answer`` problems, the zero-shot accuracy with thinking. The arithmetic-task
figures (answer accuracy at the ``=``, thoughts right) are then omitted with a one-line note.
For EleutherAI's lm-evaluation-harness see :mod:`qstar_mini.harness`.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from .data import QA_TEXT_FIELD, TEXT_FIELD_HINT, gsm8k_prompt, gsm_final_answer, qa_text, read_jsonl, split_prompt
from .errors import DataError
from .generate import decode_thought, generate_with_thoughts, generated_text, predict_with_thoughts, thought_is_correct
from .lm import text_log_probs
from .records import encode_records, load_hf_dataset, pad_right

BIN_EDGES = (0.0, 0.1, 0.5, 1.0, 2.0, 3.0, math.inf)
TEMPERATURES = (0.25, 0.5, 0.75, 1.0)


# ----------------------------------------------------------------------------- helpers

def answer_only(records: list[dict]) -> list[dict]:
    """The held-out lines without visible working (``31415=4``)."""
    return [r for r in records if not r.get("has_working", False)]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


# ----------------------------------------------------------------------------- per-token figures

@torch.no_grad()
def plain_token_stats(model, tokenizer, records, meta_ids=(), batch_size: int = 256, *,
                      seq_len: int = 512) -> dict:
    """-log p and correctness of every next token under the plain model (no thought).

    Lines are ``<s> text </s>`` cut at ``seq_len`` tokens.
    returns: {"nll": (N,) every real next-token prediction, "correct": (N,) bool,
    "is_answer": (N,) bool, "position": (N,) j, "line": (N,) line index}, flattened in the
    same order as :func:`thought_token_stats`.
    """
    enc = encode_records(tokenizer, records, seq_len)
    out = {k: [] for k in ("nll", "correct", "is_answer", "position", "line")}
    device = _device(model)
    for sl in _chunks(len(enc), batch_size):
        ids, mask = enc.input_ids[sl].to(device), enc.attention_mask[sl].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()    # (b, l, vocab)
        logp = text_log_probs(logits, tuple(i for i in meta_ids if i < logits.shape[-1]))
        _collect(out, logp[:, :-1], ids, mask, enc.answer_pos[sl].to(device), sl.start)
    return {k: torch.cat(v) for k, v in out.items()}


def _collect(out, pred, ids, mask, answer_pos, offset):
    """Append the figures of one batch of lines ids, mask (b, l).

    pred: (b, l-1, vocab) log-probs whose position j predicts x_{j+1}; or (b, n, l-1, vocab),
    one prediction per thought, and then nll and correct are means over the n thoughts
    (correct a fraction, not a bool).
    """
    b, l = ids.shape
    target = ids[:, 1:]                                                       # (b, l-1)
    if pred.dim() == 3:
        nll = -pred.gather(-1, target[..., None])[..., 0]                     # (b, l-1)
        correct = pred.argmax(-1) == target
    else:
        n = pred.shape[1]
        lp = pred.gather(-1, target[:, None, :, None].expand(b, n, l - 1, 1))[..., 0]   # (b, n, l-1)
        nll = -lp.mean(1)
        correct = (pred.argmax(-1) == target[:, None]).float().mean(1)        # (b, l-1)
    valid = mask[:, 1:].bool()
    j = torch.arange(l - 1, device=ids.device)[None].expand(b, l - 1)
    is_answer = (j + 1) == answer_pos[:, None]
    line = torch.arange(b, device=ids.device)[:, None].expand(b, l - 1) + offset
    out["nll"].append(nll[valid].cpu())
    out["correct"].append(correct[valid].cpu())
    out["is_answer"].append(is_answer[valid].cpu())
    out["position"].append(j[valid].cpu())
    out["line"].append(line[valid].cpu())


@torch.no_grad()
def thought_token_stats(model, tokenizer, meta, head, cfg, records, *, n_thoughts: int = 4,
                        greedy: bool = False, temperature: float | None = None, seed: int = 0,
                        think_where: str = "all", batch_size: int = 128, seq_len: int = 512) -> dict:
    """Like :func:`plain_token_stats` for the mixed prediction after a thought.

    think_where: "all" (a thought before every token, the paper) or "answer" (a thought only
    before the answer digit; every other token is predicted without one, which is how a model
    trained with ``think_where="answer"`` is meant to be used).

    Sampled thoughts: nll / correct are means over ``n_thoughts`` thoughts per position.
    Also returns "nll_no_thought"/"correct_no_thought" (line 2a of the same model), "w" (mean
    over thoughts; NaN where no thought was made) and, per line, "answer_thoughts": the decoded
    thoughts before the answer and "answer_thought_ok": whether each is the right working.
    """
    enc = encode_records(tokenizer, records, seq_len)
    device = _device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    n = 1 if greedy else n_thoughts
    out = {k: [] for k in ("nll", "correct", "is_answer", "position", "line")}
    plain = {k: [] for k in out}
    ws, thoughts_text, thoughts_ok = [], [], []
    for sl in _chunks(len(enc), batch_size):
        ids, mask = enc.input_ids[sl].to(device), enc.attention_mask[sl].to(device)
        answer_pos = enc.answer_pos[sl].to(device)
        b, l = ids.shape
        before = torch.where(answer_pos > 0, answer_pos - 1, -1)             # (b,) j of the answer
        if think_where == "answer":        # one thought per line, before the answer; none elsewhere
            pred = predict_with_thoughts(model, meta, head, cfg, ids, mask, n, greedy=greedy,
                                         temperature=temperature, generator=generator,
                                         positions=before.clamp(min=0)[:, None])
            talk = pred.log_p_init[:, None, :-1].expand(b, n, l - 1, -1).clone()   # (b, n, l-1, vocab)
            w = torch.full((b, n, l - 1), float("nan"), device=device)
            lines = (before >= 0).nonzero().flatten()
            talk[lines, :, before[lines]] = pred.log_p_talk[lines, :, 0]
            w[lines, :, before[lines]] = pred.w[lines, :, 0]
            thought_col = torch.zeros_like(before)
        else:
            pred = predict_with_thoughts(model, meta, head, cfg, ids, mask, n, greedy=greedy,
                                         temperature=temperature, generator=generator)
            talk, w = pred.log_p_talk[:, :, :-1], pred.w[:, :, :-1]           # (b, n, l-1, ...)
            thought_col = before
        # mixed prediction, averaged over thoughts: nll = mean_n -log p^talk, acc = mean_n [argmax right]
        _collect(out, talk, ids, mask, answer_pos, sl.start)
        ws.append(w.mean(1)[mask[:, 1:].bool()].cpu())
        _collect(plain, pred.log_p_init[:, :-1], ids, mask, answer_pos, sl.start)
        for i in range(b):
            if int(before[i]) < 0:
                thoughts_text.append([]), thoughts_ok.append([])
                continue
            texts = [decode_thought(tokenizer, pred.thoughts[i, k, int(thought_col[i])]) for k in range(n)]
            q = enc.questions[sl.start + i]
            thoughts_text.append(texts)
            thoughts_ok.append([thought_is_correct(q, t) for t in texts])
    stats = {k: torch.cat(v) for k, v in out.items()}
    stats["w"] = torch.cat(ws)
    stats["nll_no_thought"] = torch.cat(plain["nll"])
    stats["correct_no_thought"] = torch.cat(plain["correct"])
    stats["answer_thoughts"] = thoughts_text
    stats["answer_thought_ok"] = thoughts_ok
    return stats


def summarize(nll: torch.Tensor, correct: torch.Tensor, is_answer: torch.Tensor) -> dict:
    """all_nll, all_acc (every token) and answer_nll, answer_acc (the answer digit only)."""
    f = lambda x: None if x.numel() == 0 else round(float(x.float().mean()), 4)   # noqa: E731
    return {"all_nll": f(nll), "all_acc": f(correct), "answer_nll": f(nll[is_answer]),
            "answer_acc": f(correct[is_answer]), "n_tokens": int(nll.numel()),
            "n_answers": int(is_answer.sum())}


def by_difficulty(base_nll: torch.Tensor, others: dict[str, torch.Tensor],
                  edges=BIN_EDGES) -> list[dict]:
    """Tokens binned by the base model's loss on them; per bin the mean loss of every model
    and the improvement of ``quiet_star`` over each other model (positive = thinking helped)."""
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (base_nll >= lo) & (base_nll < hi)
        n = int(inside.sum())
        row = {"bin": f"[{lo:g}, {hi:g})", "lo": lo, "hi": None if math.isinf(hi) else hi, "n": n,
               "base_nll": None if n == 0 else round(float(base_nll[inside].mean()), 4)}
        for name, nll in others.items():
            row[f"{name}_nll"] = None if n == 0 else round(float(nll[inside].mean()), 4)
        if n and "quiet_star" in others:
            q = others["quiet_star"][inside]
            row["gain_vs_base"] = round(float((base_nll[inside] - q).mean()), 4)
            for name, nll in others.items():
                if name != "quiet_star":
                    row[f"gain_vs_{name}"] = round(float((nll[inside] - q).mean()), 4)
        rows.append(row)
    return rows


def w_by_position(stats: dict) -> list[float | None]:
    """Mean w at each position j over the lines (for the 'w over positions' plot); None where
    no thought was made."""
    pos, w = stats["position"], stats["w"]
    top = int(pos.max()) + 1 if pos.numel() else 0
    means = [float(w[pos == j].nanmean()) if bool((pos == j).any()) else math.nan for j in range(top)]
    return [None if math.isnan(m) else round(m, 4) for m in means]


# ----------------------------------------------------------------------------- thoughts

@torch.no_grad()
def thought_correctness(model, tokenizer, meta, cfg, records, *, temperature: float = 1.0,
                        greedy: bool = False, n_samples: int = 1, seed: int = 0,
                        batch_size: int = 256) -> float | None:
    """Fraction of thoughts at the answer position whose working is right.

    Only the prompt ``<s>31415=`` is needed (the thought at position j sees x_{<=j}) and only
    its last position thinks; the mixing head plays no part. The thought judged is the one after
    ``=``. ``greedy`` takes the argmax thought; else ``n_samples`` thoughts per line at
    ``temperature``.
    """
    from .thoughts import generate_thoughts, plain_forward

    records = [r for r in records if r.get("question")]
    if not records:
        return None
    device = _device(model)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompts = [bos + tokenizer(split_prompt(r["text"]), add_special_tokens=False)["input_ids"] for r in records]
    generator = torch.Generator(device=device).manual_seed(seed)
    n = 1 if greedy else n_samples
    ok = []
    for sl in _chunks(len(prompts), batch_size):
        rows = prompts[sl]
        ids, mask = (x.to(device) for x in pad_right(rows, tokenizer.pad_token_id))   # (b, seq) right-padded
        last = torch.tensor([[len(x) - 1] for x in rows], device=device)     # (b, 1): the "="
        h, cache = plain_forward(model, meta, ids, mask)
        th = generate_thoughts(model, meta, ids, mask, cache, cfg.thought_length, n,
                               thought_temperature=temperature, greedy=greedy, generator=generator,
                               positions=last)
        for i in range(len(rows)):
            q = records[sl.start + i]["question"]
            ok += [thought_is_correct(q, decode_thought(tokenizer, th.ids[i, k, 0])) for k in range(n)]
    return round(sum(ok) / len(ok), 4)


def best_temperature(model, tokenizer, meta, cfg, records, temperatures=TEMPERATURES, *,
                     n_samples: int = 1, seed: int = 0) -> dict:
    """Thought correctness at each sampling temperature and greedy; the best of them.

    returns: {"by_temperature": {"0.25": f, ..., "greedy": f}, "best": f, "best_temperature": T}.
    """
    res = {f"{t:g}": thought_correctness(model, tokenizer, meta, cfg, records, temperature=t,
                                         n_samples=n_samples, seed=seed) for t in temperatures}
    res["greedy"] = thought_correctness(model, tokenizer, meta, cfg, records, greedy=True, seed=seed)
    best = max(res, key=lambda k: res[k] if res[k] is not None else -1)
    return {"by_temperature": res, "best": res[best], "best_temperature": best}


def running_sum_agreement(question: str, thought_text: str) -> dict:
    """How a thought's digits agree with the question's running sums, step by step.

    returns: {"all": every sum right (= :func:`thought_is_correct`), "last": the last sum (the
    answer) right, "steps": per step k, the k-th digit is the true k-th running sum,
    "carried": per step k, the k-th digit is (the thought's own (k-1)-th digit + q_k) mod 10,
    the step done right from what the thought wrote}; a thought of the wrong length or with a
    non-digit has every entry False.
    """
    from .data import task_for_question

    if not (isinstance(question, str) and question.isascii() and question.isdigit()):
        raise DataError(f"question {question!r} is not a string of digits; pass the record's 'question'")
    sums = task_for_question(question).running_sums(question)
    n = len(sums)
    if len(thought_text) != n or not thought_text.isdigit():
        return {"all": False, "last": False, "steps": [False] * n, "carried": [False] * n}
    digits = [int(c) for c in thought_text]
    steps = [d == s for d, s in zip(digits, sums)]
    carried = [digits[k] == ((digits[k - 1] if k else 0) + int(question[k])) % 10 for k in range(n)]
    return {"all": all(steps), "last": steps[-1], "steps": steps, "carried": carried}


@torch.no_grad()
def thought_sum_agreement(model, tokenizer, meta, cfg, records, *, temperature: float = 1.0,
                          greedy: bool = False, n_samples: int = 1, seed: int = 0,
                          batch_size: int = 256) -> dict:
    """The thoughts after ``=`` (as :func:`thought_correctness` samples them) judged step by step
    with :func:`running_sum_agreement`: is the reward, which sees only the answer, paying for
    thoughts whose last sum is right but an earlier one wrong?

    returns: {"all_right", "last_right", "last_right_not_all" (the last sum right, an earlier one
    wrong), "step_right": [per step], "carried_right": [per step], "n"}; fractions of thoughts.
    """
    from .thoughts import generate_thoughts, plain_forward

    records = [r for r in records if r.get("question")]
    if not records:
        raise DataError("thought_sum_agreement needs records with a 'question'")
    device = _device(model)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    generator = torch.Generator(device=device).manual_seed(seed)
    n = 1 if greedy else n_samples
    judged = []
    for sl in _chunks(len(records), batch_size):
        rows = [bos + tokenizer(split_prompt(r["text"]), add_special_tokens=False)["input_ids"] for r in records[sl]]
        ids, mask = (x.to(device) for x in pad_right(rows, tokenizer.pad_token_id))   # (b, seq)
        last = torch.tensor([[len(x) - 1] for x in rows], device=device)     # (b, 1): the "="
        _, cache = plain_forward(model, meta, ids, mask)
        th = generate_thoughts(model, meta, ids, mask, cache, cfg.thought_length, n,
                               thought_temperature=temperature, greedy=greedy, generator=generator,
                               positions=last)
        for i, r in enumerate(records[sl]):
            judged += [running_sum_agreement(r["question"], decode_thought(tokenizer, th.ids[i, k, 0]))
                       for k in range(n)]
    frac = lambda xs: round(sum(xs) / len(xs), 4)                              # noqa: E731
    steps = len(judged[0]["steps"])
    return {"all_right": frac([j["all"] for j in judged]), "last_right": frac([j["last"] for j in judged]),
            "last_right_not_all": frac([j["last"] and not j["all"] for j in judged]),
            "step_right": [frac([j["steps"][k] for j in judged]) for k in range(steps)],
            "carried_right": [frac([j["carried"][k] for j in judged]) for k in range(steps)],
            "n": len(judged)}


@torch.no_grad()
def visible_working_accuracy(model, tokenizer, records, temperatures=TEMPERATURES, *, seed: int = 0,
                             batch_size: int = 256) -> dict:
    """The bar for the answer after a hidden thought: the plain model writes its working
    *visibly*, then answers.

    For each record's question q the model continues ``<s>q=(`` by n_digits + 1 tokens (the
    running sums and ``)``) sampled at each temperature (and greedily), then one answer token,
    always greedily (the argmax over the vocabulary, as the Quiet-STaR answer accuracy of
    :func:`evaluate`). working_correct: the running sums are all right and ``)`` follows them;
    answer_acc: the answer token is the true answer (whatever the working was). A CPU generator
    seeded with ``seed`` samples. ``model`` is a plain model (no meta-tokens needed).
    returns: {"by_temperature": {"0.25": {"working_correct", "answer_acc"}, ..., "greedy": {...}},
    "best": the entry with the highest answer_acc, "best_temperature": its key, "n": lines}.
    """
    from .data import WORK_CLOSE, WORK_OPEN, task_for_question, working_is_correct

    records = [r for r in records if r.get("question")]
    if not records:
        raise DataError("visible_working_accuracy needs records with a 'question' (lines of the arithmetic corpus)")
    from .meta_tokens import END_THOUGHT, START_THOUGHT

    device = _device(model)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    generator = torch.Generator().manual_seed(seed)
    # A model prepared for Quiet-STaR has the meta-tokens, initialised from text tokens (`(` / `)`):
    # left in, a sample takes <|endofthought|> for `)` as often as `)` itself. Visible working is
    # the plain model's, so they are taken out of its distribution, as in the Quiet-STaR step.
    vocab = tokenizer.get_vocab()
    meta_ids = tuple(vocab[t] for t in (START_THOUGHT, END_THOUGHT) if t in vocab)
    was = model.training
    model.eval()
    try:
        res = {}
        for key, temperature in [(f"{t:g}", t) for t in temperatures] + [("greedy", 0.0)]:
            working_ok, answer_ok = [], []
            for sl in _chunks(len(records), batch_size):
                chunk = records[sl]
                prompts = [bos + tokenizer(r["question"] + "=" + WORK_OPEN, add_special_tokens=False)["input_ids"]
                           for r in chunk]
                if len({len(p) for p in prompts}) != 1:
                    raise DataError("visible_working_accuracy: questions of one batch differ in length; "
                                    "pass lines of one task")
                ids = torch.tensor(prompts, device=device)                   # (b, prompt)
                task = task_for_question(chunk[0]["question"])
                n_work = task.n_digits + 1                                   # running sums and ")"
                for k in range(n_work + 1):                                  # the last token: the answer
                    logits = model(input_ids=ids).logits[:, -1].float()      # (b, vocab)
                    if temperature == 0 or k == n_work:
                        nxt = text_log_probs(logits, meta_ids).argmax(-1)
                    else:
                        probs = text_log_probs(logits, meta_ids, temperature).exp().cpu()
                        nxt = torch.multinomial(probs, 1, generator=generator)[:, 0].to(device)
                    ids = torch.cat([ids, nxt[:, None]], dim=1)
                new = ids[:, len(prompts[0]):].cpu()                         # (b, n_work + 1)
                for r, row in zip(chunk, new.tolist()):
                    working = tokenizer.decode(row[: n_work - 1], skip_special_tokens=False)
                    close = tokenizer.decode(row[n_work - 1: n_work], skip_special_tokens=False)
                    working_ok.append(close == WORK_CLOSE and working_is_correct(r["question"], working, task))
                    answer_ok.append(tokenizer.decode(row[n_work:], skip_special_tokens=False) == r["answer"])
            res[key] = {"working_correct": round(sum(working_ok) / len(working_ok), 4),
                        "answer_acc": round(sum(answer_ok) / len(answer_ok), 4)}
        best = max(res, key=lambda k: res[k]["answer_acc"])
        return {"by_temperature": res, "best": res[best], "best_temperature": best, "n": len(records)}
    finally:
        model.train(was)


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
    None, e.g. the base model); :func:`qstar_mini.generate.generate_plain` is the KV-cache
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
    from .generate import think_once
    from .thoughts import plain_forward

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
    from .data import format_line, task_for_question

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
