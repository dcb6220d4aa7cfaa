"""The command lines the Reliability issue names answer with exit status 2 and one line on stderr."""

import subprocess
import sys

import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qstar_mini", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize("args, message", [
    (["data", "--n-train", "-5", "--out", "{tmp}/out"], "n_train must be >= 1"),
    (["train", "--model", "/nonexistent/model", "--steps", "1", "--out", "{tmp}/run"], "/nonexistent/model does not exist"),
    (["eval", "--model", "/nonexistent/model"], "/nonexistent/model does not exist"),
    (["nosuchcommand"], "invalid choice: 'nosuchcommand'"),
    (["train", "--data", "{tmp}/broken.jsonl", "--steps", "1", "--out", "{tmp}/run"], "line 2 is not valid JSON"),
    (["train", "--thought-length", "2", "--steps", "1", "--out", "{tmp}/run"], "thought_length"),
    (["train", "--memory", "cheap", "--steps", "1", "--out", "{tmp}/run"], "invalid choice: 'cheap'"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, args, message):
    (tmp_path / "broken.jsonl").write_text('{"text": "12345=5"}\nthis is not json\n')
    out = run(*[a.format(tmp=tmp_path) for a in args])
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qstar-mini: error: "), out.stderr
    assert message in lines[0]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "run" / "checkpoint").exists()
