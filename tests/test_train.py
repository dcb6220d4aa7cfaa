"""The training loop, the control, checkpoints and resume (tiny random models; seconds).

The two-process check runs when ``QSTAR_SLOW=1`` (it starts two Python processes; about 20 s
on two cores). It uses ``accelerate launch --multi_gpu --num_processes 2`` on a machine without
GPUs: two torchrun processes on the CPU (gloo); ``--cpu --num_processes 2`` starts only one
process with accelerate 1.15 unless MPI is configured.

    QSTAR_SLOW=1 python -m pytest tests/test_train.py -k accelerate

tests/runs/test_fsdp.py compares two DDP or FSDP (sharded) processes with one, number for number.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qstar_mini.runs.checkpoint import load_checkpoint, load_training_state, save_checkpoint
from qstar_mini.config import official, tiny
from qstar_mini.data import read_jsonl
from qstar_mini.errors import CheckpointError, ConfigError, DataError, ModelError
from qstar_mini.models.tiny import build_tokenizer, tiny_model
from qstar_mini.paths import DATA_DIR
from qstar_mini.step import prepare_model
from qstar_mini.losses import reinforce_loss
from qstar_mini.records import batch_indices, encode_records
from qstar_mini.step import policy_entries
from qstar_mini.train import QuietStarModule, build_optimizer, train
from qstar_mini.cli.train import add_train_arguments, resolve_train_args

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent


def small_cfg(**kw):
    return tiny(**{"steps": 4, "batch_size": 8, "warmup_steps": 2, "n_thoughts": 2, **kw})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model (hidden 32, 2 layers) with the project's tokenizer, saved locally."""
    path = tmp_path_factory.mktemp("tiny-random")
    tok = build_tokenizer()
    model = tiny_model(tok, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """64 training lines (both kinds) and 16 held-out answer-only lines."""
    path = tmp_path_factory.mktemp("data")
    train_lines = read_jsonl(DATA_DIR / "train.jsonl")[:64]
    valid = [r for r in read_jsonl(DATA_DIR / "validation.jsonl") if not r["has_working"]][:16]
    (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_lines))
    (path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in valid))
    return path / "train.jsonl"


def load(model_dir, cfg):
    from qstar_mini.models.tiny import load_model

    model, tok = load_model(model_dir)
    meta, head = prepare_model(model, tok, cfg)
    return model, tok, meta, head


def fixed_batch(tok, n=8):
    records = [r for r in read_jsonl(DATA_DIR / "validation.jsonl")][:n]
    enc = encode_records(tok, records, 32)
    return enc.input_ids, enc.attention_mask, enc


# ---------------------------------------------------------------------------------- the step

def test_few_steps_reduce_the_loss_on_a_fixed_batch(model_dir):
    torch.manual_seed(0)
    cfg = small_cfg(lr=3e-3, mixer_lr=3e-3)
    model, tok, meta, head = load(model_dir, cfg)
    module = QuietStarModule(model, meta, head)
    opt = build_optimizer(module, cfg)
    ids, mask, _ = fixed_batch(tok)

    def loss_now():
        with torch.no_grad():
            return float(module(ids, mask, cfg, generator=torch.Generator().manual_seed(0))["loss"])

    before = loss_now()
    for _ in range(8):
        out = module(ids, mask, cfg, generator=torch.Generator().manual_seed(1))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert loss_now() < before - 0.1


def test_the_control_loss_is_the_plain_lm_loss(model_dir):
    cfg = small_cfg(think=False)
    model, tok, meta, head = load(model_dir, cfg)
    ids, mask, _ = fixed_batch(tok)
    out = QuietStarModule(model, meta, head)(ids, mask, cfg)
    assert out["w"] is None and out["thoughts"] is None
    logits = model(input_ids=ids, attention_mask=mask).logits[..., : min(meta.ids)]   # text tokens only
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]
    plain = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out["loss"], plain, rtol=1e-5, atol=1e-5)


def test_module_thinks_at_one_position_per_line(model_dir):
    """think_where="answer": QuietStarModule passes each line's think_pos to quiet_star_step as
    ``positions`` (one thought position per line; equal to the masked all-positions step, see
    tests/test_step.py)."""
    cfg = small_cfg()
    model, tok, meta, head = load(model_dir, cfg)
    ids, mask, enc = fixed_batch(tok, n=6)
    out = QuietStarModule(model, meta, head)(ids, mask, cfg, positions=enc.think_pos,
                                             generator=torch.Generator().manual_seed(0))
    assert out["thoughts"].shape == (6, cfg.n_thoughts, 1, cfg.thought_length)
    assert torch.equal(out["valid"][:, 0, 0], enc.think_pos >= 0)          # working lines do not think


