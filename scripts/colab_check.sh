#!/usr/bin/env bash
# make colab-check: every notebook, setup cell included, in an environment like Colab's, twice.
#
#   bash scripts/colab_check.sh [PYTHON]      (PYTHON: an environment with this project's dev extra;
#                                              default .venv/bin/python; COLAB_CHECK_DIR: where)
#
# What is like Colab:
#   - a fresh environment whose own site-packages hold Colab's ipywidgets 7.7.1; everything else
#     Colab preinstalls (torch, transformers, ipykernel, ...) comes from PYTHON's environment, read
#     through a .pth file, so pip sees it installed and keeps it (the setup cell must never
#     reinstall torch, nor upgrade ipywidgets: both are checked after the runs);
#   - a `google.colab` module imported when the kernel starts (an IPython startup file), so the
#     notebooks' setup cells take their Colab branch: clone, `pip install -e REPO[notebooks]`;
#   - the notebooks are opened from outside any checkout (COLAB_CHECK_DIR/content, like /content).
# What is not: the setup cell's two literals are replaced in the copies, /content/qstar-mini by
# COLAB_CHECK_DIR/content/qstar-mini and the repository address (pyproject.toml) by a file:// URL
# of this checkout, so the clone is of this checkout's HEAD (commit first) and needs no GitHub.
# Then tests/teaching/test_colab.py's explorer tests run again in that environment, on ipywidgets 7.7.1.
#
# nbval runs with --nbval-lax: every cell must run without error, outputs are not compared
# (the setup cell prints git's and pip's messages; the default `make test` compares outputs).
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${1:-$REPO_ROOT/.venv/bin/python}
WORK=${COLAB_CHECK_DIR:-${TMPDIR:-/tmp}/qstar-mini-colab-check}
ENV=$WORK/env
CONTENT=$WORK/content

[ -x "$PY" ] || { echo "colab-check: $PY not found; run \`make setup-dev\` first" >&2; exit 1; }
"$PY" -c "import nbval, torch" 2>/dev/null \
    || { echo "colab-check: $PY lacks nbval or torch; run \`make setup-dev\` first" >&2; exit 1; }
URL=$("$PY" -c "import tomllib, sys; print(tomllib.load(open(sys.argv[1], 'rb'))['project']['urls']['Repository'])" \
      "$REPO_ROOT/pyproject.toml")

start=$(date +%s)
rm -rf "$WORK"
mkdir -p "$CONTENT" "$WORK/ipython/profile_default/startup"

# 1. the environment: Colab's ipywidgets in its own site-packages, the rest from $PY's environment
"$PY" -m venv --without-pip "$ENV"
SITE=$("$ENV/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
"$PY" -c "import sysconfig; print(sysconfig.get_path('purelib'))" > "$SITE/zz-colab-check-base.pth"
"$ENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
    "ipywidgets==7.7.1" "widgetsnbextension<4" "jupyterlab_widgets<2" ipython_genutils 2>&1 \
    | grep -v "Not uninstalling\|outside environment\|Can't uninstall" || true
mkdir -p "$SITE/google/colab"
echo '"""Stand-in for Colab'"'"'s google.colab (scripts/colab_check.sh): only its presence matters."""' \
    > "$SITE/google/colab/__init__.py"
echo "import google.colab  # Colab's kernel imports it at start" \
    > "$WORK/ipython/profile_default/startup/00-google-colab.py"
TORCH=$("$ENV/bin/python" -c "import torch; print(torch.__version__, torch.__file__)")

# 2. the notebooks, as Colab opens them from GitHub (HEAD), the two literals replaced
git -C "$REPO_ROOT" archive HEAD notebooks | tar -x -C "$WORK"
"$PY" - "$WORK/notebooks" "$CONTENT" "$URL" "file://$REPO_ROOT" <<'EOF'
import json, pathlib, sys
src, dst, url, local = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4]
for path in sorted(src.glob("*.ipynb")):
    nb = json.loads(path.read_text())
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code" and "google.colab" in "".join(c["source"]))
    text = "".join(cell["source"])
    for old, new in (('"/content/qstar-mini"', repr(str(dst / "qstar-mini"))), (f'"{url}"', repr(local))):
        if text.count(old) != 1:
            sys.exit(f"colab-check: {path.name}'s setup cell has {text.count(old)} x {old}, not 1")
        text = text.replace(old, new)
    cell["source"] = text
    (dst / path.name).write_text(json.dumps(nb, indent=1))
EOF
rm -rf "$WORK/notebooks"
echo "colab-check: environment ready in $(( $(date +%s) - start )) s (torch $TORCH; ipywidgets 7.7.1)"

# 3. every notebook, twice in the same folder (the second run finds the clone and the runs there)
for pass in 1 2; do
    t0=$(date +%s)
    (cd "$CONTENT" && IPYTHONDIR="$WORK/ipython" "$ENV/bin/python" -m pytest -p no:cacheprovider -q \
        --nbval-lax --nbval-current-env --nbval-cell-timeout=600 ./*.ipynb)
    echo "colab-check: pass $pass: all notebooks ran in $(( $(date +%s) - t0 )) s"
done

# 4. what the setup cells must not have changed, and the explorers on ipywidgets 7.7.1 (Python
#    started in CONTENT, like Colab's /content: not in this checkout, whose package would win)
cd "$CONTENT"
"$ENV/bin/python" - "$TORCH" "$CONTENT/qstar-mini" <<'EOF'
import sys, torch, ipywidgets, qstar_mini
torch_before, clone = sys.argv[1], sys.argv[2]
assert f"{torch.__version__} {torch.__file__}" == torch_before, f"torch changed: {torch_before} -> {torch.__file__}"
assert ipywidgets.__version__ == "7.7.1", f"ipywidgets became {ipywidgets.__version__}"
assert qstar_mini.__file__.startswith(clone), f"qstar_mini imported from {qstar_mini.__file__}, not the clone"
print(f"colab-check: torch {torch.__version__} kept, ipywidgets {ipywidgets.__version__} kept, "
      f"qstar_mini from the clone")
EOF
(cd "$CONTENT/qstar-mini" && "$ENV/bin/python" -m pytest -p no:cacheprovider -q tests/teaching/test_colab.py \
    -k "explorer or widget")
echo "colab-check: passed in $(( $(date +%s) - start )) s ($WORK)"
