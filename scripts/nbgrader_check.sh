#!/usr/bin/env bash
# A real nbgrader run of the graded notebooks, as a student, a careless student and a cheater would
# submit them (opt-in: minutes of CPU; not part of `make test`).
#
#   bash scripts/nbgrader_check.sh [PYTHON]     (PYTHON: the project's environment, default .venv/bin/python;
#                                               NBGRADER_VENV: where nbgrader 0.9.6 is installed, default
#                                               $TMPDIR/qstar-nbgrader-venv; NBGRADER_CHECK_DIR: the course folder;
#                                               NOTEBOOKS: which instructor notebooks, default 02 03 04 05)
#
# nbgrader gets its own virtual environment that reads the project's packages (torch, qstar_mini)
# through a .pth file, as docs/grading.md describes. The course holds one assignment, ps1, made
# from the chosen notebooks; `nbgrader generate_assignment` writes the release, then four students
# submit:
#   instructor  the instructor notebooks (every solution): full points;
#   warns       the release with the solutions pasted back, but notebook 03's meta-token init written
#               `torch.tensor(table[ids].mean(0))` (correct; torch warns): full points too;
#   cheater     the solutions, but 05's rewards through a default argument holding the package's
#               `rewards`, 02's mask through the FlexAttention predicate, 04 replacing torch.allclose:
#               those check cells 0;
#   careless    the solutions with 05's rewards check cell deleted: `qstar-mini assignments --check`
#               names it before autograde.
# Each submission is checked with `qstar-mini assignments --check`, then `nbgrader autograde ps1`;
# the script compares every check cell's score with what it expects and exits 1 on any difference.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${1:-$REPO_ROOT/.venv/bin/python}
VENV=${NBGRADER_VENV:-${TMPDIR:-/tmp}/qstar-nbgrader-venv}
COURSE=${NBGRADER_CHECK_DIR:-${TMPDIR:-/tmp}/qstar-nbgrader-course}
NUMBERS=${NOTEBOOKS:-02 03 04 05}

[ -x "$PY" ] || { echo "nbgrader-check: $PY not found; run \`make setup-dev\` first" >&2; exit 1; }
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
BASE=$("$PY" -c 'import sys; print(sys.base_prefix)')/bin/python3

if [ ! -x "$VENV/bin/nbgrader" ]; then
    "$BASE" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet "nbgrader==0.9.6"
fi
VSITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import site; site.addsitedir('$SITE')" > "$VSITE/zz_qstar_project.pth"
export PATH=$VENV/bin:$PATH                       # nbgrader runs `alembic` by name
export JUPYTER_PATH=$(dirname "$(dirname "$(dirname "$SITE")")")/share/jupyter

rm -rf "$COURSE"
mkdir -p "$COURSE/source/ps1"
for n in $NUMBERS; do cp "$REPO_ROOT"/notebooks/${n}_*.ipynb "$COURSE/source/ps1/"; done
cat > "$COURSE/nbgrader_config.py" <<CONFIG
c = get_config()
c.CourseDirectory.course_id = "qstar-mini"
c.CourseDirectory.root = "$COURSE"
c.ExecutePreprocessor.timeout = 600
CONFIG
cd "$COURSE"
nbgrader generate_assignment ps1 --force >generate.log 2>&1 || { cat generate.log; exit 1; }

"$VENV/bin/python" - "$COURSE" <<'PYTHON'
import shutil, sys
from pathlib import Path
import nbformat

course = Path(sys.argv[1])
source, release = course / "source" / "ps1", course / "release" / "ps1"


def graded(nb, grade_id):
    return next((c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id), None)


def submit(student, change):
    out = course / "submitted" / student / "ps1"
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(release.glob("*.ipynb")):
        nb, solved = nbformat.read(path, as_version=4), nbformat.read(source / path.name, as_version=4)
        for cell in nb.cells:                                  # the solutions pasted back
            meta = cell.metadata.get("nbgrader", {})
            if meta.get("solution") and cell.cell_type == "code":
                cell.source = graded(solved, meta["grade_id"]).source
        change(path.name, nb)
        nbformat.write(nb, out / path.name)
    (out / "timestamp.txt").write_text("2026-12-07 12:00:00.000000 UTC")


