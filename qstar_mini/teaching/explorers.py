"""ipywidgets explorers for the notebooks, each with a static view for where widgets cannot run.

An explorer is displayed as ONE output that carries three representations:

* the live widget (``application/vnd.jupyter.widget-view+json``): JupyterLab 4, Notebook 7,
  VS Code and Colab draw sliders and redraw the picture as they move;
* the initial view as a static picture (``image/png`` for :func:`mask_explorer`, ``text/html``
  for :func:`thought_explorer`): what GitHub, nbviewer without a kernel, or any viewer without
  ipywidgets shows instead;
* one line of plain text.

If ipywidgets is not installed at all, only the static view is shown. Widgets need
``ipywidgets>=8`` (the ``notebooks`` extra); Colab ships with it. The widgets change their own
state when a slider moves (no ``with output:`` capture), so they behave the same in JupyterLab,
Colab, VS Code and headless runners (nbclient, nbval).

Explorers:

* :func:`mask_explorer` (notebook 02): the Figure 3 mask of one thought step, for any sequence
  length, step, query position and padding;
* :func:`thought_explorer` (notebook 01): the thoughts sampled after any position of a batch,
  with their mixed log-probs, rewards and REINFORCE loss.
"""

from __future__ import annotations

import base64
import io

import torch

from .masks import step_position_ids, thought_visibility
from .nbplots import plot_mask


def mask_view(seq_len: int = 6, step: int = 2, position: int = 3, n_pad: int = 0):
    """The figure the mask explorer shows: the mask of thought step ``step`` for one sequence of
    ``seq_len`` tokens (the last ``n_pad`` of them padding), the row of query ``position``
    outlined, and below it the same row written out as the text the naive loop would feed.

    returns: a matplotlib Figure (close it when done).
    """
    import matplotlib.pyplot as plt

    seq_len, step = max(1, int(seq_len)), max(1, int(step))
    position = min(max(0, int(position)), seq_len - 1)
    n_pad = min(max(0, int(n_pad)), seq_len - 1)
    am = (torch.arange(seq_len) < seq_len - n_pad).long()[None]              # (1, seq)
    visible = thought_visibility(am, step)[0, 0]                                # (seq, seq * (1 + step))
    pos_ids = step_position_ids(am, step)[0]
    width = min(14.0, 2.0 + 0.32 * visible.shape[1])
    fig, (ax, ax_text) = plt.subplots(2, 1, figsize=(width, 0.9 + 0.34 * seq_len + 1.1),
                                      gridspec_kw={"height_ratios": [seq_len, 2.2]})
    text = [f"x{i}" if i < seq_len - n_pad else "pad" for i in range(seq_len)]
    plot_mask(ax, visible, seq_len, query=position, text=text,
              title=f"thought step {step}: what thought token {step} of each position attends to "
                    f"(position {position} outlined)")
    row = visible[position]
    seen_text = [text[i] for i in range(seq_len) if row[i]]
    seen_thought = [f"T{position},{k}" for k in range(1, step + 1) if row[seq_len * k + position]]
    ax_text.axis("off")
    ax_text.text(0, 0.75, "position " + str(position) + " sees:  " + " ".join(seen_text) + "  |  "
                 + " ".join(seen_thought), family="monospace", fontsize=9, transform=ax_text.transAxes)
    ax_text.text(0, 0.35, f"= the naive sequence [x0 .. x{position}, <|startofthought|>, s1, ...] up to "
                 f"thought token {step} (T{position},1 = <|startofthought|>); position id of T{position},{step}: "
                 f"{int(pos_ids[position])} = {position} + {step}", fontsize=9, transform=ax_text.transAxes)
    fig.tight_layout()
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return buf.getvalue()


def _show(widget, fig, text: str) -> None:
    """Display ``widget`` with ``fig`` as its static fallback picture, in one output."""
    import matplotlib.pyplot as plt
    from IPython.display import display

    png = base64.b64encode(_png(fig)).decode("ascii")
    plt.close(fig)
    if widget is None:
        display({"image/png": png, "text/plain": text}, raw=True)
        return
    bundle = widget._repr_mimebundle_()
    bundle["image/png"] = png
    bundle["text/plain"] = text
    display(bundle, raw=True)


