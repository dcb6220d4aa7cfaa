"""Before a model is trained: does it give its own numbers through qstar_mini's path?

qstar_mini runs a causal LM in pieces: the body on embeddings with a custom 4D mask and
explicit position ids, a KV cache grown one masked step at a time, and the LM head applied
separately. Most decoders in transformers allow exactly that, but some do things the pieces
would silently skip (a sliding window, ALiBi biases taken from the mask, logits post-processed
in ``forward``, embeddings scaled inside the embedding module). A wrong number without an
error is the worst thing a teaching tool can produce, so :func:`check_model`, called by
:func:`qstar_mini.step.prepare_model`, runs a small probe and refuses the model with one line
when anything differs:

1. h_init through :func:`qstar_mini.thoughts.plain_forward` against the model's own body;
2. the log-probs through :func:`qstar_mini.lm.lm_head` against the model's own logits;
3. one greedy thought token at every position, generated in parallel (with the Figure 3 mask,
   and with the config's faster attention, ``blocks`` or ``flex``, when it asks for one) against the naive one-position-at-a-
   time loop on plain concatenated text;
4. the embedding module: its rows are the table's rows times one scale (which the meta-tokens
   then share).

The probe is 2 rows of at most 8 random tokens, so it costs a few small forward passes.
"""

from __future__ import annotations

import torch
from torch import nn

from qstar_mini.config import QuietStarConfig
from qstar_mini.errors import ModelError
from qstar_mini.lm import body, lm_head
from qstar_mini.meta_tokens import MetaTokens, embedding_scale_of
from qstar_mini.thoughts import generate_thoughts, naive_thoughts, plain_forward

# Relative error allowed between the two paths, by the model's dtype: rounding differs
# between a fused causal kernel and our masked one, nothing else may.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 2e-3, torch.bfloat16: 6e-2, torch.float16: 2e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def probe_batch(model: nn.Module, meta: MetaTokens, cfg: QuietStarConfig):
    """Two right-padded rows of random non-meta token ids: (2, l') ids and mask, l' <= 8."""
    length = min(cfg.seq_len, 8)
    vocab = model.get_input_embeddings().weight.shape[0]
    allowed = torch.tensor([i for i in range(min(vocab, 512)) if i not in meta.ids])
    g = torch.Generator().manual_seed(0)
    ids = allowed[torch.randint(len(allowed), (2, length), generator=g)]
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, max(1, length - 2):] = 0
    device = model.get_input_embeddings().weight.device
    return ids.to(device), mask.to(device)


