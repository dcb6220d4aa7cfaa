"""The promises of the packaging: torch is never pinned, the two commands are what README says,
CI runs exactly `make test`, the conda spec matches pyproject, and notebooks are saved executed."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from qstar_mini.paths import REPO_ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def requirements(pyproject) -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    return {r.name.lower(): r for r in reqs}


def commands(path: Path) -> list[str]:
    """The non-blank, non-comment lines of a shell script."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


# ---- pyproject ------------------------------------------------------------------------------------

def test_torch_is_a_range_never_a_pin(pyproject):
    torch = requirements(pyproject)["torch"]
    operators = {spec.operator for spec in torch.specifier}
    assert ">=" in operators, torch
    assert not operators & {"==", "===", "~="}, f"torch must stay a range (Colab brings its own): {torch}"


def test_transformers_range_spans_4_57_to_5(pyproject):
    """From the matrix's low row (tests/test_compat.py ties the floor to it) to every 5.x."""
    transformers = requirements(pyproject)["transformers"]
    for version in ("4.57.6", "5.0.0", "5.24.0"):
        assert transformers.specifier.contains(version), (transformers, version)
    assert not transformers.specifier.contains("6.0.0")


def test_runtime_dependencies_and_extras(pyproject):
    assert set(requirements(pyproject)) >= {
        "torch", "transformers", "datasets", "tokenizers", "safetensors", "accelerate", "tqdm", "matplotlib"}
    extras = {name: {Requirement(r).name.lower() for r in reqs}
              for name, reqs in pyproject["project"]["optional-dependencies"].items()}
    assert {"ipywidgets", "ipykernel"} <= extras["notebooks"] and "jupyterlab" in extras["lab"]
    assert {"pytest", "nbval", "hypothesis"} <= extras["dev"]


def test_installed_console_script_is_cli_main():
    """What pip installed (``make test`` installs first): the ``qstar-mini`` script runs cli.main
    (test_cli.py runs it), for Python >= 3.10."""
    from importlib import metadata

    from qstar_mini import cli
    try:
        dist = metadata.distribution("qstar-mini")
    except metadata.PackageNotFoundError:
        pytest.skip("qstar-mini is not pip-installed here (pip install -e .)")
    (script,) = [e for e in dist.entry_points if e.group == "console_scripts"]
    assert script.name == "qstar-mini" and script.load() is cli.main
    assert dist.metadata["Requires-Python"] == ">=3.10"


def test_pytest_runs_the_notebooks_with_nbval(pytestconfig):
    """The options this very pytest run was started with (pyproject's ini_options): tests and
    notebooks, the notebooks through nbval in this environment with the sanitiser file."""
    assert set(pytestconfig.getini("testpaths")) == {"tests", "notebooks"}
    assert pytestconfig.getoption("nbval") and pytestconfig.getoption("nbval_current_env")
    assert Path(pytestconfig.getoption("nbval_sanitize_with")).is_file()


# ---- the two commands, CI and README ----------------------------------------------------------------

