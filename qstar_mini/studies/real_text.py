"""Quiet-STaR on a real pretrained model (SmolLM2-135M), as a controlled experiment.

The question: after Quiet-STaR training, does the *content* of the thought change the prediction
of the tokens a thought could work out, or would training without a thought, on the same loss,
do as well? The numbers are in ``docs/results/real_report.json`` and ``docs/real-model.md``; this
docstring says only how they are made.

**Text.** The project's GSM8K-format word problems (``data/gsm8k_format.jsonl``), question and
worked answer as one line: ``... The shells cost 4*4=16 dollars, so the change is 20-16=4
dollars. #### 4``. Problems are split **by template** (:func:`template_of`): the held-out
templates (default ``two_step`` and ``change``, two operations each) never occur in training,
whose templates (``add``, ``sub``, ``mul``, ``div``) use the same four operations one at a time.

**Scored tokens.** Each answer token (the token x_{j+1} predicted at position j) falls in one
category (:func:`token_categories`): ``result`` (the digits right after ``=``, which the numbers
before them determine: where a thought could help), ``other_digit`` (operands copied from the
question, the number after ``####``), ``operator`` (``+ - * / =``), ``hash`` (`` ####``) and
``words`` (everything else: words, spaces, punctuation of the template). Training thinks only
before ``result`` tokens; evaluation reports every category apart.

**The arms**, per seed (paper notation, official names beside):

* ``base``: SmolLM2 untrained.
* ``quiet_star``: Algorithm 1 with thoughts of t tokens (``n_ahead``) at the positions j whose
  next token is a result, n_true (``n_ahead_talk``) true tokens after each thought, n_thoughts
  (``n_passes``) thoughts per position; loss = 0.5 * base NLL over every token + 0.5 * talk
  NLL over the entries (j, i) above + REINFORCE.
* ``control``: the same loss with the thought removed: 0.5 * base NLL over every token + 0.5 *
  the no-thought NLL -log p^init(x_{j+1+i}) over exactly the same entries (j, i), pooled the same
  way (``talk_nll_pooling``). This is the Quiet-STaR loss with the mixing weight w held at 0 (the
  mixed prediction is then the no-thought prediction) and without REINFORCE, which only trains
  which thought is sampled. So the scored tokens get the same weight in both arms, and the
  other tokens the same loss.
* The trained Quiet-STaR model evaluated (a) ``own``: with its own sampled thoughts (the mixed
  prediction log p^talk, NLL averaged over the n_thoughts thoughts); (b) ``random``: with
  thoughts of the same length made of uniformly random ordinary token ids; (c) ``shuffled``:
  with its own thoughts moved to other positions (of any line of the evaluation batch); (d)
  ``no_thought``: its plain next-token prediction, no thought generated (w = 0: the path the
  mixing weight gives to the prediction without a thought). (b) and (c) go through the same
  meta-tokens and mixing head as (a), so (a) - (b) and (a) - (c) measure what the thought's
  content adds. (a)-(c) think at the positions whose next token is in ``think_at`` (default:
  the results only, where training thought; thinking at every answer token multiplies the
  evaluation's cost, see docs/real-model.md), the other categories are then "not run" for
  them; (d) and the other arms are measured at every answer token.

**Equal terms** between ``control`` and ``quiet_star`` of one seed: the same starting weights
(meta-tokens and mixing head are added to both; the control never uses them), the same
training lines in the same order and batches, the same number of optimiser steps, AdamW with
the same learning rates and warm-up, the same gradient clipping norm, the same scored entries
with the same weights. What differs is only what the thought brings: the talk prediction passes
through a thought and the mixing head, the REINFORCE term trains the sampling, and these extra
gradients share the one clipping norm. The seed sets the line order, the thought samples and
the evaluation's samples; the base needs no seed.

Held-out numbers are the NLL of the true next token x_{j+1}, averaged per category over the
held-out lines' answer tokens (a token belongs to the answer if it starts after the space that
joins question and answer); each seed gives one number per arm and category, reported as mean and
sample standard deviation over the seeds, and the paired differences per seed likewise.

:func:`run_experiment` runs it (``RealSettings``); :func:`render_table` renders the report as
Markdown (``docs/real-model.md`` holds it between ``<!-- real-table -->`` markers,
:func:`update_page`), :func:`render_headline` its short form for README.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qstar_mini.config import QuietStarConfig, official
from qstar_mini.data import read_jsonl
from qstar_mini.errors import ConfigError
from qstar_mini.lm import lm_head, text_log_probs
from qstar_mini.losses import combined_loss, future_targets, talk_nll, token_log_probs
from qstar_mini.mixing import mix_log_probs, mixing_weight
from qstar_mini.paths import DATA_DIR, RUNS_DIR
from qstar_mini.fast.rescore import rescore_thoughts
from qstar_mini.step import at_positions, prepare_model, quiet_star_step, scoring_ids
from qstar_mini.models.check import resolve_attention
from qstar_mini.thoughts import generate_thoughts, plain_forward

# The official step's structure with the tiny preset's choices where a few dozen steps on a CPU
# need them: a bounded mixing weight that starts at 0.05 (the base, nearly), the summed log p(T_j)
# with weight 1, a larger learning rate, and the meta-tokens out of the scoring softmax (so adding
# them leaves the base's predictions unchanged).
REAL = official(thought_length=8, n_true=2, n_thoughts=2, seq_len=80, batch_size=4, steps=30,
                lr=1e-5, mixer_lr=1e-3, mixer_depth=1, mixer_sigmoid=True, mixer_bias_init=-3.0,
                mixer_init="default", policy_loss_weight=1.0, reinforce_reduction="sum", scoring_vocab="text",
                policy_positions="real", lr_schedule="constant", warmup_steps=5, weight_decay=0.0,
                decay_meta_tokens=False, attention="auto")

CATEGORIES = ("result", "other_digit", "operator", "hash", "words")
CATEGORY_NAMES = {"result": "results after `=`", "other_digit": "other digits", "operator": "operators",
                  "hash": "`####`", "words": "words and template"}
ARMS = ("base", "control", "quiet_star", "random", "shuffled", "no_thought")
ARM_NAMES = {"base": "base (untrained)", "control": "control (no thought, same loss weights)",
             "quiet_star": "Quiet-STaR, own thoughts", "random": "Quiet-STaR, random thoughts",
             "shuffled": "Quiet-STaR, thoughts shuffled across positions",
             "no_thought": "Quiet-STaR, no thought"}
# Paired differences per seed, (a, b): NLL of a minus NLL of b; negative = a predicts better.
DIFFERENCES = (("quiet_star", "control"), ("no_thought", "control"), ("quiet_star", "no_thought"),
               ("quiet_star", "random"), ("quiet_star", "shuffled"))

# The project's six GSM8K-format templates (qstar_mini.data.GSM_TEMPLATES), each recognised by a
# phrase of its question that no other template has.
TEMPLATES = {
    "add": r" gets \d+ more\. How many",
    "sub": r" gives \d+ of them to a friend\.",
    "mul": r" buys \d+ boxes of ",
    "div": r" shares \d+ \w+ equally among ",
    "two_step": r" buys \d+ more and then gives ",
    "change": r" pays with a \$\d+ note\.",
}


@dataclass
class RealSettings:
    """The experiment's settings; every field has a ``help`` for the command line."""

    model: str = field(default="smollm2", metadata={"help": "a model folder or the short name of a fetched model"})
    data: str = field(default=str(DATA_DIR / "gsm8k_format.jsonl"),
                      metadata={"help": "GSM8K-format JSONL (question, answer) made by the project's templates"})
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "one trained control and Quiet-STaR per seed"})
    steps: int = field(default=20, metadata={"help": "optimiser steps per arm and seed"})
    batch_size: int = field(default=REAL.batch_size, metadata={"help": "lines per step (b)"})
    train_lines: int = field(default=0, metadata={"help": "training lines to use, 0: all of the training templates"})
    test_lines: int = field(default=0, metadata={"help": "held-out lines to evaluate, 0: all of the held-out templates"})
    held_out: tuple[str, ...] = field(default=("two_step", "change"),
                                      metadata={"help": "templates held out of training (the others train)"})
    seq_len: int = field(default=REAL.seq_len, metadata={"help": "tokens per line (the longest problem must fit)"})
    lr: float = field(default=REAL.lr, metadata={"help": "learning rate of the LM and meta-tokens"})
    thought_length: int = field(default=REAL.thought_length,
                                metadata={"help": "t, thought tokens incl. both meta-tokens (official n_ahead)"})
    n_thoughts: int = field(default=REAL.n_thoughts, metadata={"help": "thoughts per position (official n_passes)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    think_at: tuple[str, ...] = field(default=("result",),
                                      metadata={"help": "categories whose positions think when the thought arms "
                                                        "are evaluated (all of them: a slower evaluation)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (1 avoids spin-waiting on a busy machine)"})

    def validate(self) -> None:
        if not self.seeds:
            raise ConfigError("seeds is empty; give at least one seed (three for a mean and spread)")
        for name in ("steps", "batch_size", "threads", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.train_lines < 0 or self.test_lines < 0:
            raise ConfigError("train_lines and test_lines must be >= 0 (0: all)")
        if not self.think_at or any(c not in CATEGORIES for c in self.think_at):
            raise ConfigError(f"think_at must name some of {', '.join(CATEGORIES)} (got {list(self.think_at)})")
        unknown = [t for t in self.held_out if t not in TEMPLATES]
        if unknown or not self.held_out or set(self.held_out) == set(TEMPLATES):
            raise ConfigError(f"held_out must name some but not all of {', '.join(TEMPLATES)} (got {list(self.held_out)})")

    def config(self, seed: int, think: bool = True) -> QuietStarConfig:
        return REAL.replace(seed=seed, steps=self.steps, batch_size=self.batch_size, lr=self.lr, seq_len=self.seq_len,
                            thought_length=self.thought_length, n_thoughts=self.n_thoughts, think=think)


# ============================================================================ the data

def template_of(question: str) -> str:
    """The name of the project template a question was made from; ConfigError if none or several."""
    found = [name for name, pattern in TEMPLATES.items() if re.search(pattern, question)]
    if len(found) != 1:
        raise ConfigError(f"question {question[:60]!r} matches {len(found)} of the project's templates "
                          f"(needs exactly one); use data made by 'qstar-mini data'")
    return found[0]


def problem_lines(path=DATA_DIR / "gsm8k_format.jsonl") -> list[tuple[str, str]]:
    """Each GSM8K-format record as (question, the whole line: question, a space, the worked answer)."""
    records = read_jsonl(Path(path))
    missing = [i for i, r in enumerate(records) if "question" not in r or "answer" not in r]
    if missing:
        raise ConfigError(f"{path}: records {missing[:5]} lack 'question' or 'answer'; give a GSM8K-format file")
    return [(r["question"], f"{r['question']} {r['answer'].replace(chr(10), ' ')}") for r in records]


def split_by_template(problems: list[tuple[str, str]], held_out: tuple[str, ...]):
    """(train, test): the problems of the other templates, and those of the ``held_out`` ones."""
    train = [p for p in problems if template_of(p[0]) not in held_out]
    test = [p for p in problems if template_of(p[0]) in held_out]
    if not train or not test:
        raise ConfigError(f"the split by template left {len(train)} training and {len(test)} held-out "
                          f"problems; hold out other templates")
    return train, test


def result_spans(line: str) -> list[tuple[int, int]]:
    """Character spans of the arithmetic results: the digits right after each ``=``."""
    return [m.span(1) for m in re.finditer(r"=(\d+)", line)]


def token_categories(line: str, offsets: list[tuple[int, int]], answer_start: int) -> list[str | None]:
    """The category (:data:`CATEGORIES`) of each token of ``line`` (by its character offsets),
    None for the question's tokens and for padding. A token belongs to the answer if it starts
    at or after ``answer_start``; the answer's first word, whose token begins with the space that
    joins question and answer, is therefore counted with the question."""
    results = result_spans(line)
    out = []
    for a, b in offsets:
        text = line[a:b].strip()
        if b <= a or a < answer_start:
            out.append(None)
        elif text == "####":
            out.append("hash")
        elif text in ("+", "-", "*", "/", "="):
            out.append("operator")
        elif text.isdigit():
            out.append("result" if any(s <= a and b <= e for s, e in results) else "other_digit")
        else:
            out.append("words")
    return out


@dataclass
class Encoded:
    """Lines as tensors. ids, mask: (n, seq) right-padded. target: (n, seq) long, the category
    index (in :data:`CATEGORIES`) of the next token x_{j+1} at each position j, -1 where x_{j+1} is
    not an answer token."""

    ids: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor
    lines: list[str]

    def positions(self, categories: tuple[str, ...]) -> torch.Tensor:
        """(n, m) the positions j whose next token is in ``categories``, -1-padded to the longest row."""
        codes = torch.tensor([CATEGORIES.index(c) for c in categories])
        hit = torch.isin(self.target, codes)
        m = max(1, int(hit.sum(1).max()))
        pos = torch.full((len(hit), m), -1, dtype=torch.long)
        for i, row in enumerate(hit):
            js = row.nonzero()[:, 0]
            pos[i, :len(js)] = js
        return pos


def encode(tokenizer, problems: list[tuple[str, str]], seq_len: int) -> Encoded:
    """Tokenize (question, line) pairs; ConfigError if a line needs more than seq_len tokens."""
    lines = [line for _, line in problems]
    enc = tokenizer(lines, padding="max_length", truncation=False, max_length=seq_len, return_offsets_mapping=True)
    longest = max(len(x) for x in enc["input_ids"])
    if longest > seq_len:
        raise ConfigError(f"a line has {longest} tokens, more than seq_len = {seq_len}; raise seq_len to {longest}")
    target = torch.full((len(lines), seq_len), -1, dtype=torch.long)
    for i, ((question, line), offsets, m) in enumerate(zip(problems, enc["offset_mapping"], enc["attention_mask"])):
        cats = token_categories(line, [o if k else (0, 0) for o, k in zip(offsets, m)], len(question) + 1)
        for k, c in enumerate(cats):
            if c is not None and k >= 1:
                target[i, k - 1] = CATEGORIES.index(c)
    return Encoded(torch.tensor(enc["input_ids"]), torch.tensor(enc["attention_mask"]), target, lines)


# ============================================================================ training

def control_step(model, meta, cfg: QuietStarConfig, ids, mask, positions) -> torch.Tensor:
    """The control's loss: the Quiet-STaR loss with the thought removed.

    ``base_loss_weight`` * the NLL of every token + (1 - ``base_loss_weight``) * the no-thought
    NLL -log p^init(x_{j+1+i}) over the same (position j, offset i) entries the Quiet-STaR arm's
    talk NLL covers, pooled by ``talk_nll_pooling`` like it. positions: (b, m), -1 slots unused.
    """
    out = quiet_star_step(model, meta, None, ids, mask, cfg.replace(think=False))
    _, valid = future_targets(ids, mask, cfg.n_true)
    valid = at_positions(valid, positions) & (positions >= 0)[..., None]    # (b, m, n_true)
    log_p = at_positions(out.log_p_init, positions)[:, None]                # (b, 1, m, n_true)
    _, scored = talk_nll(log_p, valid, cfg.talk_nll_pooling)
    return combined_loss(out.base_nll, scored, torch.zeros(()), cfg.base_loss_weight, 0.0)


def train_arm(model, meta, head, cfg: QuietStarConfig, data: Encoded, positions, *, log=print) -> list[dict]:
    """cfg.steps optimiser steps over the lines in a seeded order: Quiet-STaR when cfg.think,
    else the control (:func:`control_step`). Returns the per-step log."""
    from qstar_mini.train import QuietStarModule, build_optimizer, make_schedule

    module = QuietStarModule(model, meta, head)
    optimizer, history = build_optimizer(module, cfg), []
    scheduler = make_schedule(optimizer, cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(data.ids), generator=g)
    model.train()
    for step in range(cfg.steps):
        rows = order[(torch.arange(cfg.batch_size) + step * cfg.batch_size) % len(data.ids)]
        device = model.get_input_embeddings().weight.device
        x, m, p = data.ids[rows].to(device), data.mask[rows].to(device), positions[rows].to(device)
        if cfg.think:
            out = quiet_star_step(model, meta, head, x, m, cfg, positions=p, generator=g, step=step)
            loss = out.loss
            row = {"talk_nll": float(out.talk_nll.detach()), "w": float(out.w[..., 0].detach().mean())}
        else:
            loss, row = control_step(model, meta, cfg, x, m, p), {}
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                       cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        history.append({"step": step + 1, "loss": float(loss.detach()), **row})
        if step % 10 == 0 or step == cfg.steps - 1:
            log(json.dumps(history[-1]))
    model.eval()
    return history


# ============================================================================ evaluation

@torch.no_grad()
def plain_nll(model, meta, cfg: QuietStarConfig, ids, mask) -> torch.Tensor:
    """(n, seq) the plain (no-thought) NLL of x_{j+1} at every position j (garbage where there is
    no next token: read it through a category mask)."""
    h, _ = plain_forward(model, meta, ids, mask)
    logp = text_log_probs(lm_head(model)(h), scoring_ids(meta, cfg))
    nxt = token_log_probs(logp[:, :-1], ids[:, 1:])
    return -torch.cat([nxt, nxt[:, -1:]], 1)


@torch.no_grad()
def own_thoughts(model, meta, cfg: QuietStarConfig, ids, mask, positions, generator) -> torch.Tensor:
    """(b, n_thoughts, m, t) thoughts sampled by the model at ``positions`` (as in training)."""
    _, cache = plain_forward(model, meta, ids, mask)
    return generate_thoughts(model, meta, ids, mask, cache, cfg.thought_length, cfg.n_thoughts,
                             thought_temperature=cfg.thought_temperature,
                             reinforce_temperature=cfg.reinforce_temperature, generator=generator,
                             positions=positions.clamp(min=0), attention=resolve_attention(model, meta, cfg)).ids


def random_thoughts(thoughts: torch.Tensor, allowed: torch.Tensor, generator) -> torch.Tensor:
    """The same meta-tokens around t - 2 ids drawn uniformly from ``allowed``."""
    out = thoughts.clone()
    pick = torch.randint(len(allowed), out[..., 1:-1].shape, generator=generator)
    out[..., 1:-1] = allowed[pick].to(out.device)
    return out


def shuffled_thoughts(thoughts: torch.Tensor, positions: torch.Tensor, generator) -> torch.Tensor:
    """Every real slot (positions >= 0) of the batch gets the thoughts of another real slot, of
    the same or another line: a random order, shifted by one, so no slot keeps its own."""
    out = thoughts.clone()
    b, m = (positions.cpu() >= 0).nonzero(as_tuple=True)
    if len(b) < 2:
        raise ConfigError("shuffling thoughts needs at least two thinking positions in a batch; evaluate more lines")
    order = torch.randperm(len(b), generator=generator)
    src = order.roll(1)
    b, m, order, src = (t.to(thoughts.device) for t in (b, m, order, src))
    out[b[order], :, m[order]] = thoughts[b[src], :, m[src]]
    return out


@torch.no_grad()
def thought_nll(model, meta, head, cfg: QuietStarConfig, ids, mask, positions, thoughts) -> torch.Tensor:
    """(b, m) NLL of x_{j+1} from the mixed prediction log p^talk after the given thoughts
    (b, n_thoughts, m, t), averaged over the thoughts; nan at -1 slots."""
    h_init, _ = plain_forward(model, meta, ids, mask)
    p = positions.clamp(min=0)
    h_thought = rescore_thoughts(model, meta, ids, mask, thoughts, 1, positions=p).h_thought[:, :, :, 0]
    h_init_at = at_positions(h_init, p)[:, None].expand_as(h_thought)          # (b, n, m, hidden)
    w = mixing_weight(head, h_init_at, h_thought, cfg.mixing, cfg.mixer_sigmoid)
    logp = mix_log_probs(lm_head(model), h_init_at, h_thought, w, cfg.mixing, scoring_ids(meta, cfg))
    target = ids.gather(1, (p + 1).clamp(max=ids.shape[1] - 1))[:, None].expand(w.shape)
    nll = -token_log_probs(logp, target).mean(1)
    return nll.masked_fill(positions < 0, float("nan"))


def by_category(nll: torch.Tensor, target: torch.Tensor, only=CATEGORIES) -> dict[str, float | None]:
    """Mean of nll (same shape as target) over the entries of each category; None outside ``only``."""
    return {c: float(nll[target == k].mean()) if c in only else None for k, c in enumerate(CATEGORIES)}


def evaluate_arm(model, meta, head, cfg: QuietStarConfig, data: Encoded, *, seed: int = 0,
                 variants=("quiet_star", "random", "shuffled"), think_at=CATEGORIES, exclude_ids=(),
                 batch: int = 8) -> dict[str, dict]:
    """Held-out NLL per category: ``no_thought`` (plain prediction) everywhere, and (with a
    ``head``) for each of ``variants`` (own, random, shuffled thoughts) at the positions whose next
    token is in ``think_at`` (None for the other categories); {arm: {category: nll}}.
    Random thoughts draw from every id of the embedding but the meta-tokens and ``exclude_ids``
    (the tokenizer's special tokens)."""
    g = torch.Generator().manual_seed(seed)
    skip = set(meta.ids) | set(exclude_ids)
    allowed = torch.tensor([i for i in range(model.get_input_embeddings().weight.shape[0]) if i not in skip])
    positions_all = data.positions(tuple(think_at))
    device = model.get_input_embeddings().weight.device
    plain = torch.cat([plain_nll(model, meta, cfg, data.ids[i:i + batch].to(device),
                                 data.mask[i:i + batch].to(device)).cpu() for i in range(0, len(data.ids), batch)])
    out = {"no_thought": by_category(plain, data.target)}
    if head is None:
        return out
    per_variant = {v: torch.full(data.target.shape, float("nan")) for v in variants}
    for i in range(0, len(data.ids), batch):
        x, m, p = (t[i:i + batch].to(device) for t in (data.ids, data.mask, positions_all))
        own = own_thoughts(model, meta, cfg, x, m, p, g)
        made = {"quiet_star": own, "random": random_thoughts(own, allowed, g),
                "shuffled": shuffled_thoughts(own, p, g)}
        p_cpu = p.cpu()
        rows, real = torch.arange(len(x))[:, None].expand_as(p_cpu), p_cpu >= 0
        for v in variants:
            nll = thought_nll(model, meta, head, cfg, x, m, p, made[v]).cpu()
            per_variant[v][i + rows[real], p_cpu[real]] = nll[real]
    for v in variants:
        out[v] = by_category(per_variant[v], data.target, tuple(think_at))
    return out


# ============================================================================ the experiment

def summarise(per_seed: list[dict]) -> dict:
    """Mean and sample std over seeds of every arm x category, and of the paired differences."""
    def stats(values):
        values = [v for v in values if v is not None and not math.isnan(v)]
        return {"mean": statistics.fmean(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)}

    arms = {a: {c: stats([s["nll"][a][c] for s in per_seed]) for c in CATEGORIES} for a in ARMS}
    def minus(x, y):
        return None if x is None or y is None else x - y

    diffs = {f"{a}-{b}": {c: stats([minus(s["nll"][a][c], s["nll"][b][c]) for s in per_seed]) for c in CATEGORIES}
             for a, b in DIFFERENCES}
    return {"nll": arms, "differences": diffs}


def machine() -> dict:
    import os

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return {"platform": platform.platform(), "processor": name,
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_experiment(settings: RealSettings, out_dir, log=print) -> dict:
    """Run every arm for every seed; write ``out_dir/real_report.json`` after each seed (its
    ``complete`` says whether all seeds are in) and return the report."""
    from qstar_mini.models.tiny import load_model

    settings.validate()
    t0 = time.perf_counter()
    torch.set_num_threads(settings.threads)
    train, test = split_by_template(problem_lines(settings.data), settings.held_out)
    train = train[:settings.train_lines or None]
    test = test[:settings.test_lines or None]
    base_model, tokenizer = load_model(settings.model, device=settings.device)
    cfg0 = settings.config(settings.seeds[0])
    train_data = encode(tokenizer, train, cfg0.seq_len)
    test_data = encode(tokenizer, test, cfg0.seq_len)
    counts = {c: int((test_data.target == k).sum()) for k, c in enumerate(CATEGORIES)}
    train_pos = train_data.positions(("result",))
    meta, _ = prepare_model(base_model, tokenizer, cfg0)
    base = evaluate_arm(base_model, meta, None, cfg0, test_data)["no_thought"]
    del base_model
    report = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()},
              "config": cfg0.to_dict(), "machine": machine(),
              "train_problems": len(train), "test_problems": len(test),
              "train_templates": sorted({template_of(q) for q, _ in train}),
              "test_templates": sorted({template_of(q) for q, _ in test}),
              "test_tokens": counts, "train_result_positions": int((train_pos >= 0).sum()),
              "per_seed": [], "complete": False}
    out_path = Path(out_dir) / "real_report.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for seed in settings.seeds:
        row = {"seed": seed, "nll": {"base": base}, "seconds": {}}
        for arm, think in (("control", False), ("quiet_star", True)):
            a0 = time.perf_counter()
            torch.manual_seed(seed)
            model, tok = load_model(settings.model, device=settings.device)
            cfg = settings.config(seed, think=think)
            meta, head = prepare_model(model, tok, cfg)
            log(f"--- seed {seed}, {arm}: {cfg.steps} steps")
            history = train_arm(model, meta, head, cfg, train_data, train_pos, log=log)
            row["seconds"][f"{arm}_train"] = round(time.perf_counter() - a0, 1)
            a1 = time.perf_counter()
            if think:
                result = evaluate_arm(model, meta, head, cfg, test_data, seed=seed + 1000,
                                      think_at=settings.think_at, exclude_ids=tok.all_special_ids)
                row["nll"] |= result
            else:
                row["nll"]["control"] = evaluate_arm(model, meta, None, cfg, test_data)["no_thought"]
            row["seconds"][f"{arm}_eval"] = round(time.perf_counter() - a1, 1)
            row[f"{arm}_history"] = history
            del model
        report["per_seed"].append(row)
        report["summary"] = summarise(report["per_seed"])
        report["complete"] = len(report["per_seed"]) == len(settings.seeds)
        report["seconds"] = round(time.perf_counter() - t0, 1)
        out_path.write_text(json.dumps(report, indent=1) + "\n")
        log(render_table(report))
    return report


# ============================================================================ the table

def _cell(s: dict) -> str:
    if s["mean"] is None:
        return "not run"
    return f"{s['mean']:.3f}" if s["std"] is None else f"{s['mean']:.3f} ± {s['std']:.3f}"


def render_table(report: dict) -> str:
    """The report as Markdown: NLL per arm and category, then the paired differences."""
    summary, counts = report["summary"], report["test_tokens"]
    seeds = [s["seed"] for s in report["per_seed"]]
    head = "| arm | " + " | ".join(f"{CATEGORY_NAMES[c]} ({counts[c]})" for c in CATEGORIES) + " |"
    rule = "|---|" + "---|" * len(CATEGORIES)
    lines = [f"Held-out NLL of the true next token (nats), mean ± std over seeds {seeds} "
             f"({report['test_problems']} problems of templates {', '.join(report['test_templates'])}; "
             f"token counts in brackets; lower is better):", "", head, rule]
    for arm in ARMS:
        lines.append(f"| {ARM_NAMES[arm]} | " + " | ".join(_cell(summary["nll"][arm][c]) for c in CATEGORIES) + " |")
    lines += ["", "Paired differences per seed (NLL of the first minus the second; negative: the first predicts "
              "better), mean ± std over the seeds:", "", head.replace("| arm |", "| difference |"), rule]
    for a, b in DIFFERENCES:
        d = summary["differences"][f"{a}-{b}"]
        lines.append(f"| {ARM_NAMES[a]} − {ARM_NAMES[b]} | " + " | ".join(_cell(d[c]) for c in CATEGORIES) + " |")
    status = "" if report["complete"] else " (incomplete: not every seed has run)"
    lines += ["", f"{report['settings']['steps']} steps of {report['settings']['batch_size']} lines per arm, "
              f"{report['train_problems']} training problems; {report['seconds'] / 60:.0f} min on "
              f"{report['machine']['processor']} ({report['machine']['threads']} torch thread(s)){status}."]
    return "\n".join(lines)


def render_headline(report: dict) -> str:
    """The short form for README: the scored category (results after ``=``) only, the arms that
    answer the question, and the paired content differences."""
    nll, diff = report["summary"]["nll"], report["summary"]["differences"]
    seeds = [s["seed"] for s in report["per_seed"]]
    rows = [("base (untrained)", nll["base"]["result"]),
            ("control: the same loss weighting, no thought", nll["control"]["result"]),
            ("Quiet-STaR, own thoughts", nll["quiet_star"]["result"]),
            ("Quiet-STaR, random thoughts", nll["random"]["result"]),
            ("Quiet-STaR, thoughts shuffled across positions", nll["shuffled"]["result"]),
            ("Quiet-STaR, no thought", nll["no_thought"]["result"]),
            ("own minus random thoughts, paired per seed", diff["quiet_star-random"]["result"]),
            ("Quiet-STaR (no thought) minus control, paired per seed", diff["no_thought-control"]["result"])]
    lines = [f"| SmolLM2-135M-Instruct, held-out results after `=` ({report['test_tokens']['result']} tokens) "
             f"| NLL (nats), mean ± std over seeds {seeds} |", "|---|---|"]
    lines += [f"| {name} | {_cell(s)} |" for name, s in rows]
    return "\n".join(lines)


def _markers(kind: str) -> tuple[str, str]:
    return f"<!-- {kind} -->", f"<!-- /{kind} -->"


def update_page(page, report: dict, kind: str = "real-table") -> None:
    """Replace the text between ``<!-- kind -->`` and ``<!-- /kind -->`` in ``page`` by the
    rendering: :func:`render_table` for ``real-table``, :func:`render_headline` for ``real-headline``."""
    page, (start, end) = Path(page), _markers(kind)
    text = page.read_text()
    if start not in text or end not in text:
        raise ConfigError(f"{page} lacks the markers {start} ... {end}; add them where the table goes")
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    body = render_table(report) if kind == "real-table" else render_headline(report)
    page.write_text(f"{before}{start}\n{body}\n{end}{after}")


def page_table(page, kind: str = "real-table") -> str:
    """The text between the ``kind`` markers of ``page`` (what :func:`update_page` wrote)."""
    (start, end), text = _markers(kind), Path(page).read_text()
    if start not in text or end not in text:
        raise ConfigError(f"{page} lacks the markers {start} ... {end}")
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


# ============================================================================ the command line

def add_real_arguments(parser: argparse.ArgumentParser) -> None:
    """``qstar-mini real``'s flags: one per :class:`RealSettings` field (its ``help``, its default),
    and ``--out``. Adds to ``parser``; reads no argv itself."""
    from dataclasses import fields

    from qstar_mini.cli.args import nonnegative_int, positive_float, positive_int
    from qstar_mini.paths import REPO_ROOT

    types = {"steps": positive_int, "batch_size": positive_int, "seq_len": positive_int, "threads": positive_int,
             "thought_length": positive_int, "n_thoughts": positive_int, "train_lines": nonnegative_int,
             "test_lines": nonnegative_int, "lr": positive_float, "seeds": int}
    choices = {"held_out": tuple(TEMPLATES), "think_at": CATEGORIES}
    for f in fields(RealSettings):
        shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else str(f.default)
        shown = shown[len(str(REPO_ROOT)) + 1:] if shown.startswith(str(REPO_ROOT) + "/") else shown
        extra = {"nargs": "+"} if isinstance(f.default, tuple) else {}
        parser.add_argument("--" + f.name.replace("_", "-"), type=types.get(f.name, str), default=f.default,
                            choices=choices.get(f.name), metavar=None if f.name in choices else f.name.upper(),
                            help=f"{f.metadata['help']} (default: {shown})".replace("%", "%%"), **extra)
    parser.add_argument("--out", default=str(RUNS_DIR / "real"), metavar="DIR",
                        help="where real_report.json goes (default: runs/real)")


def run_real(args: argparse.Namespace) -> int:
    """``qstar-mini real``: :func:`run_experiment` with the flags of :func:`add_real_arguments`."""
    from dataclasses import fields

    values = {f.name: getattr(args, f.name) for f in fields(RealSettings)}
    settings = RealSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    run_experiment(settings, args.out)
    return 0
