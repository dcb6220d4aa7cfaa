"""Checks for the "build it yourself" exercises of the notebooks (issue 6).

Each exercise asks the student to write one function of Algorithm 1 again; the cell after it
calls one check of this module, e.g. ``checks.check_thought_mask(my_thought_visibility)``.
A check runs the student's function and the package's reference on fresh random inputs
(several sizes, right-padded batches), then either prints one line ending in ``passed`` or
raises :class:`CheckFailed` (an ``AssertionError``) that says precisely what is wrong and
gives a hint. A function that still raises ``NotImplementedError`` gets "not implemented yet".

==========================  ===============================  =========================================
check                       the student writes               what it catches (besides shapes, dtypes)
==========================  ===============================  =========================================
check_thought_mask          ``thought_visibility`` for one   missing diagonal (own thought, itself);
                            step (notebook 02)               seeing other positions' thoughts; a text
                                                             part that is not causal or misses x_j;
                                                             an additive (float) mask instead of bool;
                                                             a missing head axis or thought block
check_position_ids          ``step_position_ids``            off-by-k positions; the token's index in
                            (notebook 02)                    the KV cache (seq * step + j) instead of
                                                             its place in the text (j + step)
check_meta_init             ``init_embedding`` (notebook 03) the ``<s>`` the tokenizer adds; first /
                                                             last token only; sum instead of mean;
                                                             not detached; a view into the table
check_mix_hidden            hidden-state mixing              w on the wrong side (paper vs code);
                            (notebook 04)                    log-prob mixing; logits or probabilities
                                                             returned; no gradient into w or h
check_future_targets        ``future_targets`` (notebook 05) off-by-one targets (x_{j+i}); targets
                                                             past the end or on padding counted valid;
                                                             unusable ids (-100) where invalid
check_rewards               ``rewards`` with the mean        no baseline; baseline over the wrong axis
                            baseline (notebook 05)           or leave-one-out; invalid entries
                                                             summed; mean instead of sum over offsets;
                                                             sign; a reward that carries gradient
check_reinforce_loss        ``reinforce_loss`` with the      no clamp; indicator without r; sign;
                            clamp (notebook 05)              non-thinking positions counted; mean of
                                                             token log-probs; wrong average; gradient
                                                             flowing into the reward
==========================  ===============================  =========================================

The inputs come from a private ``torch.Generator`` (``seed`` argument), never from the global
random state, so calling a check does not change what a notebook samples afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..losses import future_targets, reinforce_loss, rewards
from ..masks import step_position_ids, thought_visibility
from ..mixing import mix_log_probs

__all__ = ["CheckFailed", "check_thought_mask", "check_position_ids", "check_meta_init",
           "check_mix_hidden", "check_future_targets", "check_rewards", "check_reinforce_loss"]


class CheckFailed(AssertionError):
    """A student's function disagrees with the reference; the message says how, and a hint."""


# ============================================================================ shared helpers

def _fail(check: str, what: str, hint: str | None = None, case: str | None = None):
    msg = f"{check}: FAILED. {what}"
    if case:
        msg += f"\n  on: {case}"
    if hint:
        msg += f"\n  hint: {hint}"
    raise CheckFailed(msg)


def _passed(check: str, detail: str) -> None:
    print(f"{check}: passed ({detail})")


