"""Thinking at inference: a thought before every generated token, and a picture of it.

Generation with Quiet-STaR repeats, for each new token, what training does at one position j
(Algorithm 1, lines 2b-2g, with the true future unknown)::

    h_init_j           hidden state of the text so far (KV cache of the text)
    T_j                <|startofthought|> s_1 .. s_{t-2} <|endofthought|>, sampled (or greedy)
                       after the text; thought token k sits at position j + k, as in training
    h_thought_j        hidden state at <|endofthought|>
    w_j                mixing_head(h_init_j, h_thought_j)
    log p^talk_j       the mix of the two predictions; the next token is its argmax (or a sample)

then the thought's keys are removed from the cache (``cache.crop``) and the chosen token is
appended to the text: thoughts are never part of the text that later tokens read, exactly as
in training, where every position thinks on its own.

**The official README's pitfall.** The meta-tokens must never be emitted as text, and never be
sampled inside a thought. Every distribution here goes through
:func:`qstar_mini.lm.text_log_probs`, which gives them probability 0;
``tests/test_inference.py`` checks that no generated token is a meta-token.

:func:`generate_plain` is the same loop without thoughts: the baseline that notebook 08 times.

:func:`think_on_text` is the teacher-forced counterpart: for a *given* text, the thought, w and
gain at every position at once (the parallel machinery of training). :func:`render_html`
draws either as coloured text with the thought on hover and listed below.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import torch
from torch import nn

from qstar_mini.config import QuietStarConfig
from qstar_mini.data import task_for_question, working_is_correct
from qstar_mini.errors import DataError
from qstar_mini.lm import forward_hidden, lm_head, text_log_probs
from qstar_mini.meta_tokens import MetaTokens
from qstar_mini.models.check import sampling_attention
from qstar_mini.mixing import MixingHead, mix_log_probs, mixing_weight
from qstar_mini.thoughts import generate_thoughts, gumbel_noise, plain_forward, sample_tokens


# ----------------------------------------------------------------------------- reading thoughts

def decode_thought(tokenizer, thought_ids) -> str:
    """The text *between* the meta-tokens of one thought.

    thought_ids: (t,) ids ``[<|startofthought|>, s_1 .. s_{t-2}, <|endofthought|>]``.
    Special tokens a thought may contain (``</s>``, ``<pad>``) are kept, so they make a
    working wrong instead of vanishing.
    """
    ids = [int(i) for i in thought_ids][1:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


def thought_is_correct(question: str | None, thought_text: str) -> bool:
    """True iff the thought is exactly the question's working (its running sums mod 10)."""
    if not question:
        return False
    try:
        return working_is_correct(question, thought_text, task_for_question(question))
    except DataError:
        return False


# ----------------------------------------------------------------------------- all positions at once

@dataclass
class ThoughtPrediction:
    """What the model predicts at every position, without and with a thought.

    log_p_init: (batch, seq, vocab)               line 2a: the plain prediction of x_{j+1}
    log_p_talk: (batch, n_thoughts, m, vocab)     line 2g: the mixed prediction after T_j
    w:          (batch, n_thoughts, m)            line 2f: the mixing weight (offset 0)
    thoughts:   (batch, n_thoughts, m, t)         T_j, ids incl. meta-tokens
    m = seq (every position thinks) unless ``positions`` (batch, m) chose where.
    """

    log_p_init: torch.Tensor
    log_p_talk: torch.Tensor
    w: torch.Tensor
    thoughts: torch.Tensor