def check_model(model: nn.Module, meta: MetaTokens, cfg: QuietStarConfig) -> None:
    """Raise :class:`ModelError` (one line) unless the model's numbers through qstar_mini's
    path equal its own; see the module docstring. Runs without gradient, in eval mode."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            _probe(model, meta, cfg)
    finally:
        model.train(training)


def _probe(model: nn.Module, meta: MetaTokens, cfg: QuietStarConfig) -> None:
    name = type(model).__name__
    dtype = model.get_input_embeddings().weight.dtype
    tol = TOLERANCE.get(dtype, 6e-2)
    ids, mask = probe_batch(model, meta, cfg)
    real = mask.bool()

    table = model.get_input_embeddings()
    scale = embedding_scale_of(table)
    err = _rel(table(ids), table.weight[ids] * scale)
    if err > tol:
        raise ModelError(f"{name}'s embedding module does more than scale the rows of its table (relative "
                         f"difference {err:.2g}), so qstar_mini cannot give the meta-tokens their embeddings")

    h, cache = plain_forward(model, meta, ids, mask)
    try:
        own = body(model)(input_ids=ids, attention_mask=mask)
        own_logits = model(input_ids=ids, attention_mask=mask).logits
    except Exception as e:                                   # the model's own forward must work
        raise ModelError(f"{name} fails on a plain padded batch ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    err = _rel(h[real], own.last_hidden_state[real])
    if err > tol:
        raise ModelError(f"{name}'s hidden states through qstar_mini's 4D-mask path differ from its own forward "
                         f"(relative {err:.2g}); this architecture is not supported, see docs/setup.md, 'Supported models'")
    ours = torch.log_softmax(lm_head(model)(own.last_hidden_state[real]).double(), -1)
    theirs = torch.log_softmax(own_logits[real].double(), -1)
    err = _rel(ours, theirs)
    if err > tol:
        raise ModelError(f"{name} post-processes its logits in a way qstar_mini does not reproduce (log-probs "
                         f"differ by {err:.2g} relative); this architecture is not supported")

    _, naive_lp = naive_thoughts(model, meta, ids, mask, 3, 1, greedy=True)
    ways = ["mask"] + ([cfg.attention] if cfg.attention not in ("mask", "auto") else [])
    for way in ways:
        if way != "mask":                            # the first way used up the text's cache
            _, cache = plain_forward(model, meta, ids, mask)
        err = _parallel_error(model, meta, ids, mask, cache, naive_lp, way)
        if err > tol:
            how = f"attention={way!r}" if way != "mask" else "the Figure 3 mask"
            raise ModelError(f"{name}'s thoughts generated in parallel with {how} differ from the same thoughts "
                             f"written into the text one position at a time (relative {err:.2g}); "
                             + ("use attention='mask'" if way != "mask" else "this architecture is not supported"))
    if cfg.attention == "auto":
        resolve_attention(model, meta, cfg)


def _parallel_error(model, meta, ids, mask, cache, naive_lp, way: str) -> float:
    """Relative difference between greedy parallel thoughts (attention ``way``) and the naive loop's."""
    try:
        thoughts = generate_thoughts(model, meta, ids, mask, cache, 3, 1, greedy=True, attention=way)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"{type(model).__name__} fails in qstar_mini's parallel thought step ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''}); this architecture is not "
                         f"supported") from None
    # The greedy token's log-prob (the max) is continuous in the logits, so near-ties between
    # two tokens cannot make this comparison flaky the way comparing the ids would.
    real = mask.bool()
    return _rel(thoughts.logprobs[:, 0][real].cpu(), naive_lp[:, 0][real.cpu()].to(thoughts.logprobs.dtype).cpu())


AUTO_KEY = "_qstar_auto_attention"


def resolve_attention(model: nn.Module, meta: MetaTokens, cfg: QuietStarConfig) -> str:
    """The attention of the masked steps: ``cfg.attention``, with ``"auto"`` made concrete.

    ``"auto"`` (the default) is ``"blocks"``, the fastest exact path on a CPU, when this model's
    attention allows it and gives the naive loop's thoughts on a small probe, else ``"mask"``
    (e.g. attention soft-caps or sinks, which block attention refuses). Both give the same
    numbers. Decided once per model (remembered on the model object).
    """
    if cfg.attention != "auto":
        return cfg.attention
    chosen = getattr(model, AUTO_KEY, None)
    if chosen is None:
        training = model.training
        model.eval()
        try:
            with torch.no_grad():
                ids, mask = probe_batch(model, meta, cfg)
                _, naive_lp = naive_thoughts(model, meta, ids, mask, 3, 1, greedy=True)
                _, cache = plain_forward(model, meta, ids, mask)
                tol = TOLERANCE.get(model.get_input_embeddings().weight.dtype, 6e-2)
                try:
                    ok = _parallel_error(model, meta, ids, mask, cache, naive_lp, "blocks") <= tol
                except ModelError:
                    ok = False
        finally:
            model.train(training)
        chosen = "blocks" if ok else "mask"
        setattr(model, AUTO_KEY, chosen)
    return chosen


FEW_QUERIES = 256      # rows x thinking positions up to which gradient-free steps take the fused mask


def sampling_attention(model: nn.Module, meta: MetaTokens, cfg: QuietStarConfig, rows: int, m: int) -> str:
    """The attention of masked steps run without gradient (thinking at inference, the sampling of
    ``memory="rescore"``): :func:`resolve_attention`'s, except that ``"auto"`` takes ``"mask"``
    for a few queries (rows x m <= ``FEW_QUERIES``) when the model attends with sdpa. Without a
    backward to save, one fused sdpa call per layer then costs less than block attention's dozen
    small operator calls; both give the same numbers (``qstar-mini bench --goals`` times both).
    rows: sequences x thoughts per sequence; m: thinking positions per row."""
    chosen = resolve_attention(model, meta, cfg)
    fused = getattr(model.config, "_attn_implementation", None) == "sdpa"
    if cfg.attention == "auto" and chosen == "blocks" and fused and rows * m <= FEW_QUERIES:
        return "mask"
    return chosen
