"""Checkpoints: everything a Quiet-STaR run needs to be evaluated or resumed, and no pickle.

A checkpoint is one folder, written atomically (into a temporary folder next to it, then
moved into place with ``os.replace``), so a run killed while saving leaves the previous
checkpoint intact::

    checkpoint/
      config.json, model.safetensors          the LM (``save_pretrained``), with the learned
                                               meta-token embeddings written into its table
      tokenizer.json, tokenizer_config.json    the tokenizer, meta-tokens included
      meta_tokens.safetensors                  ``MetaTokens.stored`` (2, hidden) and its scale
      mixing_head.safetensors                  the mixing head's weights
      qstar_config.json                        the QuietStarConfig
      --- only when training can resume from it ---
      optimizer.safetensors + optimizer.json   AdamW's tensors / its param groups and hyper-parameters
      scheduler.json                           the learning-rate schedule's position
      rng.safetensors                          torch's global RNG and the thought-sampling generator
      trainer_state.json                       step, data position, run settings
      manifest.json                            size and sha256 of every file above, written last

Loading checks the files it reads against ``manifest.json`` first (:func:`verify_checkpoint`):
:func:`load_checkpoint` the model's, :func:`load_training_state` the optimiser's, schedule's, RNG's
and trainer state's (so an evaluation does not hash the optimiser state it never reads). A damaged
or edited file is refused in one line naming it, before anything is trained on it. Hashing reads
every byte once more; ``verify="size"`` compares only the sizes (a ``stat`` per file), for a
checkpoint too large to hash on every load.

Every tensor is stored with ``safetensors`` and everything else as JSON: loading a checkpoint
never unpickles anything (a pickle can run arbitrary code).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from qstar_mini.config import QuietStarConfig
from qstar_mini.errors import CheckpointError, ConfigError
from qstar_mini.files import MANIFEST, check_files, make_portable, read_manifest, write_dir_atomic, write_json, write_manifest
from qstar_mini.meta_tokens import MetaTokens
from qstar_mini.mixing import MixingHead

META_FILE = "meta_tokens.safetensors"
HEAD_FILE = "mixing_head.safetensors"
CONFIG_FILE = "qstar_config.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
REQUIRED = ("config.json", META_FILE, HEAD_FILE, CONFIG_FILE)
VERIFY_MODES = ("full", "size", "none")
#: The files only ``resume`` reads (:func:`load_training_state`); the others are the trained model.
TRAINING_FILES = (OPTIMIZER_TENSORS, OPTIMIZER_JSON, SCHEDULER_FILE, RNG_FILE, STATE_FILE)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg}); the checkpoint is corrupt") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any failure is one line
        raise CheckpointError(f"{path} could not be read ({type(e).__name__}); the checkpoint is corrupt") from None


# ----------------------------------------------------------------------------- optimizer state as tensors + JSON

def optimizer_state_to_files(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and the rest (for JSON).

    state["state"][i][key] -> tensors["state.{i}.{key}"]; a non-tensor value goes to the JSON.
    """
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state_from_files(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    """Inverse of :func:`optimizer_state_to_files`."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in info.get("scalars", {}).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": info["param_groups"]}


def scheduler_state_to_json(state: dict) -> dict:
    """A LambdaLR state dict without its (unpicklable, unneeded) lambdas."""
    return {k: v for k, v in state.items() if k != "lr_lambdas"}


def scheduler_state_from_json(state: dict, n_groups: int) -> dict:
    return dict(state, lr_lambdas=[None] * n_groups)


# ----------------------------------------------------------------------------- save / load

def save_checkpoint(out_dir: str | os.PathLike, model: nn.Module, tokenizer, meta: MetaTokens,
                    head: MixingHead, cfg: QuietStarConfig, *, optimizer=None, scheduler=None,
                    rng: dict[str, torch.Tensor] | None = None, trainer_state: dict | None = None) -> Path:
    """Write a checkpoint folder atomically; returns its path.

    ``model`` is the plain (unwrapped) LM. Its embedding table gets the learned meta-token
    rows (``meta.write_into``) so the saved model is usable on its own. Pass optimizer,
    scheduler, rng ({name: uint8 state tensor}) and trainer_state to make it resumable.
    """
    meta.write_into(model)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        make_portable(tmp)
        save_file({"stored": meta.stored.detach().cpu().contiguous()}, str(tmp / META_FILE),
                  metadata={"start_id": str(meta.start_id), "end_id": str(meta.end_id),
                            "scale": repr(meta.scale)})
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
                  str(tmp / HEAD_FILE))
        write_json(tmp / CONFIG_FILE, cfg.to_dict())
        if optimizer is not None:
            tensors, info = optimizer_state_to_files(optimizer.state_dict())
            save_file(tensors, str(tmp / OPTIMIZER_TENSORS))
            write_json(tmp / OPTIMIZER_JSON, info)
        if scheduler is not None:
            write_json(tmp / SCHEDULER_FILE, scheduler_state_to_json(scheduler.state_dict()))
        if rng is not None:
            save_file({k: v.cpu().contiguous() for k, v in rng.items()}, str(tmp / RNG_FILE))
        if trainer_state is not None:
            write_json(tmp / STATE_FILE, trainer_state)
        write_manifest(tmp)                          # last: it describes the files above

    return write_dir_atomic(out_dir, write)


def check_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder, or a one-line CheckpointError saying what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a folder)")
    missing = [name for name in REQUIRED if not (path / name).exists()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return path


def verify_checkpoint(path: str | os.PathLike, verify: str = "full", part: str = "all") -> Path:
    """Check a checkpoint's files against its ``manifest.json``; returns the folder.

    verify: "full" (sha256), "size" (sizes only) or "none".
    part: which files "full" hashes: "all"; "model", all but TRAINING_FILES (what
    :func:`load_checkpoint` reads); "training", only TRAINING_FILES (what
    :func:`load_training_state` reads). The sizes of all are compared in any case.
    A damaged file is a one-line CheckpointError naming it. A checkpoint without a manifest
    (saved before qstar_mini wrote one) is loaded unchecked, with a warning.
    """
    if verify not in VERIFY_MODES:
        raise CheckpointError(f"verify must be one of {VERIFY_MODES} (got {verify!r})")
    path = check_checkpoint(path)
    if verify == "none":
        return path
    try:
        manifest = read_manifest(path)
    except ValueError as e:
        raise CheckpointError(f"{e}; the checkpoint cannot be checked: use a copy of it, or train "
                              f"again (--overwrite)") from None
    if manifest is None:
        import warnings

        warnings.warn(f"checkpoint {path} has no {MANIFEST} (saved by an older qstar_mini): its files "
                      f"cannot be checked for damage", stacklevel=3)
        return path
    table = manifest["files"]
    hashed = {"all": set(table), "model": set(table) - set(TRAINING_FILES),
              "training": set(TRAINING_FILES)}[part] if verify == "full" else set()
    problem = (check_files(path, table, full=False)
               or check_files(path, {name: table[name] for name in sorted(hashed & set(table))}, full=True))
    if problem is not None:
        raise CheckpointError(f"checkpoint {path}: {problem}: damaged or edited since it was saved; "
                              f"use a copy of the run, or train again (--overwrite)")
    return path


def load_config(path: str | os.PathLike) -> QuietStarConfig:
    """The QuietStarConfig a checkpoint was trained with."""
    values = _read_json(Path(path) / CONFIG_FILE)
    if not isinstance(values, dict):
        raise CheckpointError(f"{Path(path) / CONFIG_FILE} holds a {type(values).__name__}, not the config's "
                              f"fields; the checkpoint is corrupt")
    try:
        return QuietStarConfig.from_dict(values)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{Path(path) / CONFIG_FILE}: {e}; correct the file, or train again") from None


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns: the trained parts, ready for evaluation."""

    model: nn.Module
    tokenizer: object
    meta: MetaTokens
    head: MixingHead
    cfg: QuietStarConfig
    path: Path


def load_checkpoint(path: str | os.PathLike, *, device=None, dtype: torch.dtype = torch.float32,
                    attn_implementation: str | None = None, verify: str = "full") -> Checkpoint:
    """Load model, tokenizer, meta-tokens, mixing head and config from a checkpoint folder,
    the files it reads first checked against the manifest (``verify``: see
    :func:`verify_checkpoint`; the training state is hashed by :func:`load_training_state`)."""
    from qstar_mini.models.tiny import load_model

    path = verify_checkpoint(path, verify, part="model")
    cfg = load_config(path)
    model, tokenizer = load_model(path, dtype=dtype, attn_implementation=attn_implementation, device=device)
    meta_tensors = _load_tensors(path / META_FILE)
    with safe_open(str(path / META_FILE), framework="pt") as f:   # ids and scale: in the header
        info = f.metadata() or {}
    try:
        start_id, end_id, scale = int(info["start_id"]), int(info["end_id"]), float(info["scale"])
    except (KeyError, ValueError):
        raise CheckpointError(f"{path / META_FILE} lacks the meta-token ids; the checkpoint is corrupt") from None
    stored = meta_tensors["stored"]
    meta = MetaTokens(start_id, end_id, stored * scale, scale=scale)
    with torch.no_grad():
        meta.stored.copy_(stored)                      # exactly the saved values (no /scale*scale rounding)
    weight = model.get_input_embeddings().weight
    meta = meta.to(weight.device)
    head = MixingHead(weight.shape[1], cfg.mixer_hidden, cfg.mixer_bias_init, cfg.mixer_depth)
    try:
        head.load_state_dict(_load_tensors(path / HEAD_FILE))
    except RuntimeError as e:
        raise CheckpointError(f"{path / HEAD_FILE} does not fit the model "
                              f"({str(e).splitlines()[0][:120]})") from None
    head = head.to(weight.device, weight.dtype)
    meta.write_into(model)
    return Checkpoint(model=model, tokenizer=tokenizer, meta=meta, head=head, cfg=cfg, path=path)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_param_groups(info, n_groups: int, path: Path) -> None:
    """optimizer.json must hold one param group per group of this run, each with numeric lr,
    weight_decay and eps (a string would only fail at the first step, or not at all)."""
    groups = info.get("param_groups") if isinstance(info, dict) else None
    if not isinstance(groups, list) or len(groups) != n_groups or not all(isinstance(g, dict) for g in groups):
        raise CheckpointError(f"{path}: the optimizer state needs {n_groups} param groups; the checkpoint is corrupt")
    for group in groups:
        bad = [k for k in ("lr", "weight_decay", "eps") if not _number(group.get(k))]
        if bad:
            raise CheckpointError(f"{path}: the optimizer's {', '.join(bad)} is not a number; the checkpoint is corrupt")


def _check_scheduler(sched, n_groups: int, path: Path) -> None:
    """scheduler.json must say where the schedule is (last_epoch, base_lrs): an empty one would
    silently restart the warm-up."""
    ok = (isinstance(sched, dict) and isinstance(sched.get("last_epoch"), int)
          and isinstance(sched.get("base_lrs"), list) and len(sched["base_lrs"]) == n_groups
          and all(_number(v) for v in sched["base_lrs"]))
    if not ok:
        raise CheckpointError(f"{path} does not hold the schedule's position (last_epoch, base_lrs); "
                              f"the checkpoint is corrupt")


def load_training_state(path: str | os.PathLike, optimizer=None, scheduler=None,
                        verify: str = "full") -> tuple[dict, dict]:
    """Restore optimizer and scheduler in place from a resumable checkpoint, its TRAINING_FILES
    first checked against the manifest (``verify``: see :func:`verify_checkpoint`).

    returns: (trainer_state dict, rng {name: uint8 tensor}).
    """
    path = verify_checkpoint(path, verify, part="training")
    if not (path / STATE_FILE).exists():
        raise CheckpointError(f"checkpoint {path} has no {STATE_FILE}: it was not saved by a training "
                              f"run and cannot be resumed")
    state = _read_json(path / STATE_FILE)
    if optimizer is not None:
        info = _read_json(path / OPTIMIZER_JSON)
        _check_param_groups(info, len(optimizer.param_groups), path / OPTIMIZER_JSON)
        try:
            opt_state = optimizer_state_from_files(_load_tensors(path / OPTIMIZER_TENSORS), info)
            optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"the optimizer state in {path} does not fit this run "
                                  f"({type(e).__name__}: {str(e)[:100]})") from None
    if scheduler is not None:
        sched = _read_json(path / SCHEDULER_FILE)
        _check_scheduler(sched, len(scheduler.base_lrs), path / SCHEDULER_FILE)
        scheduler.load_state_dict(scheduler_state_from_json(sched, len(scheduler.base_lrs)))
    rng = _load_tensors(path / RNG_FILE) if (path / RNG_FILE).exists() else {}
    return state, rng


# ============================================================================ the random state a checkpoint keeps

def rng_state(generator: torch.Generator, accelerator=None) -> dict[str, torch.Tensor]:
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


def restore_rng_state(rng: dict[str, torch.Tensor], generator: torch.Generator, rank: int = 0) -> None:
    """Restore :func:`rng_state`'s states; process ``rank`` takes its own thought generator's
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


def load_checkpoint_to_resume(path, cfg: QuietStarConfig) -> Checkpoint:
    """The checkpoint a resumed run continues from, refused (naming the fields) when its config
    differs from ``cfg`` in anything but ``steps`` (more steps extend a finished run)."""
    ck = load_checkpoint(path)
    saved, asked = ck.cfg.to_dict(), cfg.to_dict()
    changed = sorted(k for k, v in asked.items() if k != "steps" and saved.get(k) != v)
    if changed:
        raise ConfigError(f"--resume: {path}'s config differs in {changed}; use its settings, or a new --out")
    return ck
