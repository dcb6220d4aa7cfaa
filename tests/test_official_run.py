"""`train(official())` against the official training run: three optimiser steps of the HF Trainer.

``tests/fixtures/official_run/`` was written by ``scripts/official_oracle.py --run-out``: the
released ``modeling_mistral.py`` (ezelikman/quiet-star on transformers 4.37.2) trained by the
Hugging Face Trainer with the TrainingArguments of ``quiet-star-train.py`` (full batch 8 as 2
micro-batches of 8 // n_passes = 4 with gradient accumulation, AdamW with weight decay 0.001,
warmup 20 from 0 then linear decay, gradient clipping 1.0, seed 42), the model set up as its
``model_init`` does (``from_pretrained``, so the mixing head and the new token rows start as
transformers initialises them), on 24 lines of 16 tokens, in float64, with the weights saved
after every step.

Here :func:`qstar_mini.train.train` runs the same three steps with ``official()`` and
``grad_accum=2``. Only what no two programs can share is handed over, and nothing else:

* the random draws: the Gumbel noise of each micro-batch (``quiet_star_step(noise=...)``) and
  the mixing head's two hidden layers (the official N(0, 0.02) draws; the last layer is
  qstar_mini's own, zero as the official one is after its first forward);
* the line order: the Trainer's sampler chose the lines of each micro-batch; the lines are
  written so that ``batch_indices`` picks the same ones;
* the dtype: the base model is loaded in float64.

Every parameter after each step must equal the official one: the change since the start
(where step 1, at learning rate 0, leaves the weights) to ``UPDATE_TOL``, which is the
meaningful bar: at lr 1e-6 the weights themselves move by only ~1e-6 relative per step.
"""

from __future__ import annotations

import json
from functools import lru_cache, partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tokenizers.models import BPE
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

import qstar_mini.train as train_module
from qstar_mini.config import official
from qstar_mini.records import batch_indices

FIXTURE = Path(__file__).parent / "fixtures" / "official_run"
UPDATE_TOL = 1e-5       # relative error of each parameter's change since the start, float64
META_ROWS = (22, 23)    # embedding rows of the meta-tokens: never read (both sides feed their own)


@lru_cache(maxsize=None)
def setup() -> dict:
    return json.loads((FIXTURE / "setup.json").read_text())


@lru_cache(maxsize=None)
def official_run() -> dict:
    return load_file(FIXTURE / "run.safetensors")


def cfg(**changes):
    s = setup()
    return official(seq_len=s["seq"], steps=s["steps"], n_ahead=s["n_ahead"], n_ahead_talk=s["n_ahead_talk"],
                    n_passes=s["n_passes"], batch_size=s["full_batch_size"], **changes)


