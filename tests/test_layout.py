"""The package's layout shows its architecture: the Algorithm 1 core at the top, the rest in rooms.

What a first reader relies on: the core imports nothing from the rooms built around it (only the
speed-ups of ``fast/`` and the model check of ``models/``), no two modules import each other in a
circle, every core module has its own test file, and one training step of ``qstar-mini train``
reaches the loss through the core and at most three other modules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from qstar_mini import cli

PACKAGE = Path(__file__).resolve().parent.parent / "qstar_mini"
TESTS = Path(__file__).resolve().parent
CORE = ("config", "masks", "meta_tokens", "lm", "thoughts", "talk", "mixing", "losses", "step")
#: What the core may import besides itself: errors, and the rooms that compute the same numbers faster
#: or check that a model gives its own numbers through the core's pieces.
CORE_MAY_USE = ("qstar_mini.errors", "qstar_mini.fast.", "qstar_mini.models.check")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The qstar_mini modules ``path`` imports (at module level only, when asked)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qstar_mini"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                known = (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists() or \
                    (PACKAGE.parent / candidate.replace(".", "/") / "__init__.py").exists()
                out.add(candidate if known else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("qstar_mini")}
    return out


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_the_top_level_holds_the_core_and_few_other_modules():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert set(CORE) <= set(top), sorted(set(CORE) - set(top))
    assert len(top) <= 20, f"{len(top)} modules at the top of qstar_mini/: {top}"


def test_train_py_is_the_loop_a_reader_follows():
    lines = len((PACKAGE / "train.py").read_text().splitlines())
    assert lines <= 460, f"qstar_mini/train.py has {lines} lines; move machinery to qstar_mini/runs/"


def test_the_core_imports_nothing_built_around_it():
    for name in CORE:
        for target in _imports(PACKAGE / f"{name}.py"):
            inside = target.removeprefix("qstar_mini.").split(".")[0] in CORE
            assert inside or target.startswith(CORE_MAY_USE), f"qstar_mini.{name} imports {target}"


def test_no_circle_of_module_level_imports():
    modules = _modules()
    graph = {name: {t for t in _imports(path, top_level_only=True) if t in modules and t != name}
             for name, path in modules.items()}
    graph = {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in graph.items()}  # a package's own __init__
    done, active = set(), []

    def visit(node):
        if node in active:
            raise AssertionError("circle of imports: " + " -> ".join(active[active.index(node):] + [node]))
        if node in done:
            return
        active.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        active.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)


def test_every_core_module_has_its_own_test_file():
    missing = [name for name in CORE if not (TESTS / f"test_{name}.py").exists()]
    assert not missing, f"core modules without tests/test_<module>.py: {missing}"


def test_a_training_step_reaches_the_loss_through_at_most_three_modules_outside_the_core(tmp_path, monkeypatch):
    """Run ``qstar-mini train`` for one step and look at the call stack every time the step calls
    the loss module: the qstar_mini modules on it, outside the core, are at most three."""
    import qstar_mini.step as step

    seen: set[tuple[str, ...]] = set()

    def watched(fn):
        def call(*args, **kwargs):
            stack, frame = [], sys._getframe(1)
            while frame is not None:
                name = frame.f_globals.get("__name__", "")
                if name.startswith("qstar_mini") and (not stack or stack[-1] != name):
                    stack.append(name)
                frame = frame.f_back
            seen.add(tuple(reversed(stack)))
            return fn(*args, **kwargs)
        return call

    for name, value in vars(step).copy().items():
        if callable(value) and getattr(value, "__module__", None) == "qstar_mini.losses":
            monkeypatch.setattr(step, name, watched(value))
    args = ["train", "--out", str(tmp_path / "run"), "--steps", "1", "--max-lines", "8", "--batch-size", "4",
            "--eval-every", "0", "--eval-lines", "1", "--no-progress", "--device", "cpu",
            "--seq-len", "24", "--thought-length", "4", "--n-true", "2"]
    assert cli.main(args) == 0
    assert seen, "the step never called the loss module"
    for path in seen:
        outside = [m for m in path if m.removeprefix("qstar_mini.") not in CORE]
        assert len(outside) <= 3, " -> ".join(path)
