"""Student copies of the notebooks: the solutions taken out, stubs put in; submissions checked.

The notebooks in ``notebooks/`` are the instructor's versions: each exercise is a code cell whose
solution sits between nbgrader's markers, and the cell after it runs a check from
:mod:`qstar_mini.teaching.checks`::

    def my_step_position_ids(attention_mask, step):          # exercise (solution) cell
        ### BEGIN SOLUTION
        batch, seq = attention_mask.shape
        return (torch.arange(seq) + step).expand(batch, seq)
        ### END SOLUTION

    checks.check_position_ids(my_step_position_ids)          # check (grade) cell

:func:`write_assignments` (``qstar-mini assignments --out DIR``) writes one student copy per
notebook that has an exercise, under the same file name; notebooks without exercises are left out
(the student reads them in the repository as they are), unless ``include_all``. A student copy,
made by :func:`make_student_notebook`, differs from its source in exactly these ways:

* **Solution regions**, the lines from ``### BEGIN SOLUTION`` to ``### END SOLUTION``, become
  ``# YOUR CODE HERE`` / ``raise NotImplementedError()`` (``YOUR ANSWER HERE`` in a markdown
  cell), indented like the BEGIN marker. The lines around them (the ``def``, the docstring) stay.
* **Hidden tests**, the lines from ``### BEGIN HIDDEN TESTS`` to ``### END HIDDEN TESTS``, are
  removed, and so are whole cells tagged ``hidden-tests`` (see :data:`HIDDEN_TEST_TAGS`).
* **Outputs.** A code cell loses its outputs and execution count when it is an exercise or a
  check, or when it reads a name that an earlier cleared cell binds (``my_step_position_ids``,
  or a variable computed from it): what it showed came from the reference solution, and a stale
  "passed" would mislead. Every other output is kept: those cells run only package code, so the
  student sees the same figures and tables when they run it. ``clear_all_outputs=True`` clears
  every output instead, as ``nbgrader generate_assignment`` does.
* **nbgrader metadata** where it is missing: exercise cells get ``{"solution": true,
  "grade_id": "ex-<function>", "locked": false, ...}`` and the check cell after each exercise
  ``{"grade": true, "points": 1, "locked": true, ...}`` (schema version 3, as Jupyter's "Create
  Assignment" toolbar writes it). Metadata already there is never changed. As nbgrader's
  ``LockCells`` does, locked cells become ``editable: false`` and solution cells
  ``deletable: false``.
* The timing metadata that executing a notebook leaves on each cell (``execution``) is dropped.

Markers are recognised as nbgrader recognises them (a line that *contains* ``BEGIN SOLUTION``,
``END SOLUTION``, ``BEGIN HIDDEN TESTS`` or ``END HIDDEN TESTS``), so a notebook that works here
also works with ``nbgrader generate_assignment``. What nbgrader would refuse or silently get wrong
is refused here with one line naming the notebook and the cell: a BEGIN without its END, an END
without its BEGIN, nested regions, markers in a cell whose nbgrader metadata says it is no
solution, and a cell marked as a solution without markers (nbgrader would replace the whole cell,
``def`` line included), unless it holds the stub already.

The result is deterministic, and the generator idempotent: the same sources give byte-identical
files, and a student copy run through it again comes out unchanged.
"""

from __future__ import annotations

import ast
import copy
import re
from collections.abc import Iterator
from pathlib import Path

import nbformat

from qstar_mini.errors import ConfigError, DataError
from qstar_mini.paths import REPO_ROOT

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"

BEGIN_SOLUTION, END_SOLUTION = "BEGIN SOLUTION", "END SOLUTION"          # nbgrader's delimiters
BEGIN_HIDDEN, END_HIDDEN = "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"
CODE_STUB = ["# YOUR CODE HERE", "raise NotImplementedError()"]          # nbgrader's code_stub
TEXT_STUB = ["YOUR ANSWER HERE"]                                          # nbgrader's text_stub

#: Cell tags that remove the whole cell from the student copy.
HIDDEN_TEST_TAGS = frozenset({"hidden-tests", "hidden_tests", "hidden-test", "hidden_test"})

#: pytest's ``testpaths`` and the folder names its ``norecursedirs`` skips for student copies
#: (pyproject.toml; tests/teaching/test_assignments.py checks that the two agree).
TEST_PATHS = ("tests", "notebooks")
NOT_COLLECTED = ("assignments", "student", "students")

