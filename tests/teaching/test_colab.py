"""Colab for real (#16): the explorers on ipywidgets 7.7 (Colab's) and 8.x, the one repository
address, and a plain (non-editable) install finding the tiny models and the corpus.

The explorer tests run against whichever ipywidgets is installed; `make colab-check` runs this
file again with Colab's ipywidgets 7.7.1 first on the path (scripts/colab_check.sh).
"""

from __future__ import annotations

import pytest
import torch

ipywidgets = pytest.importorskip("ipywidgets")
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from IPython.utils.capture import capture_output  # noqa: E402

from qstar_mini.teaching import explorers  # noqa: E402
from qstar_mini.teaching.explorers import WIDGET_VIEW  # noqa: E402


def live_widget(model_id: str):
    """The widget a front end would draw for ``model_id`` (ipywidgets 7 and 8 keep the registry
    under different names)."""
    registry = getattr(ipywidgets.widgets.widget, "_instances", None)
    if registry is None:                                   # ipywidgets 7
        registry = ipywidgets.Widget.widgets
    return registry[model_id]


def displayed(fn, *args, **kwargs) -> dict:
    """Run an explorer in an IPython shell; the one output it displays (its mime bundle)."""
    InteractiveShell.instance()
    with capture_output() as cap:
        fn(*args, **kwargs)
    assert len(cap.outputs) == 1, f"{fn.__name__} displayed {len(cap.outputs)} outputs, not one"
    return cap.outputs[0].data


def controls(widget) -> list:
    """Every slider / dropdown inside a box, depth first."""
    found = []
    for child in getattr(widget, "children", ()):
        if isinstance(child, (ipywidgets.IntSlider, ipywidgets.Dropdown)):
            found.append(child)
        found += controls(child)
    return found


def test_widget_bundle_is_what_ipywidgets_itself_displays():
    slider = ipywidgets.IntSlider(3, 0, 5)
    bundle = explorers.widget_bundle(slider, **{"text/plain": "x"})
    assert bundle[WIDGET_VIEW] == {"version_major": 2, "version_minor": 0, "model_id": slider.model_id}
    if hasattr(slider, "_repr_mimebundle_"):               # ipywidgets 8: its own bundle agrees
        assert slider._repr_mimebundle_()[WIDGET_VIEW] == bundle[WIDGET_VIEW]


def test_mask_explorer_one_output_live_widget_and_static_png():
    data = displayed(explorers.mask_explorer, seq_len=5, step=2, position=3)
    assert {WIDGET_VIEW, "image/png", "text/plain"} <= data.keys()
    box = live_widget(data[WIDGET_VIEW]["model_id"])
    s_seq = controls(box)[0]
    out = next(c for row in [box] for c in row.children if isinstance(c, ipywidgets.Output))
    before = out.outputs[0]["data"]["image/png"]
    s_seq.value = 7                                        # move one control: the picture changes
    assert out.outputs[0]["data"]["image/png"] != before


def test_generation_explorer_slider_redraws_the_view():
    steps = [{"token": tok, "thought": "a" + tok, "w": 0.5, "logp_init": -1.0, "logp_talk": -0.5,
              "gain": 0.5} for tok in "123"]
    data = displayed(explorers.generation_explorer, {"1+2=": steps, "3+4=": steps[:2]})
    assert {WIDGET_VIEW, "text/html", "text/plain"} <= data.keys()
    assert "<table" in data["text/html"]                   # the static view lists every prompt
    box = live_widget(data[WIDGET_VIEW]["model_id"])
    view = box.children[-1]
    s_token = next(c for c in controls(box) if c.description == "generated token")
    before = view.value
    s_token.value = 2
    assert view.value != before and "token #2" in view.value


def test_thought_explorer_on_a_real_step(tmp_path):
    from qstar_mini.config import tiny
    from qstar_mini.models.tiny import encode_lines, load_model
    from qstar_mini.paths import TINY_BASE
    from qstar_mini.step import prepare_model, quiet_star_step

    torch.manual_seed(0)
    cfg = tiny()
    model, tokenizer = load_model(TINY_BASE)
    meta, head = prepare_model(model, tokenizer, cfg)
    input_ids, attention_mask = encode_lines(tokenizer, ["12+34=46", "5+6=11"])
    with torch.no_grad():
        out = quiet_star_step(model, meta, head, input_ids, attention_mask, cfg)
    data = displayed(explorers.thought_explorer, out, tokenizer, input_ids, attention_mask, row=0, position=2)
    assert {WIDGET_VIEW, "text/html", "text/plain"} <= data.keys()
    box = live_widget(data[WIDGET_VIEW]["model_id"])
    view = box.children[-1]
    assert view.value == data["text/html"]                 # the static view is the widget's first view
    s_pos = next(c for c in controls(box) if c.description == "position j")
    s_pos.value = 4
    assert view.value != data["text/html"] and "after position 4" in view.value


# ---- one address ---------------------------------------------------------------------------------

