"""The training loop: Algorithm 1's step, repeated, on Hugging Face Accelerate.

One optimiser step, as a reader meets it below::

    ids, mask   <- the next batch_size lines, each "<s> line </s>", right-padded   (batch, seq)
    out         <- quiet_star_step(model, meta, head, ids, mask, cfg)              qstar_mini.step
    out.loss.backward(); clip gradients to cfg.grad_clip; AdamW step; warmup schedule step

Everything else is bookkeeping a real run needs: periodic evaluation on held-out lines,
metrics in ``metrics.jsonl``, atomic checkpoints (:mod:`qstar_mini.checkpoint`), ``resume``.

**The control.** ``cfg.think=False`` runs the very same loop (same data order, steps,
optimiser, seed) with the plain LM loss: any gain of Quiet-STaR over it is the thinking, not
the extra fine-tuning.

**Two more controls for "thinking is learned"** (issue 4, tier 2): ``policy_loss_weight=0``
turns REINFORCE off (the thoughts are only *used*, never *taught*), and
``shuffle_rewards=True`` keeps REINFORCE but gives each thought the reward of another
thought of the same position, chosen at random (:func:`shuffled_policy_loss`): same reward
statistics, no information about which thought earned it.

**Where thoughts are trained.** ``think_where="all"`` (the paper: a thought after every
token) or ``"answer"`` (only the position that predicts the answer digit, i.e. ``=`` on an
answer-only line ``31415=4``: the "think only where it matters" variant). The latter passes
``positions`` to ``quiet_star_step``, which then makes the thoughts of that one position only
(about 9x cheaper on these lines than thinking everywhere and masking).

**Devices.** ``Accelerator(mixed_precision="bf16" on CUDA, else "no")``; the same code runs on
a CPU, one GPU, or several processes: each process takes its share of every global batch,
gradients are averaged across processes (DDP). Two CPU processes on one machine::

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no -m qstar_mini train ...

(on a machine without GPUs ``--multi_gpu`` starts two torchrun processes that use the CPU
with the gloo backend; with accelerate 1.15 ``--cpu --num_processes 2`` starts *one* process
unless MPI is set up, so the spelling above is the one that works out of the box).
``cfg.batch_size`` is the *global* batch of one optimiser step; with ``grad_accum`` > 1 it is
split into that many micro-batches per process.

**Data position.** Epoch e visits the lines in the order ``randperm(n, seed + e)``; step s
reads positions ``s * batch_size .. (s + 1) * batch_size - 1`` of that endless stream. So the
data position *is* the step number, and a resumed run reads exactly what an uninterrupted one
would have read.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_checkpoint, load_training_state, save_checkpoint
from .files import append_jsonl
from .config import ATTENTION_MODES, MEMORY_MODES, MIXING_MODES, PRESETS, QuietStarConfig, preset
from .data import EQUALS, answer_index, read_jsonl
from .errors import ConfigError, DataError
from .losses import combined_loss, reinforce_loss
from .paths import DATA_DIR, RUNS_DIR, TINY_BASE
from .step import StepOutput, policy_entries, prepare_model, quiet_star_step

THINK_WHERE = ("all", "answer")
LINES = ("answer_only", "all", "working")
CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"


# ============================================================================ data

def load_records(data, split: str = "train", text_field: str = "text",
                 max_lines: int | None = None) -> list[dict]:
    """Training lines as dicts with at least ``"text"``.

    data: a JSONL file; a folder holding ``<split>.jsonl`` (e.g. the repo's ``data/``); a list
    of records already in memory; or a Hugging Face ``datasets`` name, optionally ``"name:config"`` (needs the network unless
    cached), whose ``text_field`` column is used. Broken files raise a one-line DataError.
    """
    if isinstance(data, list):                      # records already in memory
        records = [r for r in data if isinstance(r, dict) and isinstance(r.get(text_field), str)]
        if len(records) != len(data):
            raise DataError(f"every record must be a dict with a string {text_field!r} field")
        records = records if text_field == "text" else [dict(r, text=r[text_field]) for r in records]
        return records[:max_lines] if max_lines else records
    path = Path(os.fspath(data)).expanduser()
    if path.is_dir():
        path = path / f"{split}.jsonl"
    text = os.fspath(data)
    looks_local = path.exists() or path.suffix in (".jsonl", ".json") or text.startswith(("/", ".", "~")) \
        or isinstance(data, os.PathLike) or text.count("/") > 1
    if looks_local:                                  # else "name" or "owner/name": a datasets name
        records = read_jsonl(path, required=(text_field,))
        if text_field != "text":
            records = [dict(r, text=r[text_field]) for r in records]
    else:
        records = _load_hf_dataset(str(data), split, text_field, max_lines)
    return records[:max_lines] if max_lines else records


def _load_hf_dataset(name: str, split: str, text_field: str, max_lines: int | None, *,
                     all_fields: bool = False) -> list[dict]:
    """The first ``max_lines`` records of a ``datasets`` corpus, streamed: nothing past them is read.

    name: ``"name"``, ``"owner/name"`` or either with ``":config"``. The corpus is opened with
    ``datasets.load_dataset(..., streaming=True)`` and only its first ``max_lines`` records are
    taken, so a corpus of many shards (OpenWebMath) is never downloaded whole; a budget is
    therefore required (one-line DataError without one). Returns ``[{"text": ...}]`` with empty
    texts dropped; with ``all_fields`` every record's own fields instead (``"text"`` added from
    ``text_field`` where it is a string; the caller decides about records without one).
    """
    import itertools

    import datasets

    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    if max_lines is None or max_lines < 1:
        raise DataError(f"--data {name!r} is a datasets name: give a line budget with --max-lines N "
                        f"(its first N records are streamed; the corpus is never downloaded whole)")
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        rows = [dict(row) for row in itertools.islice(iter(stream), max_lines)]
    except Exception as e:  # noqa: BLE001 - any failure is one line
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise DataError(f"--data {name!r} is neither a JSONL file nor a loadable datasets name "
                        f"({type(e).__name__}: {first})") from None
    if not rows:
        raise DataError(f"dataset {name!r} split {split!r} has no records")
    if all_fields:
        return [dict(r, text=r[text_field]) if isinstance(r.get(text_field), str) else r for r in rows]
    if text_field not in rows[0]:
        raise DataError(f"dataset {name!r} has no column {text_field!r} (columns: {sorted(rows[0])}); "
                        f"choose one with --text-field")
    return [{"text": r[text_field]} for r in rows if isinstance(r.get(text_field), str) and r[text_field].strip()]


def select_lines(records: list[dict], lines: str = "answer_only") -> list[dict]:
    """``answer_only``: only ``31415=4`` lines; ``working``: only ``31415=(34894)4`` lines;
    ``all``: every line as in the file (records without ``has_working`` always count)."""
    if lines not in LINES:
        raise ConfigError(f"lines must be one of {LINES} (got {lines!r})")
    if lines == "all":
        chosen = records
    else:
        want = lines == "working"
        chosen = [r for r in records if r.get("has_working", want) == want]
    if not chosen:
        raise DataError(f"no training lines left after lines={lines!r}; use lines='all'")
    return chosen


@dataclass
class Encoded:
    """Lines as tensors, each ``<s> line </s>``, right-padded and cut at seq_len.

    input_ids, attention_mask: (n, seq) long.
    answer_pos: (n,) long, token index of the answer digit (-1 when the line has none).
    think_pos:  (n,) long, where ``think_where="answer"`` thinks: the token just before the
                answer digit on a line *without* visible working (the ``=`` of ``31415=4``);
                -1 on lines that show their working or have no answer.
    questions:  the records' "question" field (None when absent), to check thoughts.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_pos: torch.Tensor
    think_pos: torch.Tensor
    questions: list

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_records(tokenizer, records: list[dict], seq_len: int) -> Encoded:
    """Tokenize ``<s> + text + </s>`` (whichever of the two the tokenizer has), right-pad.

    Lines longer than ``seq_len`` tokens are truncated, with a warning that counts them."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows, answer_pos, think_pos, cut = [], [], [], 0
    for r in records:
        enc = tokenizer(r["text"], add_special_tokens=False, return_offsets_mapping=True)
        ids = ([bos] if bos is not None else []) + list(enc["input_ids"]) + ([eos] if eos is not None else [])
        shift = 1 if bos is not None else 0
        pos, think = -1, -1
        try:
            char = answer_index(r["text"])
            starts = [s for s, _ in enc["offset_mapping"]]
            pos = starts.index(char) + shift if char in starts else -1
            if pos > 0 and r["text"][char - 1] == EQUALS:       # answer right after "=": no working
                think = pos - 1
        except DataError:
            pass
        cut += len(ids) > seq_len
        rows.append(ids[:seq_len])
        ok = 0 < pos < min(len(ids), seq_len)
        answer_pos.append(pos if ok else -1)
        think_pos.append(think if ok else -1)
    if cut:
        warnings.warn(f"{cut} of {len(records)} lines are longer than seq_len={seq_len} tokens and were "
                      f"truncated; raise --seq-len to keep them whole", stacklevel=2)
    seq = max(len(x) for x in rows)
    input_ids = torch.full((len(rows), seq), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), seq), dtype=torch.long)
    for i, x in enumerate(rows):
        input_ids[i, : len(x)] = torch.tensor(x)
        attention_mask[i, : len(x)] = 1
    return Encoded(input_ids, attention_mask, torch.tensor(answer_pos), torch.tensor(think_pos),
                   [r.get("question") for r in records])


def think_mask_for(think_pos: torch.Tensor, seq: int, where: str) -> torch.Tensor | None:
    """Which positions' thoughts are trained, as a mask for ``quiet_star_step``: None (= every
    position) for ``"all"``; for ``"answer"`` the position ``think_pos`` (-1: none).

    think_pos: (batch,) long, e.g. :attr:`Encoded.think_pos`.  returns: (batch, seq) bool or None.
    """
    if where == "all":
        return None
    if where != "answer":
        raise ConfigError(f"think_where must be one of {THINK_WHERE} (got {where!r})")
    return (torch.arange(seq, device=think_pos.device)[None] == think_pos[:, None]) & (think_pos[:, None] >= 0)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Line indices of step ``step``: positions step*B .. step*B + B - 1 of the endless stream
    ``randperm(n, seed + 0), randperm(n, seed + 1), ...`` (one permutation per epoch)."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    out, perms = [], {}
    for p in positions:
        epoch, i = divmod(p, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(perms[epoch][i]))
    return torch.tensor(out)


# ============================================================================ the model being trained

class QuietStarModule(nn.Module):
    """The three trained parts in one module, so Accelerate (and DDP) can wrap them at once.

    model: the causal LM.  meta: the meta-token embeddings.  head: the mixing head.
    ``forward`` is one :func:`quiet_star_step` and returns its fields as a dict (DDP finds
    the tensors of a dict, not of a dataclass).
    """

    def __init__(self, model: nn.Module, meta: nn.Module, head: nn.Module):
        super().__init__()
        self.model, self.meta, self.head = model, meta, head

    def forward(self, input_ids, attention_mask, cfg: QuietStarConfig, think_mask=None,
                generator=None, step=None, shuffle_rewards: bool = False, positions=None) -> dict:
        """positions: (b,) the one thinking position of each line (-1: none), or None for all."""
        out = quiet_star_step(self.model, self.meta, self.head, input_ids, attention_mask, cfg,
                              generator=generator, think_mask=think_mask, step=step,
                              positions=None if positions is None else positions[:, None])
        if positions is not None:
            think_mask = None                        # the seq axis now holds only that position
        if shuffle_rewards and cfg.think:
            out.policy_loss = shuffled_policy_loss(out, cfg, think_mask, generator)
            out.loss = combined_loss(out.base_nll, out.talk_nll, out.policy_loss,
                                     cfg.base_loss_weight, cfg.policy_loss_weight)
        return {name: getattr(out, name) for name in out.__dataclass_fields__}


def shuffled_policy_loss(out: StepOutput, cfg: QuietStarConfig, think_mask, generator) -> torch.Tensor:
    """The REINFORCE loss with each position's rewards permuted among its n_thoughts thoughts.

    A control: the rewards keep their values (and their mean), but no longer say which thought
    earned them. If thoughts improve under the real rewards and not under these, the reward is
    what teaches them.
    """
    b, n, l = out.rewards.shape
    noise = torch.rand((b, n, l), generator=generator, device=generator.device if generator else None)
    perm = noise.to(out.rewards.device).argsort(dim=1)                      # (b, n, l)
    r = out.rewards.gather(1, perm)
    think = out.valid[..., 0] if think_mask is None else out.valid[..., 0] & think_mask.bool()
    think, counted = policy_entries(cfg, think, out.h_init.shape[1], out.positions)
    _, policy = reinforce_loss(r, out.thought_logprobs, think, cfg.clamp_negative_rewards,
                               cfg.reinforce_reduction, counted=counted)
    return policy


def _no_decay(module: nn.Module) -> set[int]:
    """ids of the parameters the Hugging Face Trainer exempts from weight decay: every bias and
    the weights of ``nn.LayerNorm`` modules (RMSNorm weights are decayed)."""
    exempt = {id(p) for name, p in module.named_parameters() if "bias" in name}
    for sub in module.modules():
        if isinstance(sub, nn.LayerNorm):
            exempt |= {id(p) for p in sub.parameters(recurse=False)}
    return exempt


def build_optimizer(module: QuietStarModule, cfg: QuietStarConfig) -> torch.optim.AdamW:
    """AdamW with three parameter groups (in this order, which checkpoints rely on):
    the LM at ``cfg.lr``, the meta-tokens at ``cfg.lr`` (their speed-up is ``embedding_scale``;
    weight decay only with ``decay_meta_tokens``), the mixing head at ``cfg.mixer_lr`` (or
    ``cfg.lr``). Without ``decay_bias_and_norm`` (the HF Trainer's rule, official) two more
    groups follow: the LM's and the head's biases and LayerNorm weights, without decay."""
    lm, head = list(module.model.parameters()), list(module.head.parameters())
    exempt = set() if cfg.decay_bias_and_norm else _no_decay(module.model) | _no_decay(module.head)
    decay = cfg.weight_decay
    groups = [
        {"params": [p for p in lm if id(p) not in exempt], "lr": cfg.lr, "weight_decay": decay},
        {"params": [module.meta.stored], "lr": cfg.lr, "weight_decay": decay if cfg.decay_meta_tokens else 0.0},
        {"params": [p for p in head if id(p) not in exempt], "lr": cfg.mixer_lr or cfg.lr, "weight_decay": decay},
    ]
    if not cfg.decay_bias_and_norm:
        groups += [{"params": [p for p in lm if id(p) in exempt], "lr": cfg.lr, "weight_decay": 0.0},
                   {"params": [p for p in head if id(p) in exempt], "lr": cfg.mixer_lr or cfg.lr, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups)


def warmup_schedule(optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_schedule="constant"``: linear warmup from lr / warmup_steps to lr over
    ``warmup_steps`` steps, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


def linear_schedule(optimizer, warmup_steps: int, decay_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_schedule="linear"``, the Hugging Face Trainer's default (official code): from 0 up to
    lr over ``warmup_steps`` (so the very first step has rate 0), then linearly down to 0 at
    ``decay_steps``."""
    def factor(s: int) -> float:
        if s < warmup_steps:
            return s / max(1, warmup_steps)
        return max(0.0, (decay_steps - s) / max(1, decay_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_schedule(optimizer, cfg: QuietStarConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule ``cfg.lr_schedule`` names."""
    if cfg.lr_schedule == "linear":
        return linear_schedule(optimizer, cfg.warmup_steps, cfg.lr_decay_steps)
    return warmup_schedule(optimizer, cfg.warmup_steps)


# ============================================================================ metrics of one step

def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of x over the True entries of mask, as a float."""
    mask = mask.to(x.dtype)
    return float((x * mask).sum() / mask.sum().clamp(min=1))


@torch.no_grad()
def step_metrics(out: dict, think_pos: torch.Tensor, fast_path: bool, questions, tokenizer) -> dict:
    """Scalars of one step for the log: losses, mean w and positive-reward fraction at the
    thinking positions, and (for lines with a question) the fraction of this batch's thoughts
    before the answer (at ``think_pos``) whose working is right.

    fast_path: ``out`` came from a step with ``positions`` (its seq axis holds only think_pos).
    """
    from .generate import decode_thought, thought_is_correct

    m = {"loss": float(out["loss"]), "base_nll": float(out["base_nll"])}
    if out.get("w") is None:
        return m
    m["talk_nll"] = float(out["talk_nll"])
    m["policy_loss"] = float(out["policy_loss"])
    think = out["valid"][..., 0][:, None].expand_as(out["rewards"])         # (b, n, l) thinking entries
    m["w"] = _masked_mean(out["w"][..., 0].float(), think)
    m["reward_pos_frac"] = _masked_mean((out["rewards"] > 0).float(), think)
    rows = [(i, 0 if fast_path else int(j)) for i, j in enumerate(think_pos.tolist()) if j >= 0 and questions[i]]
    if rows:
        thoughts = out["thoughts"]                                           # (b, n, l, t)
        ok = [thought_is_correct(questions[i], decode_thought(tokenizer, thoughts[i, k, j]))
              for i, j in rows for k in range(thoughts.shape[1])]
        m["thought_correct"] = sum(ok) / len(ok)
    return m


def micro_batch(enc: Encoded, lines: torch.Tensor, device):
    """The lines ``lines`` of ``enc`` on ``device``, cut to the longest of them.

    returns: input_ids (b, seq), attention_mask (b, seq), think_pos (b,).
    """
    seq = int(enc.attention_mask[lines].sum(1).max())
    return (enc.input_ids[lines, :seq].to(device), enc.attention_mask[lines, :seq].to(device),
            enc.think_pos[lines].to(device))


# ============================================================================ the loop

def _rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "thoughts": generator.get_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def _set_rng_state(rng: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "thoughts" in rng:
        generator.set_state(rng["thoughts"])
    if torch.cuda.is_available():
        states = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the lines of steps <= last_step (a resumed run rewrites what came after)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


def make_accelerator(device: str | None = None, grad_accum: int = 1, find_unused: bool = False):
    """``Accelerator`` with bf16 autocast on CUDA, fp32 elsewhere. ``device="cpu"`` forces the CPU.

    find_unused: tell DDP that some parameters get no gradient (the control never uses the
    mixing head).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    return Accelerator(cpu=cpu, mixed_precision="no" if cpu else "bf16",
                       gradient_accumulation_steps=grad_accum,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)])


class StopRequest:
    """Turn the first Ctrl-C (SIGINT) or SIGTERM into a request to stop after the current step.

    The loop then saves a checkpoint (atomically) and returns; ``--resume`` continues from it.
    A second signal stops at once. Handlers are only installed in the main thread.
    """

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:                     # asked twice: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, accelerator) -> bool:
        """Was any process asked to stop? With several processes they must all stop after the
        same step (else one would wait forever for the others' gradients), so they agree here."""
        if accelerator.num_processes > 1:
            asked = torch.tensor([float(self.signal or 0)], device=accelerator.device)
            asked = int(accelerator.reduce(asked, "max").item())
            if self.signal is None and asked:
                self.signal = asked
        return self.signal is not None


def train(cfg: QuietStarConfig, model_name_or_path=TINY_BASE, data=DATA_DIR, out_dir=None, *,
          think_where: str = "all", lines: str = "answer_only", shuffle_rewards: bool = False,
          eval_data=None, eval_every: int = 50, eval_lines: int = 200, save_every: int | None = None,
          resume: bool = False, grad_accum: int = 1, device: str | None = None,
          progress: bool = True, stop_after: int | None = None, text_field: str = "text",
          max_lines: int | None = None, eval_fn=None) -> dict:
    """Train Quiet-STaR (or, with ``cfg.think=False``, the control) and return a summary.

    cfg:                 the run's settings (cfg.steps optimiser steps of cfg.batch_size lines).
    model_name_or_path:  a local folder made by ``save_pretrained`` or a Hugging Face name.
    data:                a JSONL file, a folder with ``train.jsonl`` or a ``datasets`` name.
    out_dir:             ``runs/<name>``: ``metrics.jsonl``, ``checkpoint/``; None = no files.
    think_where:         "all" (the paper) or "answer" (only where the answer is predicted).
    lines:               "answer_only", "all" (answer-only and working lines as in the data)
                         or "working".
    shuffle_rewards:     the shuffled-reward control (see the module docstring).
    eval_data:           held-out lines (a JSONL file or records); default: ``validation.jsonl``
                         next to ``data`` when there is one. Evaluated at step 0, every
                         ``eval_every`` steps and at the end on ``eval_lines`` answer-only lines.
    save_every:          also checkpoint every that many steps (always at the end).
    resume:              continue from ``out_dir/checkpoint`` (model, meta-tokens, head,
                         optimiser, schedule, RNG and data position) if it exists.
    stop_after:          stop (and checkpoint) after this step, as if interrupted; for tests.
    eval_fn:             ``eval_fn(model, tokenizer, meta, head, cfg, records) -> dict``;
                         default :func:`qstar_mini.evaluate.quick_eval`.
    returns: {"steps", "seconds", "final": last step metrics, "evals": [...], "history": [...],
              "out_dir", "checkpoint"} and, in memory, "modules": (model, tokenizer, meta, head).
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from .models import load_model

    if think_where not in THINK_WHERE:
        raise ConfigError(f"think_where must be one of {THINK_WHERE} (got {think_where!r})")
    if grad_accum < 1:
        raise ConfigError(f"grad_accum must be >= 1 (got {grad_accum})")
    out_dir = Path(out_dir) if out_dir is not None else None
    ckpt_dir = out_dir / CHECKPOINT_DIR if out_dir is not None else None
    resuming = bool(resume and ckpt_dir is not None and (ckpt_dir / "trainer_state.json").exists())

    # Data first: a broken file fails before a model is loaded.
    records = select_lines(load_records(data, "train", text_field, max_lines), lines)
    eval_records = _eval_records(data, eval_data, eval_lines)

    accelerator = make_accelerator(device, grad_accum, find_unused=not cfg.think)
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = cfg.batch_size // (world * grad_accum)
    if micro * world * grad_accum != cfg.batch_size:
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of processes ({world}) x "
                          f"grad_accum ({grad_accum})")

    set_seed(cfg.seed)
    if resuming:
        ck = load_checkpoint(ckpt_dir)
        if ck.cfg.to_dict() != cfg.to_dict():
            changed = sorted(k for k, v in cfg.to_dict().items() if ck.cfg.to_dict().get(k) != v)
            raise ConfigError(f"cannot resume {ckpt_dir}: its config differs in {changed}")
        model, tokenizer, meta, head = ck.model, ck.tokenizer, ck.meta, ck.head
    else:
        model, tokenizer = load_model(model_name_or_path)
        meta, head = prepare_model(model, tokenizer, cfg)
    model.train()
    enc = encode_records(tokenizer, records, cfg.seq_len)
    if think_where == "answer" and cfg.think and not bool((enc.think_pos >= 0).any()):
        raise DataError("think_where='answer' needs answer-only lines (question=answer); none found")

    module = QuietStarModule(model, meta, head)
    optimizer = build_optimizer(module, cfg)
    scheduler = make_schedule(optimizer, cfg)
    generator = torch.Generator(device=accelerator.device).manual_seed(cfg.seed * 1000 + rank)
    start_step, evals = 0, []
    if resuming:
        state, rng = load_training_state(ckpt_dir, optimizer, scheduler)
        start_step, evals = int(state["step"]), list(state.get("evals", []))
        _set_rng_state(rng, generator)
    module, optimizer = accelerator.prepare(module, optimizer)   # the scheduler is stepped by hand
    raw = accelerator.unwrap_model(module)
    main = accelerator.is_main_process

    metrics_path = out_dir / METRICS_FILE if out_dir is not None else None
    if main and metrics_path is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resuming:
            _truncate_metrics(metrics_path, start_step)
        elif metrics_path.exists():
            metrics_path.unlink()
    eval_fn = eval_fn or _default_eval_fn(think_where)

    def evaluate_now(step: int) -> None:
        if eval_records is None or not main:
            return
        result = eval_fn(raw.model, tokenizer, raw.meta, raw.head, cfg, eval_records)
        evals.append({"step": step, **result})
        if metrics_path is not None:
            append_jsonl(metrics_path, {"kind": "eval", "step": step, **result})

    def save(step: int) -> None:
        if ckpt_dir is None:
            return
        accelerator.wait_for_everyone()
        if main:
            save_checkpoint(ckpt_dir, raw.model, tokenizer, raw.meta, raw.head, cfg,
                            optimizer=optimizer, scheduler=scheduler, rng=_rng_state(generator),
                            trainer_state={"step": step, "evals": evals, "think_where": think_where,
                                           "lines": lines, "shuffle_rewards": shuffle_rewards,
                                           "model": os.fspath(model_name_or_path), "world_size": world,
                                           "grad_accum": grad_accum, "batch_size": cfg.batch_size})

    if start_step == 0:
        evaluate_now(0)
    history, last = [], {}
    end_step = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    t0 = time.perf_counter()
    bar = tqdm(range(start_step, end_step), disable=not (progress and main), desc="quiet-star" if cfg.think
               else "control", initial=start_step, total=cfg.steps, leave=False)
    done = start_step
    with StopRequest() as stop:            # Ctrl-C / SIGTERM: finish the step, save, stop
        for step in bar:
            idx = batch_indices(len(enc), cfg.batch_size, step, cfg.seed)      # the global batch
            idx = idx[rank::world]                                              # this process's share
            parts = []
            for chunk in idx.split(micro):                                      # grad_accum micro-batches
                with accelerator.accumulate(module):
                    ids, mask, think_pos = micro_batch(enc, chunk, accelerator.device)
                    positions = think_pos if think_where == "answer" else None     # the fast path
                    out = module(ids, mask, cfg, generator=generator, step=step,
                                 shuffle_rewards=shuffle_rewards, positions=positions)
                    accelerator.backward(out["loss"])
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(module.parameters(), cfg.grad_clip)
                    optimizer.step()                       # (skipped by Accelerate until the last micro-batch)
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    parts.append(step_metrics(out, think_pos.cpu(), positions is not None,
                                              [enc.questions[i] for i in chunk.tolist()], tokenizer))
            last = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
            if world > 1:                                   # the losses averaged over processes
                shared = torch.tensor([last["loss"], last["base_nll"]], device=accelerator.device)
                last["loss"], last["base_nll"] = accelerator.reduce(shared, "mean").tolist()
            last.update(step=step + 1, lr=scheduler.get_last_lr()[0],
                        seconds=round(time.perf_counter() - t0, 2))
            history.append(last)
            if main and metrics_path is not None:
                append_jsonl(metrics_path, {"kind": "train", **last})
            bar.set_postfix({k: f"{last[k]:.3f}" for k in ("loss", "w", "thought_correct") if k in last})
            done = step + 1
            if eval_every and done % eval_every == 0 and done < end_step:
                evaluate_now(done)
            if save_every and done % save_every == 0 and done < end_step:
                save(done)
            if stop.agreed(accelerator):            # every process stops after the same step
                break
    bar.close()
    finished = done if stop.signal is not None else max(end_step, start_step)
    if finished == cfg.steps and (not evals or evals[-1]["step"] != finished):
        evaluate_now(finished)
    save(finished)
    model.eval()
    return {"steps": finished, "seconds": round(time.perf_counter() - t0, 2), "final": last,
            "interrupted": None if stop.signal is None else signal.Signals(stop.signal).name,
            "evals": evals, "history": history, "out_dir": None if out_dir is None else str(out_dir),
            "checkpoint": None if ckpt_dir is None else str(ckpt_dir),
            "modules": (raw.model, tokenizer, raw.meta, raw.head)}


def _default_eval_fn(think_where: str):
    from functools import partial

    from .evaluate import quick_eval
    return partial(quick_eval, think_where=think_where)


def _eval_records(data, eval_data, eval_lines: int):
    """Held-out answer-only lines for the periodic evaluation (None: no evaluation)."""
    if isinstance(eval_data, list):
        records = eval_data
    else:
        path = None
        if eval_data is not None:
            path = Path(eval_data)
        elif isinstance(data, (str, os.PathLike)) and Path(data).exists():
            guess = Path(data) if Path(data).is_dir() else Path(data).parent
            if (guess / "validation.jsonl").exists():
                path = guess / "validation.jsonl"
        if path is None:
            return None
        records = read_jsonl(path)
    records = [r for r in records if not r.get("has_working", False) and r.get("question")]
    return records[:eval_lines] or None


# ============================================================================ command line

RUN_KEYS = ("model", "data", "out", "name", "think_where", "lines", "shuffle_rewards", "eval_every",
            "eval_lines", "save_every", "grad_accum", "device", "preset", "text_field", "max_lines")
CONFIG_FLAGS = ("steps", "batch_size", "lr", "mixer_lr", "seed", "n_thoughts", "thought_length",
                "n_true", "seq_len", "policy_loss_weight", "base_loss_weight", "warmup_steps", "mixing",
                "thought_temperature", "embedding_scale", "weight_decay", "memory", "attention")


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``qstar-mini train``. Unset flags are None: the YAML file, then the preset,
    then QuietStarConfig's defaults decide."""
    p = parser
    p.add_argument("--config", metavar="FILE.yaml",
                   help="YAML file: QuietStarConfig fields and/or run options (model, data, out, "
                        "think_where, lines, ...); flags override it")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="starting settings: tiny (CPU minutes) or official (the paper's code; GPU). Default tiny")
    p.add_argument("--model", default=None, help="local folder or Hugging Face name (default: data/tiny-base)")
    p.add_argument("--data", default=None,
                   help="JSONL file, folder with train.jsonl, or datasets name[:config] (default: data/)")
    p.add_argument("--text-field", default=None, help="column holding the text (default: text)")
    p.add_argument("--max-lines", type=int, default=None, help="use only the first N lines")
    p.add_argument("--out", default=None, help="run folder (default: runs/<name>)")
    p.add_argument("--name", default=None, help="run name under runs/ (default: train)")
    p.add_argument("--no-think", dest="think", action="store_false", default=None,
                   help="the control: same loop, plain LM loss, no thoughts")
    p.add_argument("--think-where", choices=THINK_WHERE, default=None,
                   help="all positions (the paper, default) or only the answer position")
    p.add_argument("--lines", choices=LINES, default=None, help="which lines to train on (default answer_only)")
    p.add_argument("--shuffle-rewards", action="store_true", default=None,
                   help="control: permute rewards among the thoughts of each position")
    p.add_argument("--no-policy", action="store_true", default=None,
                   help="control: REINFORCE off (policy_loss_weight = 0)")
    for name in CONFIG_FLAGS:
        kind = str if name in ("mixing", "memory", "attention") else (int if name in ("steps", "batch_size", "seed", "n_thoughts",
                                                              "thought_length", "n_true", "seq_len",
                                                              "warmup_steps") else float)
        choices = {"mixing": MIXING_MODES, "memory": MEMORY_MODES, "attention": ATTENTION_MODES}.get(name)
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, choices=choices,
                       help=f"QuietStarConfig.{name}")
    p.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default 50; 0 = only start/end)")
    p.add_argument("--eval-lines", type=int, default=None, help="held-out lines per evaluation (default 200)")
    p.add_argument("--save-every", type=int, default=None, help="also checkpoint every N steps")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimiser step (default 1)")
    p.add_argument("--device", default=None, help="cpu to force the CPU (default: CUDA if available)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint if it exists")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    return p


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must hold a mapping of settings")
    return values


def resolve_train_args(args: argparse.Namespace) -> tuple[QuietStarConfig, dict]:
    """(config, run options) from YAML + preset + flags, flags winning."""
    from dataclasses import fields as dc_fields

    values = _read_yaml(args.config) if getattr(args, "config", None) else {}
    config_names = {f.name for f in dc_fields(QuietStarConfig)}
    unknown = set(values) - config_names - set(RUN_KEYS)
    if unknown:
        raise ConfigError(f"--config: unknown setting(s) {sorted(unknown)}; use QuietStarConfig fields "
                          f"or {list(RUN_KEYS)}")
    run = {k: values[k] for k in RUN_KEYS if k in values}
    changes = {k: v for k, v in values.items() if k in config_names}
    for name in RUN_KEYS:
        if getattr(args, name, None) is not None:
            run[name] = getattr(args, name)
    for name in CONFIG_FLAGS + ("think",):
        if getattr(args, name, None) is not None:
            changes[name] = getattr(args, name)
    if getattr(args, "no_policy", None):
        changes["policy_loss_weight"] = 0.0
    cfg = preset(run.pop("preset", None) or "tiny", **changes)
    return cfg, run


def run_train(args: argparse.Namespace) -> int:
    """``qstar-mini train``: train, print a one-line summary per evaluation, return 0."""
    cfg, run = resolve_train_args(args)
    out = run.get("out") or (RUNS_DIR / (run.get("name") or "train"))
    result = train(
        cfg, run.get("model") or TINY_BASE, run.get("data") or DATA_DIR, out,
        think_where=run.get("think_where", "all"), lines=run.get("lines", "answer_only"),
        shuffle_rewards=bool(run.get("shuffle_rewards", False)),
        eval_every=run.get("eval_every", 50), eval_lines=run.get("eval_lines", 200),
        save_every=run.get("save_every"), resume=bool(getattr(args, "resume", False)),
        grad_accum=run.get("grad_accum", 1), device=run.get("device"),
        progress=getattr(args, "progress", True), text_field=run.get("text_field", "text"),
        max_lines=run.get("max_lines"))
    for e in result["evals"]:
        shown = {k: v for k, v in e.items() if isinstance(v, (int, float))}
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    if result["interrupted"]:
        import sys
        print(f"qstar-mini: interrupted ({result['interrupted']}) after step {result['steps']}; checkpoint "
              f"saved in {result['checkpoint']}; continue with the same command and --resume", file=sys.stderr)
        return 130 if result["interrupted"] == "SIGINT" else 143
    print(f"trained {result['steps']} steps in {result['seconds']:.1f} s; checkpoint: {result['checkpoint']}")
    return 0
