"""The ipywidgets explorers of the notebooks, each with a static view for where widgets cannot run.

An explorer is displayed as ONE output that carries three representations:

* the live widget (``application/vnd.jupyter.widget-view+json``): JupyterLab 4, Notebook 7,
  VS Code and Colab draw sliders and redraw the picture as they move;
* the initial view as a static picture (``image/png`` for :func:`mask_explorer`, ``text/html``
  for :func:`thought_explorer` and :func:`generation_explorer`): what GitHub, nbviewer without a
  kernel, or any viewer without ipywidgets shows instead;
* one line of plain text.

If ipywidgets is not installed at all, only the static view is shown. Widgets work with
ipywidgets 7.7 (what Colab ships) and 8.x (the ``notebooks`` extra admits both): the output is
built from the widget's public ``model_id``, the same bundle both majors display. The widgets change their own
state when a slider moves (no ``with output:`` capture), so they behave the same in JupyterLab,
Colab, VS Code and headless runners (nbclient, nbval).

Explorers:

* :func:`mask_explorer` (notebook 02): the Figure 3 mask of one thought step, for any sequence
  length, step, query position and padding (:func:`mask_view` draws it);
* :func:`thought_explorer` (notebook 01): the thoughts sampled after any position of a batch,
  with their mixed log-probs, rewards and REINFORCE loss (:func:`thought_view_html`);
* :func:`generation_explorer` (notebook 08): generation with hidden thoughts, token by token: the
  text so far, the thought written before the token (revealed step by step, with a play button)
  and how the mix changed the token's probability (:func:`generation_view_html`); its static
  view adds every prompt in one table (:func:`generations_table_html`).

Everything here only *draws* what the package already computed (a
:class:`~qstar_mini.step.StepOutput`, the dicts of
:func:`~qstar_mini.inference.generate_with_thoughts`): no model is run. Numbers are formatted at
fixed precision, so the HTML is the same wherever the values agree to it.
"""

from __future__ import annotations

import base64
import html
import io
import math

import torch

from qstar_mini.inference import visible_text
from qstar_mini.masks import step_position_ids, thought_visibility
from qstar_mini.meta_tokens import END_THOUGHT, START_THOUGHT
from qstar_mini.teaching.plots import plot_mask


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
    cell = 0.3                                                                  # inches per mask cell
    width = min(14.0, max(4.0, 1.2 + cell * visible.shape[1]))
    # the figure is as tall as the mask needs (no slack for the equal-aspect axes to leave empty)
    fig, ax = plt.subplots(figsize=(width, 1.0 + (width - 1.2) / visible.shape[1] * seq_len))
    text = [f"x{i}" if i < seq_len - n_pad else "pad" for i in range(seq_len)]
    plot_mask(ax, visible, seq_len, query=position, text=text,
              title=f"thought step {step}: what thought token {step} of each position attends to "
                    f"(position {position} outlined)")
    row = visible[position]
    seen_text = [text[i] for i in range(seq_len) if row[i]]
    seen_thought = [f"T{position},{k}" for k in range(1, step + 1) if row[seq_len * k + position]]
    lines = [("position " + str(position) + " sees:  " + " ".join(seen_text) + "  |  " + " ".join(seen_thought),
              "monospace"),
             (f"= the naive sequence [x0 .. x{position}, <|startofthought|>, s1, ...] up to thought token {step} "
              f"(T{position},1 = <|startofthought|>)", None),
             (f"position id of T{position},{step}: {int(pos_ids[position])} = {position} + {step}", None)]
    for i, (line, family) in enumerate(lines):    # left-aligned with the mask, just under its x label
        ax.annotate(line, xy=(0, 0), xycoords=("axes fraction", ax.xaxis.label), xytext=(0, -10 - 14 * i),
                    textcoords="offset points", va="top", fontsize=9, family=family)
    return fig     # saved with bbox_inches="tight" (see _png): no layout pass, no empty margins


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


# The mimetype and version a Jupyter front end draws a widget view from: what ipywidgets 7's
# ``_ipython_display_`` and ipywidgets 8's ``_repr_mimebundle_`` both put in their output.
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def widget_bundle(widget, **static) -> dict:
    """The display bundle of ``widget`` (a live view of it) plus ``static`` representations
    (``{"text/html": ...}``, ...) for viewers without widgets: one output, ipywidgets 7 or 8."""
    return {WIDGET_VIEW: {"version_major": 2, "version_minor": 0, "model_id": widget.model_id}, **static}


