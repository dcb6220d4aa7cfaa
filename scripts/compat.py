"""The compatibility matrix: the whole test suite (unit tests + nbval over every notebook) on each
stack we declare, each in an environment built from this checkout's own files.

    python scripts/compat.py                    # every row; writes docs/results/compat.json
    python scripts/compat.py --rows low,colab   # some rows (the others keep their last result)
    python scripts/compat.py --list             # the rows, nothing run
    python scripts/compat.py --table            # only docs/compatibility.md's table, from the JSON
    python scripts/compat.py lowest-transformers DIR   # only the lowest transformers we declare,
                                                # as `pip install --target DIR` (make test uses it)

`make compat` runs the first form. Each environment is a venv under .compat/envs/ (COMPAT_DIR to
move it) holding a fresh clone of HEAD under .compat/src/ (commit first: uncommitted work is not
tested), installed with `pip install -e .[dev,notebooks]` plus the row's pins. Rows that differ only
in how the CPU computes share one environment, the clone cleaned (runs/ removed) between them, so
each row trains the course runs itself. The real model comes from the shared cache
(QSTAR_MINI_CACHE, else ~/.cache/qstar_mini): it was converted once, and every row must load it.

docs/compatibility.md's table is rendered from the JSON (tests/test_compat.py checks that it is).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results" / "compat.json"
WORK = Path(os.environ.get("COMPAT_DIR", ROOT / ".compat"))

# The stack Colab documents (github.com/googlecolab/backend-info, pip-freeze.gpu.txt and
# os-info.txt at commit a724079, 2026-08-19: Python 3.13, torch 2.11.0+cu128, transformers 5.15.0).
COLAB = ("torch==2.11.0", "transformers==5.15.0", "tokenizers==0.22.2", "accelerate==1.14.0", "numpy==2.1.3")
# Colab's ipywidgets, installed after the dev extra (which asks for ipywidgets 8 for the tests).
COLAB_WIDGETS = ("ipywidgets==7.7.1", "widgetsnbextension<4", "jupyterlab_widgets<2", "ipython_genutils")


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    python: str                                   # "3.10": found as python3.10 (or in pyenv)
    pins: tuple[str, ...] = ()                    # pip constraints for this row's environment
    after: tuple[str, ...] = ()                   # installed with --no-deps after the project
    env: dict = field(default_factory=dict)       # environment variables while the tests run
    environment: str = ""                         # which venv (rows on one stack share it)
    no_cap: bool = False                          # ignore a pip config constraint file (newest torch)
    tests: tuple[str, ...] = ()                   # what pytest runs; () = everything, as make test

    @property
    def venv(self) -> str:
        return self.environment or self.name


# The CPU rows change only how torch computes on make test's stack: they run every notebook and
# the tests that compare numbers (the official fixture, the conformance suite, parallel == naive,
# block attention == mask, the memory modes), not the file-handling and command-line tests.
NUMERIC = ("notebooks", "tests/test_official.py", "tests/test_conformance.py", "tests/test_step.py",
           "tests/test_parallel.py", "tests/fast/test_block_attention.py", "tests/test_masks.py",
           "tests/test_mixing.py", "tests/fast/test_rescore.py")
MAKE_TEST = ("torch==2.13.0",)

ROWS = [
    Row("low", "the lowest Python, torch and transformers that pyproject.toml declares", "3.10",
        pins=("torch==2.6.0", "transformers==4.57.6")),
    Row("cpu-default", "make test's stack with torch's portable CPU kernels (ATEN_CPU_CAPABILITY=default)",
        "3.11", pins=MAKE_TEST, env={"ATEN_CPU_CAPABILITY": "default"}, environment="default", tests=NUMERIC),
    Row("cpu-avx2", "make test's stack with AVX2 kernels (ATEN_CPU_CAPABILITY=avx2)", "3.11",
        pins=MAKE_TEST, env={"ATEN_CPU_CAPABILITY": "avx2"}, environment="default", tests=NUMERIC),
    Row("threads-1", "make test's stack on one thread (OMP_NUM_THREADS=1)", "3.11",
        pins=MAKE_TEST, env={"OMP_NUM_THREADS": "1"}, environment="default", tests=NUMERIC),
    Row("colab", "Colab's documented stack: Python 3.13, torch 2.11.0, transformers 5.15.0, ipywidgets 7.7.1",
        "3.13", pins=COLAB, after=COLAB_WIDGETS),
    Row("newest", "the newest releases on PyPI today (no pins)", "3.13", no_cap=True),
]
BY_NAME = {r.name: r for r in ROWS}
VERSIONS = ("torch", "transformers", "tokenizers", "numpy", "ipywidgets", "nbval", "pytest")


def sh(cmd, *, cwd=None, env=None, check=True, log=None) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(map(str, cmd))}\n{out.stdout}\n")
    if check and out.returncode != 0:
        tail = "\n".join(out.stdout.splitlines()[-15:])
        raise SystemExit(f"compat: `{' '.join(map(str, cmd))}` failed (exit {out.returncode}):\n{tail}")
    return out


def find_python(version: str) -> str | None:
    """python3.X on PATH, else a pyenv installation of 3.X (the newest patch), else None."""
    exe = shutil.which(f"python{version}")
    if exe and subprocess.run([exe, "--version"], capture_output=True).returncode == 0:
        return exe
    root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip() \
        if shutil.which("pyenv") else ""
    found = sorted(Path(root, "versions").glob(f"{version}.*/bin/python{version}"),
                   key=lambda p: [int(x) for x in re.findall(r"\d+", p.parts[-3])]) if root else []
    return str(found[-1]) if found else None


def pip_env(row: Row) -> dict:
    env = dict(os.environ)
    if row.no_cap:                                   # a machine-wide pip config (a cap on torch, say)
        env["PIP_CONFIG_FILE"] = os.devnull          # would hide the newest releases
    return env


def prepare(row: Row, log: Path) -> tuple[Path, Path]:
    """The row's venv (built once, redone when its pins or pyproject.toml change) and a clone of
    HEAD without any earlier run's files. Returns (python, clone)."""
    python = find_python(row.python)
    if python is None:
        raise SystemExit(f"compat: row {row.name} needs Python {row.python}; none found "
                         f"(install it, e.g. `pyenv install {row.python}`)")
    venv, src = WORK / "envs" / row.venv, WORK / "src" / row.venv
    head = sh(["git", "rev-parse", "HEAD"], cwd=ROOT).stdout.strip()
    if not (src / ".git").is_dir():
        shutil.rmtree(src, ignore_errors=True)
        sh(["git", "clone", "-q", "--no-checkout", ROOT, src])
    sh(["git", "fetch", "-q", ROOT, head], cwd=src)
    sh(["git", "checkout", "-q", "--force", head], cwd=src)
    sh(["git", "clean", "-xdfq"], cwd=src)                        # runs/, caches: each row starts clean
    key = hashlib.sha256(json.dumps([python, row.pins, row.after, row.no_cap,
                                     (src / "pyproject.toml").read_text()]).encode()).hexdigest()[:16]
    stamp = venv / f".compat-{key}"
    if not stamp.exists():
        shutil.rmtree(venv, ignore_errors=True)
        sh([python, "-m", "venv", venv], log=log)
        vpy = venv / "bin" / "python"
        sh([vpy, "-m", "pip", "install", "-q", "--upgrade", "pip", "setuptools", "wheel"], env=pip_env(row), log=log)
        pins = venv / "pins.txt"
        pins.write_text("".join(p + "\n" for p in row.pins))
        sh([vpy, "-m", "pip", "install", "-q", "-c", pins, *row.pins, "-e", f"{src}[dev,notebooks]"],
           env=pip_env(row), log=log)
        if row.after:
            sh([vpy, "-m", "pip", "install", "-q", "--no-deps", *row.after], env=pip_env(row), log=log)
        stamp.touch()
    return venv / "bin" / "python", src