@torch.no_grad()
def predict_with_thoughts(model: nn.Module, meta: MetaTokens, head: MixingHead, cfg: QuietStarConfig,
                          input_ids: torch.Tensor, attention_mask: torch.Tensor, n_thoughts: int = 1, *,
                          greedy: bool = False, temperature: float | None = None,
                          generator: torch.Generator | None = None,
                          positions: torch.Tensor | None = None) -> ThoughtPrediction:
    """Lines 1-2g of Algorithm 1 for the next token only (offset 0), in parallel.

    input_ids, attention_mask: (batch, seq), right-padded. ``temperature``: of the thought
    sampling (default ``cfg.thought_temperature``); ``greedy``: argmax thoughts.
    positions: (batch, m) long, think only after these positions (default: every position).
    """
    from qstar_mini.step import at_positions

    temperature = cfg.thought_temperature if temperature is None else temperature
    head_fn = lm_head(model)
    h_init, cache = plain_forward(model, meta, input_ids, attention_mask)      # (b, l, hidden)
    m = input_ids.shape[1] if positions is None else positions.shape[1]
    attention = sampling_attention(model, meta, cfg, input_ids.shape[0] * n_thoughts, m)
    thoughts = generate_thoughts(model, meta, input_ids, attention_mask, cache, cfg.thought_length,
                                 n_thoughts, thought_temperature=temperature, greedy=greedy,
                                 generator=generator, positions=positions, attention=attention)
    h_thought = thoughts.h_end                                                 # (b, n, m, hidden)
    h_init_n = at_positions(h_init, positions)[:, None].expand_as(h_thought)
    w = mixing_weight(head, h_init_n, h_thought, cfg.mixing, cfg.mixer_sigmoid)   # (b, n, m)
    log_p_talk = mix_log_probs(head_fn, h_init_n, h_thought, w, cfg.mixing, meta.ids)
    log_p_init = text_log_probs(head_fn(h_init), meta.ids)
    return ThoughtPrediction(log_p_init.float(), log_p_talk.float(), w.float(), thoughts.ids)


@torch.no_grad()
def think_on_text(model, tokenizer, meta, head, cfg, text: str, *, greedy: bool = True,
                  generator: torch.Generator | None = None) -> list[dict]:
    """Teacher-forced: for every token of ``text`` (after ``<s>``), the thought made just before it.

    returns: one dict per token: ``token`` (its text), ``thought`` (the text between the
    meta-tokens), ``w`` (mixing weight), ``gain`` = log p^talk(token) - log p^init(token)
    (how much the thought helped predict the true token; not the training reward r_j, which
    compares a thought with the mean of the other thoughts at j), ``logp_init``, ``logp_talk``.
    """
    device = next(model.parameters()).device
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids], device=device)                                     # (1, seq)
    pred = predict_with_thoughts(model, meta, head, cfg, x, torch.ones_like(x), 1, greedy=greedy,
                                 generator=generator)
    steps = []
    for j in range(len(ids) - 1):
        target = ids[j + 1]
        lp_init = float(pred.log_p_init[0, j, target])
        lp_talk = float(pred.log_p_talk[0, 0, j, target])
        steps.append({"token": tokenizer.decode([target]), "token_id": target,
                      "thought": decode_thought(tokenizer, pred.thoughts[0, 0, j]),
                      "w": float(pred.w[0, 0, j]), "gain": lp_talk - lp_init,
                      "logp_init": lp_init, "logp_talk": lp_talk})
    return steps


# ----------------------------------------------------------------------------- one position, with a KV cache

def _visible(keys: int, device) -> torch.Tensor:
    """Additive mask (1, 1, 1, keys) of zeros: one new token that may see every cached key."""
    return torch.zeros(1, 1, 1, keys, device=device)


@torch.no_grad()
def think_once(model: nn.Module, meta: MetaTokens, head: MixingHead, cfg: QuietStarConfig, cache,
               h_last: torch.Tensor, position: int, *, greedy: bool = True, temperature: float = 1.0,
               generator: torch.Generator | None = None):
    """A thought after the last text token, and the mixed prediction of the next token.

    cache:   the KV cache of the text x_0 .. x_j (1 row); restored to that on return.
    h_last:  (1, hidden) h_init of x_j.   position: j.
    returns: thought ids (t,), w (float), log p^talk (vocab,), log p^init (vocab,).
    """
    device = h_last.device
    head_fn = lm_head(model)
    n_text = cache.get_seq_length()
    token = torch.tensor([[meta.start_id]], device=device)                   # (1, 1)
    thought, h = [meta.start_id], None
    for k in range(1, cfg.thought_length + 1):                                # feed thought token k
        h = forward_hidden(model, meta.embed(model, token), _visible(n_text + k, device),
                           torch.tensor([[position + k]], device=device), cache)[:, -1]   # (1, hidden)
        if k == cfg.thought_length:
            break                                                             # h at <|endofthought|>
        if k == cfg.thought_length - 1:
            token = torch.tensor([[meta.end_id]], device=device)
        else:
            logits = head_fn(h)                                               # (1, vocab)
            noise = None if greedy else gumbel_noise(logits.shape, generator, device=device)
            token = sample_tokens(logits, meta.ids, temperature, noise, greedy)[:, None]
        thought.append(int(token))
    cache.crop(-cfg.thought_length)                     # forget the thought: back to the text
    w = mixing_weight(head, h_last, h, cfg.mixing, cfg.mixer_sigmoid)        # (1,)
    log_p_talk = mix_log_probs(head_fn, h_last, h, w, cfg.mixing, meta.ids)[0].float()
    log_p_init = text_log_probs(head_fn(h_last), meta.ids)[0].float()
    return torch.tensor(thought), float(w[0]), log_p_talk, log_p_init