def _show(widget, fig, text: str) -> None:
    """Display ``widget`` with ``fig`` as its static fallback picture, in one output."""
    import matplotlib.pyplot as plt
    from IPython.display import display

    png = base64.b64encode(_png(fig)).decode("ascii")
    plt.close(fig)
    if widget is None:
        display({"image/png": png, "text/plain": text}, raw=True)
        return
    display(widget_bundle(widget, **{"image/png": png, "text/plain": text}), raw=True)


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
    box = W.VBox([W.HBox([s_row, s_pos]), view])
    display(widget_bundle(box, **{"text/html": first, "text/plain": text}), raw=True)


# ---- generation with hidden thoughts (notebook 08) ---------------------------------------------
# :func:`qstar_mini.inference.generate_with_thoughts` returns one dict per generated token: the
# token, the thought written just before it (``<|startofthought|> s_1 .. s_{t-2} <|endofthought|>``),
# the mixing weight ``w`` and the log-probabilities of the token with and without the thought.
# The reader of the *text* never sees the thoughts; the functions below show them.

TEXT_BG, THOUGHT_BG, META_BG, NOW_BG = "#bee3f8", "#feebc8", "#e9d8fd", "#dd6b20"


def _chip(text: str, background: str, colour: str = "black", title: str = "", faded: bool = False) -> str:
    opacity = "opacity:0.3;" if faded else ""
    tip = f' title="{html.escape(title, quote=True)}"' if title else ""
    return (f'<span{tip} style="background:{background};color:{colour};{opacity}font-family:monospace;'
            f'padding:1px 4px;margin:1px;border-radius:3px;display:inline-block">{visible_text(text)}</span>')


def thought_tokens(step: dict, tokenizer=None) -> list[str]:
    """The sampled tokens of a step's thought, as text, one entry per token (meta-tokens excluded).

    With a tokenizer and the step's ``thought_ids``, each id is decoded on its own (right for any
    tokenizer); without, the thought text is split into characters (right for the char tokenizer).
    """
    ids = step.get("thought_ids")
    if tokenizer is not None and ids:
        return [tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids[1:-1]]
    return list(step.get("thought", ""))


def _prob(logp: float | None) -> str:
    return "-" if logp is None or not math.isfinite(logp) else f"{math.exp(logp):.3f}"


def generation_view_html(steps: list[dict], prompt: str = "", index: int = 0, thought_step: int | None = None,
                         tokenizer=None) -> str:
    """HTML of generated token ``index`` of one generation and the hidden thought before it.

    steps:        from :func:`qstar_mini.inference.generate_with_thoughts` (or ``think_on_text``).
    index:        which generated token (0 = the first after the prompt).
    thought_step: reveal the thought up to this step k (0 = only ``<|startofthought|>``; the
                  default, t - 1, is the whole thought with ``<|endofthought|>``), as the model
                  wrote it one token at a time before predicting the token.
    """
    if not steps:
        return f'<div style="font-family:monospace">{visible_text(prompt)} <i>(nothing generated)</i></div>'
    index = min(max(0, int(index)), len(steps) - 1)
    step = steps[index]
    inner = thought_tokens(step, tokenizer)
    last = len(inner) + 1                                     # step of <|endofthought|>
    k = last if thought_step is None else min(max(0, int(thought_step)), last)

    # 1. the visible text: prompt, tokens already generated, the current one, those still to come
    text = [f'<span style="color:#666;font-family:monospace">{visible_text(prompt)}</span>']
    for i, s in enumerate(steps):
        tip = f"#{i} w = {s.get('w', 0.0):.3f}"
        if i == index:
            text.append(_chip(s["token"], NOW_BG, "white", tip))
        else:
            text.append(_chip(s["token"], TEXT_BG, title=tip, faded=i > index))

    # 2. the hidden thought before it, revealed up to step k
    chips = [_chip(START_THOUGHT, META_BG, title="thought step 0")]
    for j, tok in enumerate(inner, start=1):
        chips.append(_chip(tok, THOUGHT_BG, title=f"thought step {j}", faded=j > k))
    chips.append(_chip(END_THOUGHT, META_BG, title=f"thought step {last}", faded=k < last))

    # 3. the mix, once the thought is complete
    if k < last:
        mix = (f"the model is still writing its thought ({k} of {last} steps); the token is predicted "
               f"after <code>{html.escape(END_THOUGHT)}</code>")
    else:
        mix = (f"w = <b>{step.get('w', 0.0):.3f}</b> (weight of the thought in the mix) &middot; "
               f"p(<code>{visible_text(step['token'])}</code>) without the thought {_prob(step.get('logp_init'))}, "
               f"after it {_prob(step.get('logp_talk'))} &middot; "
               f"log-ratio {step.get('gain', 0.0):+.3f}")
    return ('<div class="qstar-explorer">'
            f'<div style="font-size:1.1em;margin-bottom:4px">{"".join(text)}</div>'
            f'<div style="margin:4px 0">hidden thought before token #{index} '
            f'(<code>{visible_text(step["token"])}</code>): {"".join(chips)}</div>'
            f'<div style="font-size:0.9em">{mix}</div>'
            '<div style="color:#666;font-size:0.8em">blue: generated text (orange: this token); '
            'yellow: thought tokens, never part of the text; purple: the meta-tokens</div></div>')


