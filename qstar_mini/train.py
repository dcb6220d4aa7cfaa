"""The training loop: Algorithm 1's step, repeated, on Hugging Face Accelerate.

One optimiser step, as a reader meets it in :func:`train`'s loop (:func:`train_step`)::

    ids, mask   <- the next batch_size lines, each "<s> line </s>", right-padded   (batch, seq)
    out         <- quiet_star_step(model, meta, head, ids, mask, cfg)              qstar_mini.step
    out.loss.backward(); clip gradients to cfg.grad_clip; AdamW step; warmup schedule step

Data (reading, encoding, batching) is :mod:`qstar_mini.records`; the ``qstar-mini train``
command (flags, YAML) is :mod:`qstar_mini.cli.train`.

Everything else is bookkeeping a real run needs: periodic evaluation on held-out lines,
metrics in ``metrics.jsonl``, atomic checkpoints (:mod:`qstar_mini.runs.checkpoint`), ``resume``.

**The control.** ``cfg.think=False`` runs the very same loop (same data order, steps,
optimiser, seed) with the plain LM loss: any gain of Quiet-STaR over it is the thinking, not
the extra fine-tuning.

**Two more controls for "thinking is learned"** (tier 2): ``policy_loss_weight=0``
turns REINFORCE off (the thoughts are only *used*, never *taught*), and
``shuffle_rewards=True`` keeps REINFORCE but gives each thought the reward of another
thought of the same position, chosen at random (:func:`shuffled_policy_loss`, computed from the step's own rewards,
thought log-probabilities and REINFORCE entries): same reward
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

**Sharding (FSDP).** A 7B model's fp32 weights, gradients and AdamW moments (~117 GB) fit on no
80 GB GPU. ``accelerate launch --config_file configs/accelerate/fsdp_7b_8gpu.yaml`` (or
``--use_fsdp --fsdp_version 2``) shards all three across the processes with FSDP2
(``torch.distributed.fsdp.fully_shard``): between steps each process keeps 1/N of every tensor;
for a step the whole model is gathered (one FSDP unit: see :func:`_check_fsdp_plugin`) and the
gradients are reduce-scattered after the backward. The loop is the same; what changes is in
:func:`make_accelerator` (accelerate 1.15 silently falls back to DDP on a CPU-only machine:
we switch it to FSDP, which torch runs on the CPU with gloo), :func:`evaluate_now` (every
process evaluates, inside the sharded module's forward, where its weights are whole),
:func:`save` (the full state is gathered on the main process, which writes the same checkpoint
a single process would) and :func:`set_up` (a resumed optimiser state is sharded after
wrapping). ``configs/accelerate/fsdp_cpu_2proc.yaml`` is the two-process CPU check.

``cfg.batch_size`` is the *global* batch of one optimiser step; with ``grad_accum`` > 1 it is
split into that many micro-batches per process.

**Data position.** Epoch e visits the lines in the order ``randperm(n, seed + e)``; step s
reads positions ``s * batch_size .. (s + 1) * batch_size - 1`` of that endless stream. So the
data position *is* the step number, and a resumed run reads exactly what an uninterrupted one
would have read.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from qstar_mini.runs.checkpoint import load_checkpoint, load_training_state, save_checkpoint
from qstar_mini.config import QuietStarConfig
from qstar_mini.errors import ConfigError, DataError
from qstar_mini.evaluation.arithmetic import quick_eval
from qstar_mini.files import append_jsonl, write_file_atomic
from qstar_mini.inference import decode_thought, thought_is_correct
from qstar_mini.losses import combined_loss, masked_mean, reinforce_loss
from qstar_mini.meta_tokens import MetaTokens
from qstar_mini.models.tiny import load_model
from qstar_mini.paths import DATA_DIR, TINY_BASE
from qstar_mini.records import (Encoded, batch_indices, encode_records, held_out_records, load_records,
                      micro_batch, select_lines)
from qstar_mini.runs.folder import CHECKPOINT_DIR, METRICS_FILE, clear_run, open_run
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

def _rng_state(generator: torch.Generator, accelerator=None) -> dict[str, torch.Tensor]:
    """The RNG states a checkpoint keeps: torch's, CUDA's and the thought generator's. With
    several processes every process calls this: each samples its own thoughts with its own
    generator, so all their states are gathered ("thoughts" is process 0's, "thoughts1" process
    1's, ...) for a resumed run to continue each one's stream."""
    state = {"torch": torch.get_rng_state(), "thoughts": generator.get_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    if accelerator is not None and accelerator.num_processes > 1:
        mine = generator.get_state().to(accelerator.device)[None]                 # (1, n) uint8
        every = accelerator.gather(mine).cpu()                                     # (world, n)
        state.update({f"thoughts{r}": every[r] for r in range(1, accelerator.num_processes)})
    return state


def _set_rng_state(rng: dict[str, torch.Tensor], generator: torch.Generator, rank: int = 0) -> None:
    """Restore :func:`_rng_state`'s states; process ``rank`` takes its own thought generator's
    (one a checkpoint lacks, e.g. resuming with more processes, keeps its fresh seed)."""
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    key = "thoughts" if rank == 0 else f"thoughts{rank}"
    if key in rng:
        generator.set_state(rng[key])
    if torch.cuda.is_available():
        states = [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def make_accelerator(device: str | None = None, grad_accum: int = 1, find_unused: bool = False):
    """``Accelerator`` with bf16 autocast on CUDA, fp32 elsewhere. ``device="cpu"`` forces the CPU.

    find_unused: tell DDP that some parameters get no gradient (the control never uses the
    mixing head).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=cpu, mixed_precision="no" if cpu else "bf16",
                              gradient_accumulation_steps=grad_accum,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)])
    if _fsdp_asked() and accelerator.distributed_type == DistributedType.MULTI_CPU:
        _shard_on_cpu(accelerator)
    if is_sharded(accelerator):
        _check_fsdp_plugin(accelerator.state.fsdp_plugin)
        # FSDP2 warns at every forward that the returned dict holds views; the loop only reads them.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return accelerator


