"""Every saved artefact verified, a real full disk handled, every config field type-checked.

- A checkpoint's ``manifest.json`` lists each file with its size and sha256; loading checks it,
  and a damaged, truncated or missing file is one line naming it (``verify="size"`` catches only
  what changes a size).
- A real full disk (a small tmpfs, mounted as root; skipped elsewhere) while a run saves: one
  line, exit 2, and the previous checkpoint still loads.
- A config field of the wrong type, in a saved config or anywhere, is refused naming the field.

The command-line side of the same promises (``--resume`` on damaged weights, ...) is in the
matrix of tests/cli/test_cli_matrix.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from qstar_mini import cli, files
from qstar_mini.runs.checkpoint import load_checkpoint, load_config, load_training_state, verify_checkpoint
from qstar_mini.config import FIELD_TYPES, QuietStarConfig, check_field_types, tiny
from qstar_mini.errors import CheckpointError, ConfigError

SMALL = ["--max-lines", "16", "--batch-size", "4", "--eval-every", "0", "--eval-lines", "2", "--no-progress"]


def train_args(out: Path, steps: int = 2) -> list[str]:
    return ["train", "--out", str(out), "--steps", str(steps), *SMALL]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "run"
    assert cli.main(train_args(out)) == 0
    return out


@pytest.fixture
def ckpt(finished_run, tmp_path) -> Path:
    """A copy of the finished run's checkpoint, to damage."""
    return Path(shutil.copytree(finished_run / "checkpoint", tmp_path / "checkpoint"))


def xor_middle(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + n] = bytes(b ^ 0xFF for b in data[middle:middle + n])
    path.write_bytes(bytes(data))


# ---- manifests ---------------------------------------------------------------------------------

def test_the_manifest_lists_every_file_with_its_size_and_sha256(ckpt):
    manifest = json.loads((ckpt / "manifest.json").read_text())
    names = {p.name for p in ckpt.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == names
    assert {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "trainer_state.json"} <= names
    for name, entry in manifest["files"].items():
        assert entry == {"bytes": (ckpt / name).stat().st_size, "sha256": files.sha256_file(ckpt / name)}, name
    assert verify_checkpoint(ckpt) == ckpt


def test_an_evaluation_hashes_the_model_not_the_training_state(ckpt):
    """load_checkpoint reads no optimiser state, so it hashes none (on a SmolLM2 run's 1.6 GB
    checkpoint that is 2 s of 2.5); a damaged one is found by the resume that reads it."""
    xor_middle(ckpt / "optimizer.safetensors")
    load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="optimizer.safetensors differs from the manifest"):
        load_training_state(ckpt)
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        verify_checkpoint(ckpt)                                         # part="all"


def _xor_weights(ckpt): xor_middle(ckpt / "model.safetensors")
def _truncate_optimizer(ckpt): (ckpt / "optimizer.safetensors").write_bytes((ckpt / "optimizer.safetensors").read_bytes()[:-10])
def _delete_rng(ckpt): (ckpt / "rng.safetensors").unlink()
def _edit_state(ckpt): (ckpt / "trainer_state.json").write_text((ckpt / "trainer_state.json").read_text().replace('"step": 2', '"step": 1'))


@pytest.mark.parametrize("damage, name, seen_by_size", [
    (_xor_weights, "model.safetensors", False), (_truncate_optimizer, "optimizer.safetensors", True),
    (_delete_rng, "rng.safetensors", True), (_edit_state, "trainer_state.json", False)],
    ids=["xor-64-bytes", "truncated", "deleted", "step-edited"])
def test_a_damaged_file_is_refused_in_one_line_naming_it(ckpt, damage, name, seen_by_size):
    """By the loader that reads it: load_checkpoint the model's files, load_training_state the
    training state's (load_checkpoint compares only their sizes)."""
    damage(ckpt)
    training = name in ("optimizer.safetensors", "rng.safetensors", "trainer_state.json")
    with pytest.raises(CheckpointError) as refused:
        load_training_state(ckpt) if training else load_checkpoint(ckpt)
    message = str(refused.value)
    assert name in message and "--overwrite" in message and "\n" not in message, message
    if seen_by_size:
        with pytest.raises(CheckpointError, match=name):
            verify_checkpoint(ckpt, "size")
    else:                                     # a flipped byte keeps the size: only the hash sees it
        assert verify_checkpoint(ckpt, "size") == ckpt