def test_think_pos_is_the_position_before_the_answer(model_dir):
    tok = build_tokenizer()
    enc = encode_records(tok, [{"text": "31415=4"}, {"text": "31415=(34894)4"}, {"text": "no answer"}], 32)
    assert enc.answer_pos.tolist() == [7, 14, -1]                 # <s> shifts by one
    assert enc.think_pos.tolist() == [6, -1, -1]                  # only answer-only lines think
    assert int(enc.input_ids[0, 6]) == tok.convert_tokens_to_ids("=")   # the "=" of 31415=4


@pytest.mark.parametrize("policy_positions", ["real", "official"])
@pytest.mark.parametrize("answer_only", [False, True])
def test_shuffled_rewards_use_the_steps_own_entries(model_dir, policy_positions, answer_only):
    """The shuffled-reward control reads rewards, thought log-probs and REINFORCE's entries from
    the step's output; its loss is REINFORCE on the rewards permuted within each position,
    with the entries recomputed here the way the step defines them (and the loss recombined)."""
    cfg = small_cfg(n_thoughts=3, policy_positions=policy_positions)
    model, tok, meta, head = load(model_dir, cfg)
    ids, mask, enc = fixed_batch(tok, n=6)
    positions = enc.think_pos if answer_only else None
    module = QuietStarModule(model, meta, head)
    plain = module(ids, mask, cfg, generator=torch.Generator().manual_seed(5), positions=positions)
    g = torch.Generator().manual_seed(5)
    shuffled = module(ids, mask, cfg, generator=g, shuffle_rewards=True, positions=positions)
    b, n, m = plain["rewards"].shape
    torch.testing.assert_close(shuffled["rewards"], plain["rewards"])        # the same step, the same thoughts
    g = torch.Generator().manual_seed(5)
    module(ids, mask, cfg, generator=g, positions=positions)                   # the step's own draws ...
    perm = torch.rand((b, n, m), generator=g).argsort(dim=1)                  # ... then the control's
    trained, counted = policy_entries(cfg, shuffled["valid"][..., 0], ids.shape[1],
                                      None if positions is None else positions[:, None])
    _, expected = reinforce_loss(plain["rewards"].gather(1, perm), shuffled["thought_logprobs"], trained,
                                 cfg.clamp_negative_rewards, cfg.reinforce_reduction, counted=counted)
    torch.testing.assert_close(shuffled["policy_loss"], expected)
    assert not torch.equal(shuffled["policy_loss"], plain["policy_loss"])
    torch.testing.assert_close(shuffled["loss"], cfg.base_loss_weight * shuffled["base_nll"]
                               + (1 - cfg.base_loss_weight) * shuffled["talk_nll"]
                               + cfg.policy_loss_weight * expected)


def test_batch_indices_are_a_deterministic_endless_stream():
    a = torch.cat([batch_indices(10, 4, s, seed=3) for s in range(5)])
    assert a[:10].sort().values.tolist() == list(range(10))        # epoch 0 visits every line once
    assert a[10:20].sort().values.tolist() == list(range(10))      # and so does epoch 1
    assert torch.equal(batch_indices(10, 4, 3, seed=3), a[12:16])


# ---------------------------------------------------------------------------------- the loop

