"""The ``qstar-mini`` command line: subcommands listed, files written, and every bad input
reported as ONE line on stderr with exit status 2, no traceback, nothing written.

Almost everything calls ``qstar_mini.cli.main([...])`` in this process (it returns the exit
status; ``--help`` exits through argparse's SystemExit): the same code a user runs, without
paying a Python + torch start-up per case. Two tests start real processes, for what only a
real process shows: ``python -m qstar_mini`` and the installed ``qstar-mini`` script turn
main()'s return value into the process's exit status and print where a user sees it.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from qstar_mini import cli
from qstar_mini.errors import DataError
from qstar_mini.paths import REPO_ROOT

SMALL = ["--n-train", "40", "--n-valid", "10", "--n-test", "10", "--n-gsm", "4"]


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(capsys, *args: str) -> Result:
    """``qstar-mini ARGS`` in this process: exit status, stdout, stderr."""
    capsys.readouterr()                                   # start from empty buffers
    try:
        code = cli.main(list(args))
    except SystemExit as exit:                            # --help, --version
        code = exit.code
    out, err = capsys.readouterr()
    return Result(code, out, err)


def assert_one_line_error(result: Result, *words: str) -> str:
    """Exit status 2, exactly one line on stderr, ``qstar-mini: error: ...``, no traceback."""
    assert result.code == 2, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    line = lines[0]
    assert line.startswith("qstar-mini: error: "), line
    assert "Traceback" not in result.err
    for word in words:
        assert word in line, (word, line)
    return line


def snapshot(folder: Path) -> dict:
    """Every path under ``folder`` with its bytes (None for a folder): to check nothing was written."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    assert cli.main(["data", "--out", str(out), *SMALL]) == 0
    return out


# ---- what works -----------------------------------------------------------------------------

JOBS = ["data", "pretrain", "demo", "train", "eval", "bench", "assignments", "models", "reproduce", "real",
        "harness"]