_CHECK_CALL = re.compile(r"\bcheck_\w+\s*\(")   # a call of a qstar_mini.teaching.checks check
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")


# ---- one notebook ------------------------------------------------------------------------

def make_student_notebook(nb, *, name: str = "notebook", clear_all_outputs: bool = False):
    """The student copy of ``nb`` (an nbformat v4 notebook; ``nb`` itself is left unchanged).

    ``name`` is used only in error messages. Raises :class:`~qstar_mini.errors.DataError` on
    markers that do not pair up; see the module docstring for everything that changes.
    """
    nb = copy.deepcopy(nb)
    cells = []
    taken: set[str] = {g for c in nb.cells if (g := _nbgrader(c).get("grade_id"))}
    student_names: set[str] = set()      # names whose values come from the student's code
    after_exercise: str | None = None    # grade_id stem of the exercise just before, until a code cell

    for number, cell in enumerate(nb.cells, start=1):
        where = _where(name, number, cell)
        if HIDDEN_TEST_TAGS & set(cell.metadata.get("tags", [])):
            continue
        original = cell.source
        stub = CODE_STUB if cell.cell_type == "code" else TEXT_STUB
        cell.source, has_solution = _cut_regions(cell.source, BEGIN_SOLUTION, END_SOLUTION, stub, where)
        cell.source, has_hidden = _cut_regions(cell.source, BEGIN_HIDDEN, END_HIDDEN, [], where)
        meta = _nbgrader(cell)

        is_solution = has_solution or bool(meta.get("solution"))
        if has_solution and meta and not meta.get("solution"):
            raise DataError(f"{where}: has {BEGIN_SOLUTION} markers but its nbgrader metadata says "
                            f"solution: false (nbgrader would refuse it); make it a solution cell")
        if is_solution and not has_solution and not _holds_stub(cell):
            raise DataError(f"{where}: is an nbgrader solution cell without ### {BEGIN_SOLUTION} / "
                            f"### {END_SOLUTION} markers; put them around the solution")
        is_check = (cell.cell_type == "code" and not is_solution
                    and (has_hidden or bool(meta.get("grade"))
                         or (after_exercise is not None and bool(_CHECK_CALL.search(cell.source)))))

        if is_solution and not meta:
            stem = _unique(_exercise_stem(original, cell, number), taken)
            meta = cell.metadata["nbgrader"] = _solution_metadata(stem, cell.cell_type)
        elif is_check and not meta:
            stem = after_exercise or f"cell-{number}"
            meta = cell.metadata["nbgrader"] = _check_metadata(_unique(f"check-{stem}", taken))
        if is_solution:
            cell.metadata["deletable"] = False
        if meta.get("locked"):
            cell.metadata["editable"] = False
            cell.metadata["deletable"] = False
        cell.metadata.pop("execution", None)

        if cell.cell_type == "code":
            uses_student_code = bool(student_names & set(_IDENTIFIER.findall(cell.source)))
            if clear_all_outputs or is_solution or is_check or uses_student_code:
                _clear_outputs(cell)
            if is_solution or is_check or uses_student_code:
                student_names |= _bound_names(original)
            after_exercise = meta.get("grade_id", f"cell-{number}").removeprefix("ex-") if is_solution else None
        elif is_solution:
            after_exercise = None
        cells.append(cell)

    nb.cells = cells
    if clear_all_outputs:
        nb.metadata.pop("widgets", None)   # the saved state (and pictures) of interactive widgets
    return nb


def solution_cells(nb) -> list[int]:
    """Indices of the exercise cells of ``nb``: cells with solution markers (matched or not) or
    marked as solutions in their nbgrader metadata. Empty for a notebook without exercises."""
    return [i for i, cell in enumerate(nb.cells)
            if _nbgrader(cell).get("solution")
            or any(BEGIN_SOLUTION in line or END_SOLUTION in line for line in cell.source.split("\n"))]


# ---- the whole set -----------------------------------------------------------------------

