"""Quiet-STaR on a real pretrained model: SmolLM2-135M thinking at the hardest tokens of text.

The tiny arithmetic model shows every part of the algorithm; this experiment asks the same
question of a real language model, on CPU, in well under an hour:

1. **Text.** The project's GSM8K-format word problems (``data/gsm8k_format.jsonl``), question and
   worked answer as one line, e.g. ``... The shells cost 4*4=16 dollars, so the change is
   20-16=4 dollars. #### 4``. The first 150 lines train, the last 50 are held out.
2. **Where to think.** The base model scores every token of every line; each line thinks after
   the k positions of its worked answer whose next token the base finds hardest (highest NLL).
   Those are mostly the results of the arithmetic (``16`` after ``4*4=``): "difficult tokens"
   that a thought could work out from the question. (The question's own numbers are harder
   still, but nothing before them says what they are, so no thought can help there.)
3. **Two arms from the same seed**, the same lines in the same order, the same optimiser:
   Quiet-STaR (thinking at those positions) and the control, the same loop with thinking off
   (plain NLL on the same lines). Both fine-tune the model on this text, so the comparison is
   Quiet-STaR against fine-tuning alone.
4. **Held-out evaluation** at the hardest positions of the 50 test lines (chosen by the base):
   the NLL of the true next token for the base, the control, the Quiet-STaR model without
   thinking, and the Quiet-STaR model with thinking (the mixed post-thought prediction, mean over
   n_thoughts sampled thoughts); binned by the base's NLL, as in the paper's "which tokens
   benefit". The numbers are reported whatever they show.

``qstar-mini real`` (``make real``) writes ``runs/real/report.json`` and prints the
table; README quotes the result and the time it took. On a GPU raise ``--steps`` and
``--lines``; settings below.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import torch

from qstar_mini.config import official
from qstar_mini.data import read_jsonl
from qstar_mini.errors import ConfigError
from qstar_mini.lm import lm_head, text_log_probs
from qstar_mini.losses import token_log_probs
from qstar_mini.paths import DATA_DIR, RUNS_DIR
from qstar_mini.step import at_positions, prepare_model, quiet_star_step
from qstar_mini.thoughts import plain_forward

# The official step's structure with the tiny preset's choices where a few dozen steps on a CPU
# need them: a bounded mixing weight that starts at 0.05 (the base, nearly), the summed log p(T_j)
# with weight 1, a larger learning rate, and the meta-tokens out of the scoring softmax (so adding
# them leaves the base's predictions unchanged).
REAL = official(thought_length=8, n_true=2, n_thoughts=2, seq_len=96, batch_size=4, steps=30,
                lr=1e-5, mixer_lr=1e-3, mixer_depth=1, mixer_sigmoid=True, mixer_bias_init=-3.0,
                mixer_init="default", policy_loss_weight=1.0, reinforce_reduction="sum", scoring_vocab="text",
                policy_positions="real", lr_schedule="constant", warmup_steps=5, weight_decay=0.0,
                decay_meta_tokens=False)
HARD_PER_LINE = 4
TRAIN_LINES, TEST_LINES = 150, 50
BINS = (0.0, 2.0, 4.0, 6.0, float("inf"))


def problem_lines(path=DATA_DIR / "gsm8k_format.jsonl") -> list[tuple[str, str]]:
    """Each GSM8K-format record as (question, the whole line: question, then the worked answer)."""
    records = read_jsonl(Path(path))
    missing = [i for i, r in enumerate(records) if "question" not in r or "answer" not in r]
    if missing:
        raise ConfigError(f"{path}: records {missing[:5]} lack 'question' or 'answer'")
    return [(r["question"], f"{r['question']} {r['answer'].replace(chr(10), ' ')}") for r in records]


def answer_starts(tokenizer, questions: list[str]) -> torch.Tensor:
    """(n,) the index of the first token after each question (where the worked answer begins)."""
    return torch.tensor([len(tokenizer(q)["input_ids"]) for q in questions])


def encode(tokenizer, lines: list[str], seq_len: int):
    """Right-padded ids and mask (len(lines), seq_len); lines longer than seq_len are cut."""
    enc = tokenizer(lines, return_tensors="pt", padding="max_length", truncation=True, max_length=seq_len)
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def base_token_nll(model, ids: torch.Tensor, mask: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """The model's NLL of x_{j+1} at every position j: (n, seq), +inf where there is no target."""
    out = []
    for i in range(0, len(ids), batch):
        x, m = ids[i:i + batch], mask[i:i + batch]
        logp = torch.log_softmax(model(input_ids=x, attention_mask=m).logits.float(), -1)
        nll = -logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0]
        valid = m[:, 1:].bool()
        nll = torch.cat([nll.masked_fill(~valid, float("inf")), torch.full_like(nll[:, :1], float("inf"))], 1)
        out.append(nll)
    return torch.cat(out)