@torch.no_grad()
def generate_with_thoughts(model: nn.Module, tokenizer, meta: MetaTokens, head: MixingHead,
                           cfg: QuietStarConfig, prompt: str, max_new_tokens: int = 8, greedy: bool = True,
                           *, thought_greedy: bool | None = None, temperature: float = 1.0,
                           generator: torch.Generator | None = None, stop_at_eos: bool = True) -> list[dict]:
    """Continue ``prompt`` token by token, thinking before each token.

    greedy:          argmax next token (else sample at ``temperature``).
    thought_greedy:  argmax thought tokens (default: same as ``greedy``); else sampled at
                     ``cfg.thought_temperature``.
    returns: one dict per new token: ``token`` (text), ``token_id``, ``thought`` (text between
    the meta-tokens), ``thought_ids``, ``w``, ``gain`` = log p^talk(token) - log p^init(token)
    (how much the thought changed the chosen token's probability), ``logp_init``, ``logp_talk``.
    Stops after ``</s>`` when ``stop_at_eos``. Meta-tokens are never emitted.
    """
    thought_greedy = greedy if thought_greedy is None else thought_greedy
    h_last, cache, position = _read_prompt(model, tokenizer, meta, prompt)     # line 1 on the prompt
    steps = []
    for _ in range(max_new_tokens):
        thought, w, log_p_talk, log_p_init = think_once(
            model, meta, head, cfg, cache, h_last, position, greedy=thought_greedy,
            temperature=cfg.thought_temperature, generator=generator)
        if greedy:
            token = int(log_p_talk.argmax())
        else:
            noise = gumbel_noise(log_p_talk.shape, generator, device=log_p_talk.device)
            token = int((log_p_talk / temperature + noise).argmax())
        steps.append({"token": tokenizer.decode([token]), "token_id": token,
                      "thought": decode_thought(tokenizer, thought), "thought_ids": thought.tolist(),
                      "w": w, "gain": float(log_p_talk[token] - log_p_init[token]),
                      "logp_init": float(log_p_init[token]), "logp_talk": float(log_p_talk[token])})
        if stop_at_eos and token == tokenizer.eos_token_id:
            break
        position += 1
        h_last = _append_token(model, meta, cache, token, position)
    return steps


@torch.no_grad()
def generate_plain(model: nn.Module, tokenizer, meta: MetaTokens, prompt: str, max_new_tokens: int = 8, *,
                   stop_at_eos: bool = True) -> list[int]:
    """Greedy generation **without** thoughts, on the KV-cache machinery of
    :func:`generate_with_thoughts`: the baseline that thinking at inference is compared with.

    One pass over the prompt (line 1, ``h_init``), then per new token: the argmax of
    log p^init (meta-tokens masked, never emitted) and one pass that appends it to the cache
    (1 + max_new_tokens passes in all, against 1 + max_new_tokens x (t + 1) with thoughts).
    returns: the new token ids, a list of max_new_tokens ints (shorter if it stopped after ``</s>``).
    """
    h_last, cache, position = _read_prompt(model, tokenizer, meta, prompt)     # line 1 on the prompt
    out = []
    for _ in range(max_new_tokens):
        token = int(text_log_probs(lm_head(model)(h_last), meta.ids)[0].argmax())
        out.append(token)
        if stop_at_eos and token == tokenizer.eos_token_id:
            break
        position += 1
        h_last = _append_token(model, meta, cache, token, position)
    return out


def _read_prompt(model, tokenizer, meta: MetaTokens, prompt: str):
    """One plain pass over ``<s> prompt`` (line 1): (h_last (1, hidden) of the last position,
    the KV cache, that position's index)."""
    ids = _prompt_ids(tokenizer, prompt)
    x = torch.tensor([ids], device=next(model.parameters()).device)            # (1, seq)
    h, cache = plain_forward(model, meta, x, torch.ones_like(x))
    return h[:, -1], cache, len(ids) - 1