def generations_table_html(generations: dict[str, list[dict]], tokenizer=None) -> str:
    """One row per prompt: the generated text and, for each token, the thought before it."""
    rows = []
    for prompt, steps in generations.items():
        shown = "".join(visible_text(s["token"]) for s in steps)
        thoughts = " ".join(f'<code>[{visible_text("".join(thought_tokens(s, tokenizer)))}]</code>&rarr;'
                            f'<code>{visible_text(s["token"])}</code>' for s in steps)
        rows.append(f'<tr><td style="font-family:monospace">{visible_text(prompt)}</td>'
                    f'<td style="font-family:monospace">{shown}</td><td>{thoughts}</td></tr>')
    return ('<table style="font-size:0.85em"><tr><th>prompt</th><th>generated</th>'
            f'<th>[thought] &rarr; token, for each token</th></tr>{"".join(rows)}</table>')


def generation_explorer(generations: dict[str, list[dict]], tokenizer=None, prompt: str | None = None,
                        index: int = 0) -> None:
    """Sliders over :func:`generation_view_html`: which prompt, which generated token, and how far
    into its thought (with a play button that writes the thought token by token). Displays itself
    (returns nothing); viewers without widgets show the initial view and the table of all prompts.

    generations: {prompt: steps}, e.g. ``{p: generate_with_thoughts(..., p) for p in prompts}``.
    """
    from IPython.display import display

    if not generations:
        raise ValueError("generation_explorer needs at least one generation")
    prompts = list(generations)
    prompt = prompts[0] if prompt is None else prompt
    first = generation_view_html(generations[prompt], prompt, index, tokenizer=tokenizer)
    static = first + '<div style="margin-top:8px"></div>' + generations_table_html(generations, tokenizer)
    text = (f"generation explorer ({len(prompts)} prompts); run the notebook with ipywidgets to step "
            f"through the tokens and their hidden thoughts")
    try:
        import ipywidgets as W
    except ImportError:
        display({"text/html": static, "text/plain": text + " (pip install ipywidgets)"}, raw=True)
        return

    def n_thought_steps(p: str, i: int) -> int:
        steps = generations[p]
        return len(thought_tokens(steps[min(i, len(steps) - 1)], tokenizer)) + 1 if steps else 0

    style = {"description_width": "initial"}
    w_prompt = W.Dropdown(options=prompts, value=prompt, description="prompt", style=style)
    s_token = W.IntSlider(index, 0, max(0, len(generations[prompt]) - 1), description="generated token", style=style)
    last = n_thought_steps(prompt, index)
    s_think = W.IntSlider(last, 0, last, description="thought step", style=style)
    play = W.Play(value=last, min=0, max=last, interval=500, description="write the thought")
    W.jslink((play, "value"), (s_think, "value"))
    view = W.HTML(first)

    def redraw(_=None):
        p = w_prompt.value
        s_token.max = max(0, len(generations[p]) - 1)
        view.value = generation_view_html(generations[p], p, s_token.value, s_think.value, tokenizer)

    def new_token(_=None):
        top = n_thought_steps(w_prompt.value, s_token.value)
        s_think.max = play.max = top
        s_think.value = top
        redraw()

    w_prompt.observe(new_token, names="value")
    s_token.observe(new_token, names="value")
    s_think.observe(redraw, names="value")
    box = W.VBox([W.HBox([w_prompt, s_token]), W.HBox([play, s_think]), view])
    display(widget_bundle(box, **{"text/html": static, "text/plain": text}), raw=True)