@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_ci_runs_make_test_and_nothing_else(tmp_path):
    """.ci/run with a stand-in ``make`` first on PATH: it is called once, as ``make test``, from
    the repository root, and its failure is CI's failure."""
    script = REPO_ROOT / ".ci" / "run"
    assert os.access(script, os.X_OK), ".ci/run must be executable"
    log = tmp_path / "calls"
    fake = tmp_path / "bin" / "make"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$PWD $*" >> {shlex.quote(str(log))}\nexit ${{FAKE_MAKE_STATUS:-0}}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    assert subprocess.run([str(script)], env=env, cwd=tmp_path, timeout=60).returncode == 0
    assert log.read_text().splitlines() == [f"{REPO_ROOT} test"]
    failed = subprocess.run([str(script)], env={**env, "FAKE_MAKE_STATUS": "3"}, timeout=60)
    assert failed.returncode == 3


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_runs_pytest_and_make_demo_runs_the_demo(tmp_path):
    """``make -n`` (print, do not run) with the environment already set up: `make test` fetches the
    real model as a user does (verified only, once it is there) and the lowest transformers we
    declare (tests/test_compat.py loads our artefacts with it), then runs pytest on two workers
    (conftest.py keeps the notebooks on one); `make demo` runs the demo."""
    stamp = tmp_path / "stamp"
    stamp.touch()                                     # newer than pyproject.toml: no install step

    def planned(target: str, stamp_var: str) -> list[str]:
        out = subprocess.run(["make", "-n", "-C", str(REPO_ROOT), target, f"{stamp_var}={stamp}",
                              f"PY={sys.executable}"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return [line for line in out.stdout.splitlines() if not line.startswith("make")]

    assert planned("test", "STAMP_DEV") == [
        f"{sys.executable} -m qstar_mini models fetch smollm2",
        f"{sys.executable} scripts/compat.py lowest-transformers .compat/lowest-transformers",
        f"{sys.executable} -m pytest -n 2"]
    assert planned("demo", "STAMP_RUN") == [f"{sys.executable} -m qstar_mini demo"]


def test_readme_quick_start_has_exactly_the_two_commands():
    readme = (REPO_ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", quick, flags=re.S)
    shown = [line.strip() for block in blocks for line in block.splitlines()
             if line.strip() and not line.strip().startswith("#")]
    assert shown == ["make demo", "make test"], shown


def test_readme_names_the_command_ci_runs():
    readme = (REPO_ROOT / "README.md").read_text()
    ci_command = commands(REPO_ROOT / ".ci" / "run")[-1]            # make test
    assert ci_command in readme
    assert "python -m pytest" in readme                             # what `make test` runs


def test_readme_badge_opens_notebook_00_in_colab():
    readme = (REPO_ROOT / "README.md").read_text()
    badge = re.search(r"colab\.research\.google\.com/github/[^)\s]+", readme)
    assert badge and badge.group(0).endswith("notebooks/00_start_here.ipynb")
    assert (REPO_ROOT / "notebooks" / "00_start_here.ipynb").is_file()


# ---- environment.yml ----------------------------------------------------------------------------------

def test_environment_yml_matches_pyproject(pyproject):
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    assert env["name"] == "qstar-mini"
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    names = {Requirement(line).name.lower() for line in pip if not line.startswith("-")}
    assert names == set(requirements(pyproject)), names ^ set(requirements(pyproject))
    assert "-e .[dev,notebooks,lab]" in pip


# ---- notebooks ------------------------------------------------------------------------------------

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_saved_executed_in_order(path):
    """nbval compares against the saved outputs, so they must be there, from one clean run."""
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == list(range(1, len(code) + 1)), \
        f"re-execute {path.name} from a fresh kernel (docs/setup.md, \"Editing a notebook\")"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    for cell in code:
        for out in cell["outputs"]:
            assert out.get("ename") is None, f"{path.name} was saved with an error output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_colab_setup_cell_survives_a_rerun(path, tmp_path, monkeypatch):
    """On Colab the setup cell clones once: run twice (Run all after a restart), it must not
    clone into the folder it made the first time (git would exit 128 and stop Run all)."""
    import subprocess
    import types

    cell = next("".join(c["source"]) for c in json.loads(path.read_text())["cells"]
                if c["cell_type"] == "code" and "google.colab" in "".join(c["source"]))
    repo = tmp_path / "qstar-mini"
    calls = []

    def fake_run(args, check=False, **kwargs):
        calls.append(args[:3] if args[0] == "git" else args[1:4])
        if args[:2] == ["git", "clone"]:
            if (repo / ".git").exists():
                raise subprocess.CalledProcessError(128, args)     # what git does
            (repo / ".git").mkdir(parents=True)
        return subprocess.CompletedProcess(args, 0)

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "path", list(sys.path))
    source = cell.replace('"/content/qstar-mini"', repr(str(repo)))
    for _ in range(2):
        exec(compile(source, str(path), "exec"), {})
    assert sum(c[:2] == ["git", "clone"] for c in calls) == 1
    assert sum(c[:3] == ["-m", "pip", "install"] for c in calls) == 2


def test_the_colab_clone_folder_cannot_shadow_the_package(tmp_path):
    """Colab's working folder is /content, the parent of the clone. Were the clone named like
    the package (qstar_mini), `python -m qstar_mini` run there would import the clone's root as a
    namespace package ahead of the editable install, and its runs/ and data/ folders would hide
    the modules runs.py and data.py (ImportError: ... (unknown location)). Every setup cell
    clones into the same folder, whose name is not an importable name."""
    folders = set()
    for path in NOTEBOOKS:
        cell = next("".join(c["source"]) for c in json.loads(path.read_text())["cells"]
                    if c["cell_type"] == "code" and "google.colab" in "".join(c["source"]))
        folders |= set(re.findall(r'REPO = "(/content/[^"]+)"', cell))
    assert len(folders) == 1, folders
    clone = tmp_path / Path(folders.pop()).name               # a clone as the parent folder sees it
    for sub in ("runs", "data", "qstar_mini"):
        (clone / sub).mkdir(parents=True)
    done = subprocess.run([sys.executable, "-m", "qstar_mini", "data", "--help"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]