def hardest_positions(nll: torch.Tensor, k: int, starts: torch.Tensor | None = None) -> torch.Tensor:
    """(n, k) positions j whose next token is hardest, among j >= starts - 1 (the next token is in
    the answer; default j >= 1); -1 where a line has fewer candidates."""
    scores = nll.clone()
    first = torch.ones(len(nll), dtype=torch.long) if starts is None else (starts - 1).clamp(min=1)
    before = torch.arange(nll.shape[1])[None, :] < first[:, None]
    scores = scores.masked_fill(before | torch.isinf(scores), -1.0)
    top = scores.topk(k, dim=1)
    return torch.where(top.values >= 0, top.indices, torch.full_like(top.indices, -1)).sort(dim=1).values


def train_arm(model, tokenizer, meta, head, cfg, ids, mask, positions, *, log=print) -> list[dict]:
    """cfg.steps optimiser steps over the training lines in a seeded order; returns the log."""
    from qstar_mini.train import QuietStarModule, build_optimizer, make_schedule

    module = QuietStarModule(model, meta, head)
    optimizer, history = build_optimizer(module, cfg), []
    scheduler = make_schedule(optimizer, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(ids), generator=g)
    model.train()
    for step in range(cfg.steps):
        rows = order[(torch.arange(cfg.batch_size) + step * cfg.batch_size) % len(ids)]
        out = quiet_star_step(model, meta, head, ids[rows], mask[rows], cfg, positions=positions[rows],
                              generator=g, step=step)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                       cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        row = {"step": step + 1, "loss": float(out.loss.detach()), "base_nll": float(out.base_nll.detach())}
        if cfg.think:
            row |= {"talk_nll": float(out.talk_nll.detach()), "w": float(out.w[..., 0].detach().mean())}
        history.append(row)
        if step % 10 == 0 or step == cfg.steps - 1:
            log(json.dumps(row))
    model.eval()
    return history


@torch.no_grad()
def nll_at(model, meta, cfg, ids, mask, positions) -> torch.Tensor:
    """The model's plain NLL of x_{j+1} at the given positions: (n, k), nan at -1 slots."""
    out = []
    for i in range(0, len(ids), 8):
        x, m, p = ids[i:i + 8], mask[i:i + 8], positions[i:i + 8]
        h, _ = plain_forward(model, meta, x, m)
        logp = text_log_probs(lm_head(model)(h), meta.ids if cfg.scoring_vocab == "text" else ())
        nxt = token_log_probs(logp[:, :-1], x[:, 1:])                        # (b, seq - 1)
        nll = -at_positions(torch.cat([nxt, nxt[:, :1]], 1), p)
        out.append(nll.masked_fill(p < 0, float("nan")))
    return torch.cat(out)


@torch.no_grad()
def thinking_nll_at(model, meta, head, cfg, ids, mask, positions, seed: int = 1) -> torch.Tensor:
    """NLL of x_{j+1} from the mixed post-thought prediction, mean over the n_thoughts sampled
    thoughts: (n, k), nan at -1 slots."""
    out, g = [], torch.Generator().manual_seed(seed)
    for i in range(0, len(ids), 8):
        x, m, p = ids[i:i + 8], mask[i:i + 8], positions[i:i + 8]
        step = quiet_star_step(model, meta, head, x, m, cfg, positions=p, generator=g)
        nll = -step.log_p_talk[..., 0].mean(1)                                # (b, k)
        out.append(nll.masked_fill(p < 0, float("nan")))
    return torch.cat(out)


def binned(base: torch.Tensor, other: torch.Tensor) -> list[dict]:
    """Mean gain (base NLL - other NLL) per bin of the base's NLL."""
    rows = []
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        sel = (base >= lo) & (base < hi) & ~torch.isnan(base)
        rows.append({"bin": f"{lo:g}-{hi:g}", "tokens": int(sel.sum()),
                     "gain": float((base - other)[sel].mean()) if sel.any() else None})
    return rows