# ============================================================================ sharded runs (FSDP2)

def _fsdp_asked() -> bool:
    """Did ``accelerate launch`` ask for FSDP (``--use_fsdp`` or ``distributed_type: FSDP``)?"""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_sharded(accelerator) -> bool:
    """Are the parameters, gradients and optimiser state sharded across the processes (FSDP)?"""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _shard_on_cpu(accelerator) -> None:
    """Turn a multi-process CPU run that asked for FSDP into one.

    accelerate 1.15 enables FSDP only on GPU-like devices: on a CPU-only machine ``--use_fsdp``
    quietly gives DDP (``DistributedType.MULTI_CPU``; the plugin is dropped). torch's FSDP2
    itself runs on the CPU over gloo, so give the accelerator's state the plugin the launcher's
    settings describe (``FSDP_*`` variables) and the FSDP type; ``prepare``, ``clip_grad_norm_``
    and the rest then take their FSDP2 paths, as on GPUs.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP    # as AcceleratorState does


def _check_fsdp_plugin(plugin) -> None:
    """What this loop can shard: FSDP2, the whole :class:`QuietStarModule` as one unit.

    Per-layer units (``fsdp_auto_wrap_policy`` other than NO_WRAP, which FSDP's activation
    checkpointing also needs) cannot work here: the talk pass backpropagates through the KV
    cache into the *plain* pass of the same layer, after the layer's unit has resharded (freed)
    its weights at the end of its own backward ("setStorage: ... storage of size 0")."""
    if plugin.fsdp_version != 2:
        raise ConfigError("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config "
                          "(or pass --fsdp_version 2 to accelerate launch)")
    if plugin.auto_wrap_policy is not None or plugin.activation_checkpointing:
        raise ConfigError("qstar-mini shards the whole model as one FSDP unit: set fsdp_auto_wrap_policy: "
                          "NO_WRAP and fsdp_activation_checkpointing: false (gradients reach a layer through "
                          "the KV cache after a per-layer unit has freed its weights); to save activation "
                          "memory use --memory rescore_checkpointed")


def _fsdp_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _optimizer_names(module: nn.Module, optimizer) -> list[list[str]]:
    """The parameter names of each param group, in the optimiser's order (a checkpoint numbers
    the parameters 0, 1, ... in this order; torch's sharded state dicts name them)."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def _named_to_numbered(state: dict, names: list[list[str]]) -> dict:
    """A full optimiser state keyed by parameter names -> the numbered one ``optimizer.state_dict()``
    gives on one process (what :func:`qstar_mini.runs.checkpoint.save_checkpoint` writes)."""
    number = {n: i for i, n in enumerate(n for group in names for n in group)}
    groups = [dict(g, params=[number[n] for n in g["params"]]) for g in state["param_groups"]]
    return {"state": {number[n]: v for n, v in state["state"].items()}, "param_groups": groups}


