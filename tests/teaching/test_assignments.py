"""Student notebooks (``qstar_mini.teaching.assignments``, ``qstar-mini assignments``).

What must hold: a student copy contains no solution code and no hidden test; run as generated,
every check fails with its "not implemented yet" message; with the reference solutions pasted
back, every check passes; the generator is deterministic and idempotent; bad markers and bad
folders are refused with one line. A small synthetic notebook covers every rule (and is run
once in a real Jupyter kernel); the real notebooks are checked too, their exercise and check
cells run in this process, which takes seconds instead of the minutes of a full run.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from qstar_mini import cli
from qstar_mini.teaching.assignments import (CODE_STUB, NOT_COLLECTED, NOTEBOOKS_DIR, TEST_PATHS,
                                             make_student_notebook, solution_cells, write_assignments)
from qstar_mini.teaching.checks import CheckFailed
from qstar_mini.errors import QStarError
from qstar_mini.paths import REPO_ROOT

# ---- a synthetic instructor notebook: one exercise of each kind, no nbgrader metadata -------

SOLUTION_LINES = ["batch, seq = attention_mask.shape", "return (torch.arange(seq) + step).expand(batch, seq)"]
SECRETS = ["SECRET-HIDDEN-REGION", "SECRET-TAGGED-CELL", "SECRET-ANSWER"]

EXERCISE = '''def my_step_position_ids(attention_mask, step):
    """Position ids (batch, seq) of the tokens fed at thought step `step`."""
    ### BEGIN SOLUTION
    batch, seq = attention_mask.shape
    return (torch.arange(seq) + step).expand(batch, seq)
    ### END SOLUTION'''

STUDENT_EXERCISE = '''def my_step_position_ids(attention_mask, step):
    """Position ids (batch, seq) of the tokens fed at thought step `step`."""
    # YOUR CODE HERE
    raise NotImplementedError()'''


def code(cell_id: str, source: str, output: str | None = None, count: int | None = None, **metadata):
    cell = new_code_cell(source, id=cell_id, execution_count=count, metadata=metadata)
    if output is not None:
        cell.outputs = [new_output("stream", name="stdout", text=output)]
    return cell


def synthetic_notebook():
    timing = {"execution": {"iopub.status.idle": "2026-01-01T00:00:00.000000Z"}}
    return new_notebook(cells=[
        new_markdown_cell("# A tiny assignment", id="intro"),
        code("imports", "import torch", count=1),
        code("explain", "print(torch.arange(3).tolist())", "[0, 1, 2]\n", 2, **timing),
        code("exercise", EXERCISE, count=3, **timing),
        code("check", "from qstar_mini.teaching import checks\n\nchecks.check_position_ids(my_step_position_ids)",
             "check_position_ids: passed (7 random padded batches, steps 0-7)\n", 4),
        code("visible-and-hidden",
             "assert my_step_position_ids(torch.ones(1, 3, dtype=torch.long), 1).tolist() == [[1, 2, 3]]\n"
             "### BEGIN HIDDEN TESTS\n"
             "assert my_step_position_ids(torch.ones(2, 4, dtype=torch.long), 2)[1, 3].item() == 5  "
             "# SECRET-HIDDEN-REGION\n"
             "### END HIDDEN TESTS", count=5),
        code("tagged", "assert my_step_position_ids(torch.ones(1, 2, dtype=torch.long), 0).tolist() == [[0, 1]]"
             "  # SECRET-TAGGED-CELL", count=6, tags=["hidden-tests"]),
        new_markdown_cell("Why is the position of a thought token not its index in the KV cache?\n\n"
                          "  ### BEGIN SOLUTION\n  The cache stacks whole thought blocks after the text: "
                          "SECRET-ANSWER.\n  ### END SOLUTION", id="question"),
        code("uses", "ids = my_step_position_ids(torch.ones(1, 4, dtype=torch.long), 2)", count=7),
        code("uses-indirectly", "print(ids.tolist())", "[[2, 3, 4, 5]]\n", 8),
        code("independent", "print(torch.ones(2).sum().item())", "2.0\n", 9, scrolled=True),
    ])


def by_id(nb) -> dict:
    return {cell.id: cell for cell in nb.cells}


def all_text(nb) -> str:
    """Every source and every textual output of ``nb``, one string."""
    parts = []
    for cell in nb.cells:
        parts.append(cell.source)
        for out in cell.get("outputs", []):
            parts.append(str(out.get("text", "")))
            parts.extend(str(v) for k, v in out.get("data", {}).items() if k.startswith("text/"))
            parts.extend(out.get("traceback", []))
    return "\n".join(parts)


def write_nb(path: Path, nb) -> Path:
    path.write_text(nbformat.writes(nb) + "\n", encoding="utf-8")
    return path


def paste_back(student, source):
    """The student copy with each exercise cell's source replaced by the instructor's."""
    pasted = copy.deepcopy(student)
    originals = by_id(source)
    for i in solution_cells(pasted):
        pasted.cells[i].source = originals[pasted.cells[i].id].source
    return pasted


# ---- the rules, on the synthetic notebook ------------------------------------------------

@pytest.fixture(scope="module")
def student():
    return make_student_notebook(synthetic_notebook(), name="tiny.ipynb")


def test_a_solution_region_becomes_the_stub_indented_like_its_marker(student):
    assert by_id(student)["exercise"].source == STUDENT_EXERCISE
    assert CODE_STUB == ["# YOUR CODE HERE", "raise NotImplementedError()"]   # nbgrader's code stub


def test_a_markdown_answer_becomes_your_answer_here(student):
    assert by_id(student)["question"].source == (
        "Why is the position of a thought token not its index in the KV cache?\n\n  YOUR ANSWER HERE")


def test_no_solution_code_and_no_hidden_test_is_left(student):
    text = all_text(student)
    for line in SOLUTION_LINES + SECRETS:
        assert line not in text
    assert "BEGIN" not in text and "END SOLUTION" not in text
    assert "tagged" not in by_id(student)                                      # the tagged cell is gone
    assert by_id(student)["visible-and-hidden"].source == (
        "assert my_step_position_ids(torch.ones(1, 3, dtype=torch.long), 1).tolist() == [[1, 2, 3]]")


def test_outputs_from_the_solutions_are_cleared_the_others_kept(student):
    cells = by_id(student)
    for cell_id in ("exercise", "check", "visible-and-hidden", "uses", "uses-indirectly"):
        assert cells[cell_id].outputs == [] and cells[cell_id].execution_count is None, cell_id
    assert cells["explain"].outputs[0].text == "[0, 1, 2]\n" and cells["explain"].execution_count == 2
    assert cells["independent"].outputs[0].text == "2.0\n" and cells["independent"].execution_count == 9
    assert all("execution" not in cell.metadata for cell in student.cells)


def test_clear_all_outputs_clears_every_output():
    nb = make_student_notebook(synthetic_notebook(), clear_all_outputs=True)
    assert all(c.outputs == [] and c.execution_count is None for c in nb.cells if c.cell_type == "code")
    assert "scrolled" not in by_id(nb)["independent"].metadata


def test_nbgrader_metadata_is_added_where_missing(student):
    cells = by_id(student)
    assert cells["exercise"].metadata["nbgrader"] == {
        "grade": False, "grade_id": "ex-my_step_position_ids", "locked": False, "schema_version": 3,
        "solution": True, "task": False}
    assert cells["check"].metadata["nbgrader"] == {
        "grade": True, "grade_id": "check-my_step_position_ids", "locked": True, "points": 1,
        "schema_version": 3, "solution": False, "task": False}
    assert cells["visible-and-hidden"].metadata["nbgrader"]["grade"] is True   # it held hidden tests
    assert cells["question"].metadata["nbgrader"]["solution"] is True          # a manually graded answer
    assert cells["question"].metadata["nbgrader"]["grade"] is True
    assert "nbgrader" not in cells["uses"].metadata and "nbgrader" not in cells["explain"].metadata
    # as nbgrader's LockCells: checks cannot be edited, exercises not deleted
    assert cells["check"].metadata["editable"] is False and cells["check"].metadata["deletable"] is False
    assert cells["exercise"].metadata["deletable"] is False and "editable" not in cells["exercise"].metadata


def test_existing_nbgrader_metadata_is_kept():
    nb = synthetic_notebook()
    mine = {"grade": False, "grade_id": "week1-positions", "locked": False, "schema_version": 3,
            "solution": True, "task": False}
    by_id(nb)["exercise"].metadata["nbgrader"] = dict(mine)
    out = make_student_notebook(nb)
    assert by_id(out)["exercise"].metadata["nbgrader"] == mine
    assert by_id(out)["check"].metadata["nbgrader"]["grade_id"] == "check-week1-positions"


def test_the_source_notebook_is_not_changed():
    nb = synthetic_notebook()
    before = nbformat.writes(nb)
    make_student_notebook(nb)
    assert nbformat.writes(nb) == before


@pytest.mark.parametrize("clear_all", [False, True])
def test_a_student_copy_goes_through_unchanged(clear_all):
    once = make_student_notebook(synthetic_notebook(), clear_all_outputs=clear_all)
    twice = make_student_notebook(once, clear_all_outputs=clear_all)
    assert nbformat.writes(twice) == nbformat.writes(once)


# ---- refusals ------------------------------------------------------------------------------

@pytest.mark.parametrize("source, message", [
    ("def f():\n    ### BEGIN SOLUTION\n    return 1", r"### BEGIN SOLUTION on line 2 has no ### END SOLUTION"),
    ("def f():\n    return 1\n    ### END SOLUTION", r'"### END SOLUTION" on line 3 has no ### BEGIN SOLUTION'),
    ("### BEGIN SOLUTION\nx = 1\n### BEGIN SOLUTION\ny = 2\n### END SOLUTION",
     r"on line 3 opens a region inside the one opened on line 1"),
    ("x = 1\n### BEGIN HIDDEN TESTS\nassert x", r"### BEGIN HIDDEN TESTS on line 2 has no ### END HIDDEN TESTS"),
])
def test_unmatched_markers_are_refused_naming_notebook_and_cell(source, message):
    nb = new_notebook(cells=[new_markdown_cell("# title", id="a"), new_code_cell(source, id="b")])
    with pytest.raises(QStarError, match=message) as caught:
        make_student_notebook(nb, name="07_broken.ipynb")
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith('07_broken.ipynb, cell 2 (code, "')


def test_a_solution_cell_without_markers_is_refused():
    nb = new_notebook(cells=[new_code_cell("def f():\n    return 42", id="a",
                                           metadata={"nbgrader": {"solution": True, "grade_id": "f"}})])
    with pytest.raises(QStarError, match="cell 1 .* without ### BEGIN SOLUTION"):
        make_student_notebook(nb, name="x.ipynb")


def test_markers_in_a_cell_nbgrader_calls_no_solution_are_refused():
    nb = new_notebook(cells=[new_code_cell("### BEGIN SOLUTION\nx = 1\n### END SOLUTION", id="a",
                                           metadata={"nbgrader": {"solution": False, "grade": True}})])
    with pytest.raises(QStarError, match="solution: false"):
        make_student_notebook(nb)


# ---- the whole set -----------------------------------------------------------------------

@pytest.fixture
def sources(tmp_path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    write_nb(folder / "10_exercise.ipynb", synthetic_notebook())
    write_nb(folder / "11_reading.ipynb", new_notebook(cells=[code("only", "print(1)", "1\n", 1)]))
    return folder


def test_only_notebooks_with_exercises_are_written_unless_all(sources, tmp_path):
    assert [p.name for p in write_assignments(tmp_path / "a", sources)] == ["10_exercise.ipynb"]
    both = write_assignments(tmp_path / "b", sources, include_all=True)
    assert [p.name for p in both] == ["10_exercise.ipynb", "11_reading.ipynb"]
    assert nbformat.read(both[1], as_version=4).cells[0].outputs[0].text == "1\n"


def test_the_generator_is_deterministic_and_idempotent(sources, tmp_path):
    first = write_assignments(tmp_path / "first", sources, include_all=True)
    again = write_assignments(tmp_path / "first", sources, include_all=True)        # rerun in place
    of_students = write_assignments(tmp_path / "second", tmp_path / "first", include_all=True)
    for a, b, c in zip(first, again, of_students):
        assert a.read_bytes() == b.read_bytes() == c.read_bytes(), a.name


def test_missing_or_empty_notebook_folders_are_refused(tmp_path):
    with pytest.raises(QStarError, match="notebooks folder .* not found"):
        write_assignments(tmp_path / "out", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QStarError, match="no .ipynb notebooks"):
        write_assignments(tmp_path / "out", tmp_path / "empty")
    write_nb(tmp_path / "empty" / "plain.ipynb", new_notebook(cells=[new_code_cell("1", id="a")]))
    with pytest.raises(QStarError, match="has an exercise"):
        write_assignments(tmp_path / "out", tmp_path / "empty")
    assert not (tmp_path / "out").exists()


def test_an_output_folder_pytest_would_collect_is_refused(sources, tmp_path):
    with pytest.raises(QStarError, match="overwrite the solutions"):
        write_assignments(sources, sources)
    with pytest.raises(QStarError, match="where pytest would collect"):
        write_assignments(sources / "release", sources)
    with pytest.raises(QStarError, match="where pytest would collect"):
        write_assignments(NOTEBOOKS_DIR / "release-test-assignments", sources)
    assert not (sources / "release").exists() and not (NOTEBOOKS_DIR / "release-test-assignments").exists()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(QStarError, match="not a folder"):
        write_assignments(tmp_path / "a-file", sources)
    assert write_assignments(sources / "students" / "week1", sources)        # a folder pytest skips


def test_a_bad_notebook_leaves_the_output_folder_untouched(sources, tmp_path):
    write_nb(sources / "12_broken.ipynb", new_notebook(cells=[new_code_cell("### BEGIN SOLUTION\nx = 1", id="a")]))
    with pytest.raises(QStarError, match="12_broken.ipynb, cell 1"):
        write_assignments(tmp_path / "out", sources)
    assert not (tmp_path / "out").exists()
    (sources / "12_broken.ipynb").write_text("{not json")
    with pytest.raises(QStarError, match="12_broken.ipynb: not a readable notebook"):
        write_assignments(tmp_path / "out", sources)


def test_the_folder_rules_match_pyproject():
    tomllib = pytest.importorskip("tomllib")
    options = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert set(options["testpaths"]) <= set(TEST_PATHS)
    assert set(NOT_COLLECTED) <= set(options["norecursedirs"])


# ---- executed in a Jupyter kernel, as generated and with the solutions pasted back -------------

def execute(nb):
    """Run ``nb`` top to bottom in a fresh kernel of this Python (errors kept as outputs)."""
    import ipykernel.kernelspec
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from nbclient import NotebookClient

    class ThisPython(KernelSpecManager):   # the installed spec may start whatever `python` is on PATH
        def get_kernel_spec(self, kernel_name):
            return KernelSpec(resource_dir=ipykernel.kernelspec.RESOURCES, **ipykernel.kernelspec.get_kernel_dict())

    km = KernelManager(kernel_name="python3", kernel_spec_manager=ThisPython())
    NotebookClient(nb, km=km, timeout=120, allow_errors=True,
                   resources={"metadata": {"path": str(REPO_ROOT)}}).execute()
    return nb


def errors(cell) -> list:
    return [out for out in cell.outputs if out.output_type == "error"]


def test_in_a_kernel_the_student_copy_fails_and_the_solutions_pass(student):
    ran = by_id(execute(copy.deepcopy(student)))
    [error] = errors(ran["check"])
    assert error.ename == "CheckFailed" and "check_position_ids: not implemented yet" in error.evalue
    assert [e.ename for e in errors(ran["visible-and-hidden"])] == ["NotImplementedError"]
    assert not errors(ran["explain"]) and not errors(ran["independent"])

    solved = by_id(execute(paste_back(student, synthetic_notebook())))
    assert not [cid for cid, cell in solved.items() if cell.cell_type == "code" and errors(cell)]
    assert "check_position_ids: passed" in solved["check"].outputs[0].text
    assert solved["uses-indirectly"].outputs[0].text == "[[2, 3, 4, 5]]\n"


# ---- the real notebooks ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """{name: (instructor notebook, student notebook)} for notebooks/ (skipped when none has exercises)."""
    out = tmp_path_factory.mktemp("release")
    try:
        written = write_assignments(out)
    except QStarError as error:
        if "has an exercise" in str(error):
            pytest.skip("no notebook has exercises yet")
        raise
    return {p.name: (nbformat.read(NOTEBOOKS_DIR / p.name, as_version=4), nbformat.read(p, as_version=4))
            for p in written}


def solution_lines(nb) -> set[str]:
    """The stripped, non-trivial lines between the solution markers of ``nb``."""
    lines, inside = set(), False
    for cell in nb.cells:
        for line in cell.source.split("\n"):
            if "BEGIN SOLUTION" in line:
                inside = True
            elif "END SOLUTION" in line:
                inside = False
            elif inside and len(line.strip()) > 3 and not line.strip().startswith("#"):
                lines.add(line.strip())
    return lines


def test_real_student_notebooks_contain_no_solution_line(real):
    for name, (source, student) in real.items():
        solutions = solution_lines(source)
        # a notebook with only open questions (01, 06-09) has no solution lines: its answer cells
        # hold the stub in the instructor notebook too, the key lives in docs/grading.md
        assert solutions or not code_exercises(source), name
        left = {line.strip() for line in all_text(student).split("\n")}
        # lines the author also wrote outside the exercises are the author's business, not a leak
        elsewhere = {line.strip() for i, cell in enumerate(source.cells) if i not in solution_cells(source)
                     for line in cell.source.split("\n")}
        leaked = (solutions - elsewhere) & left
        assert not leaked, f"{name}: solution lines left in the student copy: {sorted(leaked)}"
        assert "BEGIN SOLUTION" not in all_text(student) and "HIDDEN TESTS" not in all_text(student), name


def code_exercises(nb) -> list[int]:
    return [i for i in solution_cells(nb) if nb.cells[i].cell_type == "code"]


ANSWER_ID = re.compile(r"answer(\d\d)-(\d+)")


def test_every_open_question_of_01_to_09_has_an_answer_cell_and_a_key(real):
    """Each numbered question of a notebook's Exercises section is followed by a manually graded
    answer cell `answer<NN>-<k>` (3 points, only the stub), and docs/grading.md keys it."""
    key = (REPO_ROOT / "docs" / "grading.md").read_text()
    for number in range(1, 10):
        [name] = [n for n in real if n.startswith(f"{number:02d}_")]
        source, student = real[name]
        start = next(i for i, c in enumerate(source.cells) if c.cell_type == "markdown" and "## Exercises" in c.source)
        cells = source.cells[start:]
        questions = [i for i, c in enumerate(cells) if c.cell_type == "markdown"
                     and re.search(r"^\d\. \*\*", c.source, re.M)]
        assert len(questions) >= 1, name
        for k, i in enumerate(questions, start=1):
            answer = cells[i + 1]
            grading = answer.metadata.get("nbgrader", {})
            grade_id = f"answer{number:02d}-{k}"
            assert grading.get("grade_id") == grade_id, (name, k, grading)
            assert grading["grade"] and grading["solution"] and grading["points"] == 3, (name, grade_id)
            assert answer.cell_type == "markdown" and answer.source == "YOUR ANSWER HERE", (name, grade_id)
            assert f"[`{grade_id}`]" in key, f"docs/grading.md has no key for {grade_id}"
        assert all(m.group(1) == f"{number:02d}" for c in source.cells
                   if (m := ANSWER_ID.fullmatch(c.metadata.get("nbgrader", {}).get("grade_id", "")))), name


def test_real_student_notebooks_are_idempotent(real, tmp_path):
    first = write_assignments(tmp_path / "a")
    second = write_assignments(tmp_path / "b", tmp_path / "a")
    for a, b in zip(first, second):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_the_real_notebooks_carry_nbgrader_metadata(real):
    """So that ``nbgrader generate_assignment`` accepts the instructor notebooks as they are."""
    for name, (source, student) in real.items():
        for i, (a, b) in enumerate(zip(source.cells, student.cells)):
            assert a.metadata.get("nbgrader") == b.metadata.get("nbgrader"), (
                f"{name}, cell {i + 1}: add the nbgrader metadata of its student copy to the instructor "
                f"notebook (Jupyter's 'Create Assignment' toolbar does it): {b.metadata.get('nbgrader')}")


def run_cells(nb, name: str) -> dict:
    """Run the imports of ``nb``, then its exercise and check cells in order, in this process;
    return {grade_id of each check cell: (exception or None, printed text)}."""
    namespace = {"__name__": "__main__"}
    for cell in nb.cells:
        if cell.cell_type == "code":
            try:
                tree = ast.parse(cell.source)
            except SyntaxError:
                continue
            imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
            exec(compile(ast.Module(body=imports, type_ignores=[]), name, "exec"), namespace)
    results, exercises = {}, set(solution_cells(nb))
    for i, cell in enumerate(nb.cells):
        grading = cell.metadata.get("nbgrader", {})
        if i in exercises and cell.cell_type == "code":
            with contextlib.suppress(NotImplementedError):   # a stub at the top level of the cell
                exec(compile(cell.source, f"{name} cell {i + 1}", "exec"), namespace)
        elif grading.get("grade") and cell.cell_type == "code":
            printed, raised = io.StringIO(), None
            with contextlib.redirect_stdout(printed):
                try:
                    exec(compile(cell.source, f"{name} cell {i + 1}", "exec"), namespace)
                except Exception as error:  # noqa: BLE001 - the test inspects it
                    raised = error
            results[grading["grade_id"]] = (raised, printed.getvalue())
    return results


def test_real_checks_fail_as_generated_and_pass_with_the_solutions(real):
    for name, (source, student) in real.items():
        failing = run_cells(student, name)
        assert failing or not code_exercises(source), f"{name}: no check cell after its exercises"
        for grade_id, (raised, _) in failing.items():
            assert isinstance(raised, (CheckFailed, NotImplementedError)), (name, grade_id, raised)
            if isinstance(raised, CheckFailed):
                assert re.match(r"check_\w+: not implemented yet", str(raised)), (name, grade_id, str(raised))
        for grade_id, (raised, printed) in run_cells(paste_back(student, source), name).items():
            assert raised is None, (name, grade_id, raised)
            assert "check_" not in student_source(student, grade_id) or ": passed" in printed, (name, grade_id)


# Lines of the notebooks' own (not exercise) cells that compute an exercise's answer: each may
# only come after the check cell of that exercise (docs/grading.md, "Solution leaks").
AFTER_THE_EXERCISE = [
    ("05_losses_nll_vs_reinforce.ipynb", "score.mean(dim=1", "check05-rewards"),
    ("05_losses_nll_vs_reinforce.ipynb", "per_thought = -a * r_plus * log_p_T", "check05-reinforce"),
    ("05_losses_nll_vs_reinforce.ipynb", "policy = per_thought.sum()", "check05-reinforce"),
]


@pytest.mark.parametrize("name, line, grade_id", AFTER_THE_EXERCISE)
def test_no_cell_computes_an_exercise_before_its_check(real, name, line, grade_id):
    source, _ = real[name]
    exercises = set(solution_cells(source))
    check = next(i for i, c in enumerate(source.cells) if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)
    before = [i + 1 for i, c in enumerate(source.cells[:check]) if i not in exercises and line in c.source]
    assert not before, f"{name}, cell {before[0]}: {line!r} shows the answer before {grade_id}"


def student_source(nb, grade_id: str) -> str:
    return next(c.source for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)


def test_the_teaching_guide_lists_every_check_of_the_notebooks(real):
    guide = (REPO_ROOT / "docs" / "teaching.md").read_text()
    listed = set(re.findall(r"^\|.*?`(check_\w+)`", guide, re.M))
    # the checks of qstar_mini.teaching.checks, called as checks.check_...(...) (09 also calls the
    # package's qstar_mini.lm.check_supported, which is no exercise check)
    used = {m for _, student in real.values() for cell in student.cells
            for m in re.findall(r"\bchecks\.(check_\w+)\s*\(", cell.source)}
    assert used <= listed, f"add a row for {sorted(used - listed)} to the exercise table of docs/teaching.md"


# ---- the command line --------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "qstar_mini", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_writes_the_student_set(real, tmp_path):
    result = run_cli("assignments", "--out", str(tmp_path / "release"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "release").iterdir()) == sorted(real)
    assert f"{len(real)} student notebooks" in result.stdout


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    code = cli.main(["assignments", "--out", str(tmp_path / "out"), "--notebooks", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("qstar-mini: error: notebooks folder")
    assert not (tmp_path / "out").exists()


def test_cli_names_the_notebook_and_cell_of_a_broken_marker(sources, tmp_path, capsys):
    write_nb(sources / "12_broken.ipynb", new_notebook(cells=[new_code_cell("### BEGIN SOLUTION\nx = 1", id="a")]))
    assert cli.main(["assignments", "--out", str(tmp_path / "out"), "--notebooks", str(sources)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "12_broken.ipynb, cell 1" in err
    assert cli.main(["assignments"]) == 2
    assert "--out" in capsys.readouterr().err


# ---- a submission, checked before autograde ------------------------------------------------------

from qstar_mini.teaching.assignments import audit_code, check_submission  # noqa: E402


@pytest.fixture
def submission(real, tmp_path):
    """The instructor notebooks 02-05 as one student's submission (solutions in, hidden tests in,
    as nbgrader's autograded copy holds them)."""
    folder = tmp_path / "submitted"
    folder.mkdir()
    for name in real:
        if name[:2] in ("02", "03", "04", "05"):
            (folder / name).write_bytes((NOTEBOOKS_DIR / name).read_bytes())
    return folder