def test_train_writes_metrics_and_a_checkpoint(model_dir, data_file, tmp_path):
    cfg = small_cfg(steps=3)
    result = train(cfg, model_dir, data_file, tmp_path / "run", think_where="answer", shuffle_rewards=True,
                   eval_every=2, eval_lines=8, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["kind"] == "train"]
    assert [x["step"] for x in train_lines] == [1, 2, 3]
    assert [x["step"] for x in lines if x["kind"] == "eval"] == [0, 2, 3]
    for key in ("loss", "base_nll", "talk_nll", "policy_loss", "w", "thought_correct", "lr"):
        assert key in train_lines[-1]
    assert result["evals"][-1]["step"] == 3 and "thought_correct" in result["evals"][-1]
    files = {p.name for p in (tmp_path / "run" / "checkpoint").iterdir()}
    assert {"model.safetensors", "mixing_head.safetensors", "meta_tokens.safetensors", "qstar_config.json",
            "optimizer.safetensors", "optimizer.json", "scheduler.json", "rng.safetensors",
            "trainer_state.json", "tokenizer.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)     # never pickle


def test_checkpoint_round_trip(model_dir, tmp_path):
    cfg = small_cfg(mixer_hidden=8)
    model, tok, meta, head = load(model_dir, cfg)
    with torch.no_grad():
        meta.stored.add_(0.5)
        head.net[-1].weight.normal_()
    save_checkpoint(tmp_path / "ck", model, tok, meta, head, cfg)
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.cfg == cfg
    assert (ck.meta.start_id, ck.meta.end_id, ck.meta.scale) == (meta.start_id, meta.end_id, meta.scale)
    assert torch.equal(ck.meta.stored, meta.stored)
    for k, v in head.state_dict().items():
        assert torch.equal(ck.head.state_dict()[k], v)
    for k, v in model.state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v), k
    table = ck.model.get_input_embeddings().weight
    assert torch.allclose(table[meta.start_id], meta.embeddings()[0])              # written into the table
    assert ck.tokenizer.convert_tokens_to_ids("<|startofthought|>") == meta.start_id


def test_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="incomplete") as e:
        load_checkpoint(tmp_path / "half")
    assert "\n" not in str(e.value)


def _all_tensors(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for name in ("model.safetensors", "mixing_head.safetensors", "meta_tokens.safetensors",
                 "optimizer.safetensors"):
        out.update({f"{name}:{k}": v for k, v in load_file(str(ckpt / name)).items()})
    return out


def test_interrupted_then_resumed_equals_uninterrupted(model_dir, data_file, tmp_path):
    cfg = small_cfg(steps=6)
    kw = dict(eval_data=[], progress=False, think_where="all")
    full = train(cfg, model_dir, data_file, tmp_path / "full", save_every=3, **kw)
    part = train(cfg, model_dir, data_file, tmp_path / "part", stop_after=3, **kw)
    assert part["steps"] == 3
    state, _ = load_training_state(tmp_path / "part" / "checkpoint")
    assert state["step"] == 3
    resumed = train(cfg, model_dir, data_file, tmp_path / "part", resume=True, **kw)
    assert resumed["steps"] == 6
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in full["history"][3:]],
                                                                    rel=1e-5, abs=1e-6)
    a, b = _all_tensors(tmp_path / "full" / "checkpoint"), _all_tensors(tmp_path / "part" / "checkpoint")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    lines = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]                       # no duplicates
    with pytest.raises(ConfigError, match="config differs"):
        train(cfg.replace(lr=1e-3), model_dir, data_file, tmp_path / "part", resume=True, **kw)


# ---------------------------------------------------------------------------------- errors

def test_missing_model_path_is_a_one_line_model_error(data_file, tmp_path):
    with pytest.raises(ModelError) as e:
        train(small_cfg(), tmp_path / "no-such-model", data_file, None, progress=False)
    assert "does not exist" in str(e.value) and "\n" not in str(e.value)


def test_broken_jsonl_is_a_one_line_data_error(model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "12345=5"}\n{"text": oops}\n')
    with pytest.raises(DataError) as e:
        train(small_cfg(), model_dir, bad, None, progress=False)
    assert "line 2" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        train(small_cfg(), model_dir, tmp_path / "missing.jsonl", None, progress=False)


def test_bad_batch_split_is_a_config_error(model_dir, data_file):
    with pytest.raises(ConfigError, match="multiple"):
        train(small_cfg(batch_size=6), model_dir, data_file, None, grad_accum=4, progress=False)


def test_grad_accum_runs(model_dir, data_file):
    r = train(small_cfg(steps=2), model_dir, data_file, None, grad_accum=2, eval_data=[], progress=False)
    assert r["steps"] == 2 and torch.isfinite(torch.tensor(r["final"]["loss"]))


# ---------------------------------------------------------------------------------- command line