def _numbered_to_named(state: dict, names: list[list[str]]) -> dict:
    """The inverse of :func:`_named_to_numbered`."""
    flat = [n for group in names for n in group]
    groups = [dict(g, params=list(group)) for g, group in zip(state["param_groups"], names)]
    return {"state": {flat[int(i)]: v for i, v in state["state"].items()}, "param_groups": groups}


def _load_sharded_optimizer(run_module: nn.Module, optimizer, numbered: dict) -> None:
    """Every process: shard a full (numbered) optimiser state into the wrapped optimiser."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    named = _numbered_to_named(numbered, _optimizer_names(run_module, inner))
    set_optimizer_state_dict(run_module, inner, named, options=StateDictOptions(full_state_dict=True))


class _GatheredLM:
    """The LM as :func:`save_checkpoint` writes it from a sharded run: the live model's class and
    config, the full tensors gathered on the main process (``save_pretrained(state_dict=...)``)."""

    def __init__(self, model: nn.Module, tensors: dict[str, torch.Tensor]):
        # A tied pair (embeddings = LM head) is one parameter with two names; gathered, it is two
        # copies. Keep the first name only, as save_pretrained does for a live tied model.
        tied = ({n for n, _ in model.named_parameters(remove_duplicate=False)}
                - {n for n, _ in model.named_parameters()})
        self.model, self.tensors = model, {k: v for k, v in tensors.items() if k not in tied}
        table = model.get_input_embeddings().weight
        self.embed_key = next(n for n, p in model.named_parameters() if p is table)

    def get_input_embeddings(self):               # MetaTokens.write_into writes the meta rows here
        return _Holder(weight=self.tensors[self.embed_key])

    def save_pretrained(self, path, **kwargs):
        self.model.save_pretrained(path, state_dict=self.tensors, **kwargs)


class _Holder:
    """Something with ``.weight`` (a gathered embedding table) or ``.state_dict()`` (a gathered
    head or optimiser state), for :func:`save_checkpoint`."""

    def __init__(self, weight=None, state=None):
        self.weight, self._state = weight, state

    def state_dict(self):
        return self._state


def _gathered_parts(run: "Run"):
    """Every process: gather the full model and optimiser state (torch's
    ``get_state_dict(full_state_dict=True, cpu_offload=True)``); returns, on the main process,
    (model, meta, head, optimizer) stand-ins holding full CPU tensors, elsewhere None."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    inner = run.optimizer.optimizer
    if not inner.state:              # nothing to gather (a checkpoint before the first step)
        tensors, optim = get_model_state_dict(run.module, options=_fsdp_options()), None
    else:
        tensors, optim = get_state_dict(run.module, inner, options=_fsdp_options())
    if not run.main:
        return None
    part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    raw, stored = run.raw, tensors["meta.stored"]
    meta = MetaTokens(raw.meta.start_id, raw.meta.end_id, stored * raw.meta.scale, scale=raw.meta.scale)
    with torch.no_grad():
        meta.stored.copy_(stored)
    numbered = (run.optimizer.state_dict() if optim is None       # no state yet: only the groups
                else _named_to_numbered(optim, _optimizer_names(run.module, inner)))
    return (_GatheredLM(raw.model, part("model.")), meta, _Holder(state=part("head.")),
            _Holder(state=numbered))


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


# ============================================================================ the run folder

@dataclass
class RunDir:
    """Where a run writes; every path is None for a run without files (``out_dir=None``).

    out_dir: the run folder.  checkpoint: ``out_dir/checkpoint``.  metrics: ``out_dir/metrics.jsonl``.
    resuming: ``resume`` was asked and the checkpoint holds a training state to continue from.
    """

    out_dir: Path | None
    checkpoint: Path | None
    metrics: Path | None
    resuming: bool


def run_settings(model_name_or_path, data, *, text_field: str, max_lines: int | None, think_where: str,
                 lines: str, shuffle_rewards: bool) -> dict:
    """What ``trainer_state.json`` records of a run and a resumed run must share
    (:data:`qstar_mini.runs.folder.RESUME_KEYS`): local paths made absolute, so that ``data`` and
    ``./data`` are the same; records passed in memory are not recorded."""
    def name(value):
        if isinstance(value, (str, os.PathLike)):
            return str(Path(value).resolve()) if Path(value).exists() else os.fspath(value)
        return None
    return {"model": name(model_name_or_path), "data": name(data), "text_field": text_field,
            "max_lines": max_lines, "think_where": think_where, "lines": lines,
            "shuffle_rewards": bool(shuffle_rewards)}