def test_a_damaged_manifest_is_refused_and_an_absent_one_warns(ckpt):
    manifest = ckpt / "manifest.json"
    manifest.write_text("{oops")
    with pytest.raises(CheckpointError, match="manifest.json"):
        verify_checkpoint(ckpt)
    manifest.write_text(json.dumps({"format": 1, "files": {"model.safetensors": "yes"}}))
    with pytest.raises(CheckpointError, match="manifest.json"):
        verify_checkpoint(ckpt)
    manifest.unlink()                         # a checkpoint saved before manifests: loads, warned
    with pytest.warns(UserWarning, match="no manifest.json"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="verify"):
        verify_checkpoint(ckpt, "quick")


def test_the_checks_cost_little(ckpt):
    """Measured: sha256 reads about 1 GB/s here; a tiny run's 10 MB checkpoint in ~25 ms."""
    import time

    start = time.perf_counter()
    verify_checkpoint(ckpt, "full")
    assert time.perf_counter() - start < 2.0


# ---- a real full disk ------------------------------------------------------------------------

def mount_tmpfs(where: Path, size: str) -> None:
    """Mount a real tmpfs of ``size`` at ``where``, or skip the test saying why not."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode})")


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of 16 MiB: one tiny checkpoint (10 MB) fits, a second beside it (an
    atomic save writes the new one before the old one goes) does not."""
    mount_tmpfs(tmp_path / "disk", "16m")
    try:
        yield tmp_path / "disk"
    finally:
        subprocess.run(["umount", "--lazy", str(tmp_path / "disk")], check=True)


@pytest.fixture
def full_disk(tmp_path):
    """A real 64 KiB file system, filled but for 512 bytes."""
    where = tmp_path / "full"
    mount_tmpfs(where, "64k")
    try:
        stat = os.statvfs(where)
        (where / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 512))
        yield where
    finally:
        subprocess.run(["umount", "--lazy", str(where)], check=True)     # lazy: torch may hold a file open


def _writers():
    import torch
    from safetensors.torch import save_file

    from qstar_mini.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    return {"safetensors": lambda tmp: save_file({"x": torch.zeros(100_000)}, str(tmp / "x.safetensors")),
            "tokenizer": lambda tmp: tokenizer.save_pretrained(tmp),
            "tokenizer.json": lambda tmp: tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json")),
            "json": lambda tmp: files.write_json(tmp / "a.json", {"k": "v" * 100_000}),
            "torch.save": lambda tmp: torch.save({"x": torch.zeros(100_000)}, tmp / "x.pt")}


@pytest.mark.parametrize("writer", list(_writers()))
def test_every_writer_on_a_real_full_disk_gives_enospc_and_leaves_nothing(full_disk, writer):
    """Measured on a real full tmpfs, each writer fails its own way: SafetensorError '(os error
    28)', tokenizers' Exception '(os error 28)', OSError, torch's RuntimeError 'unexpected pos'.
    Through write_dir_atomic each is an OSError ENOSPC naming the folder (one line on the
    command line, exit 2), and neither the folder nor its temporary copy is left."""
    import errno

    with pytest.raises(OSError) as raised:
        files.write_dir_atomic(full_disk / "out", _writers()[writer])
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(full_disk / "out")
    assert [p.name for p in full_disk.iterdir()] == ["filler"]