import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from qstar_mini.paths import REPO_ROOT, REPO_URL  # noqa: E402

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
GITHUB = re.compile(r"https://(?:github\.com|colab\.research\.google\.com/github)/[\w.-]+/[\w.-]+")


def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def colab_address(url: str) -> str:
    """https://colab.research.google.com/github/OWNER/NAME -> https://github.com/OWNER/NAME"""
    return url.replace("colab.research.google.com/github", "github.com")


def setup_cell(path: Path) -> str:
    return next("".join(c["source"]) for c in json.loads(path.read_text())["cells"]
                if c["cell_type"] == "code" and "google.colab" in "".join(c["source"]))


def test_repo_url_is_pyprojects():
    assert pyproject()["project"]["urls"]["Repository"] == REPO_URL


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_uses_the_one_address_and_opens_itself_on_colab(path):
    text = path.read_text()
    addresses = {colab_address(m) for m in GITHUB.findall(text)}
    assert addresses == {REPO_URL}, f"{path.name}: {addresses} (pyproject.toml says {REPO_URL})"
    badge = f"https://colab.research.google.com/github/{REPO_URL.split('github.com/')[1]}/blob/main/notebooks/{path.name}"
    assert badge in json.loads(text)["cells"][0]["source"][2], f"{path.name}: no Open-in-Colab badge to itself"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_setup_cell_clones_the_address_keeps_torch_and_installs_the_notebooks_extra(path):
    cell = setup_cell(path)
    assert f'"{REPO_URL}", REPO]' in cell
    pip = next(line for line in cell.splitlines() if '"pip", "install"' in line)
    assert "torch" not in pip and "ipywidgets" not in pip and "--upgrade" not in pip and "-U" not in pip
    assert re.search(r'REPO \+ "\[notebooks(,real)?\]"', pip), pip


def test_readme_and_docs_use_the_one_address():
    """README (its badge) and every docs page name the project's repository by the one address."""
    official = {"https://github.com/ezelikman/quiet-star"}               # the official code
    readme = (REPO_ROOT / "README.md").read_text()
    assert {colab_address(m) for m in GITHUB.findall(readme)} - official == {REPO_URL}
    for page in sorted((REPO_ROOT / "docs").rglob("*.md")):
        addresses = {colab_address(m) for m in GITHUB.findall(page.read_text())} - official
        assert addresses <= {REPO_URL}, f"{page.relative_to(REPO_ROOT)}: {addresses}"


def test_notebooks_extra_admits_colabs_ipywidgets():
    from packaging.requirements import Requirement

    extras = pyproject()["project"]["optional-dependencies"]
    ipyw = next(Requirement(r) for r in extras["notebooks"] if r.startswith("ipywidgets"))
    assert ipyw.specifier.contains("7.7.1") and ipyw.specifier.contains("8.1.5"), ipyw
    assert not any(r.startswith(("jupyterlab", "torch")) for r in extras["notebooks"]), \
        "Colab's setup cell installs the notebooks extra: no JupyterLab, no torch in it"


# ---- a plain (non-editable) install finds the data -------------------------------------------------

def test_wheel_lists_every_package():
    found = {".".join(p.relative_to(REPO_ROOT).parent.parts)
             for p in (REPO_ROOT / "qstar_mini").rglob("__init__.py")}
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    assert found | {"qstar_mini._data"} == listed, found ^ listed


def test_plain_install_finds_the_tiny_models_and_the_corpus(tmp_path):
    """Build the wheel (from a copy of the sources, so the checkout is left alone), install it
    into a folder of its own with --no-deps, and from a directory outside the repository load the
    tiny base and the corpus through qstar_mini.paths: the wheel's copy, not the checkout's."""
    import shutil

    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO_ROOT / "qstar_mini", src / "qstar_mini", ignore=ignore)
    shutil.copytree(REPO_ROOT / "data", src / "data", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "whl"), str(src)],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "whl").glob("qstar_mini-*.whl"))
    assert wheel.stat().st_size < 10_000_000, f"the wheel is {wheel.stat().st_size:,} bytes"
    target = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import qstar_mini.paths as p\n"
             "from qstar_mini.models.tiny import load_model\n"
             "from qstar_mini.data import read_jsonl, split_path\n"
             "model, tok = load_model(p.TINY_BASE)\n"
             "load_model(p.TINY_BASE_NOISY)\n"
             "import qstar_mini.evaluation.lm_eval_tasks as t, pathlib\n"
             "assert (pathlib.Path(t.__file__).parent / 'qstar_gsm8k_format.yaml').is_file()  # the offline task\n"
             "print(p.__file__, p.DATA_DIR, p.RUNS_DIR, len(read_jsonl(split_path('test'))), len(tok), sep='\\n')\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, capture_output=True, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(target)})
    assert result.returncode == 0, result.stderr[-2000:]
    module, data_dir, runs_dir, n_test, vocab = result.stdout.split("\n")[:5]
    assert Path(module).is_relative_to(target) and Path(data_dir) == target / "qstar_mini" / "_data"
    assert Path(runs_dir) == elsewhere / "runs"
    assert int(n_test) > 0 and int(vocab) > 0