def save_base(path: Path) -> Path:
    """The fixture's starting weights with the 22-token tokenizer (the meta-tokens come from
    qstar_mini, at the same ids 22 and 23), as a folder ``train`` can load."""
    s = setup()
    model = MistralForCausalLM(MistralConfig.from_pretrained(FIXTURE / "model")).double()
    model.load_state_dict(load_file(FIXTURE / "model" / "model.safetensors"))   # float64, not rounded
    model.save_pretrained(path)
    core = Tokenizer(BPE(vocab={tok: i for i, tok in enumerate(s["vocab"])},
                         merges=[tuple(m) for m in s["merges"]], unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>").save_pretrained(path)
    return path


def lines_in_official_order(c) -> list[dict]:
    """The fixture's lines placed so that step s's batch_indices, cut into grad_accum micro-batches,
    are the lines of the official micro-batches 2s and 2s + 1, in their order."""
    s, order = setup(), setup()["lines_per_micro_batch"]
    n, per_step = len(s["texts"]), c.batch_size
    records: list[dict | None] = [None] * n
    for step in range(s["steps"]):
        seen = [line for micro in order[2 * step:2 * step + 2] for line in micro]
        for slot, line in zip(batch_indices(n, per_step, step, c.seed).tolist(), seen):
            records[slot] = {"text": s["texts"][line]}
    assert all(r is not None for r in records)
    return records


def with_official_draws(monkeypatch):
    """The official run's random draws handed to qstar_mini: the float64 base, the head's hidden
    layers, each micro-batch's Gumbel noise (see the module docstring)."""
    theirs = official_run()
    monkeypatch.setattr(train_module, "load_model", partial(train_module.load_model, dtype=torch.float64))
    real_prepare, real_step = train_module.prepare_model, train_module.quiet_star_step

    def prepare_model(model, tokenizer, c):
        meta, head = real_prepare(model, tokenizer, c)
        assert bool((head.net[-1].weight == 0).all())            # ours; the official one after forward 1
        with torch.no_grad():
            for i in (0, 2):
                head.net[i].weight.copy_(theirs[f"head_init.{i}.weight"])
                head.net[i].bias.copy_(theirs[f"head_init.{i}.bias"])
        return meta, head

    noise = iter(theirs["noise"].double())

    def quiet_star_step(*args, **kwargs):
        return real_step(*args, noise=next(noise), **kwargs)

    monkeypatch.setattr(train_module, "prepare_model", prepare_model)
    monkeypatch.setattr(train_module, "quiet_star_step", quiet_star_step)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


def our_weights(modules) -> dict[str, torch.Tensor]:
    model, _, meta, head = modules
    out = {k: v.detach() for k, v in model.named_parameters()}
    out |= {f"head.{k}": v.detach() for k, v in head.named_parameters()}
    out["meta.stored"] = meta.stored.detach()
    return out


def without_meta_rows(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "model.embed_tokens.weight":
        keep = [i for i in range(x.shape[0]) if i not in META_ROWS]
        return x[keep]
    return x


def run_errors(tmp_path, monkeypatch, steps: int, **changes) -> dict[str, float]:
    """Train ``steps`` steps with qstar_mini; the relative error of every parameter's change since
    the start against the official run's after the same step (the step-1 weights themselves,
    which step 1 at learning rate 0 leaves at the start, for steps = 1)."""
    with_official_draws(monkeypatch)
    c = cfg(**changes)
    base = save_base(tmp_path / "base")
    result = train_module.train(c, base, lines_in_official_order(c), None, lines="all", grad_accum=2,
                                progress=False, stop_after=steps)
    assert result["steps"] == steps
    ours, theirs = our_weights(result["modules"]), official_run()
    err = {}
    for name, value in ours.items():
        start = without_meta_rows(name, theirs[f"step1.{name}"])
        mine = without_meta_rows(name, value)
        target = without_meta_rows(name, theirs[f"step{steps}.{name}"])
        err[name] = rel(mine, start) if steps == 1 else rel(mine - start, target - start)
    return err


def test_the_fixture_is_the_official_setup_and_moves_every_part():
    s, theirs = setup(), official_run()
    args = s["training_arguments"]
    assert (args["per_device_train_batch_size"], args["gradient_accumulation_steps"]) == (4, 2)
    assert (args["learning_rate"], args["weight_decay"], args["warmup_steps"], args["seed"]) == (1e-6, 0.001, 20, 42)
    assert s["learning_rate_of_each_step"] == [0.0, 5e-08, 1e-07]        # warmup over 20 steps from 0
    assert len(s["lines_per_micro_batch"]) == s["steps"] * 2
    assert sorted(sum(s["lines_per_micro_batch"], [])) == list(range(len(s["texts"])))
    # the official head before its first forward: N(0, 0.02), biases 0; the last layer zeroed after
    for i in (0, 2, 4):
        assert abs(float(theirs[f"head_init.{i}.weight"].std()) - 0.02) < 0.002
    assert all(float(theirs[f"head_init.{i}.bias"].abs().max()) == 0 for i in (0, 2))
    assert float(theirs["step1.head.net.4.weight"].abs().max()) == 0
    # steps 2 and 3 move every part, the meta-tokens and the head's last layer included
    for name in ("model.layers.0.mlp.down_proj.weight", "lm_head.weight", "head.net.4.weight", "meta.stored"):
        assert rel(theirs[f"step3.{name}"], theirs[f"step1.{name}"]) > 1e-9, name


def test_train_official_reproduces_the_official_trainer(tmp_path, monkeypatch):
    """After step 3 every parameter has moved from the official start (the meta-tokens from '---',
    the head's last layer 0: step 1 at learning rate 0 leaves it) as the official Trainer moved it.
    Measured: 5e-16 after step 2 (float64 throughout, sdpa attention on both sides: w is still 0,
    so no reward); after step 3, 3.0e-6, all of it in the embedding rows that only thoughts feed
    (pad, unk, '-', '--': 1e-5 of their change, the other rows 1e-14). There w is ~7e-9, so each
    reward (~2e-10) is a difference of log-probs of size ~3 and keeps only ~6 significant digits,
    which the two programs round differently; the 1e6 policy weight carries that into those rows."""
    err = run_errors(tmp_path, monkeypatch, 3)
    worst = {k: v for k, v in err.items() if v > UPDATE_TOL}
    assert not worst, f"after step 3 the weights differ from the official run's: {worst}"


# What around the step the run checks: each of these, switched to qstar_mini's side, is seen.
# (Not seen, so not listed: the meta-tokens are stored / 100, so the weight decay on them changes
# their step by about 2e-7 of itself, below UPDATE_TOL.)
RUN_DEPARTURES = {
    "warmup from lr / 20, then held (tiny's schedule)": dict(lr_schedule="constant"),
    "the mixing head at 10 x the learning rate (tiny's mixer_lr)": dict(mixer_lr=1e-5),
}


@pytest.mark.parametrize("name", RUN_DEPARTURES)
def test_each_departure_around_the_step_is_caught(tmp_path, monkeypatch, name):
    err = run_errors(tmp_path, monkeypatch, 3, **RUN_DEPARTURES[name])
    assert max(err.values()) > 100 * UPDATE_TOL, f"the official run does not see '{name}': {err}"