def test_a_real_full_disk_is_one_line_and_the_last_checkpoint_still_loads(small_disk):
    run = small_disk / "run"
    done = subprocess.run([sys.executable, "-m", "qstar_mini", *train_args(run)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    before = {p.name: p.read_bytes() for p in (run / "checkpoint").iterdir()}
    grown = subprocess.run([sys.executable, "-m", "qstar_mini", *train_args(run, steps=3), "--resume"],
                           capture_output=True, text=True)
    lines = [line for line in grown.stderr.splitlines() if line.strip() and "%|" not in line]   # bars aside
    assert grown.returncode == 2 and len(lines) == 1, grown.stderr
    assert lines[0].startswith("qstar-mini: error: ") and "No space left on device" in lines[0], lines[0]
    assert "checkpoint" in lines[0] and "Traceback" not in grown.stderr
    assert {p.name: p.read_bytes() for p in (run / "checkpoint").iterdir()} == before
    assert not [p.name for p in run.iterdir() if p.name.startswith(".checkpoint")]   # no half-written copy
    load_checkpoint(run / "checkpoint")                                              # verified and loaded
    assert load_training_state(run / "checkpoint")[0]["step"] == 2


def test_the_first_save_on_a_3_mib_disk_is_one_line_and_leaves_no_half_checkpoint(tmp_path):
    """The reported case: `train --steps 2 ...` on a 3 MiB tmpfs ended in a 31-line traceback
    (SafetensorError, os error 28). Now one line, exit 2; there was no checkpoint before, and no
    half-written one is left (metrics.jsonl stays: a new run needs --overwrite)."""
    where = tmp_path / "disk"
    mount_tmpfs(where, "3m")
    try:
        done = subprocess.run([sys.executable, "-m", "qstar_mini", *train_args(where / "run")],
                              capture_output=True, text=True)
        lines = [line for line in done.stderr.splitlines() if line.strip() and "%|" not in line]
        assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert f"{where / 'run' / 'checkpoint'}: No space left on device" in lines[0], lines[0]
        assert sorted(p.name for p in (where / "run").iterdir()) == [".qstar-run.lock", "metrics.jsonl"]
    finally:
        subprocess.run(["umount", "--lazy", str(where)], check=True)


def test_a_full_disk_in_a_library_of_its_own_becomes_an_os_error(tmp_path):
    """safetensors and tokenizers report a full disk as their own exceptions, '(os error 28)'."""
    import errno

    class SafetensorError(Exception):
        pass

    def write(tmp):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(OSError) as raised:
        files.write_dir_atomic(tmp_path / "out", write)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []                                  # the temporary folder is gone
    with pytest.raises(ValueError, match="not a disk error"):
        files.write_dir_atomic(tmp_path / "out", lambda tmp: (_ for _ in ()).throw(ValueError("not a disk error")))


def test_a_metrics_line_cut_by_a_full_disk_does_not_break_resume(finished_run, tmp_path):
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "loss": 1.2')                         # the disk filled up here
    assert cli.main([*train_args(run, steps=3), "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 2, 3, 3]                                   # evals at 0, 2 (kept) and 3


# ---- config fields ---------------------------------------------------------------------------

WRONG = {"int": "3", "float": "fast", "bool": "yes", "str": 3}


def test_every_field_annotation_can_be_checked():
    for f in dataclasses.fields(QuietStarConfig):
        assert all(k.strip() in FIELD_TYPES for k in str(f.type).split("|")), (f.name, f.type)


@pytest.mark.parametrize("field", [f for f in dataclasses.fields(QuietStarConfig)], ids=lambda f: f.name)
def test_every_config_field_of_the_wrong_type_is_refused_naming_it(field):
    kind = str(field.type).split("|")[0].strip()
    with pytest.raises(ConfigError) as refused:
        tiny(**{field.name: WRONG[kind]})
    assert f"config field {field.name} must be" in str(refused.value), str(refused.value)


def test_ints_are_numbers_and_bools_are_not():
    check_field_types(tiny(lr=1, mixer_bias_init=None))
    for name, value in (("steps", True), ("lr", False), ("think", 1), ("steps", 2.0)):
        with pytest.raises(ConfigError, match=name):
            tiny(**{name: value})


def test_a_saved_config_with_lr_fast_is_refused_naming_lr(ckpt):
    values = json.loads((ckpt / "qstar_config.json").read_text())
    (ckpt / "qstar_config.json").write_text(json.dumps({**values, "lr": "fast"}))
    with pytest.raises(CheckpointError) as refused:
        load_config(ckpt)
    assert "lr must be a number, not 'fast'" in str(refused.value) and "qstar_config.json" in str(refused.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="qstar_config.json"):      # the manifest sees it first
            load_checkpoint(ckpt)


# ---- hostile data: the cost of what was asked ----------------------------------------------

def test_a_1mb_line_is_tokenized_only_as_far_as_seq_len_needs_and_encodes_the_same(monkeypatch):
    """Measured: encode_records on a 1 MB line, seq_len 512: 2.6 s tokenizing it whole, 0.04 s
    now (the first 16,896 characters); the tensors are the same."""
    from qstar_mini import records
    from qstar_mini.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    seen = []

    class Spy:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, text, **kwargs):
            seen.append(len(text))
            return tokenizer(text, **kwargs)

    lines = [{"text": ("31415=(34894)4 and some words " * 40_000)[:1_000_000]}, {"text": "31415=4"},
             {"text": "x" * 600_000 + "=7"}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                       # "2 of 3 lines ... truncated"
        head = records.encode_records(Spy(), lines, 512)
        assert max(seen) <= 20_000                            # (512 + 16) * 32 characters, not 10^6
        monkeypatch.setattr(records, "HEAD_CHARS_PER_TOKEN", 10**9)        # tokenize whole, then cut
        whole = records.encode_records(tokenizer, lines, 512)
    for name in ("input_ids", "attention_mask", "answer_pos", "think_pos"):
        assert torch.equal(getattr(head, name), getattr(whole, name)), name
    assert head.input_ids.shape == (3, 512) and head.answer_pos.tolist() == [-1, 7, -1]


def test_read_jsonl_reads_only_the_records_asked_for(tmp_path):
    """Measured: 100,000 lines (7.8 MB) read whole in 0.48 s; the first 16 in milliseconds.
    Past the 16th line the file here is not even text: it is never read."""
    from qstar_mini.data import read_jsonl

    path = tmp_path / "many.jsonl"
    path.write_bytes(b"".join(b'{"text": "line %d"}\n' % i for i in range(16)) + bytes(range(256)) * 1000)
    assert [r["text"] for r in read_jsonl(path, max_records=16)] == [f"line {i}" for i in range(16)]
    with pytest.raises(Exception, match="UTF-8|not valid JSON"):
        read_jsonl(path)


def test_a_line_too_long_for_a_record_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    from qstar_mini import data

    monkeypatch.setattr(data, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "blob.jsonl"
    path.write_bytes(b'{"text": "' + b"x" * 5000 + b'"}\n')
    with pytest.raises(data.DataError, match="line 1 is longer than"):
        data.read_jsonl(path)


# ---- the fetched model: sizes on every load, every byte on `models verify` --------------------

@pytest.fixture
def fake_smollm2(tmp_path, monkeypatch) -> Path:
    """A cache holding a stand-in for the fetched SmolLM2 folder: small files and their manifest
    (what `models fetch` writes), so that the checks run without the 270 MB download."""
    from qstar_mini.models import pretrained as real_models

    monkeypatch.setenv("QSTAR_MINI_CACHE", str(tmp_path / "cache"))
    folder = real_models.model_dir("smollm2")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "tokenizer.json").write_text('{"model": {}}\n')
    files.write_manifest(folder, n_parameters=real_models.KNOWN["smollm2"].n_parameters)
    return folder


def models_command(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["models", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_models_verify_passes_an_intact_copy(fake_smollm2, capsys):
    from qstar_mini.models import pretrained as real_models

    assert real_models.resolve("smollm2") == fake_smollm2
    code, out, err = models_command(capsys, "verify", "smollm2")
    assert (code, err) == (0, "") and out.startswith(str(fake_smollm2)) and "3 files match" in out


def test_a_truncated_file_is_refused_when_the_model_is_loaded(fake_smollm2):
    from qstar_mini.errors import ModelError
    from qstar_mini.models.tiny import load_model

    (fake_smollm2 / "tokenizer.json").write_text("{")
    with pytest.raises(ModelError) as refused:
        load_model("smollm2")
    message = str(refused.value)
    assert "tokenizer.json differs from the manifest" in message and "models fetch smollm2 --force" in message
    assert "\n" not in message


def test_a_flipped_byte_passes_the_load_check_and_is_caught_by_models_verify(fake_smollm2, capsys):
    from qstar_mini.models import pretrained as real_models

    xor_middle(fake_smollm2 / "model.safetensors")
    assert real_models.resolve("smollm2") == fake_smollm2      # sizes only: a stat per file
    for argv in (("verify", "smollm2"), ("fetch", "smollm2")):  # a second fetch verifies too
        code, out, err = models_command(capsys, *argv)
        errors = [line for line in err.splitlines() if not line.startswith("[verify] ")]   # fetch's phase line
        assert code == 2 and out == "" and len(errors) == 1 and err.splitlines()[-1] == errors[0], err
        assert "model.safetensors differs from the manifest (sha256)" in err and "--force" in err, err


def test_models_verify_of_a_model_not_fetched_says_how_to_fetch_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QSTAR_MINI_CACHE", str(tmp_path))
    code, _, err = models_command(capsys, "verify", "smollm2")
    assert code == 2 and "models fetch smollm2" in err, err