def edit(folder, name, change):
    path = folder / name
    nb = nbformat.read(path, as_version=4)
    change(nb)
    nbformat.write(nb, path)


def graded(nb, grade_id):
    return next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)


NB05 = "05_losses_nll_vs_reinforce.ipynb"


def test_a_complete_submission_and_the_release_have_no_problem(submission, real, tmp_path):
    assert check_submission(submission) == []
    release = tmp_path / "release"
    write_assignments(release)
    assert check_submission(release) == []


def test_a_deleted_check_cell_is_named(submission):
    edit(submission, NB05, lambda nb: nb.cells.remove(graded(nb, "check05-rewards")))
    [problem] = check_submission(submission)
    assert problem.startswith(f"{NB05}: check cell 'check05-rewards' is missing")


def test_removed_metadata_and_a_renamed_grade_id_are_named(submission):
    def change(nb):
        graded(nb, "check05-future-targets").metadata.pop("nbgrader")
        graded(nb, "check05-reinforce").metadata["nbgrader"]["grade_id"] = "mine"
        graded(nb, "answer05-1").metadata["nbgrader"]["points"] = 30
    edit(submission, NB05, change)
    problems = "\n".join(check_submission(submission))
    assert "check cell 'check05-future-targets' lost its nbgrader metadata" in problems
    assert "check cell 'check05-reinforce' was renamed to 'mine'" in problems
    assert "answer cell 'answer05-1' has other nbgrader metadata than the release (points: 30 instead of 3)" in problems