def _call(check: str, fn: Callable, args: tuple, case: str, signature: str, crash_hint: str | None = None):
    """Run the student's function; turn NotImplementedError and crashes into clear failures."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise CheckFailed(
            f"{check}: not implemented yet. In the exercise cell, replace `# YOUR CODE HERE` and "
            f"`raise NotImplementedError()` with your code, run that cell, then this one."
        ) from None
    except CheckFailed:
        raise
    except Exception as e:  # noqa: BLE001 - any crash of the student's code is reported, with the input
        raise CheckFailed(
            f"{check}: FAILED. your function raised {type(e).__name__}: {e}\n  on: {case}\n"
            f"  hint: {crash_hint + '; ' if crash_hint else ''}the expected signature is {signature}; print "
            f"the shapes of the arguments and of your intermediate tensors to find the mismatch"
        ) from e


def _need_tensor(check: str, value, what: str, case: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        _fail(check, f"{what} must be a torch.Tensor, got {type(value).__name__}", case=case)
    return value


def _need_shape(check: str, got: torch.Tensor, expected: Sequence[int], what: str, case: str,
                hint: str | None = None) -> None:
    if tuple(got.shape) != tuple(expected):
        _fail(check, f"{what} has shape {tuple(got.shape)}, expected {tuple(expected)}", hint, case)


def _padding_mask(lengths: Sequence[int], seq: int) -> torch.Tensor:
    """(batch, seq) long, right-padded: row b has lengths[b] ones then zeros."""
    return (torch.arange(seq)[None, :] < torch.tensor(list(lengths))[:, None]).long()


def _random_lengths(g: torch.Generator, batch: int, seq: int) -> list[int]:
    """Row 0 full (the longest row sets seq), the others random in 1..seq."""
    return [seq] + torch.randint(1, seq + 1, (batch - 1,), generator=g).tolist()


def _fmt(x) -> str:
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, list):
        return "[" + ", ".join(_fmt(v) for v in x) + "]"
    return str(x)


def _same(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), rtol=1e-5, atol=atol))


# ============================================================================ notebook 02: masks

def _mask_cases(seed: int):
    g = torch.Generator().manual_seed(seed)
    cases = [((3,), 3, 1), ((4, 2), 4, 2), ((5, 3, 1), 5, 3), ((6, 6), 6, 1)]
    for _ in range(4):
        seq = int(torch.randint(2, 9, (1,), generator=g))
        batch = int(torch.randint(1, 4, (1,), generator=g))
        step = int(torch.randint(1, 5, (1,), generator=g))
        cases.append((tuple(_random_lengths(g, batch, seq)), seq, step))
    return cases


def _key_name(k: int, seq: int) -> str:
    if k < seq:
        return f"text token x_{k}"
    return f"thought step {k // seq} of position {k % seq}"


def _diagnose_mask(got: torch.Tensor, exp: torch.Tensor, am: torch.Tensor, step: int) -> tuple[str, str]:
    """What differs on real query rows, in words, and a hint."""
    batch, seq = am.shape
    real_q = am.bool()[:, None, :, None].expand_as(exp)          # compare real query rows only
    missing = exp & ~got & real_q
    extra = got & ~exp & real_q
    k = torch.arange(exp.shape[-1])
    j = torch.arange(seq)[:, None]
    text = (k < seq)[None, :]                                    # (1, keys)
    own = ((k % seq)[None, :] == j) & ~text                      # thought blocks, column j
    problems, hints = [], []

    def first(where: torch.Tensor) -> str:
        b, _, q, key = where.nonzero()[0].tolist()
        return f"(batch row {b}, query position {q}, key {key} = {_key_name(key, seq)})"

    sel = missing & own
    if sel.any():
        current = sel & ((k // seq) == step)[None, None, None, :]
        problems.append(f"{int(sel.sum())} entries where a thought token cannot see its own position's "
                        f"thought tokens (the diagonal of a thought block), e.g. {first(sel)}")
        hints.append("every thought block is an identity matrix: query j sees column j of each of the "
                     f"`step` blocks{', including the current one (itself)' if bool(current.any()) else ''}")
    sel = extra & ~text & ~own
    if sel.any():
        problems.append(f"{int(sel.sum())} entries where a position sees ANOTHER position's thought, "
                        f"e.g. {first(sel)}")
        hints.append("a position's thought is private: in the thought blocks only column j (torch.eye) is True")
    sel = missing & text
    if sel.any():
        problems.append(f"{int(sel.sum())} entries where a thought cannot see real text before it, e.g. {first(sel)}")
        hints.append("the text part is the causal mask: query j sees x_i for every real i <= j, x_j included")
    sel = extra & text & (k[None, :] > j)
    if sel.any():
        problems.append(f"{int(sel.sum())} entries where a thought sees FUTURE text (i > j), e.g. {first(sel)}")
        hints.append("the text part must be lower-triangular (torch.ones(seq, seq).tril())")
    if not problems:
        sel = missing | extra
        problems.append(f"{int(sel.sum())} entries differ, e.g. {first(sel)}")
    return "; ".join(problems), " / ".join(hints) or "compare with the picture of the mask above"


def check_thought_mask(fn: Callable, seed: int = 0) -> None:
    """Exercise: ``fn(attention_mask, step) -> (batch, 1, seq, seq * (1 + step))`` bool mask of
    thought step ``step`` (reference :func:`qstar_mini.masks.thought_visibility`).

    Compared on real query rows (padded rows only need one visible key). With right padding a
    real query never reaches a padded key through the causal part, so padding shows up only in
    the padded rows, whose outputs are never used."""
    name = "check_thought_mask"
    cases = _mask_cases(seed)
    for lengths, seq, step in cases:
        am = _padding_mask(lengths, seq)
        case = f"attention_mask={_fmt(am)}, step={step}"
        exp = thought_visibility(am, step)
        got = _need_tensor(name, _call(name, fn, (am.clone(), step), case,
                                       "fn(attention_mask (batch, seq), step: int) -> (batch, 1, seq, seq * (1 + step)) bool"),
                           "the mask", case)
        if got.dtype != torch.bool:
            if got.is_floating_point() and bool((got < -1).any()):
                _fail(name, f"you returned an additive {got.dtype} mask (0 / large negative)", case=case,
                      hint="return the boolean form (True = may attend); masks.to_additive converts it")
            _fail(name, f"the mask has dtype {got.dtype}, expected torch.bool (True = may attend)", case=case,
                  hint="build it from boolean tensors (torch.eye(seq, dtype=torch.bool), ...) or call .bool()")
        batch = am.shape[0]
        expected_shape = (batch, 1, seq, seq * (1 + step))
        if tuple(got.shape) == (batch, seq, seq * (1 + step)):
            _fail(name, f"the mask has shape {tuple(got.shape)}, expected {expected_shape}", case=case,
                  hint="Hugging Face wants a head axis of size 1: (batch, 1, query, key); use [:, None]")
        if tuple(got.shape) == (batch, 1, seq, seq * step):
            _fail(name, f"the mask has shape {tuple(got.shape)}, expected {expected_shape}", case=case,
                  hint="the keys are the seq text tokens FOLLOWED by `step` blocks of seq thought tokens")
        _need_shape(name, got, expected_shape, "the mask", case,
                    hint="keys = seq text tokens + one block of seq tokens per thought step fed so far")
        real_q = am.bool()[:, None, :, None].expand_as(exp)
        if not torch.equal(got & real_q, exp & real_q):
            what, hint = _diagnose_mask(got, exp, am, step)
            _fail(name, what, hint, case)
        if not bool(got.any(-1).all()):
            _fail(name, "a padded query row sees nothing at all: softmax over no keys gives NaN", case=case,
                  hint="keep each position's own diagonal even at padding (the reference does)")
    _passed(name, f"{len(cases)} random padded batches, steps 1-4")


def check_position_ids(fn: Callable, seed: int = 0) -> None:
    """Exercise: ``fn(attention_mask, step) -> (batch, seq)`` position ids of the tokens fed at
    ``step`` (0 = the text; reference :func:`qstar_mini.masks.step_position_ids`).
    Compared at real positions."""
    name = "check_position_ids"
    g = torch.Generator().manual_seed(seed)
    cases = [((4,), 4, 0), ((4, 2), 4, 1), ((5, 3), 5, 3)]
    for _ in range(4):
        seq = int(torch.randint(2, 10, (1,), generator=g))
        cases.append((tuple(_random_lengths(g, int(torch.randint(1, 4, (1,), generator=g)), seq)), seq,
                      int(torch.randint(0, 8, (1,), generator=g))))
    for lengths, seq, step in cases:
        am = _padding_mask(lengths, seq)
        case = f"attention_mask={_fmt(am)}, step={step}"
        exp = step_position_ids(am, step)
        got = _need_tensor(name, _call(name, fn, (am.clone(), step), case,
                                       "fn(attention_mask (batch, seq), step: int) -> (batch, seq) long"),
                           "the position ids", case)
        if got.is_floating_point() or got.dtype == torch.bool:
            _fail(name, f"position ids have dtype {got.dtype}, expected an integer dtype (torch.long)", case=case,
                  hint="torch.arange(seq) is already long")
        if tuple(got.shape) == (seq,):
            _fail(name, f"position ids have shape {(seq,)}, expected {tuple(am.shape)}", case=case,
                  hint="one row per sequence: .expand(batch, seq)")
        _need_shape(name, got, am.shape, "the position ids", case)
        real = am.bool()
        if torch.equal(got[real], exp[real]):
            continue
        j = torch.arange(seq).expand_as(am)
        diff = (got - exp)[real]
        if torch.equal(got[real], (seq * step + j)[real]) and step > 0:
            _fail(name, "you gave thought tokens their index in the KV cache (seq * step + j)", case=case,
                  hint="the position id says where the token would sit in the TEXT: thought token k of "
                       "position j comes right after x_j and its k - 1 predecessors, at j + k")
        if bool((diff == diff[0]).all()):
            _fail(name, f"every position id is off by {int(diff[0]):+d} (got {_fmt(got[0])}, expected {_fmt(exp[0])} "
                        f"for row 0)", case=case,
                  hint="x_j is at position j; the token fed at step k after x_j is at j + k "
                       "(the first thought token <|startofthought|> at j + 1)")
        b, pos = (got != exp).logical_and(real).nonzero()[0].tolist()
        _fail(name, f"position ids differ, first at batch row {b}, position {pos}: got {int(got[b, pos])}, "
                    f"expected {int(exp[b, pos])}", case=case,
              hint="position ids do not depend on padding here: j + step for every j")
    _passed(name, f"{len(cases)} random padded batches, steps 0-7")


# ============================================================================ notebook 03: meta-tokens

def _small_model_and_tokenizer(seed: int):
    from ..models import build_tokenizer, tiny_model

    tok = build_tokenizer()
    model = tiny_model(tok, seed=seed, hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                       num_attention_heads=2, num_key_value_heads=1)
    return model, tok


def check_meta_init(fn: Callable, seed: int = 0, model=None, tokenizer=None, how: str = "mean") -> None:
    """Exercise: ``fn(model, tokenizer, text) -> (hidden,)``, the embedding a meta-token starts
    from, without ``<s>`` (reference :func:`qstar_mini.meta_tokens.init_embedding`):
    ``how="mean"`` (the exercise, the tiny preset's ``meta_init``) the mean of the input
    embeddings of the tokens of ``text``; ``how="first"`` (the official code) the embedding of
    its first token. A tuple ``(vector, ids)`` like the reference's is accepted too."""
    from ..meta_tokens import init_embedding

    name = "check_meta_init"
    if how not in ("mean", "first"):
        raise ValueError(f"how must be 'mean' or 'first' (got {how!r})")
    if model is None or tokenizer is None:
        model, tokenizer = _small_model_and_tokenizer(seed)
    table = model.get_input_embeddings().weight
    before = table.detach().clone()
    texts = ["---", "(", ")", "=(", "31415"]
    for text in texts:
        case = f"text={text!r}, how={how!r}"
        exp, _ = init_embedding(model, tokenizer, text, how)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out = _call(name, fn, (model, tokenizer, text), case, "fn(model, tokenizer, text: str) -> (hidden,) tensor")
        got = _need_tensor(name, out[0] if isinstance(out, tuple) else out, "the embedding", case)
        hidden = table.shape[1]
        if tuple(got.shape) == (len(ids), hidden) and len(ids) > 1:
            _fail(name, f"you returned one row per token, shape {tuple(got.shape)}; expected ({hidden},)", case=case,
                  hint="average over the tokens: .mean(0)" if how == "mean" else "keep the first token's row: [ids[0]]")
        if tuple(got.shape) == (1, hidden):
            _fail(name, f"shape (1, {hidden}), expected ({hidden},)", case=case, hint="drop the extra axis: [0] or .squeeze(0)")
        _need_shape(name, got, (hidden,), "the embedding", case)
        if got.requires_grad:
            _fail(name, "the embedding still carries the graph of the embedding table (requires_grad=True)",
                  case=case, hint="it is a starting value, a copy: .detach() (then .clone())")
        start, size = table.untyped_storage().data_ptr(), table.untyped_storage().nbytes()
        if start <= got.data_ptr() < start + size:
            _fail(name, "you returned a view into the model's embedding table", case=case,
                  hint=".clone() it: otherwise changing one changes the other")
        if not torch.equal(table.detach(), before):
            _fail(name, "your function changed the model's embedding table", case=case,
                  hint="only read the table (table[ids]); add_meta_tokens writes the new rows later")
        if _same(got, exp):
            continue
        bos = tokenizer.bos_token_id
        rows = before[ids]
        if bos is not None and _same(got, torch.cat([before[[bos]], rows]).mean(0)):
            _fail(name, "your mean includes the <s> token the tokenizer adds at the start", case=case,
                  hint="tokenizer(text, add_special_tokens=False)['input_ids'] gives the characters only")
        if bos is not None and how == "first" and _same(got, before[bos]):
            _fail(name, "you took the <s> token the tokenizer adds at the start", case=case,
                  hint="tokenizer(text, add_special_tokens=False)['input_ids'] gives the characters only")
        if how == "mean" and len(ids) > 1 and _same(got, rows[0]):
            _fail(name, f"you used only the first token of {text!r} ({len(ids)} tokens): that is the official "
                        f"code's rule (how='first'), not the mean this exercise asks for", case=case,
                  hint="average the embeddings of ALL its tokens: table[ids].mean(0)")
        if how == "first" and len(ids) > 1 and _same(got, rows.mean(0)):
            _fail(name, f"you averaged the {len(ids)} tokens of {text!r}; the official code takes the first only",
                  case=case, hint="table[ids[0]]: the official initial_start_token rule")
        if len(ids) > 1 and _same(got, rows[-1]):
            _fail(name, f"you used only the last token of {text!r} ({len(ids)} tokens)", case=case,
                  hint="average the embeddings of ALL its tokens: table[ids].mean(0)" if how == "mean"
                  else "the official code takes the FIRST token: table[ids[0]]")
        if len(ids) > 1 and _same(got, rows.sum(0)):
            _fail(name, "you summed the token embeddings", case=case,
                  hint="the mean keeps the size of an ordinary embedding: .mean(0), not .sum(0)" if how == "mean"
                  else "the official code takes the first token's row: table[ids[0]]")
        rule = "the mean embedding of the tokens" if how == "mean" else "the embedding of the first of the tokens"
        _fail(name, f"the embedding differs from {rule} {ids} of {text!r} "
                    f"(max difference {float((got.double() - exp.double()).abs().max()):.3g})", case=case,
              hint="model.get_input_embeddings().weight[ids].mean(0), with ids from the tokenizer "
                   "without special tokens" if how == "mean" else
                   "model.get_input_embeddings().weight[ids[0]], with ids from the tokenizer without special tokens")
    _passed(name, f"{len(texts)} texts on a random tiny model" + (", official first-token rule" if how == "first" else ""))


# ============================================================================ notebook 04: mixing

def check_mix_hidden(fn: Callable, seed: int = 0) -> None:
    """Exercise: the official hidden-state mixing,
    ``fn(lm_head, h_init, h_thought, w) -> log_softmax(lm_head((1 - w) * h_init + w * h_thought))``
    of shape (..., vocab); w (...) weights the THOUGHT and is unbounded
    (reference :func:`qstar_mini.mixing.mix_log_probs` in mode "hidden")."""
    name = "check_mix_hidden"
    g = torch.Generator().manual_seed(seed)
    hidden, vocab = 8, 11
    head = torch.nn.Linear(hidden, vocab, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g, dtype=torch.float64))
    shapes = [(3,), (2, 4), (2, 3, 5, 2)]
    for lead in shapes:
        h0 = torch.randn(*lead, hidden, generator=g, dtype=torch.float64)
        h1 = torch.randn(*lead, hidden, generator=g, dtype=torch.float64)
        w = torch.randn(*lead, generator=g, dtype=torch.float64) * 1.5            # unbounded
        w.view(-1)[0], w.view(-1)[-1] = 0.0, 1.0
        case = f"h_init, h_thought of shape {tuple(h0.shape)}, w of shape {tuple(w.shape)} (values {w.min():.2f}..{w.max():.2f})"
        ins = [t.clone().requires_grad_(True) for t in (h0, h1, w)]
        got = _need_tensor(name, _call(name, fn, (head, *ins), case,
                                       "fn(lm_head, h_init (..., hidden), h_thought (..., hidden), w (...)) -> (..., vocab)",
                                       "w has no hidden axis: broadcast it against the states with w[..., None]"),
                           "log p^talk", case)
        _need_shape(name, got, (*lead, vocab), "log p^talk", case,
                    hint="w has no hidden axis: broadcast it with w[..., None]; apply lm_head to the mixed hidden state")
        ref_ins = [t.clone().requires_grad_(True) for t in (h0, h1, w)]
        exp = mix_log_probs(head, *ref_ins, "hidden")
        if not _same(got, exp, atol=1e-8):
            with torch.no_grad():
                wv = w[..., None]
                lp0, lp1 = torch.log_softmax(head(h0), -1), torch.log_softmax(head(h1), -1)
                mix = head((1 - wv) * h0 + wv * h1)
                alternatives = [
                    (torch.log_softmax(head(wv * h0 + (1 - wv) * h1), -1),
                     "you weighted the BASE state with w", "in the official code w weights the thought: "
                     "(1 - w) * h_init + w * h_thought (the paper's w, on log-probs, weights the base: opposite sides)"),
                    ((1 - wv) * lp0 + wv * lp1, "you mixed log-probabilities (the paper's formula)",
                     "the official code mixes the HIDDEN states, then applies lm_head and log_softmax"),
                    (wv * lp0 + (1 - wv) * lp1, "you mixed log-probabilities, w on the base (the paper's formula)",
                     "here: the official code, (1 - w) * h_init + w * h_thought, then lm_head and log_softmax"),
                    (mix, "you returned logits", "finish with torch.log_softmax(..., dim=-1)"),
                    (torch.softmax(mix, -1), "you returned probabilities", "use log_softmax, not softmax"),
                ]
            for value, what, hint in alternatives:
                if _same(got, value, atol=1e-8):
                    _fail(name, what, hint, case)
            diff = (got.detach() - exp.detach()).abs()
            _fail(name, f"log p^talk differs from the reference (max difference {float(diff.max()):.3g})", case=case,
                  hint="log_softmax(lm_head((1 - w[..., None]) * h_init + w[..., None] * h_thought), dim=-1)")
        weights = torch.randn(got.shape, generator=g, dtype=torch.float64)
        grads_got = torch.autograd.grad((got * weights).sum(), ins, allow_unused=True)
        grads_exp = torch.autograd.grad((exp * weights).sum(), ref_ins)
        for label, gg, ge in zip(("h_init", "h_thought", "w"), grads_got, grads_exp):
            if gg is None or not bool(gg.abs().sum() > 0):
                _fail(name, f"no gradient reaches {label}", case=case,
                      hint=("the mixing head learns through w: do not .detach() it or turn it into a number"
                            if label == "w" else f"do not .detach() {label}: the LM learns through it"))
            if not _same(gg, ge, atol=1e-8):
                _fail(name, f"the gradient with respect to {label} differs from the reference's", case=case,
                      hint="use only differentiable torch operations on the inputs")
    _passed(name, f"{len(shapes)} shapes, w unbounded, values and gradients")