def run(model_name="smollm2", steps: int | None = None, out_dir=RUNS_DIR / "real", seed: int = 0,
        log=print) -> dict:
    from qstar_mini.models.tiny import load_model

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = REAL.replace(seed=seed, **({"steps": steps} if steps is not None else {}))
    problems = problem_lines()
    train, test = problems[:TRAIN_LINES], problems[-TEST_LINES:]
    test_lines = [line for _, line in test]
    base, tokenizer = load_model(model_name)
    train_ids, train_mask = encode(tokenizer, [line for _, line in train], cfg.seq_len)
    test_ids, test_mask = encode(tokenizer, test_lines, cfg.seq_len)
    train_pos = hardest_positions(base_token_nll(base, train_ids, train_mask), HARD_PER_LINE,
                                  answer_starts(tokenizer, [q for q, _ in train]))
    test_nll = base_token_nll(base, test_ids, test_mask)
    test_pos = hardest_positions(test_nll, HARD_PER_LINE, answer_starts(tokenizer, [q for q, _ in test]))
    base_at = torch.stack([test_nll[i, p.clamp(min=0)] for i, p in enumerate(test_pos)]).masked_fill(test_pos < 0, float("nan"))
    examples = [{"line": test_lines[i][:160],
                 "hard_tokens": [tokenizer.decode(test_ids[i, j + 1]) for j in test_pos[i].tolist() if j >= 0]}
                for i in range(3)]
    del base
    result = {"settings": cfg.to_dict(), "hard_per_line": HARD_PER_LINE, "train_lines": TRAIN_LINES,
              "test_lines": TEST_LINES, "model": str(model_name), "examples": examples,
              "nll_at_hard_tokens": {"base": float(base_at.nanmean())}}
    for arm, think in (("control", False), ("quiet_star", True)):
        torch.manual_seed(seed)
        model, tok = load_model(model_name)
        arm_cfg = cfg.replace(think=think)
        meta, head = prepare_model(model, tok, arm_cfg)
        a0 = time.perf_counter()
        log(f"--- {arm}: {arm_cfg.steps} steps")
        history = train_arm(model, tok, meta, head, arm_cfg, train_ids, train_mask, train_pos, log=log)
        plain = nll_at(model, meta, arm_cfg, test_ids, test_mask, test_pos)
        result["nll_at_hard_tokens"][arm] = float(plain.nanmean())
        result[f"{arm}_seconds"] = round(time.perf_counter() - a0, 1)
        result[f"{arm}_history"] = history
        result[f"{arm}_gain_by_base_nll"] = binned(base_at, plain)
        if think:
            thinking = thinking_nll_at(model, meta, head, arm_cfg, test_ids, test_mask, test_pos)
            result["nll_at_hard_tokens"]["quiet_star_thinking"] = float(thinking.nanmean())
            result["quiet_star_thinking_gain_by_base_nll"] = binned(base_at, thinking)
            result["thoughts"] = thought_examples(model, tok, meta, head, arm_cfg, test_ids[:3], test_mask[:3],
                                                  test_pos[:3])
        del model
    result["seconds"] = round(time.perf_counter() - t0, 1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    log(format_table(result))
    return result


@torch.no_grad()
def thought_examples(model, tokenizer, meta, head, cfg, ids, mask, positions) -> list[dict]:
    step = quiet_star_step(model, meta, head, ids, mask, cfg, positions=positions, greedy=True)
    rows = []
    for b in range(ids.shape[0]):
        for slot, j in enumerate(positions[b].tolist()):
            if j < 0:
                continue
            rows.append({"context_end": tokenizer.decode(ids[b, max(0, j - 6): j + 1]),
                         "next": tokenizer.decode(ids[b, j + 1]),
                         "thought": tokenizer.decode(step.thoughts[b, 0, slot, 1:-1]),
                         "w": round(float(step.w[b, 0, slot, 0]), 3)})
    return rows


def format_table(result: dict) -> str:
    n = result["nll_at_hard_tokens"]
    lines = ["NLL of the true next token at the base's 4 hardest answer positions of each held-out line:",
             f"  base model                         {n['base']:.3f}",
             f"  control (fine-tuned, no thoughts)   {n['control']:.3f}",
             f"  Quiet-STaR model, not thinking     {n['quiet_star']:.3f}",
             f"  Quiet-STaR model, thinking         {n['quiet_star_thinking']:.3f}",
             "gain over the base by the base's NLL of the token (control / Quiet-STaR thinking):"]
    for c, q in zip(result["control_gain_by_base_nll"], result["quiet_star_thinking_gain_by_base_nll"]):
        fmt = lambda x: "-" if x is None else f"{x:+.3f}"
        lines.append(f"  {c['bin']:>8} nats ({c['tokens']:3d} tokens): {fmt(c['gain'])} / {fmt(q['gain'])}")
    lines.append(f"time: {result['seconds']:.0f} s (control {result['control_seconds']:.0f} s, "
                 f"Quiet-STaR {result['quiet_star_seconds']:.0f} s)")
    return "\n".join(lines)


def add_real_arguments(parser: argparse.ArgumentParser) -> None:
    """``qstar-mini real``'s flags; their defaults are :func:`run`'s and :data:`REAL`'s."""
    from qstar_mini.cli.args import positive_int

    defaults = inspect.signature(run).parameters
    parser.add_argument("--model", default=defaults["model_name"].default, metavar="NAME_OR_DIR",
                        help="a model folder or the short name of a fetched model (default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=REAL.steps, metavar="N",
                        help="optimiser steps per arm (default: %(default)s)")
    parser.add_argument("--out", default=str(defaults["out_dir"].default), metavar="DIR",
                        help="where report.json goes (default: %(default)s)")


def run_real(args: argparse.Namespace) -> int:
    """``qstar-mini real``: :func:`run` with the flags of :func:`add_real_arguments`."""
    run(args.model, args.steps, args.out)
    return 0
