"""A token-by-token explorer of generation with hidden thoughts (notebook 08).

:func:`qstar_mini.generate.generate_with_thoughts` returns one dict per generated token: the
token, the thought written just before it (``<|startofthought|> s_1 .. s_{t-2} <|endofthought|>``),
the mixing weight ``w`` and the log-probabilities of the token with and without the thought. The
reader of the *text* never sees the thoughts; this module shows them:

* :func:`generation_view_html`: one generated token of one prompt, with the text so far, the
  thought before it revealed up to thought step ``k`` (one chip per thought token), and, once
  the thought is complete, how the mix changed that token's probability;
* :func:`generations_table_html`: every prompt in one table (generated text and its thoughts);
* :func:`generation_explorer`: sliders over :func:`generation_view_html` (prompt, token,
  thought step, and a play button), displayed as ONE output with three representations, like
  the explorers of :mod:`qstar_mini.widgets`: the live widget, a static HTML picture (the
  initial view and the table, for GitHub or any viewer without a kernel), one line of text.

Everything here only *draws* dicts that generation already computed: no model is run. Numbers
are formatted at fixed precision, so the HTML is the same wherever the values agree to it.
"""

from __future__ import annotations

import html
import math

START, END = "<|startofthought|>", "<|endofthought|>"
TEXT_BG, THOUGHT_BG, META_BG, NOW_BG = "#bee3f8", "#feebc8", "#e9d8fd", "#dd6b20"


def _esc(text: str) -> str:
    """Escaped, with whitespace made visible (a newline as a return symbol, spaces kept)."""
    return html.escape(text).replace("\n", "\u23ce").replace(" ", "&nbsp;") or "&nbsp;"


def _chip(text: str, background: str, colour: str = "black", title: str = "", faded: bool = False) -> str:
    opacity = "opacity:0.3;" if faded else ""
    tip = f' title="{html.escape(title, quote=True)}"' if title else ""
    return (f'<span{tip} style="background:{background};color:{colour};{opacity}font-family:monospace;'
            f'padding:1px 4px;margin:1px;border-radius:3px;display:inline-block">{_esc(text)}</span>')


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

    steps:        from :func:`qstar_mini.generate.generate_with_thoughts` (or ``think_on_text``).
    index:        which generated token (0 = the first after the prompt).
    thought_step: reveal the thought up to this step k (0 = only ``<|startofthought|>``; the
                  default, t - 1, is the whole thought with ``<|endofthought|>``), as the model
                  wrote it one token at a time before predicting the token.
    """
    if not steps:
        return f'<div style="font-family:monospace">{_esc(prompt)} <i>(nothing generated)</i></div>'
    index = min(max(0, int(index)), len(steps) - 1)
    step = steps[index]
    inner = thought_tokens(step, tokenizer)
    last = len(inner) + 1                                     # step of <|endofthought|>
    k = last if thought_step is None else min(max(0, int(thought_step)), last)

    # 1. the visible text: prompt, tokens already generated, the current one, those still to come
    text = [f'<span style="color:#666;font-family:monospace">{_esc(prompt)}</span>']
    for i, s in enumerate(steps):
        tip = f"#{i} w = {s.get('w', 0.0):.3f}"
        if i == index:
            text.append(_chip(s["token"], NOW_BG, "white", tip))
        else:
            text.append(_chip(s["token"], TEXT_BG, title=tip, faded=i > index))

    # 2. the hidden thought before it, revealed up to step k
    chips = [_chip(START, META_BG, title="thought step 0")]
    for j, tok in enumerate(inner, start=1):
        chips.append(_chip(tok, THOUGHT_BG, title=f"thought step {j}", faded=j > k))
    chips.append(_chip(END, META_BG, title=f"thought step {last}", faded=k < last))

    # 3. the mix, once the thought is complete
    if k < last:
        mix = (f"the model is still writing its thought ({k} of {last} steps); the token is predicted "
               f"after <code>{html.escape(END)}</code>")
    else:
        mix = (f"w = <b>{step.get('w', 0.0):.3f}</b> (weight of the thought in the mix) &middot; "
               f"p(<code>{_esc(step['token'])}</code>) without the thought {_prob(step.get('logp_init'))}, "
               f"after it {_prob(step.get('logp_talk'))} &middot; "
               f"log-ratio {step.get('reward', 0.0):+.3f}")
    return ('<div class="qstar-explorer">'
            f'<div style="font-size:1.1em;margin-bottom:4px">{"".join(text)}</div>'
            f'<div style="margin:4px 0">hidden thought before token #{index} '
            f'(<code>{_esc(step["token"])}</code>): {"".join(chips)}</div>'
            f'<div style="font-size:0.9em">{mix}</div>'
            '<div style="color:#666;font-size:0.8em">blue: generated text (orange: this token); '
            'yellow: thought tokens, never part of the text; purple: the meta-tokens</div></div>')


def generations_table_html(generations: dict[str, list[dict]], tokenizer=None) -> str:
    """One row per prompt: the generated text and, for each token, the thought before it."""
    rows = []
    for prompt, steps in generations.items():
        shown = "".join(_esc(s["token"]) for s in steps)
        thoughts = " ".join(f'<code>[{_esc("".join(thought_tokens(s, tokenizer)))}]</code>&rarr;'
                            f'<code>{_esc(s["token"])}</code>' for s in steps)
        rows.append(f'<tr><td style="font-family:monospace">{_esc(prompt)}</td>'
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
    bundle = W.VBox([W.HBox([w_prompt, s_token]), W.HBox([play, s_think]), view])._repr_mimebundle_()
    bundle["text/html"] = static
    bundle["text/plain"] = text
    display(bundle, raw=True)
