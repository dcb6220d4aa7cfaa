"""Several processes, and sharding (FSDP2): what a run on many devices adds to the loop.

A first reader may skip this module: on one device it only makes the ``Accelerator``.

**Devices.** ``Accelerator(mixed_precision="bf16" on CUDA, else "no")``; the same loop runs on a
CPU, one GPU, or several processes: each process takes its share of every global batch,
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
we switch it to FSDP, which torch runs on the CPU with gloo), in the loop's evaluation (every
process evaluates, inside the sharded module's forward, where its weights are whole), in its
save (:func:`gathered_parts`: the full state is gathered on the main process, which writes the
same checkpoint a single process would) and in its set-up (:func:`load_sharded_optimizer`: a
resumed optimiser state is sharded after wrapping). ``configs/accelerate/fsdp_cpu_2proc.yaml``
is the two-process CPU check.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from qstar_mini.errors import ConfigError
from qstar_mini.meta_tokens import MetaTokens


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


def load_sharded_optimizer(run_module: nn.Module, optimizer, numbered: dict) -> None:
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


def gathered_parts(run):
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


def micro_batch_size(batch_size: int, world: int, grad_accum: int) -> int:
    """Lines per micro-batch: the global batch split over ``world`` processes and ``grad_accum``."""
    micro = batch_size // (world * grad_accum)
    if micro * world * grad_accum != batch_size:
        raise ConfigError(f"batch_size {batch_size} must be a multiple of processes ({world}) x "
                          f"grad_accum ({grad_accum})")
    return micro