# ============================================================================ notebook 05: losses

def _target_cases(seed: int):
    g = torch.Generator().manual_seed(seed)
    cases = [((6, 4), 6, 2), ((5,), 5, 1), ((7, 3, 5), 7, 3)]
    for _ in range(3):
        seq = int(torch.randint(3, 10, (1,), generator=g))
        n_true = int(torch.randint(1, min(4, seq - 1) + 1, (1,), generator=g))
        cases.append((tuple(_random_lengths(g, int(torch.randint(1, 4, (1,), generator=g)), seq)), seq, n_true))
    out = []
    for lengths, seq, n_true in cases:
        am = _padding_mask(lengths, seq)
        ids = torch.randint(4, 40, am.shape, generator=g).masked_fill(am == 0, 0)
        out.append((ids, am, n_true))
    return out


def check_future_targets(fn: Callable, seed: int = 0) -> None:
    """Exercise: ``fn(input_ids, attention_mask, n_true) -> (targets, valid)``, both
    (batch, seq, n_true): targets[b, j, i] = x_{j+1+i}, valid False past the end or on padding
    (reference :func:`qstar_mini.losses.future_targets`). Targets are compared where valid."""
    name = "check_future_targets"
    cases = _target_cases(seed)
    for ids, am, n_true in cases:
        case = f"input_ids={_fmt(ids)}, attention_mask={_fmt(am)}, n_true={n_true}"
        exp_t, exp_v = future_targets(ids, am, n_true)
        out = _call(name, fn, (ids.clone(), am.clone(), n_true), case,
                    "fn(input_ids (batch, seq), attention_mask (batch, seq), n_true) -> (targets, valid)")
        if not (isinstance(out, tuple) and len(out) == 2):
            _fail(name, f"return a pair (targets, valid); got {type(out).__name__}", case=case)
        got_t = _need_tensor(name, out[0], "targets", case)
        got_v = _need_tensor(name, out[1], "valid", case)
        shape = (*ids.shape, n_true)
        _need_shape(name, got_t, shape, "targets", case, hint="one target per (sequence, position j, offset i)")
        _need_shape(name, got_v, shape, "valid", case)
        if got_v.dtype != torch.bool:
            _fail(name, f"valid has dtype {got_v.dtype}, expected torch.bool", case=case)
        if got_t.is_floating_point() or got_t.dtype == torch.bool:
            _fail(name, f"targets have dtype {got_t.dtype}, expected torch.long (token ids)", case=case)
        if bool((got_t < 0).any()):
            _fail(name, "some targets are negative (e.g. -100 or -1 where invalid)", case=case,
                  hint="targets feed .gather(), so every entry must be a real id: put 0 where valid is False")
        seq = ids.shape[1]
        j = torch.arange(seq)[:, None]
        i = torch.arange(n_true)[None, :]
        if not torch.equal(got_v, exp_v):
            past_end = (j + 1 + i >= seq)[None].expand_as(exp_v)
            extra, missing = got_v & ~exp_v, exp_v & ~got_v
            b, pos, off = (extra | missing).nonzero()[0].tolist()
            where = f"e.g. batch row {b}, position j={pos}, offset i={off} (target index j+1+i={pos + 1 + off})"
            if bool((extra & past_end).any()):
                _fail(name, f"targets past the end of the sequence are marked valid, {where}", case=case,
                      hint="x_{j+1+i} exists only when j + 1 + i < seq")
            if bool(extra.any()):
                _fail(name, f"padding tokens are marked as valid targets, {where}", case=case,
                      hint="valid also needs attention_mask at index j + 1 + i")
            _fail(name, f"real targets are marked invalid, {where}", case=case,
                  hint="valid[b, j, i] is True iff j + 1 + i < seq and attention_mask[b, j + 1 + i] == 1")
        if torch.equal(got_t[exp_v], exp_t[exp_v]):
            continue
        idx = (j + i).clamp(max=seq - 1)
        if torch.equal(got_t[exp_v], ids[:, idx][exp_v]):
            _fail(name, "targets are off by one: you gave x_{j+i}, the token the model already sees at offset 0",
                  case=case, hint="the thought after x_j predicts the NEXT token first: targets[b, j, i] = x_{j+1+i}")
        idx2 = (j + 2 + i).clamp(max=seq - 1)
        if torch.equal(got_t[exp_v], ids[:, idx2][exp_v]):
            _fail(name, "targets are off by one: you gave x_{j+2+i}", case=case,
                  hint="offset 0 is the very next token: targets[b, j, i] = x_{j+1+i}")
        b, pos, off = ((got_t != exp_t) & exp_v).nonzero()[0].tolist()
        _fail(name, f"targets differ at batch row {b}, position j={pos}, offset i={off}: got {int(got_t[b, pos, off])}, "
                    f"expected x_{pos + 1 + off} = {int(exp_t[b, pos, off])}", case=case,
              hint="index input_ids with j + 1 + i: torch.arange(seq)[:, None] + 1 + torch.arange(n_true)")
    _passed(name, f"{len(cases)} random padded batches, n_true 1-4")