def warns(name, nb):
    cell = graded(nb, "ex03-meta-init")
    if cell is not None:
        cell.source = ('def my_init_embedding(model, tokenizer, text):\n'
                       '    ids = tokenizer(text, add_special_tokens=False)["input_ids"]\n'
                       '    table = model.get_input_embeddings().weight\n'
                       '    return torch.tensor(table[ids].mean(0))\n')


def cheats(name, nb):
    cell = graded(nb, "ex05-rewards")
    if cell is not None:
        cell.source = ('from qstar_mini.losses import rewards\n'
                       'def my_rewards(log_p_talk, valid, _r=rewards):\n'
                       '    return _r(log_p_talk, valid)\n')
    cell = graded(nb, "ex02-thought-mask")
    if cell is not None:
        cell.source = ('from torch.nn.attention.flex_attention import create_mask\n'
                       'from qstar_mini import flex_attention\n'
                       'def my_thought_visibility(attention_mask, step):\n'
                       '    batch, seq = attention_mask.shape\n'
                       '    visible = flex_attention.figure3_visible(seq, seq, attention_mask)\n'
                       '    return create_mask(visible, batch, None, seq, seq * (1 + step), device="cpu")\n')
    cell = graded(nb, "ex04-mix-hidden")
    if cell is not None:
        cell.source += "\ntorch.allclose = lambda *args, **kwargs: True\n"


def careless(name, nb):
    cell = graded(nb, "check05-rewards")
    if cell is not None:
        nb.cells.remove(cell)


shutil.rmtree(course / "submitted", ignore_errors=True)
out = course / "submitted" / "instructor" / "ps1"
out.mkdir(parents=True)
for path in source.glob("*.ipynb"):
    shutil.copy(path, out / path.name)
(out / "timestamp.txt").write_text("2026-12-07 12:00:00.000000 UTC")
submit("warns", warns)
submit("cheater", cheats)
submit("careless", careless)
PYTHON

for student in instructor warns cheater careless; do
    echo "== qstar-mini assignments --check submitted/$student/ps1"
    "$PY" -m qstar_mini assignments --check "submitted/$student/ps1" --notebooks "$REPO_ROOT/notebooks" || true
done

echo "== nbgrader autograde ps1"
start=$(date +%s)
nbgrader autograde ps1 --force >autograde.log 2>&1 || { tail -40 autograde.log; exit 1; }
echo "autograde took $(( $(date +%s) - start )) s"

"$VENV/bin/python" - "$COURSE" "$NUMBERS" <<'PYTHON'
import sys
from nbgrader.api import Gradebook, MissingEntry

course, numbers = sys.argv[1], sys.argv[2].split()
# full points everywhere, except what each student broke
ZERO = {"cheater": {"check05-rewards", "check02-thought-mask", "check02-end-to-end", "check04-mix-hidden"},
        "careless": {"check05-rewards"}}
wrong = 0
with Gradebook(f"sqlite:///{course}/gradebook.db") as gb:
    assignment = gb.find_assignment("ps1")
    for student in ("instructor", "warns", "cheater", "careless"):
        total = possible = 0
        for notebook in assignment.notebooks:
            for cell in notebook.grade_cells:
                if cell.cell_type != "code":
                    continue
                try:
                    score = gb.find_grade(cell.name, notebook.name, "ps1", student).score
                except MissingEntry:
                    score = 0.0
                want = 0.0 if cell.name in ZERO.get(student, ()) else cell.max_score
                total, possible = total + score, possible + cell.max_score
                flag = "" if score == want else f"   <-- expected {want:g}"
                wrong += bool(flag)
                print(f"{student:10s} {notebook.name:34s} {cell.name:24s} {score:g}/{cell.max_score:g}{flag}")
        print(f"{student:10s} autograded total {total:g}/{possible:g}")
sys.exit(1 if wrong else 0)
PYTHON