@contextmanager
def _prepare_run_dir(out_dir, settings: dict, *, resume: bool, overwrite: bool):
    """The one place :func:`train` opens its run folder, before the data and the model are
    loaded: :func:`qstar_mini.runs.folder.open_run` checks it can be written, locks it, repairs an
    interrupted save and refuses to overwrite or wrongly resume a run (main process only;
    the others only read). Yields the :class:`RunDir`."""
    if out_dir is None:
        if resume:
            raise ConfigError("resume=True needs an out_dir holding the run to continue")
        yield RunDir(None, None, None, False)
        return
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    if int(os.environ.get("RANK", "0")) != 0:               # other processes of a distributed run
        yield RunDir(out_dir, ckpt_dir, out_dir / METRICS_FILE, bool(resume))
        return
    with open_run(out_dir, settings, resume=resume, overwrite=overwrite) as state:
        yield RunDir(out_dir, ckpt_dir, out_dir / METRICS_FILE, state is not None)


def _start_metrics(run_dir: RunDir, start_step: int) -> None:
    """Create the run folder; a new run starts ``metrics.jsonl`` afresh, a resumed one keeps the
    lines up to its checkpoint's step."""
    if run_dir.metrics is None:
        return
    run_dir.out_dir.mkdir(parents=True, exist_ok=True)
    if run_dir.resuming:
        _truncate_metrics(run_dir.metrics, start_step)
    else:
        clear_run(run_dir.out_dir)         # the run overwrite replaces, kept until this one started


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the lines of steps <= last_step (a resumed run rewrites what came after); a line
    that is no JSON object (cut short by a full disk or a kill) goes too."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            keep.append(line)
    write_file_atomic(path, "".join(line + "\n" for line in keep).encode())


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
    run_dir: RunDir
    start_step: int
    think_where: str
    shuffle_rewards: bool
    settings: dict
    eval_fn: object
    eval_records: list | None
    evals: list = field(default_factory=list)
    history: list = field(default_factory=list)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def _micro_batch_size(cfg: QuietStarConfig, world: int, grad_accum: int) -> int:
    """Lines per micro-batch: cfg.batch_size split over ``world`` processes and ``grad_accum``."""
    micro = cfg.batch_size // (world * grad_accum)
    if micro * world * grad_accum != cfg.batch_size:
        raise ConfigError(f"batch_size {cfg.batch_size} must be a multiple of processes ({world}) x "
                          f"grad_accum ({grad_accum})")
    return micro


def _load_modules(cfg: QuietStarConfig, model_name_or_path, run_dir: RunDir):
    """(model, tokenizer, meta, head): from the checkpoint when resuming (its config must be
    ``cfg``), else the base model with new meta-tokens and mixing head."""
    if run_dir.resuming:
        ck = load_checkpoint(run_dir.checkpoint)
        saved, asked = ck.cfg.to_dict(), cfg.to_dict()
        changed = sorted(k for k, v in asked.items() if k != "steps" and saved.get(k) != v)
        if changed:      # steps may differ: more steps extend a finished run
            raise ConfigError(f"--resume: {run_dir.checkpoint}'s config differs in {changed}; use its "
                              f"settings, or a new --out")
        return ck.model, ck.tokenizer, ck.meta, ck.head
    model, tokenizer = load_model(model_name_or_path)
    meta, head = prepare_model(model, tokenizer, cfg)
    return model, tokenizer, meta, head