def test_a_duplicated_grade_id_and_an_edited_locked_cell_are_named(submission):
    def change(nb):
        graded(nb, "check05-rewards").source = "print('check_rewards: passed')"
        extra = copy.deepcopy(graded(nb, "answer05-1"))
        extra["id"] = "a-copy"
        nb.cells.append(extra)
    edit(submission, NB05, change)
    problems = "\n".join(check_submission(submission))
    assert "the source of locked check cell 'check05-rewards' was changed" in problems
    assert "grade_id 'answer05-1' is also cell" in problems


def test_code_that_reaches_around_the_checks_is_named_with_its_cell_and_line(submission):
    def change(nb):
        graded(nb, "ex05-rewards").source += ("\nimport torch\ntorch.allclose = lambda *a, **k: True\n"
                                              "checks.check_rewards = print\n")
    edit(submission, NB05, change)
    problems = check_submission(submission)
    assert any(re.search(r"cell \d+, line \d+: sets torch\.allclose", p) for p in problems), problems
    assert any("sets checks.check_rewards" in p for p in problems), problems


AUDITED = [
    ("f = lambda lp, v, _r=rewards: _r(lp, v)\nfrom qstar_mini.losses import rewards", "imports from qstar_mini.losses"),
    ("import types\ng = types.FunctionType(rewards.__code__, {})", "uses rewards.__code__"),
    ("import inspect\nexec(inspect.getsource(rewards))", "calls exec"),
    ("import importlib\nimportlib.reload(qstar_mini.losses)", "calls importlib.reload"),
    ("spec = importlib.util.spec_from_file_location('x', path)", "loads a module from a file"),
    ("import functools\nr = functools.lru_cache(rewards)", "calls functools.lru_cache"),
    ("checks.REFERENCES.clear()", "uses checks.REFERENCES"),
    ("class Always(torch.Tensor):\n    pass", "defines a subclass of torch.Tensor"),
    ("setattr(torch, 'allclose', f)", "calls setattr"),
    ("from qstar_mini.fast.flex_attention import figure3_visible", "imports qstar_mini.fast.flex_attention"),
    ("m = create_mask(figure3_visible(4, 4), 1, None, 4, 8)", "calls create_mask"),
    ("answers = torch.load('answers.pt')", "calls torch.load"),
    ("import sys\nsys.modules['qstar_mini.losses'] = fake", "uses sys.modules"),
    ("checks = Fake()", "rebinds the name checks"),
    ("checks._same = lambda *a, **k: True", "sets checks._same"),
]


@pytest.mark.parametrize("source, finding", AUDITED)
def test_the_audit_names_each_way_around(source, finding):
    assert any(finding in what for _, what in audit_code(source)), audit_code(source)


def test_the_audit_leaves_the_instructor_solutions_alone(real):
    for name, (source, _) in real.items():
        for i in solution_cells(source):
            cell = source.cells[i]
            if cell.cell_type == "code":
                assert audit_code(cell.source) == [], (name, i, audit_code(cell.source))


def test_cli_check_exit_1_with_the_problems_0_without(submission, capsys):
    assert cli.main(["assignments", "--check", str(submission)]) == 0
    assert "every graded cell is in place" in capsys.readouterr().out
    edit(submission, NB05, lambda nb: nb.cells.remove(graded(nb, "check05-rewards")))
    assert cli.main(["assignments", "--check", str(submission / NB05)]) == 1
    out = capsys.readouterr().out
    assert "check cell 'check05-rewards' is missing" in out and "1 problem(s) found" in out
    assert cli.main(["assignments", "--check", str(submission / "nothing.txt")]) == 2
    assert "neither a notebook nor a folder" in capsys.readouterr().err
