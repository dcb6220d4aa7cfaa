"""The training loop: Algorithm 1's step, repeated, on Hugging Face Accelerate.

One optimiser step, as a reader meets it in :func:`train`'s loop (:func:`train_step`)::

    ids, mask   <- the next batch_size lines, each "<s> line </s>", right-padded   (batch, seq)
    out         <- quiet_star_step(model, meta, head, ids, mask, cfg)              qstar_mini.step
    out.loss.backward(); clip gradients to cfg.grad_clip; AdamW step; schedule step  qstar_mini.optim

Data (reading, encoding, batching) is :mod:`qstar_mini.records`. Around the loop: periodic
evaluation on held-out lines, ``metrics.jsonl``, checkpoints and ``resume``; several processes
or sharding (:mod:`qstar_mini.runs.sharding`), the run folder (:mod:`qstar_mini.runs.folder`),
checkpoints (:mod:`qstar_mini.runs.checkpoint`) and Ctrl-C (:mod:`qstar_mini.runs.signals`).

**Controls.** ``cfg.think=False`` runs the very same loop (same data order, steps, optimiser,
seed) with the plain LM loss: a gain of Quiet-STaR over it is the thinking, not the extra
fine-tuning. ``policy_loss_weight=0`` turns REINFORCE off (thoughts used, never taught);
``shuffle_rewards`` gives each thought the reward of another thought of the same position
(:func:`shuffled_policy_loss`): same reward statistics, no information about which thought earned it.

**Where thoughts are trained.** ``think_where="all"`` (the paper: a thought after every token)
or ``"answer"`` (only the position that predicts the answer digit, ``=`` on ``31415=4``): the
step then makes the thoughts of that one position only.

**Batches and data position.** ``cfg.batch_size`` is the *global* batch of one optimiser step,
split over the processes and ``grad_accum`` micro-batches. Epoch e visits the lines in the order
``randperm(n, seed + e)`` and step s reads positions ``s * batch_size ..`` of that endless
stream: the data position *is* the step number, so a resumed run reads what an uninterrupted one would.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field, fields
from functools import partial

import torch
from torch import nn

from qstar_mini.config import QuietStarConfig
from qstar_mini.errors import ConfigError, DataError
from qstar_mini.evaluation.arithmetic import quick_eval
from qstar_mini.files import append_jsonl
from qstar_mini.inference import decode_thought, thought_is_correct
from qstar_mini.losses import combined_loss, masked_mean, reinforce_loss
from qstar_mini.models.tiny import load_model
from qstar_mini.paths import DATA_DIR, TINY_BASE
from qstar_mini.optim import build_optimizer, make_schedule
from qstar_mini.records import (Encoded, batch_indices, encode_records, held_out_records, load_records,
                      micro_batch, select_lines)
from qstar_mini.runs.checkpoint import (load_checkpoint_to_resume, load_training_state, restore_rng_state,
                                       rng_state, save_checkpoint)
from qstar_mini.runs.folder import RunFolder, prepare_run_folder, run_settings, start_metrics
from qstar_mini.runs.sharding import (gathered_parts, is_sharded, load_sharded_optimizer, make_accelerator,
                                     micro_batch_size)
from qstar_mini.runs.signals import StopRequest
from qstar_mini.step import StepOutput, prepare_model, quiet_star_step


THINK_WHERE = ("all", "answer")


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

    def tie_weights(self, *args, **kwargs):
        """Re-tie the LM's input and output embeddings (a tied model). FSDP's low-memory loading
        moves every parameter to the meta device and back, which unties them; accelerate then
        calls this, as it would on a Hugging Face model."""
        tie = getattr(self.model, "tie_weights", None)
        if tie is not None:
            tie(*args, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, cfg: QuietStarConfig = None, generator=None,
                step=None, shuffle_rewards: bool = False, positions=None, *, inside=None):
        """input_ids, attention_mask: (b, seq). positions: (b,) the one thinking position of each
        line (-1: none; ``think_where="answer"``), or None for every position. shuffle_rewards:
        the shuffled-reward control (:func:`shuffled_policy_loss`).

        inside: instead of a step, return ``inside(model, meta, head)``. Under FSDP the weights
        are whole only during this module's forward, so code that reads the three parts
        directly (the periodic evaluation) runs here, on every process."""
        if inside is not None:
            return inside(self.model, self.meta, self.head)
        out = quiet_star_step(self.model, self.meta, self.head, input_ids, attention_mask, cfg,
                              generator=generator, step=step,
                              positions=None if positions is None else positions[:, None])
        if shuffle_rewards and cfg.think:
            out.policy_loss = shuffled_policy_loss(out, cfg, generator)
            out.loss = combined_loss(out.base_nll, out.talk_nll, out.policy_loss,
                                     cfg.base_loss_weight, cfg.policy_loss_weight)
        return {name: getattr(out, name) for name in out.__dataclass_fields__}


def shuffled_policy_loss(out: StepOutput, cfg: QuietStarConfig, generator) -> torch.Tensor:
    """The REINFORCE loss with each position's rewards permuted among its n_thoughts thoughts.

    A control: the rewards keep their values (and their mean), but no longer say which thought
    earned them. If thoughts improve under the real rewards and not under these, the reward is
    what teaches them. Computed from the step's own outputs: ``out.rewards`` (b, n, m),
    ``out.thought_logprobs`` (b, n, m, t - 2) and the entries ``out.policy_trained`` /
    ``out.policy_counted`` (b, m); returns the scalar loss.
    """
    b, n, m = out.rewards.shape
    noise = torch.rand((b, n, m), generator=generator, device=generator.device if generator else None)
    perm = noise.to(out.rewards.device).argsort(dim=1)                      # (b, n, m)
    _, policy = reinforce_loss(out.rewards.gather(1, perm), out.thought_logprobs, out.policy_trained,
                               cfg.clamp_negative_rewards, cfg.reinforce_reduction, counted=out.policy_counted)
    return policy


# ============================================================================ metrics of one step

@torch.no_grad()
def step_metrics(out: dict, think_pos: torch.Tensor, fast_path: bool, questions, tokenizer) -> dict:
    """Scalars of one step for the log: losses, mean w and positive-reward fraction at the
    thinking positions, and (for lines with a question) the fraction of this batch's thoughts
    before the answer (at ``think_pos``) whose working is right.

    fast_path: ``out`` came from a step with ``positions`` (its seq axis holds only think_pos).
    """
    m = {"loss": float(out["loss"]), "base_nll": float(out["base_nll"])}
    if out.get("w") is None:
        return m
    m["talk_nll"] = float(out["talk_nll"])
    m["policy_loss"] = float(out["policy_loss"])
    entries = out["valid"][..., 0][:, None].expand_as(out["rewards"])       # (b, n, l) thinking entries
    m["w"] = float(masked_mean(out["w"][..., 0].float(), entries))
    m["reward_pos_frac"] = float(masked_mean((out["rewards"] > 0).float(), entries))
    rows = [(i, 0 if fast_path else int(j)) for i, j in enumerate(think_pos.tolist()) if j >= 0 and questions[i]]
    if rows:
        thoughts = out["thoughts"]                                           # (b, n, l, t)
        ok = [thought_is_correct(questions[i], decode_thought(tokenizer, thoughts[i, k, j]))
              for i, j in rows for k in range(thoughts.shape[1])]
        m["thought_correct"] = sum(ok) / len(ok)
    return m


# ============================================================================ devices, randomness, signals


# ============================================================================ sharded runs (FSDP2)


# ============================================================================ the run folder


# ============================================================================ setting up

@dataclass
class Run:
    """Everything the loop works with, made by :func:`set_up`.

    module: the :class:`QuietStarModule` as Accelerate prepared it (DDP-wrapped with several
    processes); raw: the module itself.  enc: the training lines as tensors.  micro: lines per
    micro-batch on this process.  settings: what ``trainer_state.json`` records of the run.
    evals: the evaluations so far (a resumed run's included).
    """

    cfg: QuietStarConfig
    accelerator: object
    module: nn.Module
    raw: QuietStarModule
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    tokenizer: object
    enc: Encoded
    micro: int
    run_dir: RunFolder
    start_step: int
    opts: "TrainOptions"
    settings: dict
    eval_fn: object
    eval_records: list | None
    evals: list = field(default_factory=list)
    history: list = field(default_factory=list)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def _load_modules(cfg: QuietStarConfig, model_name_or_path, run_dir: RunFolder):
    """(model, tokenizer, meta, head): from the checkpoint when resuming (its config must be
    ``cfg``), else the base model with new meta-tokens and mixing head."""
    if run_dir.resuming:
        ck = load_checkpoint_to_resume(run_dir.checkpoint, cfg)
        return ck.model, ck.tokenizer, ck.meta, ck.head
    model, tokenizer = load_model(model_name_or_path)
    meta, head = prepare_model(model, tokenizer, cfg)
    return model, tokenizer, meta, head


def set_up(cfg: QuietStarConfig, records: list[dict], run_dir: RunFolder, opts: TrainOptions, settings: dict,
           eval_records) -> Run:
    """Accelerator, model, encoded lines, optimiser, schedule and thought generator, restored
    from the checkpoint when resuming (the data position is the step number)."""
    from accelerate.utils import set_seed

    think_where, grad_accum = opts.think_where, opts.grad_accum
    accelerator = make_accelerator(opts.device, grad_accum, find_unused=not cfg.think)
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = micro_batch_size(cfg.batch_size, world, grad_accum)
    set_seed(cfg.seed)
    model, tokenizer, meta, head = _load_modules(cfg, opts.model, run_dir)
    model.train()
    enc = encode_records(tokenizer, records, cfg.seq_len)
    if think_where == "answer" and cfg.think and not bool((enc.think_pos >= 0).any()):
        raise DataError("think_where='answer' needs answer-only lines (question=answer); none found")

    raw = QuietStarModule(model, meta, head)
    optimizer = build_optimizer(raw, cfg)
    scheduler = make_schedule(optimizer, cfg)
    generator = torch.Generator(device=accelerator.device).manual_seed(cfg.seed * 1000 + rank)
    start_step, evals = 0, []
    if run_dir.resuming:
        state, rng = load_training_state(run_dir.checkpoint, optimizer, scheduler)
        start_step, evals = int(state["step"]), list(state.get("evals", []))
        if start_step > cfg.steps:
            raise ConfigError(f"--resume: {run_dir.checkpoint} has already trained {start_step} steps; "
                              f"--steps must be at least that (more steps extend the run)")
        restore_rng_state(rng, generator, rank)
    saved_optimizer = None
    if is_sharded(accelerator):      # wrapping replaces the parameters the loaded state is keyed by
        saved_optimizer = optimizer.state_dict() if run_dir.resuming else None
        optimizer.state.clear()
    module, optimizer = accelerator.prepare(raw, optimizer)   # the scheduler is stepped by hand
    raw = accelerator.unwrap_model(module)
    if saved_optimizer is not None:
        load_sharded_optimizer(module, optimizer, saved_optimizer)
    if accelerator.is_main_process:
        start_metrics(run_dir, start_step)
    settings = {**settings, "world_size": world, "grad_accum": grad_accum, "batch_size": cfg.batch_size}
    return Run(cfg, accelerator, module, raw, optimizer, scheduler, generator, tokenizer, enc, micro, run_dir,
               start_step, opts, settings,
               opts.eval_fn or partial(quick_eval, think_where=think_where), eval_records, evals)


# ============================================================================ one step, evaluation, checkpoint

def train_step(run: Run, step: int) -> dict:
    """Algorithm 1's step and line 3 (theta <- theta - lr sum_j grad L_j) on step ``step``'s lines.

    This process takes its share of the global batch (:func:`batch_indices`) in grad_accum
    micro-batches of (micro, seq) tokens: forward (:func:`quiet_star_step`), backward, then
    :func:`optimizer_step`. returns: the step's metrics (:func:`step_metrics`), averaged over
    the micro-batches; loss and base_nll also over the processes.
    """
    acc, cfg = run.accelerator, run.cfg
    idx = batch_indices(len(run.enc), cfg.batch_size, step, cfg.seed)      # the global batch
    idx = idx[acc.process_index::acc.num_processes]                         # this process's share
    parts = []
    for chunk in idx.split(run.micro):                                      # grad_accum micro-batches
        with acc.accumulate(run.module):
            ids, mask, think_pos = micro_batch(run.enc, chunk, acc.device)
            positions = think_pos if run.opts.think_where == "answer" else None     # the fast path
            out = run.module(ids, mask, cfg, generator=run.generator, step=step,
                             shuffle_rewards=run.opts.shuffle_rewards, positions=positions)
            acc.backward(out["loss"])
            optimizer_step(run)
            parts.append(step_metrics(out, think_pos.cpu(), positions is not None,
                                      [run.enc.questions[i] for i in chunk.tolist()], run.tokenizer))
    last = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
    if acc.num_processes > 1:                               # the losses averaged over processes
        shared = torch.tensor([last["loss"], last["base_nll"]], device=acc.device)
        last["loss"], last["base_nll"] = acc.reduce(shared, "mean").tolist()
    return last


def optimizer_step(run: Run) -> None:
    """Clip the gradients to cfg.grad_clip, take the AdamW step and the schedule's step, zero
    the gradients. Accelerate skips the step until the last micro-batch of a global batch."""
    acc = run.accelerator
    if acc.sync_gradients:
        acc.clip_grad_norm_(run.module.parameters(), run.cfg.grad_clip)
    run.optimizer.step()
    if acc.sync_gradients:
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def log_step(run: Run, last: dict, step: int, t0: float, bar) -> None:
    """Add step, lr and seconds to the step's metrics; keep them, write them, show them."""
    last.update(step=step + 1, lr=run.scheduler.get_last_lr()[0], seconds=round(time.perf_counter() - t0, 2))
    run.history.append(last)
    if run.main and run.run_dir.metrics is not None:
        append_jsonl(run.run_dir.metrics, {"kind": "train", **last})
    bar.set_postfix({k: f"{last[k]:.3f}" for k in ("loss", "w", "thought_correct") if k in last})


def evaluate_now(run: Run, step: int) -> None:
    """The periodic evaluation on the held-out lines, kept and written (main process).

    Unsharded, the main process evaluates alone. Sharded (FSDP), every process evaluates the
    same lines inside the module's forward, where the weights are gathered whole; the results
    are the same on all, the main one keeps them."""
    if run.eval_records is None:
        return
    evaluate = lambda model, meta, head: run.eval_fn(model, run.tokenizer, meta, head, run.cfg, run.eval_records)
    if is_sharded(run.accelerator):
        with torch.no_grad():
            result = run.module(inside=evaluate)
    elif run.main:
        result = evaluate(run.raw.model, run.raw.meta, run.raw.head)
    if not run.main:
        return
    run.evals.append({"step": step, **result})
    if run.run_dir.metrics is not None:
        append_jsonl(run.run_dir.metrics, {"kind": "eval", "step": step, **result})


def save(run: Run, step: int) -> None:
    """An atomic checkpoint of everything ``resume`` needs (all processes wait; main writes).

    Sharded (FSDP), the full tensors are first gathered on the main process: the checkpoint is
    the one a single process would write, loadable by :func:`load_checkpoint` anywhere."""
    if run.run_dir.checkpoint is None:
        return
    run.accelerator.wait_for_everyone()
    parts = gathered_parts(run) if is_sharded(run.accelerator) else None   # every process takes part
    rng = rng_state(run.generator, run.accelerator)                          # (all) gathered too
    if run.main:
        raw = run.raw
        model, meta, head, optimizer = parts or (raw.model, raw.meta, raw.head, run.optimizer)
        save_checkpoint(run.run_dir.checkpoint, model, run.tokenizer, meta, head, run.cfg,
                        optimizer=optimizer, scheduler=run.scheduler, rng=rng,
                        trainer_state={"step": step, "evals": run.evals, **run.settings})
    run.accelerator.wait_for_everyone()     # no process reads the checkpoint before it is written


# ============================================================================ the loop

@dataclass
class TrainOptions:
    """How a run is fed, evaluated and saved; the algorithm's settings are in QuietStarConfig.

    Each field is a ``qstar-mini train`` flag (``think_where`` is ``--think-where``) and a key of
    its YAML file; the comment beside a field is that flag's help.
    """

    model: str = str(TINY_BASE)       # the base model: a local folder made by save_pretrained, or a Hugging Face name
    data: str = str(DATA_DIR)         # the training lines: a JSONL file, a folder with train.jsonl, or a datasets name[:config]
    out: str | None = None            # the run folder (metrics.jsonl, checkpoint/); none = no files
    text_field: str = "text"          # the column holding the text; question+answer for GSM8K-format records
                                      # (each line is the question, a newline, "A: " and the answer)
    max_lines: int | None = None      # use only the first N lines
    think_where: str = "all"          # all positions think (the paper) or only the answer position
    lines: str = "answer_only"        # which lines to train on: answer_only, all or working
    shuffle_rewards: bool = False     # control: permute the rewards among the thoughts of each position
    eval_data: str | None = None      # held-out lines (a JSONL file; in Python also records); none = validation.jsonl
                                      # beside the data, when there is one
    eval_every: int = 50              # evaluate every N steps, at the start and at the end (0 = only start and end)
    eval_lines: int = 200             # held-out answer-only lines per evaluation
    save_every: int | None = None     # also checkpoint every N steps (always at the end)
    grad_accum: int = 1               # micro-batches per optimiser step
    device: str | None = None         # cpu, cuda or cuda:N; none = CUDA when available (a device this machine lacks is refused)
    resume: bool = False              # continue the run in the run folder from its checkpoint (model, meta-tokens, head,
                                      # optimiser, schedule, RNG, data position); refused when there is none or when
                                      # the settings differ (a larger steps extends a finished run)
    overwrite: bool = True            # a new run into a folder that holds one replaces it (the command line refuses
                                      # instead, unless --overwrite)
    progress: bool = True             # show a tqdm progress bar
    stop_after: int | None = field(default=None, metadata={"cli": False})  # stop (and checkpoint) after this
                                      # step, as if interrupted
    eval_fn: object = field(default=None, metadata={"cli": False})  # eval_fn(model, tokenizer, meta, head, cfg,
                                      # records) -> dict; none = qstar_mini.evaluation.arithmetic.quick_eval


def train(cfg: QuietStarConfig, model_name_or_path=None, data=None, out_dir=None, **options) -> dict:
    """Train Quiet-STaR (or, with ``cfg.think=False``, the control) and return a summary.

    cfg: the algorithm's settings (cfg.steps optimiser steps of cfg.batch_size lines).
    model_name_or_path, data, out_dir and ``options``: the fields of :class:`TrainOptions`
    (``model``, ``data``, ``out``, ``think_where=...``), its defaults where not given.
    returns: {"steps", "seconds", "final": last step metrics, "evals": [...], "history": [...],
              "out_dir", "checkpoint", "interrupted"} and, in memory, "modules": (model, tokenizer, meta, head).
    """
    given = {"model": model_name_or_path, "data": data, "out": out_dir}
    opts = _options(**options, **{k: v for k, v in given.items() if v is not None})
    if opts.shuffle_rewards and not (cfg.think and cfg.policy_loss_weight > 0):
        raise ConfigError("shuffle_rewards permutes REINFORCE's rewards: it needs thinking on and "
                          "policy_loss_weight > 0 (drop --shuffle-rewards, --no-think or --no-policy)")
    settings = run_settings(opts)
    with prepare_run_folder(opts.out, settings, resume=opts.resume, overwrite=opts.overwrite) as run_dir:
        # Data first: a broken file fails before a model is loaded.
        records = select_lines(load_records(opts.data, "train", opts.text_field, opts.max_lines), opts.lines)
        eval_records = held_out_records(opts.data, opts.eval_data, opts.eval_lines)
        run = set_up(cfg, records, run_dir, opts, settings, eval_records)
        end = cfg.steps if opts.stop_after is None else min(cfg.steps, opts.stop_after)
        return _loop(run, end, eval_every=opts.eval_every, save_every=opts.save_every, progress=opts.progress)


def _options(**given) -> TrainOptions:
    """:class:`TrainOptions` from keyword arguments, each checked; an unknown one is named."""
    known = {f.name for f in fields(TrainOptions)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"train() got unknown option(s) {unknown}; the options are {sorted(known)}")
    opts = TrainOptions(**given)
    if opts.think_where not in THINK_WHERE:
        raise ConfigError(f"think_where must be one of {THINK_WHERE} (got {opts.think_where!r})")
    if opts.grad_accum < 1:
        raise ConfigError(f"grad_accum must be >= 1 (got {opts.grad_accum})")
    return opts


def _loop(run: Run, end_step: int, *, eval_every: int, save_every: int | None, progress: bool) -> dict:
    """Steps start_step .. end_step - 1, evaluating and saving on the way; the final
    evaluation and checkpoint; the summary :func:`train` returns."""
    cfg, run_dir = run.cfg, run.run_dir
    if run.start_step == 0:
        evaluate_now(run, 0)
    t0 = time.perf_counter()
    bar = _progress_bar(run, end_step, progress)
    done, last = run.start_step, {}
    with StopRequest() as stop:            # Ctrl-C / SIGTERM: finish the step, save, stop
        for step in bar:
            last = train_step(run, step)                # batch, forward, backward, optimiser step
            log_step(run, last, step, t0, bar)
            done = step + 1
            if eval_every and done % eval_every == 0 and done < end_step:
                evaluate_now(run, done)
            if save_every and done % save_every == 0 and done < end_step:
                save(run, done)
            if stop.agreed(run.accelerator):            # every process stops after the same step
                break
    bar.close()

    finished = done if stop.signal is not None else max(end_step, run.start_step)
    if finished == cfg.steps and (not run.evals or run.evals[-1]["step"] != finished):
        evaluate_now(run, finished)
    save(run, finished)
    run.raw.model.eval()
    return {"steps": finished, "seconds": round(time.perf_counter() - t0, 2), "final": last,
            "interrupted": None if stop.signal is None else signal.Signals(stop.signal).name,
            "evals": run.evals, "history": run.history,
            "out_dir": None if run_dir.out_dir is None else str(run_dir.out_dir),
            "checkpoint": None if run_dir.checkpoint is None else str(run_dir.checkpoint),
            "modules": (run.raw.model, run.tokenizer, run.raw.meta, run.raw.head)}


def _progress_bar(run: Run, end_step: int, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(range(run.start_step, end_step), disable=not (progress and run.main),
                desc="quiet-star" if run.cfg.think else "control", initial=run.start_step,
                total=run.cfg.steps, leave=False)
