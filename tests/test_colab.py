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
              "reward": 0.5} for tok in "123"]
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
    from qstar_mini.models import encode_lines, load_model
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