def set_up(cfg: QuietStarConfig, model_name_or_path, records: list[dict], run_dir: RunDir, *,
           think_where: str, shuffle_rewards: bool, grad_accum: int, device: str | None,
           eval_fn, eval_records, settings: dict) -> Run:
    """Accelerator, model, encoded lines, optimiser, schedule and thought generator, restored
    from the checkpoint when resuming (the data position is the step number)."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(device, grad_accum, find_unused=not cfg.think)
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = _micro_batch_size(cfg, world, grad_accum)
    set_seed(cfg.seed)
    model, tokenizer, meta, head = _load_modules(cfg, model_name_or_path, run_dir)
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
        _set_rng_state(rng, generator, rank)
    saved_optimizer = None
    if is_sharded(accelerator):      # wrapping replaces the parameters the loaded state is keyed by
        saved_optimizer = optimizer.state_dict() if run_dir.resuming else None
        optimizer.state.clear()
    module, optimizer = accelerator.prepare(raw, optimizer)   # the scheduler is stepped by hand
    raw = accelerator.unwrap_model(module)
    if saved_optimizer is not None:
        _load_sharded_optimizer(module, optimizer, saved_optimizer)
    if accelerator.is_main_process:
        _start_metrics(run_dir, start_step)
    settings = {**settings, "world_size": world, "grad_accum": grad_accum, "batch_size": cfg.batch_size}
    return Run(cfg, accelerator, module, raw, optimizer, scheduler, generator, tokenizer, enc, micro, run_dir,
               start_step, think_where, shuffle_rewards, settings,
               eval_fn or partial(quick_eval, think_where=think_where), eval_records, evals)


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
            positions = think_pos if run.think_where == "answer" else None     # the fast path
            out = run.module(ids, mask, cfg, generator=run.generator, step=step,
                             shuffle_rewards=run.shuffle_rewards, positions=positions)
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
    parts = _gathered_parts(run) if is_sharded(run.accelerator) else None   # every process takes part
    rng = _rng_state(run.generator, run.accelerator)                          # (all) gathered too
    if run.main:
        raw = run.raw
        model, meta, head, optimizer = parts or (raw.model, raw.meta, raw.head, run.optimizer)
        save_checkpoint(run.run_dir.checkpoint, model, run.tokenizer, meta, head, run.cfg,
                        optimizer=optimizer, scheduler=run.scheduler, rng=rng,
                        trainer_state={"step": step, "evals": run.evals, **run.settings})
    run.accelerator.wait_for_everyone()     # no process reads the checkpoint before it is written


# ============================================================================ the loop

def train(cfg: QuietStarConfig, model_name_or_path=TINY_BASE, data=DATA_DIR, out_dir=None, *,
          think_where: str = "all", lines: str = "answer_only", shuffle_rewards: bool = False,
          eval_data=None, eval_every: int = 50, eval_lines: int = 200, save_every: int | None = None,
          resume: bool = False, overwrite: bool = True, grad_accum: int = 1, device: str | None = None,
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
                         optimiser, schedule, RNG and data position); refused when there is
                         none or when the run's settings differ (a larger cfg.steps extends it).
    overwrite:           a new run into an ``out_dir`` that holds one replaces it (the command
                         line passes False unless --overwrite: it then refuses).
    stop_after:          stop (and checkpoint) after this step, as if interrupted; for tests.
    eval_fn:             ``eval_fn(model, tokenizer, meta, head, cfg, records) -> dict``;
                         default :func:`qstar_mini.evaluation.arithmetic.quick_eval`.
    returns: {"steps", "seconds", "final": last step metrics, "evals": [...], "history": [...],
              "out_dir", "checkpoint"} and, in memory, "modules": (model, tokenizer, meta, head).
    """
    if think_where not in THINK_WHERE:
        raise ConfigError(f"think_where must be one of {THINK_WHERE} (got {think_where!r})")
    if grad_accum < 1:
        raise ConfigError(f"grad_accum must be >= 1 (got {grad_accum})")
    if shuffle_rewards and not (cfg.think and cfg.policy_loss_weight > 0):
        raise ConfigError("shuffle_rewards permutes REINFORCE's rewards: it needs thinking on and "
                          "policy_loss_weight > 0 (drop --shuffle-rewards, --no-think or --no-policy)")
    settings = run_settings(model_name_or_path, data, text_field=text_field, max_lines=max_lines,
                            think_where=think_where, lines=lines, shuffle_rewards=shuffle_rewards)
    with _prepare_run_dir(out_dir, settings, resume=resume, overwrite=overwrite) as run_dir:
        # Data first: a broken file fails before a model is loaded.
        records = select_lines(load_records(data, "train", text_field, max_lines), lines)
        eval_records = held_out_records(data, eval_data, eval_lines)
        run = set_up(cfg, model_name_or_path, records, run_dir, think_where=think_where,
                     shuffle_rewards=shuffle_rewards, grad_accum=grad_accum, device=device, eval_fn=eval_fn,
                     eval_records=eval_records, settings=settings)
        return _loop(run, cfg.steps if stop_after is None else min(cfg.steps, stop_after),
                     eval_every=eval_every, save_every=save_every, progress=progress)


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