def test_yaml_config_and_flags(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("preset: tiny\nsteps: 7\nlr: 0.001\nthink_where: answer\nmodel: some/model\n")
    parser = add_train_arguments(argparse.ArgumentParser())
    cfg, run = resolve_train_args(parser.parse_args(["--config", str(yaml_file), "--lr", "0.002", "--no-policy"]))
    assert (cfg.steps, cfg.lr, cfg.policy_loss_weight) == (7, 0.002, 0.0)
    assert run["think_where"] == "answer" and run["model"] == "some/model"
    cfg, _ = resolve_train_args(parser.parse_args(["--no-think", "--preset", "official"]))
    assert cfg.think is False and cfg.lr == 1e-6
    yaml_file.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match="stepz"):
        resolve_train_args(parser.parse_args(["--config", str(yaml_file)]))


@pytest.mark.skipif(os.environ.get("QSTAR_SLOW") != "1", reason="two processes; set QSTAR_SLOW=1")
def test_accelerate_launch_two_cpu_processes(model_dir, data_file, tmp_path):
    script = tmp_path / "two.py"
    script.write_text(
        "import torch, sys\ntorch.set_num_threads(1)\n"
        "from qstar_mini.config import tiny\nfrom qstar_mini.train import train\n"
        f"r = train(tiny(steps=2, batch_size=8, n_thoughts=2), {str(model_dir)!r}, {str(data_file)!r}, "
        f"{str(tmp_path / 'run')!r}, eval_data=[], progress=False, device='cpu')\n"
        "print('STEPS', r['steps'], r['final']['loss'])\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("STEPS 2") == 2
    assert (tmp_path / "run" / "checkpoint" / "trainer_state.json").exists()
    assert json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())["world_size"] == 2


def test_run_train_from_flags_on_a_llama(data_file, tmp_path, capsys):
    """``qstar-mini train`` as the CLI calls it, on another architecture (a local folder stands
    in for a Hugging Face name: both go through the same ``from_pretrained``)."""
    from qstar_mini.cli.train import run_train

    tok = build_tokenizer()
    tiny_model(tok, arch="llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=64).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    parser = add_train_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--model", str(tmp_path / "llama"), "--data", str(data_file), "--out",
                              str(tmp_path / "run"), "--steps", "2", "--batch-size", "8", "--n-thoughts", "2",
                              "--think-where", "answer", "--eval-every", "0", "--eval-lines", "4",
                              "--no-progress"])
    assert run_train(args) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    ck = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert type(ck.model).__name__ == "LlamaForCausalLM" and ck.cfg.n_thoughts == 2


# ---------------------------------------------------------------- schedule and decay (official)

def test_linear_schedule_is_the_hugging_face_trainers():
    """official(): lr from 0 up over the warmup, then linearly down (HF Trainer's default)."""
    from transformers import get_linear_schedule_with_warmup

    from qstar_mini.train import make_schedule

    def rates(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched, out = make(opt), []
        for _ in range(60):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    cfg = official(warmup_steps=20, lr_decay_steps=50)
    ours = rates(lambda opt: make_schedule(opt, cfg))
    theirs = rates(lambda opt: get_linear_schedule_with_warmup(opt, 20, 50))
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert ours[0] == 0.0 and ours[20] == 1.0 and ours[55] == 0.0
    held = rates(lambda opt: make_schedule(opt, tiny(warmup_steps=10)))      # tiny: warm up, then hold
    assert held[0] == pytest.approx(0.1) and held[9:] == [1.0] * 51


def test_weight_decay_groups_follow_the_official_trainer(model_dir):
    """official(): decay on the meta-tokens, none on biases or LayerNorm weights (the HF Trainer
    of transformers 4.37); tiny(): the meta-tokens never decay."""
    cfg = official(seq_len=16, weight_decay=0.1)
    model, tok, meta, head = load(model_dir, cfg)
    opt = build_optimizer(QuietStarModule(model, meta, head), cfg)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(meta.stored)] == 0.1
    biases = [p for n, p in head.named_parameters() if "bias" in n]
    assert biases and all(decay[id(p)] == 0.0 for p in biases)
    norms = [m.weight for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert all(decay[id(p)] == 0.0 for p in norms)
    assert decay[id(model.get_input_embeddings().weight)] == 0.1
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters())) + 1 + len(list(head.parameters()))
    small = tiny(seq_len=16, weight_decay=0.1)
    model, tok, meta, head = load(model_dir, small)
    opt = build_optimizer(QuietStarModule(model, meta, head), small)
    assert len(opt.param_groups) == 3 and opt.param_groups[1]["weight_decay"] == 0.0