def versions(python: Path, env: dict) -> dict:
    code = ("import json, sys, importlib.metadata as m, torch\n"
            "v = {'python': sys.version.split()[0], 'cpu': torch.backends.cpu.get_cpu_capability(),"
            " 'threads': torch.get_num_threads()}\n"
            f"for p in {VERSIONS!r}:\n"
            "    v[p] = m.version(p)\n"
            "print(json.dumps(v))")
    return json.loads(sh([python, "-c", code], env=env).stdout.strip().splitlines()[-1])


def counts(junit: Path) -> dict:
    """passed / failed / errors / skipped and the failing test ids, from pytest's JUnit XML."""
    tally = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "slowest_cell": None}
    if not junit.exists():
        return tally
    for case in ET.parse(junit).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        seconds = float(case.get("time") or 0)
        if "ipynb" in name and seconds > (tally["slowest_cell"] or {}).get("seconds", -1):
            tally["slowest_cell"] = {"cell": name, "seconds": round(seconds, 1)}
        if "failure" in kinds or "error" in kinds:
            tally["failed" if "failure" in kinds else "errors"] += 1
            tally["failures"].append(name)
        elif "skipped" in kinds:
            tally["skipped"] += 1
        else:
            tally["passed"] += 1
    tally["failures"] = tally["failures"][:30]
    return tally