def write_assignments(out_dir, notebooks_dir=NOTEBOOKS_DIR, *, include_all: bool = False,
                      clear_all_outputs: bool = False, overwrite: bool = False) -> list[Path]:
    """Write the student copy of every notebook of ``notebooks_dir`` that has an exercise (every
    notebook if ``include_all``) to ``out_dir``, same file names; return the paths written.

    Every notebook is converted before anything is written, so a bad one leaves ``out_dir``
    untouched. Refused (:class:`~qstar_mini.errors.QStarError`, one line): a missing notebooks
    folder, a folder with no exercise, a broken notebook or marker, and an ``out_dir`` that is
    the notebooks folder itself or lies where pytest would collect the copies as tests (inside
    ``notebooks/`` or ``tests/``, except under a folder named ``assignments``, ``student`` or
    ``students``). Files already in ``out_dir`` under other names are left alone; a notebook
    already there under the same name (perhaps holding a student's work) is replaced only if
    ``overwrite`` or if it is byte-identical to the new copy.
    """
    notebooks_dir, out_dir = Path(notebooks_dir), Path(out_dir)
    if not notebooks_dir.is_dir():
        raise DataError(f"notebooks folder {notebooks_dir} not found; pass --notebooks DIR "
                        f"(the instructor notebooks, with ### {BEGIN_SOLUTION} markers)")
    sources = sorted(notebooks_dir.glob("*.ipynb"))
    if not sources:
        raise DataError(f"no .ipynb notebooks in {notebooks_dir}")
    _check_out_dir(out_dir, notebooks_dir)

    students = {}
    for path in sources:
        nb = _read(path)
        if include_all or solution_cells(nb):
            students[path.name] = make_student_notebook(nb, name=path.name, clear_all_outputs=clear_all_outputs)
    if not students:
        raise DataError(f"no notebook in {notebooks_dir} has an exercise (### {BEGIN_SOLUTION}); "
                        f"nothing to write")

    texts = {file_name: nbformat.writes(nb) + "\n" for file_name, nb in students.items()}
    edited = [name for name, text in texts.items()
              if (out_dir / name).exists() and (out_dir / name).read_text(encoding="utf-8") != text]
    if edited and not overwrite:
        raise DataError(f"{out_dir} already holds {', '.join(edited)} with other contents (perhaps edited); "
                        f"add --overwrite to replace them, or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, text in texts.items():
        target = out_dir / file_name
        target.write_text(text, encoding="utf-8", newline="\n")
        written.append(target)
    return written


# ---- helpers -----------------------------------------------------------------------------

def _cut_regions(source: str, begin: str, end: str, stub: list[str], where: str) -> tuple[str, bool]:
    """``source`` with every begin..end region (marker lines included) replaced by ``stub``,
    indented like the begin marker; and whether there was a region. nbgrader's algorithm, plus
    refusing an END without a BEGIN (nbgrader ignores it and leaves the solution in)."""
    lines, found, opened = [], False, None
    for number, line in enumerate(source.split("\n"), start=1):
        if begin in line:
            if opened is not None:
                raise DataError(f'{where}: "{line.strip()}" on line {number} opens a region inside the one '
                                f"opened on line {opened}; close that one first (### {end})")
            opened, found = number, True
            indent = line[: len(line) - len(line.lstrip())]
            lines.extend(indent + s for s in stub)
        elif end in line:
            if opened is None:
                raise DataError(f'{where}: "{line.strip()}" on line {number} has no ### {begin} before it')
            opened = None
        elif opened is None:
            lines.append(line)
    if opened is not None:
        raise DataError(f"{where}: ### {begin} on line {opened} has no ### {end} after it")
    return "\n".join(lines), found


def _bound_names(source: str) -> set[str]:
    """Names a cell binds at top level (def, class, assignment, for, with ... as). Imports are
    not counted: ``import torch`` gives every student the same module."""
    code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.split("\n"))
    try:
        tree = ast.parse(code)
    except SyntaxError:   # IPython syntax ast cannot read: the plain assignments, at least
        return set(re.findall(r"^([A-Za-z_]\w*)\s*=(?!=)", code, re.M))
    return set(_stored(tree))


