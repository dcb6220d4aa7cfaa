"""The ``qstar-mini`` command line: subcommands listed, files written, and every bad input
reported as ONE line on stderr with exit status 2, no traceback, nothing written.

The command runs in a subprocess (``python -m qstar_mini``), exactly as a user runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qstar_mini import cli
from qstar_mini.errors import DataError
from qstar_mini.paths import REPO_ROOT

SMALL = ["--n-train", "40", "--n-valid", "10", "--n-test", "10", "--n-gsm", "4"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m qstar_mini ARGS`` in a subprocess; works without a pip install too."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "qstar_mini", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=300,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """Exit status 2, exactly one line on stderr, ``qstar-mini: error: ...``, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("qstar-mini: error: "), line
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in line, (word, line)
    return line


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    result = run_cli("data", "--out", str(out), *SMALL)
    assert result.returncode == 0, result.stderr
    return out


# ---- what works -----------------------------------------------------------------------------

def test_help_lists_the_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("data", "pretrain", "demo"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["data", "pretrain", "demo"])
def test_each_subcommand_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"qstar-mini {command}" in result.stdout


def test_data_writes_the_corpus(small_corpus):
    names = sorted(p.name for p in small_corpus.iterdir())
    assert names == ["corpus_config.json", "gsm8k_format.jsonl", "test.jsonl", "train.jsonl", "validation.jsonl"]
    train = [json.loads(line) for line in (small_corpus / "train.jsonl").read_text().splitlines()]
    assert len(train) == 40
    assert json.loads((small_corpus / "corpus_config.json").read_text())["n_train"] == 40


def test_data_is_byte_identical_when_regenerated(small_corpus, tmp_path):
    result = run_cli("data", "--out", str(tmp_path), *SMALL, cwd=tmp_path)  # another cwd too
    assert result.returncode == 0, result.stderr
    for path in small_corpus.iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


# ---- bad input: one line, exit 2, nothing written -------------------------------------------------

def test_negative_n_train_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "corpus"
    result = run_cli("data", "--n-train", "-5", "--out", str(out))
    assert_one_line_error(result, "n_train")
    assert not out.exists()


@pytest.mark.parametrize("flag, value, word", [
    ("--frac-working", "1.5", "frac_working"),
    ("--working-error", "-0.1", "working_error"),
    ("--task", "nope", "nope"),
    ("--n-test", "0", "n_test"),
])
def test_impossible_corpus_config_is_one_line(tmp_path, flag, value, word):
    out = tmp_path / "corpus"
    assert_one_line_error(run_cli("data", flag, value, "--out", str(out)), word)
    assert not out.exists()


@pytest.mark.parametrize("args, word", [
    (["--steps", "0"], "steps"),
    (["--frac-working", "2"], "frac_working"),
    (["--arch", "gpt"], "--arch"),
])
def test_impossible_pretrain_options_are_one_line(tmp_path, args, word):
    out = tmp_path / "model"
    assert_one_line_error(run_cli("pretrain", "--out", str(out), *args), word)
    assert not out.exists()


def test_unknown_subcommand_is_one_line():
    assert_one_line_error(run_cli("frobnicate"), "frobnicate")


def test_no_subcommand_is_one_line():
    assert_one_line_error(run_cli(), "data")


def test_bad_flag_value_is_one_line(tmp_path):
    assert_one_line_error(run_cli("data", "--n-train", "many", "--out", str(tmp_path / "x")), "--n-train")
    assert not (tmp_path / "x").exists()


def test_unknown_flag_is_one_line():
    assert_one_line_error(run_cli("data", "--bogus"), "--bogus")


def test_out_that_is_a_file_is_one_line(tmp_path):
    out = tmp_path / "a-file"
    out.write_text("keep me")
    assert_one_line_error(run_cli("data", "--out", str(out), *SMALL), "not a folder")
    assert out.read_text() == "keep me"


def test_data_file_that_is_not_jsonl_is_one_line(small_corpus, tmp_path):
    # `demo` reads the test split before it loads any model.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "test.jsonl").write_text("31415=(34894)4\nthis is not JSON\n")
    line = assert_one_line_error(run_cli("demo", "--data", str(broken), "--n", "4"), "test.jsonl")
    assert "JSON" in line
    assert sorted(p.name for p in broken.iterdir()) == ["test.jsonl"]


def test_missing_data_file_is_one_line(tmp_path):
    assert_one_line_error(run_cli("demo", "--data", str(tmp_path / "nowhere"), "--n", "4"), "test.jsonl")


def test_model_path_that_does_not_exist_is_one_line(small_corpus, tmp_path):
    missing = tmp_path / "no-such-model"
    assert_one_line_error(run_cli("demo", "--data", str(small_corpus), "--model", str(missing), "--n", "4"),
                          "no-such-model")
    assert not missing.exists()


# ---- main() in-process: Ctrl-C, library errors, real bugs -----------------------------------------

def _add_command(name, exc):
    def add(subparsers):
        p = subparsers.add_parser(name)

        def run(args):
            raise exc

        p.set_defaults(func=run)
    return add


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + [_add_command("sleep", KeyboardInterrupt())])
    assert cli.main(["sleep"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["qstar-mini: error: interrupted"]


def test_qstar_error_message_is_folded_onto_one_line(monkeypatch, capsys):
    error = DataError("first part\n  second part")
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + [_add_command("bad", error)])
    assert cli.main(["bad"]) == 2
    assert capsys.readouterr().err == "qstar-mini: error: first part second part\n"


def test_unexpected_exceptions_keep_their_traceback(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + [_add_command("bug", ZeroDivisionError("a bug"))])
    with pytest.raises(ZeroDivisionError):
        cli.main(["bug"])