def _loss_cases(seed: int):
    """(valid, log_p_talk with requires_grad, garbage in invalid entries) for several sizes."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for n_thoughts, lengths, seq, n_true in [(2, (6, 4), 6, 2), (4, (5, 5, 2), 5, 1), (3, (7, 3), 7, 3)]:
        am = _padding_mask(lengths, seq)
        ids = torch.randint(4, 40, am.shape, generator=g)
        _, valid = future_targets(ids, am, n_true)
        lp = -torch.rand(len(lengths), n_thoughts, seq, n_true, generator=g, dtype=torch.float64) * 3
        garbage = -50 * torch.rand(lp.shape, generator=g, dtype=torch.float64)  # differs per thought,
        lp = torch.where(valid[:, None], lp, garbage)       # as log p^talk computed on padding does
        cases.append((valid, lp, am))
    return cases


def check_rewards(fn: Callable, seed: int = 0) -> None:
    """Exercise: ``fn(log_p_talk, valid) -> r`` (batch, n_thoughts, seq): each thought's summed
    log p^talk of its valid true tokens, minus the mean over the thoughts of the same position,
    without gradient (reference :func:`qstar_mini.losses.rewards` with baseline "mean")."""
    name = "check_rewards"
    cases = _loss_cases(seed)
    for valid, lp, _ in cases:
        b, n, seq, n_true = lp.shape
        case = f"log_p_talk of shape {tuple(lp.shape)} (batch, n_thoughts, seq, n_true), valid of shape {tuple(valid.shape)}"
        lp_in = lp.clone().requires_grad_(True)
        got = _need_tensor(name, _call(name, fn, (lp_in, valid.clone()), case,
                                       "fn(log_p_talk (batch, n_thoughts, seq, n_true), valid (batch, seq, n_true)) -> (batch, n_thoughts, seq)"),
                           "the reward", case)
        if tuple(got.shape) == (b, n, seq, n_true):
            _fail(name, f"the reward has shape {tuple(got.shape)}: one per offset", case=case,
                  hint="one reward per thought: sum log p^talk over the n_true offsets (the last axis)")
        _need_shape(name, got, (b, n, seq), "the reward", case)
        if got.requires_grad:
            _fail(name, "the reward carries gradient (requires_grad=True)", case=case,
                  hint="a reward is a number that weights log p(T_j), not something to optimise: "
                       "start from log_p_talk.detach()")
        exp = rewards(lp, valid, "mean")
        if _same(got, exp):
            continue
        masked = lp.masked_fill(~valid[:, None], 0.0)
        score = masked.sum(-1)
        loo = score - (score.sum(1, keepdim=True) - score) / max(n - 1, 1)
        alternatives = [
            (score, "no baseline: you returned each thought's total log p^talk",
             "subtract the mean over the thoughts of the same position: score - score.mean(dim=1, keepdim=True)"),
            (-exp, "the sign is flipped", "the reward is log p^talk (higher = better), not the NLL"),
            (lp.sum(-1) - lp.sum(-1).mean(1, keepdim=True), "invalid entries (past the end, padding) were summed",
             "zero them first: log_p_talk.masked_fill(~valid[:, None], 0) (valid has no thought axis)"),
            (masked.mean(-1) - masked.mean(-1).mean(1, keepdim=True), "you averaged over the n_true offsets",
             "sum over the offsets (the log-prob of the whole continuation): .sum(-1)"),
            (score - score.mean(2, keepdim=True), "the baseline is a mean over POSITIONS (dim 2)",
             "the baseline is the mean over the n_thoughts thoughts of the same position: dim=1"),
            (score - score.mean(0, keepdim=True), "the baseline is a mean over the BATCH (dim 0)",
             "the baseline is the mean over the n_thoughts thoughts of the same position: dim=1"),
            (loo, "you used a leave-one-out baseline (the mean of the OTHER thoughts)",
             "the official baseline is the plain mean over all thoughts, the thought itself included"),
        ]
        for value, what, hint in alternatives:
            if _same(got, value.detach()):
                _fail(name, what, hint, case)
        bi, ni, ji = (~torch.isclose(got.detach().double(), exp, atol=1e-6)).nonzero()[0].tolist()
        _fail(name, f"rewards differ, first at (batch {bi}, thought {ni}, position {ji}): got "
                    f"{float(got[bi, ni, ji]):.4f}, expected {float(exp[bi, ni, ji]):.4f}", case=case,
              hint="score = sum over valid offsets of log p^talk; r = score - score.mean(dim=1, keepdim=True)")
    _passed(name, f"{len(cases)} random batches, 2-4 thoughts, padding")


def check_reinforce_loss(fn: Callable, seed: int = 0) -> None:
    """Exercise: ``fn(r, thought_logprobs, think) -> (per_thought, scalar)``: per thought
    ``-max(r, 0) * log p(T_j)`` (0 where not thinking), and its mean over thinking positions
    and thoughts; no gradient into r (reference :func:`qstar_mini.losses.reinforce_loss`,
    clamp on)."""
    name = "check_reinforce_loss"
    g = torch.Generator().manual_seed(seed)
    sizes = [(2, 2, 6, 3), (1, 4, 5, 5), (3, 3, 4, 2)]
    for b, n, seq, n_sampled in sizes:
        r = torch.randn(b, n, seq, generator=g, dtype=torch.float64)
        r[0, 0, 0], r[0, 1, 0] = 0.7, -0.7                                        # both signs for sure
        lp = -torch.rand(b, n, seq, n_sampled, generator=g, dtype=torch.float64) * 4
        think = torch.rand(b, seq, generator=g) < 0.75
        think[0, 0], think[-1, -1] = True, False
        case = (f"r of shape {tuple(r.shape)} (batch, n_thoughts, seq), thought_logprobs of shape "
                f"{tuple(lp.shape)}, think of shape {tuple(think.shape)}")
        r_in, lp_in = r.clone().requires_grad_(True), lp.clone().requires_grad_(True)
        out = _call(name, fn, (r_in, lp_in, think.clone()), case,
                    "fn(r (batch, n_thoughts, seq), thought_logprobs (batch, n_thoughts, seq, t - 2), think (batch, seq)) "
                    "-> (per_thought (batch, n_thoughts, seq), scalar)")
        if not (isinstance(out, tuple) and len(out) == 2):
            _fail(name, f"return a pair (per_thought_loss, scalar_loss); got {type(out).__name__}", case=case)
        per, scalar = _need_tensor(name, out[0], "per_thought", case), _need_tensor(name, out[1], "the scalar loss", case)
        _need_shape(name, per, (b, n, seq), "per_thought", case,
                    hint="log p(T_j) sums the t - 2 sampled tokens (last axis); one loss per thought")
        if scalar.dim() != 0:
            _fail(name, f"the scalar loss has shape {tuple(scalar.shape)}, expected ()", case=case)
        exp_per, exp_scalar = reinforce_loss(r, lp, think, clamp_negative=True)
        mask = think[:, None].expand(b, n, seq)
        if not _same(per, exp_per):
            unclamped, _ = reinforce_loss(r, lp, think, clamp_negative=False)
            logp = lp.sum(-1)
            alternatives = [
                (unclamped, "negative rewards were not clamped: worse-than-average thoughts are pushed down too",
                 "the official code keeps only r > 0: r.clamp(min=0) (with two thoughts, only the better one learns)"),
                (-exp_per, "the sign is flipped: minimising your loss makes good thoughts LESS likely",
                 "loss = -r * log p(T_j)"),
                ((-r.clamp(min=0) * logp), "positions where think is False got a loss",
                 "zero the loss where think is False (padding, no target): think[:, None]"),
                ((-(r > 0).double() * logp).masked_fill(~mask, 0), "you used only the indicator 1[r > 0]",
                 "multiply by the reward itself: -r * 1[r > 0] * log p(T_j) = -r.clamp(min=0) * log p(T_j)"),
                ((-r.clamp(min=0) * lp.mean(-1)).masked_fill(~mask, 0), "log p(T_j) is a mean of token log-probs",
                 "the log-probability of the thought is the SUM over its sampled tokens"),
            ]
            for value, what, hint in alternatives:
                if _same(per, value.detach()):
                    _fail(name, what, hint, case)
            bi, ni, ji = (~torch.isclose(per.detach().double(), exp_per, atol=1e-6)).nonzero()[0].tolist()
            _fail(name, f"per_thought differs, first at (batch {bi}, thought {ni}, position {ji}): got "
                        f"{float(per[bi, ni, ji]):.4f}, expected {float(exp_per[bi, ni, ji]):.4f} "
                        f"(r = {float(r[bi, ni, ji]):.4f}, think = {bool(think[bi, ji])})", case=case,
                  hint="-r.clamp(min=0) * thought_logprobs.sum(-1), then 0 where think is False")
        if not _same(scalar, exp_scalar):
            if _same(scalar, exp_per.mean()):
                _fail(name, "the scalar is the mean over ALL entries, non-thinking positions included", case=case,
                      hint="average over thinking positions (and all thoughts) only: sum / mask.sum()")
            if _same(scalar, exp_per.sum()):
                _fail(name, "the scalar is a sum", case=case,
                      hint="take the mean over thinking positions and thoughts, so it does not grow with the batch")
            _fail(name, f"the scalar loss is {float(scalar):.4f}, expected {float(exp_scalar):.4f}", case=case,
                  hint="mean of per_thought over the entries where think is True")
        if not scalar.requires_grad:
            _fail(name, "the loss carries no gradient", case=case,
                  hint="REINFORCE trains the LM through thought_logprobs: do not .detach() them or use .item()")
        scalar.backward()
        if r_in.grad is not None and bool(r_in.grad.abs().sum() > 0):
            _fail(name, "gradient flows into the reward r", case=case,
                  hint="detach the reward (r = r.detach()): REINFORCE differentiates only log p(T_j)")
        lp_ref = lp.clone().requires_grad_(True)
        reinforce_loss(r, lp_ref, think)[1].backward()
        if lp_in.grad is None or not _same(lp_in.grad, lp_ref.grad, atol=1e-9):
            _fail(name, "the gradient with respect to thought_logprobs differs from the reference's", case=case,
                  hint="the loss must stay a differentiable function of thought_logprobs (no .item(), no .detach())")
    _passed(name, f"{len(sizes)} random batches, rewards of both signs, values and gradients")
