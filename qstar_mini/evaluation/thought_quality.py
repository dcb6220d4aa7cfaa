"""Are the thoughts right? The thought at the answer position, compared with the working.

The thought at the answer position, decoded between the meta-tokens, should be the working
(the five running sums mod 10): ``thought_correct`` is the fraction of sampled thoughts
(temperature ``cfg.thought_temperature``) that are, and ``thought_correct_greedy`` that of the
greedy thought. :func:`thought_correctness` also measures a model at other temperatures (the
base's best temperature is the bar a REINFORCE-trained model must clear to be more than
sharpened). :func:`running_sum_agreement` and :func:`thought_sum_agreement` score the thought
digit by digit; :func:`visible_working_accuracy` asks the model to write its working in the text.
"""

from __future__ import annotations

import torch

from qstar_mini.data import split_prompt
from qstar_mini.errors import DataError
from qstar_mini.evaluation.token_gains import _chunks, _device
from qstar_mini.inference import decode_thought, thought_is_correct
from qstar_mini.lm import text_log_probs
from qstar_mini.records import pad_right


TEMPERATURES = (0.25, 0.5, 0.75, 1.0)


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
    from qstar_mini.thoughts import generate_thoughts, plain_forward

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
    from qstar_mini.data import task_for_question

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
    from qstar_mini.thoughts import generate_thoughts, plain_forward

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
    from qstar_mini.data import WORK_CLOSE, WORK_OPEN, task_for_question, working_is_correct

    records = [r for r in records if r.get("question")]
    if not records:
        raise DataError("visible_working_accuracy needs records with a 'question' (lines of the arithmetic corpus)")
    from qstar_mini.meta_tokens import END_THOUGHT, START_THOUGHT

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