def _one_line_helps() -> dict[str, str]:
    """{subcommand: its one-line help} as the parser holds them."""
    (commands,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {action.dest: action.help for action in commands._choices_actions}


def test_help_lists_every_subcommand_with_its_one_line_description(capsys):
    result = run_cli(capsys, "--help")
    assert result.code == 0, result.err
    helps = _one_line_helps()
    assert list(helps) == cli.build_parser().command_names == JOBS
    squeezed = "".join(result.out.split())                # argparse wraps lines (also after a hyphen)
    for command, text in helps.items():
        assert text and "\n" not in text, command
        assert "".join(f"{command} {text}".split()) in squeezed, command


def test_the_module_docstring_lists_every_subcommand():
    listed = [line.split()[1] for line in cli.__doc__.splitlines() if line.strip().startswith("qstar-mini ")]
    assert listed == JOBS


@pytest.mark.parametrize("command", JOBS)
def test_each_subcommand_has_help(capsys, command):
    result = run_cli(capsys, command, "--help")
    assert result.code == 0, result.err
    assert f"qstar-mini {command}" in result.out and "--help" in result.out


def test_data_writes_the_corpus(small_corpus):
    names = sorted(p.name for p in small_corpus.iterdir())
    assert names == ["corpus_config.json", "gsm8k_format.jsonl", "test.jsonl", "train.jsonl", "validation.jsonl"]
    train = [json.loads(line) for line in (small_corpus / "train.jsonl").read_text().splitlines()]
    assert len(train) == 40
    assert json.loads((small_corpus / "corpus_config.json").read_text())["n_train"] == 40


def test_data_is_byte_identical_when_regenerated(small_corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                                      # from another cwd too
    result = run_cli(capsys, "data", "--out", str(tmp_path / "again"), *SMALL)
    assert result.code == 0, result.err
    assert snapshot(tmp_path / "again") == snapshot(small_corpus)


# ---- bad input: one line, exit 2, nothing written -------------------------------------------------

BAD = [
    # data: impossible corpus configs, bad flags, an --out that is a file
    (["data", "--n-train", "-5", "--out", "{tmp}/out"], ["n_train must be >= 1"]),
    (["data", "--frac-working", "1.5", "--out", "{tmp}/out"], ["frac_working"]),
    (["data", "--working-error", "-0.1", "--out", "{tmp}/out"], ["working_error"]),
    (["data", "--task", "nope", "--out", "{tmp}/out"], ["nope"]),
    (["data", "--n-test", "0", "--out", "{tmp}/out"], ["n_test"]),
    (["data", "--n-train", "many", "--out", "{tmp}/out"], ["--n-train"]),
    (["data", "--bogus"], ["--bogus"]),
    (["data", "--out", "{tmp}/a-file", *SMALL], ["not a folder"]),
    # pretrain
    (["pretrain", "--out", "{tmp}/out", "--steps", "0"], ["steps"]),
    (["pretrain", "--out", "{tmp}/out", "--frac-working", "2"], ["frac_working"]),
    (["pretrain", "--out", "{tmp}/out", "--arch", "gpt"], ["--arch"]),
    # no command, an unknown one
    ([], ["no command given", "data"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'"]),
    # demo reads the test split before it loads any model
    (["demo", "--data", "{tmp}/broken", "--n", "4"], ["test.jsonl", "JSON"]),
    (["demo", "--data", "{tmp}/nowhere", "--n", "4"], ["test.jsonl"]),
    (["demo", "--data", "{corpus}", "--model", "{tmp}/no-such-model", "--n", "4"], ["no-such-model"]),
    # train and eval
    (["train", "--model", "/nonexistent/model", "--steps", "1", "--out", "{tmp}/run"],
     ["/nonexistent/model does not exist"]),
    (["train", "--data", "{tmp}/broken.jsonl", "--steps", "1", "--out", "{tmp}/run"],
     ["broken.jsonl line 2 is not valid JSON"]),
    (["train", "--thought-length", "2", "--steps", "1", "--out", "{tmp}/run"], ["thought_length"]),
    (["train", "--memory", "cheap", "--steps", "1", "--out", "{tmp}/run"], ["invalid choice: 'cheap'"]),
    (["eval", "--model", "/nonexistent/model"], ["/nonexistent/model does not exist"]),
]


@pytest.mark.parametrize("args, words", BAD, ids=[" ".join(a[:2]) or "(none)" for a, _ in BAD])
def test_bad_input_is_one_line_status_2_and_writes_nothing(small_corpus, tmp_path, capsys, args, words):
    (tmp_path / "a-file").write_text("keep me")
    (tmp_path / "broken.jsonl").write_text('{"text": "12345=5"}\nthis is not json\n')
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "test.jsonl").write_text("31415=(34894)4\nthis is not JSON\n")
    before = snapshot(tmp_path)
    result = run_cli(capsys, *[a.format(tmp=tmp_path, corpus=small_corpus) for a in args])
    assert_one_line_error(result, *words)
    assert snapshot(tmp_path) == before


# ---- one way to start things -------------------------------------------------------------------

#: Where a package module may touch sys.argv: lm_eval's cli_evaluate() takes no arguments and parses
#: sys.argv, so `qstar-mini harness` sets it for that call (and restores it).
ARGV_ALLOWED = {("evaluation/harness.py", "run_lm_eval_cli")}


def _entry_points(path: Path) -> list[tuple[int, str, str]]:
    """(line, enclosing function, what) for each ``__name__ == "__main__"`` test and each use of
    ``sys.argv`` (``sys.argv`` or ``from sys import argv``) in the module at ``path``."""
    found = []

    def visit(node, function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if (any(isinstance(x, ast.Name) and x.id == "__name__" for x in sides)
                    and any(isinstance(x, ast.Constant) and x.value == "__main__" for x in sides)):
                found.append((node.lineno, function, '__name__ == "__main__"'))
        if (isinstance(node, ast.Attribute) and node.attr == "argv" and isinstance(node.value, ast.Name)
                and node.value.id == "sys"):
            found.append((node.lineno, function, "sys.argv"))
        if isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "argv" for a in node.names):
            found.append((node.lineno, function, "from sys import argv"))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(path.read_text(), str(path)), "<module>")
    return found


def test_no_package_module_is_a_script_or_reads_sys_argv():
    """Every job starts as a `qstar-mini` subcommand: only qstar_mini/__main__.py is run as a module."""
    package = REPO_ROOT / "qstar_mini"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        where = path.relative_to(package).as_posix()
        if where == "__main__.py":
            continue
        offenders += [f"{where}:{line} ({function}): {what}" for line, function, what in _entry_points(path)
                      if (where, function) not in ARGV_ALLOWED]
    assert not offenders, "make these a qstar-mini subcommand (qstar_mini/cli): " + "; ".join(offenders)


def test_the_entry_point_check_sees_both_forms(tmp_path):
    script = tmp_path / "m.py"
    script.write_text("import sys\n\ndef f():\n    return sys.argv[1:]\n\nif '__main__' == __name__:\n    f()\n")
    assert [(line, what) for line, _, what in _entry_points(script)] == [(4, "sys.argv"), (6, '__name__ == "__main__"')]
    script.write_text("from sys import argv\nprint('sys.argv in a string is not a use')\n")
    assert [what for _, _, what in _entry_points(script)] == ["from sys import argv"]


@pytest.mark.parametrize("args, words", [
    (["reproduce"], ["reproduce: choose an action", "demo", "long"]),
    (["reproduce", "nonsense"], ["invalid choice: 'nonsense'", "ablations"]),
    (["reproduce", "long"], ["PART", "--merge"]),
    (["reproduce", "long", "base", "--merge"], ["PART", "--merge", "not both"]),
    (["reproduce", "long", "everything"], ["invalid choice: 'everything'", "quiet_star"]),
    (["reproduce", "ablations", "--seed", "x"], ["--seed", "invalid int value"]),
    (["real", "--steps", "0"], ["--steps", ">= 1"]),
    (["real", "--held-out", "everything"], ["--held-out", "invalid choice: 'everything'", "two_step"]),
    (["real", "--held-out", "add", "sub", "mul", "div", "two_step", "change"], ["held_out", "some but not all"]),
    (["data", "--bogus"], ["unrecognized arguments: --bogus"]),
])
def test_bad_study_commands_are_one_line(capsys, args, words):
    assert_one_line_error(run_cli(capsys, *args), *words)


def test_real_with_a_missing_model_is_one_line_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "real"
    line = assert_one_line_error(run_cli(capsys, "real", "--model", str(tmp_path / "no-model"), "--steps", "1",
                                         "--out", str(out)), "no-model", "does not exist")
    assert "--model" in line or "model path" in line
    assert not out.exists()


def test_harness_without_lm_eval_is_one_line_naming_the_install(capsys, monkeypatch):
    """Without lm_eval installed (here: its import blocked), `qstar-mini harness` says what to install."""
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "qstar_mini.evaluation.harness", raising=False)
    monkeypatch.setitem(sys.modules, "lm_eval", None)           # `import lm_eval` now raises ImportError
    assert_one_line_error(run_cli(capsys, "harness", "--model", "qstar-mini", "--tasks", "x"),
                          "needs lm_eval", "pip install 'qstar-mini[harness]'")


def test_real_runs_on_the_tiny_base(capsys, tmp_path):
    """`qstar-mini real`'s smallest form: one seed, one step per arm of the tiny base (a character
    model: longer lines, shorter thoughts), a few lines; real_report.json written, its table printed."""
    from qstar_mini.paths import TINY_BASE

    result = run_cli(capsys, "real", "--model", str(TINY_BASE), "--steps", "1", "--seeds", "3", "--seq-len", "224",
                     "--thought-length", "4", "--train-lines", "4", "--test-lines", "4", "--out", str(tmp_path))
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "real_report.json").read_text())
    assert report["settings"]["steps"] == 1 and report["settings"]["seeds"] == [3] and report["complete"]
    assert set(report["per_seed"][0]["nll"]) == {"base", "control", "quiet_star", "random", "shuffled", "no_thought"}
    assert "Quiet-STaR, random thoughts" in result.out


# ---- main(): Ctrl-C, library errors, real bugs -------------------------------------------------

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


# ---- real processes: what the user's shell sees -------------------------------------------------

def test_python_m_qstar_mini_exits_with_mains_status(tmp_path):
    """``python -m qstar_mini`` (no pip install needed): a bad command is one line and status 2."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "qstar_mini", "frobnicate"], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("qstar-mini: error: ") and "invalid choice: 'frobnicate'" in line
    assert result.stdout == ""


def test_installed_qstar_mini_command_runs(tmp_path):
    """The console script pip installed (``make test`` installs the package first) runs main()."""
    script = Path(sys.executable).with_name("qstar-mini")
    if not script.exists():
        pytest.skip(f"qstar-mini is not installed next to {sys.executable} (pip install -e .)")
    result = subprocess.run([str(script), "data", "--out", str(tmp_path / "c"), *SMALL], capture_output=True,
                            text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "train.jsonl" in result.stdout and len((tmp_path / "c" / "train.jsonl").read_text().splitlines()) == 40