def mask_explorer(seq_len: int = 6, step: int = 2, position: int = 3, n_pad: int = 0,
                  max_seq: int = 12, max_step: int = 8) -> None:
    """Sliders for sequence length, thought step, query position and padding over
    :func:`mask_view`. Displays itself (returns nothing), with the initial view as a static
    picture for viewers without widgets."""
    import matplotlib.pyplot as plt

    fig = mask_view(seq_len, step, position, n_pad)
    text = (f"mask explorer (seq_len={seq_len}, step={step}, position={position}, padding={n_pad}); "
            f"run the notebook with ipywidgets for the sliders")
    try:
        import ipywidgets as W
    except ImportError:
        _show(None, fig, text + " (pip install ipywidgets)")
        return

    style = {"description_width": "initial"}
    s_seq = W.IntSlider(seq_len, 2, max_seq, description="sequence length", style=style)
    s_step = W.IntSlider(step, 1, max_step, description="thought step", style=style)
    s_pos = W.IntSlider(position, 0, seq_len - 1, description="position j", style=style)
    s_pad = W.IntSlider(n_pad, 0, seq_len - 1, description="padding", style=style)
    out = W.Output()

    def picture(f) -> dict:
        data = {"image/png": base64.b64encode(_png(f)).decode("ascii"), "text/plain": "mask view"}
        plt.close(f)
        return {"output_type": "display_data", "data": data, "metadata": {}}

    def redraw(_=None):
        s_pos.max = s_seq.value - 1
        s_pad.max = s_seq.value - 1
        # set the Output widget's state directly (not `with out:`), so that every frontend and every
        # headless runner (nbclient, nbval) sees the same thing
        out.outputs = (picture(mask_view(s_seq.value, s_step.value, s_pos.value, s_pad.value)),)

    for s in (s_seq, s_step, s_pos, s_pad):
        s.observe(redraw, names="value")
    out.outputs = (picture(mask_view(seq_len, step, position, n_pad)),)
    _show(W.VBox([W.HBox([s_seq, s_step]), W.HBox([s_pos, s_pad]), out]), fig, text)


def thought_view_html(out, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      row: int = 0, position: int = 0) -> str:
    """HTML: sequence ``row`` with position ``position`` marked, and a table of the thoughts
    sampled after it, with their mixed log-probs of the true tokens, rewards and REINFORCE loss.

    out: a :class:`qstar_mini.step.StepOutput` (``think=True``) of ``input_ids`` (b, l).
    """
    import html

    n_real = int(attention_mask[row].sum())
    position = min(max(0, int(position)), n_real - 1)
    tokens = tokenizer.convert_ids_to_tokens(input_ids[row, :n_real].tolist())
    spans = []
    for j, tok in enumerate(tokens):
        style = ("background:#dd6b20;color:white" if j == position else
                 "background:#bee3f8" if position < j <= position + out.valid.shape[-1] else "")
        spans.append(f'<span style="{style};padding:1px 2px;font-family:monospace">{html.escape(tok)}</span>')
    n_true = out.valid.shape[-1]
    targets = [html.escape(t) for t in tokens[position + 1: position + 1 + n_true]]
    head = "".join(f"<th>log p^talk({t})</th>" for t in targets)
    rows = []
    for n in range(out.thoughts.shape[1]):
        text = tokenizer.decode(out.thoughts[row, n, position, 1:-1].tolist())
        lps = "".join(f"<td>{out.log_p_talk[row, n, position, i].item():.3f}</td>" for i in range(len(targets)))
        r = out.rewards[row, n, position].item()
        colour = "#c6f6d5" if r > 0 else "#fed7d7" if r < 0 else "#edf2f7"
        rows.append(f"<tr><td>{n}</td><td style='font-family:monospace'>{html.escape(text)}</td>{lps}"
                    f"<td style='background:{colour}'>{r:+.3f}</td>"
                    f"<td>{out.reinforce[row, n, position].item():.3f}</td></tr>")
    base = "".join(f"<td>{out.log_p_init[row, position, i].item():.3f}</td>" for i in range(len(targets)))
    return (f"<div>{''.join(spans)}</div>"
            f"<div style='font-size:85%;margin:4px 0'>thoughts after position {position} "
            f"(x_j = {html.escape(tokens[position])!r}); highlighted in blue: the true tokens that judge them</div>"
            f"<table><tr><th>thought</th><th>text</th>{head}<th>reward r</th><th>REINFORCE</th></tr>"
            f"{''.join(rows)}<tr><td></td><td><i>no thought</i></td>{base}<td></td><td></td></tr></table>")


def thought_explorer(out, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     row: int = 0, position: int = 0) -> None:
    """Sliders for the sequence and the position over :func:`thought_view_html`; shows the
    initial view as HTML where widgets cannot run."""
    from IPython.display import display

    first = thought_view_html(out, tokenizer, input_ids, attention_mask, row, position)
    text = (f"thought explorer (row={row}, position={position}); run the notebook with ipywidgets "
            f"to choose the line and the position")
    try:
        import ipywidgets as W
    except ImportError:
        display({"text/html": first, "text/plain": text}, raw=True)
        return

    style = {"description_width": "initial"}
    s_row = W.IntSlider(row, 0, input_ids.shape[0] - 1, description="line", style=style)
    s_pos = W.IntSlider(position, 0, int(attention_mask[row].sum()) - 1, description="position j", style=style)
    view = W.HTML(first)

    def redraw(_=None):
        s_pos.max = int(attention_mask[s_row.value].sum()) - 1
        view.value = thought_view_html(out, tokenizer, input_ids, attention_mask, s_row.value, s_pos.value)

    s_row.observe(redraw, names="value")
    s_pos.observe(redraw, names="value")
    bundle = W.VBox([W.HBox([s_row, s_pos]), view])._repr_mimebundle_()
    bundle["text/html"] = first
    bundle["text/plain"] = text
    display(bundle, raw=True)