def _stored(node) -> Iterator[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        yield node.name            # its body's names are local
        return
    if isinstance(node, (ast.Import, ast.ImportFrom, ast.Lambda, ast.ListComp, ast.SetComp,
                         ast.DictComp, ast.GeneratorExp)):
        return
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
        yield node.id
    for child in ast.iter_child_nodes(node):
        yield from _stored(child)


def _exercise_stem(source: str, cell, number: int) -> str:
    """``ex-<first function or class the cell defines>``, else ``ex-<cell id or number>``."""
    match = re.search(r"^(?:async\s+)?(?:def|class)\s+([A-Za-z_]\w*)", source, re.M)
    if match:
        return f"ex-{match.group(1)}"
    return f"ex-{cell.get('id') or number}"


def _unique(grade_id: str, taken: set[str]) -> str:
    candidate, k = grade_id, 2
    while candidate in taken:
        candidate, k = f"{grade_id}-{k}", k + 1
    taken.add(candidate)
    return candidate


def _solution_metadata(grade_id: str, cell_type: str) -> dict:
    # nbgrader accepts a markdown solution cell only as a manually graded answer (grade: true)
    graded = cell_type == "markdown"
    meta = {"grade": graded, "grade_id": grade_id, "locked": False, "schema_version": 3,
            "solution": True, "task": False}
    if graded:
        meta["points"] = 1
    return meta


def _check_metadata(grade_id: str) -> dict:
    return {"grade": True, "grade_id": grade_id, "locked": True, "points": 1, "schema_version": 3,
            "solution": False, "task": False}


def _nbgrader(cell) -> dict:
    return cell.metadata.get("nbgrader") or {}


def _holds_stub(cell) -> bool:
    lines = {line.strip() for line in cell.source.split("\n")}
    return (CODE_STUB[-1] if cell.cell_type == "code" else TEXT_STUB[0]) in lines


def _clear_outputs(cell) -> None:
    cell.outputs = []
    cell.execution_count = None
    for key in ("collapsed", "scrolled"):
        cell.metadata.pop(key, None)


def _where(name: str, number: int, cell) -> str:
    first = next((line.strip() for line in cell.source.split("\n") if line.strip()), "")
    first = first if len(first) <= 60 else first[:57] + "..."
    return f'{name}, cell {number} ({cell.cell_type}, "{first}")'


def _read(path: Path):
    try:
        return nbformat.read(path, as_version=4)
    except Exception as error:  # noqa: BLE001 - JSON, schema or encoding: all mean "not a notebook"
        detail = " ".join(str(error).split())[:200]
        raise DataError(f"{path}: not a readable notebook ({type(error).__name__}: {detail})") from error


def _check_out_dir(out_dir: Path, notebooks_dir: Path) -> None:
    out = out_dir.resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output folder {out_dir} exists and is not a folder; choose another path")
    source = notebooks_dir.resolve()
    if out == source:
        raise ConfigError(f"output folder {out_dir} is the notebooks folder itself: the student copies "
                          f"would overwrite the solutions; choose another folder, e.g. release/")
    for root in (source, *(REPO_ROOT / p for p in TEST_PATHS)):
        root = root.resolve()
        if out.is_relative_to(root):
            parts = out.relative_to(root).parts
            if not any(part in NOT_COLLECTED or part.startswith(".") for part in parts):
                raise ConfigError(
                    f"output folder {out_dir} is inside {root}, where pytest would collect the student "
                    f"copies as tests (and fail on their NotImplementedError); write them elsewhere "
                    f"(e.g. release/) or under a folder named {', '.join(NOT_COLLECTED)}")


# ---- a submission, before autograde ------------------------------------------------------------

def check_submission(submission, notebooks_dir=NOTEBOOKS_DIR) -> list[str]:
    """What would make autograde give points silently wrong, one line each (empty: nothing found).

    ``submission`` is a student's notebook or a folder of them (``submitted/<student>/<assignment>``);
    each notebook is compared, by file name, with the student copy of the instructor notebook of
    ``notebooks_dir``. Named: a graded cell (check or answer) that is missing, whose nbgrader metadata
    was removed, whose ``grade_id`` was renamed (nbgrader then stops autograding the whole
    submission), whose points, grading or locking changed, or whose source differs from the release;
    a duplicated ``grade_id``; and, in every cell the student could edit, code that reaches around
    the checks (see :func:`audit_code`). Raises :class:`~qstar_mini.errors.DataError` for a path that
    holds no notebook or a notebook that is not one of the assignment's.
    """
    submission, notebooks_dir = Path(submission), Path(notebooks_dir)
    if submission.is_dir():
        paths = sorted(submission.glob("*.ipynb"))
        if not paths:
            raise DataError(f"no .ipynb notebooks in {submission}")
    elif submission.suffix == ".ipynb" and submission.is_file():
        paths = [submission]
    else:
        raise DataError(f"{submission} is neither a notebook nor a folder of notebooks")
    problems = []
    for path in paths:
        source_path = notebooks_dir / path.name
        if not source_path.is_file():
            raise DataError(f"{path.name} is not one of the notebooks of {notebooks_dir}; pass --notebooks DIR "
                            f"(the instructor notebooks the assignment was made from)")
        release = make_student_notebook(_read(source_path), name=path.name)
        problems += [f"{path.name}: {p}" for p in _compare(release, _read(path))]
    return problems


def _compare(release, submitted) -> list[str]:
    problems = []
    expected = {g: (i, c) for i, c in enumerate(release.cells) if (g := _nbgrader(c).get("grade_id"))
                and (_nbgrader(c).get("grade") or _nbgrader(c).get("locked"))}
    seen: dict[str, int] = {}
    for number, cell in enumerate(submitted.cells, start=1):
        grade_id = _nbgrader(cell).get("grade_id")
        if grade_id:
            if grade_id in seen:
                problems.append(f"cell {number}: grade_id {grade_id!r} is also cell {seen[grade_id]}'s (nbgrader "
                                f"refuses the whole notebook)")
            seen.setdefault(grade_id, number)
    release_sources = {_normal_source(c.source) for c in release.cells}
    for grade_id, (index, want) in expected.items():
        what = _graded_kind(want)
        if grade_id not in seen:
            twin = next((n for n, c in enumerate(submitted.cells, start=1)
                         if _normal_source(c.source) == _normal_source(want.source) and c.cell_type == want.cell_type),
                        None)
            if twin is None:
                problems.append(f"{what} {grade_id!r} is missing (deleted?): it scores 0 without a word from "
                                f"nbgrader; put the cell back from the release")
                continue
            other = _nbgrader(submitted.cells[twin - 1]).get("grade_id")
            if other:
                problems.append(f"cell {twin}: {what} {grade_id!r} was renamed to {other!r} (nbgrader stops "
                                f"autograding the whole submission); restore grade_id {grade_id!r}")
            else:
                problems.append(f"cell {twin}: {what} {grade_id!r} lost its nbgrader metadata (it scores 0 without "
                                f"a word from nbgrader); restore the metadata from the release")
            continue
        number = seen[grade_id]
        cell, meta = submitted.cells[number - 1], _nbgrader(submitted.cells[number - 1])
        changed = [k for k in ("grade", "solution", "locked", "points") if meta.get(k) != _nbgrader(want).get(k)]
        if changed:
            problems.append(f"cell {number}: {what} {grade_id!r} has other nbgrader metadata than the release "
                            f"({', '.join(f'{k}: {meta.get(k)!r} instead of {_nbgrader(want).get(k)!r}' for k in changed)})")
        if _nbgrader(want).get("locked") and _normal_source(cell.source) != _normal_source(want.source):
            problems.append(f"cell {number}: the source of locked {what} {grade_id!r} was changed (nbgrader puts "
                            f"the instructor's back when it autogrades, but look at why)")
    for number, cell in enumerate(submitted.cells, start=1):
        if cell.cell_type != "code" or _normal_source(cell.source) in release_sources:
            continue
        problems += [f"cell {number}, line {line}: {what}" for line, what in audit_code(cell.source)]
    return problems


def _graded_kind(cell) -> str:
    if cell.cell_type == "markdown":
        return "answer cell"
    return "check cell" if _nbgrader(cell).get("grade") else "locked cell"


def _normal_source(source: str) -> str:
    """The source without hidden tests (nbgrader's autograded copy has them back) and trailing blanks."""
    try:
        source, _ = _cut_regions(source, BEGIN_HIDDEN, END_HIDDEN, [], "a submitted cell")
    except DataError:
        pass
    return "\n".join(line.rstrip() for line in source.strip().split("\n"))


# ---- code that reaches around the checks ---------------------------------------------------------

#: Modules whose attributes a student's cell has no reason to set: the checker, the package, torch
#: and the interpreter.
_GUARDED_ROOTS = frozenset({"checks", "torch", "sys", "builtins", "qstar_mini", "F", "nn", "importlib"})
_SUSPECT_CALLS = {
    "exec": "runs code from a string", "eval": "runs code from a string", "compile": "compiles code at run time",
    "__import__": "imports by a computed name", "setattr": "sets an attribute by name",
    "delattr": "deletes an attribute by name", "globals": "reads or changes the notebook's globals",
    "vars": "reads or changes a namespace", "getsource": "reads a function's source",
    "reload": "reloads a module", "import_module": "imports by a computed name",
    "spec_from_file_location": "loads a module from a file", "module_from_spec": "loads a module from a file",
    "exec_module": "loads a module from a file", "FunctionType": "builds a function from a code object",
    "CodeType": "builds a code object", "setprofile": "turns the call monitor off or on",
    "settrace": "turns a tracer off or on", "get_referrers": "walks the interpreter's objects",
    "get_referents": "walks the interpreter's objects", "get_objects": "walks the interpreter's objects",
    "lru_cache": "caches a function's results", "load": "loads saved data (answers computed elsewhere?)",
    "create_mask": "builds a mask from a FlexAttention predicate", "create_block_mask": "builds a mask from a "
    "FlexAttention predicate", "figure3_visible": "the package's Figure-3 predicate",
    "system": "runs a shell command", "Popen": "runs another program", "check_output": "runs another program",
}
_SUSPECT_ATTRIBUTES = frozenset({
    "__code__", "__globals__", "__closure__", "__defaults__", "__kwdefaults__", "__wrapped__", "__dict__",
    "__class__", "__torch_function__", "__torch_dispatch__", "__builtins__", "__subclasses__", "__getattribute__",
    "__setattr__", "cell_contents", "f_globals", "f_locals", "f_back", "REFERENCES", "HINTS",
    "TorchFunctionMode", "TorchDispatchMode", "figure3_visible", "create_mask", "create_block_mask"})
_SUSPECT_MODULES = frozenset({"importlib", "inspect", "gc", "ctypes", "subprocess", "types", "pickle", "marshal",
                              "qstar_mini.fast.flex_attention", "torch.overrides", "torch.utils._python_dispatch"})


def audit_code(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` for each construct of ``source`` that reaches around the checks: setting an
    attribute of the checker, the package, torch or the interpreter; rebinding ``checks`` or
    ``torch``; a subclass of ``torch.Tensor``; the interpreter's introspection (``__code__``,
    ``__closure__``, ``sys.modules``, ``gc``, ``inspect``, ``exec``, ``importlib``, ...); the
    package's FlexAttention predicate; loading saved data; private names of the checks. Code that
    ``ast`` cannot read (IPython magics aside) is reported as such. A finding is for the instructor
    to read, not proof: the checks themselves fail on what they can see at run time."""
    lines = ["" if line.lstrip().startswith(("%", "!")) else line for line in source.split("\n")]
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError as error:
        return [(error.lineno or 1, "code that Python cannot parse (the checks cannot audit it)")]
    found: list[tuple[int, str]] = []
    named: set[int] = set()          # the callee of a call already named is not named again

    def root(node) -> str | None:
        while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
            node = node.value if not isinstance(node, ast.Call) else node.func
        return node.id if isinstance(node, ast.Name) else None

    def dotted(node) -> str:
        try:
            return ast.unparse(node)
        except Exception:  # noqa: BLE001
            return "?"

    for node in ast.walk(tree):
        line = getattr(node, "lineno", 1)
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                for t in ast.walk(target):
                    if isinstance(t, (ast.Attribute, ast.Subscript)) and root(t) in _GUARDED_ROOTS:
                        found.append((line, f"sets {dotted(t)} (changes the checker, the package, torch or the "
                                            f"interpreter)"))
                        break
                    if isinstance(t, ast.Name) and t.id in ("checks", "torch") and isinstance(t.ctx, (ast.Store, ast.Del)):
                        found.append((line, f"rebinds the name {t.id}"))
                        break
        elif isinstance(node, ast.ClassDef):
            for base in node.bases:
                text = dotted(base)
                if text.endswith("Tensor") or "Mode" in text:
                    found.append((line, f"defines a subclass of {text}"))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if isinstance(node, ast.ImportFrom):
                names += [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name in _SUSPECT_MODULES or name.split(".")[0] in _SUSPECT_MODULES:
                    found.append((line, f"imports {name}"))
                    break
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qstar_mini") \
                    and node.module != "qstar_mini.teaching":
                found.append((line, f"imports from {node.module} (the exercises ask for torch only)"))
            if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
                found.append((line, f"imports everything from {node.module}"))
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            why = _SUSPECT_CALLS.get(name)
            if name == "run" and root(node.func) == "subprocess":
                why = "runs another program"
            if why:
                found.append((line, f"calls {dotted(node.func)} ({why})"))
                named.add(id(node.func))
        elif isinstance(node, ast.Attribute) and id(node) not in named:
            if node.attr in _SUSPECT_ATTRIBUTES or (node.attr == "modules" and root(node) == "sys"):
                found.append((line, f"uses {dotted(node)}"))
            elif root(node) == "checks" and node.attr.startswith("_"):
                found.append((line, f"uses the checks' private {dotted(node)}"))
        elif isinstance(node, ast.Name) and node.id in ("__builtins__", "__import__"):
            found.append((line, f"uses {node.id}"))
    return sorted(set(found))