def run_row(row: Row) -> dict:
    log = WORK / "logs" / f"{row.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    start = time.time()
    python, src = prepare(row, log)
    built = round(time.time() - start)
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS",
                                                           "VIRTUAL_ENV", "PYTHONPATH")}
    env.update(row.env)
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    fetch = sh([python, "-m", "qstar_mini", "models", "fetch", "smollm2"], cwd=src, env=env, check=False, log=log)
    junit = src / "compat-junit.xml"
    t0 = time.time()
    # docs/compatibility.md's table is this script's output, so the clone cannot hold the table of its own run:
    # make test checks it, the matrix does not.
    test = sh([python, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-q", f"--junitxml={junit}",
               "--deselect", "tests/test_compat.py::test_compatibility_page_shows_the_matrix_output", *row.tests],
              cwd=src, env=env, check=False, log=log)
    result = {
        "row": row.name, "what": row.what, "env": row.env, "tests": list(row.tests) or "all",
        "commit": sh(["git", "rev-parse", "--short", "HEAD"], cwd=src).stdout.strip(),
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions(python, env),
        "fetch_ok": fetch.returncode == 0,
        "exit": test.returncode,
        "pytest_seconds": round(time.time() - t0), "setup_seconds": built,
        **counts(junit),
    }
    result["ok"] = result["fetch_ok"] and test.returncode == 0 and result["failed"] == result["errors"] == 0
    print(f"compat: {row.name}: {'pass' if result['ok'] else 'FAIL'} ({result['passed']} passed, "
          f"{result['failed']} failed, {result['errors']} errors, {result['skipped']} skipped; "
          f"pytest {result['pytest_seconds']} s; log {log})", flush=True)
    return result


def lowest_transformers(target: Path) -> None:
    """The lowest transformers of BY_NAME['low'] (with the tokenizers and hub it needs) in a
    folder for PYTHONPATH, beside this environment's torch: tests load our artefacts with it."""
    pin = next(p for p in BY_NAME["low"].pins if p.startswith("transformers=="))
    stamp = target / ".stamp"
    if stamp.exists() and stamp.read_text() == pin:
        return
    shutil.rmtree(target, ignore_errors=True)
    sh([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, pin,
        "tokenizers>=0.22,<0.23", "huggingface_hub>=0.34,<1.0"])
    stamp.write_text(pin)


# ----------------------------------------------------------------------------- the page's table

def render_table(results: list[dict]) -> str:
    """The Markdown table docs/compatibility.md shows (between its compat-table markers): every row of ROWS, its
    last result, or "not run" where the matrix has none."""
    lines = ["| row | Python | torch | transformers | ipywidgets | CPU kernels, threads | tests | result |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    by_row = {r["row"]: r for r in results}
    for row in ROWS:
        r = by_row.get(row.name)
        if r is None:
            lines.append(f"| {row.name} | {row.python} | | | | | | not run |")
            continue
        v = r["versions"]
        tests = (f"{'all' if r['tests'] == 'all' else 'notebooks + numeric'}: {r['passed']} passed, "
                 f"{r['skipped']} skipped, {r['failed'] + r['errors']} failed")
        lines.append(f"| {r['row']} | {v['python']} | {v['torch']} | {v['transformers']} | {v['ipywidgets']} "
                     f"| {v['cpu']}, {v['threads']} | {tests} | {'pass' if r['ok'] else '**fail**'} "
                     f"({r['commit']}, {r['date']}) |")
    return "\n".join(lines)


def write_table(results: list[dict]) -> None:
    """Put the table between docs/compatibility.md's compat-table markers."""
    page = ROOT / "docs" / "compatibility.md"
    text = page.read_text()
    new = re.sub(r"(<!-- compat-table -->\n).*?(<!-- /compat-table -->)",
                 lambda m: m[1] + render_table(results) + "\n" + m[2], text, count=1, flags=re.S)
    if new == text and "<!-- compat-table -->" not in text:
        raise SystemExit("compat: docs/compatibility.md has no <!-- compat-table --> markers")
    page.write_text(new)


def load_results() -> list[dict]:
    if not RESULTS.exists():
        return []
    return json.loads(RESULTS.read_text())["rows"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", nargs="*", help="`lowest-transformers DIR` to prepare only that folder")
    p.add_argument("--rows", default=",".join(r.name for r in ROWS), help="comma-separated rows")
    p.add_argument("--list", action="store_true", help="print the rows and exit")
    p.add_argument("--table", action="store_true", help="only render docs/compatibility.md's table from the JSON")
    args = p.parse_args(argv)
    if args.what[:1] == ["lowest-transformers"]:
        if len(args.what) != 2:
            p.error("lowest-transformers needs a folder: lowest-transformers DIR")
        lowest_transformers(Path(args.what[1]))
        return 0
    if args.what:
        p.error(f"unknown job {args.what[0]!r}; the only job is lowest-transformers DIR")
    if args.table:
        write_table(load_results())
        return 0
    if args.list:
        for r in ROWS:
            print(f"{r.name:12} Python {r.python}  {' '.join(r.pins) or '(no pins)'}  {r.env or ''}\n  {r.what}")
        return 0
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        p.error(f"unknown row(s) {unknown}; choose from {[r.name for r in ROWS]}")
    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                      capture_output=True, text=True).stdout.strip():
        print("compat: the checkout has uncommitted changes; the matrix tests HEAD, not them", file=sys.stderr)
    old = {r["row"]: r for r in load_results()}
    for name in names:
        old[name] = run_row(BY_NAME[name])
        rows = [old[r.name] for r in ROWS if r.name in old]
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    results = [old[r.name] for r in ROWS if r.name in old]
    write_table(results)
    print(render_table(results))
    return 0 if all(old[n]["ok"] for n in names) else 1


if __name__ == "__main__":
    sys.exit(main())
