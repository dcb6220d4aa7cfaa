"""Does thinking help, and at which tokens: per-token NLL with and without a thought.

On held-out lines (by default the answer-only lines of the test split, ``31415=4``), for every
token x_{j+1} of every line:

* **base**: -log p(x_{j+1}) under the model Quiet-STaR started from (no training at all);
* **control**: the same under the model trained with the same loop and thinking off;
* **quiet_star**: the mixed prediction log p^talk after a thought T_j (Algorithm 1, line 2g),
  with sampled thoughts (averaged over ``n_thoughts`` samples per position) and with a greedy
  thought; accuracy = argmax of the prediction is the true token;
* **quiet_star_no_thought**: the trained LM's own prediction without a thought (line 2a).

Answer-token figures (the digit after ``=``, the token thinking is for) are reported on
their own; ``all_*`` covers every next-token prediction of the line, ``</s>`` included.

**Which tokens benefit** (the paper's Figure: gains concentrate on difficult tokens):
:func:`by_difficulty` puts every token in a bin by the *base* model's loss on it and reports
each bin's mean loss for base, control and Quiet-STaR, and the improvements.
"""

from __future__ import annotations

import math

import torch

from qstar_mini.inference import decode_thought, predict_with_thoughts, thought_is_correct
from qstar_mini.lm import text_log_probs
from qstar_mini.records import encode_records


BIN_EDGES = (0.0, 0.1, 0.5, 1.0, 2.0, 3.0, math.inf)


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