def _append_token(model, meta: MetaTokens, cache, token: int, position: int) -> torch.Tensor:
    """Append x_{j+1} = ``token`` at ``position`` to the cache; returns its hidden state (1, hidden)."""
    device = next(model.parameters()).device
    return forward_hidden(model, meta.embed(model, torch.tensor([[token]], device=device)),
                          _visible(cache.get_seq_length() + 1, device),
                          torch.tensor([[position]], device=device), cache)[:, -1]


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    """``<s>`` (when the tokenizer has one) and the prompt's ids."""
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids += tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError("the prompt is empty and the tokenizer has no <s>: nothing to continue")
    return ids


def generated_text(steps: list[dict], skip_special: tuple[str, ...] = ("</s>",)) -> str:
    """The generated tokens joined (``</s>`` dropped)."""
    return "".join(s["token"] for s in steps if s["token"] not in skip_special)


# ----------------------------------------------------------------------------- HTML

def _colour(value: float, color_by: str, scale: float) -> str:
    """w in [0, 1]: white -> green. gain: red (hurt) -> white -> green (helped)."""
    if color_by == "w":
        a = min(max(value, 0.0), 1.0)
        return f"rgba(46, 160, 67, {a:.2f})"
    a = min(abs(value) / scale, 1.0) if scale > 0 else 0.0
    return f"rgba(46, 160, 67, {a:.2f})" if value >= 0 else f"rgba(215, 58, 73, {a:.2f})"


def visible_text(text: str) -> str:
    """``text`` escaped for HTML with its whitespace made visible: a newline as a return symbol,
    spaces as ``&nbsp;``, an empty token as one space."""
    return html.escape(text).replace("\n", "\u23ce").replace(" ", "&nbsp;") or "&nbsp;"


#: How :func:`render_html` draws one token (``style`` gives its background).
TOKEN_SPAN = '<span style="{style};font-family:monospace;padding:1px 0" title="{title}">{text}</span>'


def coloured_spans(tokens: list[str], styles: list[str], titles: list[str], template: str = TOKEN_SPAN) -> str:
    """Coloured text: token i written with ``template`` as :func:`visible_text`, with CSS
    ``styles[i]`` (its background) and ``titles[i]`` (escaped) on hover.

    Both coloured-text views draw with it: :func:`render_html` and
    :func:`qstar_mini.teaching.plots.coloured_text`.
    """
    return "".join(template.format(style=style, title=html.escape(title, quote=True), text=visible_text(token))
                   for token, style, title in zip(tokens, styles, titles))


def render_html(steps: list[dict], color_by: str = "w", prompt: str = "", show_thoughts: bool = True) -> str:
    """Text coloured by ``w`` (how much the thought was trusted) or ``gain`` (how much it
    helped), each token's thought on hover (``title``) and, if ``show_thoughts``, listed below.

    steps: from :func:`generate_with_thoughts` or :func:`think_on_text`.
    returns: an HTML fragment (no JavaScript): display it with ``IPython.display.HTML``.
    """
    if color_by not in ("w", "gain"):
        raise ValueError(f"color_by must be 'w' or 'gain' (got {color_by!r})")
    scale = max([abs(s.get("gain", 0.0)) for s in steps] + [1e-9])
    spans = coloured_spans(
        [s["token"] for s in steps],
        [f"background:{_colour(float(s.get(color_by, 0.0)), color_by, scale)}" for s in steps],
        [f"#{i} thought: {s.get('thought', '')} | w = {s.get('w', 0.0):.3f} | gain = {s.get('gain', 0.0):+.3f}"
         for i, s in enumerate(steps)])
    legend = ("green = w high (thought trusted)" if color_by == "w"
              else "green = thought helped, red = thought hurt")
    parts = [f'<div class="qstar-thoughts"><div style="font-family:monospace;font-size:1.2em">'
             f'<span style="color:#666">{html.escape(prompt)}</span>{spans}</div>',
             f'<div style="color:#666;font-size:0.8em">coloured by {color_by}: {legend}; hover a token for its thought</div>']
    if show_thoughts:
        rows = "".join(
            f"<tr><td>{i}</td><td><code>{html.escape(s['token'])}</code></td>"
            f"<td><code>&lt;|startofthought|&gt;{html.escape(s.get('thought', ''))}&lt;|endofthought|&gt;</code></td>"
            f"<td>{s.get('w', 0.0):.3f}</td><td>{s.get('gain', 0.0):+.3f}</td></tr>"
            for i, s in enumerate(steps))
        parts.append('<table style="font-size:0.85em"><tr><th>#</th><th>token</th><th>thought</th>'
                     f'<th>w</th><th>gain</th></tr>{rows}</table>')
    parts.append("</div>")
    return "".join(parts)
