"""Think: a thought after every token, all positions in parallel (Algorithm 1, lines 1-2b/c).

Shapes used throughout (the paper's letters where it has them)::

    batch      b   sequences in the mini-batch
    seq        l   tokens per sequence; position j = 0 .. l-1
    n_thoughts     thoughts sampled per position (official ``n_passes``)
    t              thought length incl. both meta-tokens (official ``n_ahead`` = t + 1)
    hidden         model width;  vocab  vocabulary size

**What is T_j?** The thought after position j is a row of t token ids::

    T_j = [<|startofthought|>, s_1, ..., s_{t-2}, <|endofthought|>]

sampled n_thoughts times for every position of every sequence, so all thoughts of a batch
form one tensor ``ids`` of shape ``(batch, n_thoughts, seq, t)``; ``ids[b, n, j]`` is T_j of
sequence b, thought n. The meta-tokens are forced at the first and last step; the t - 2
tokens between them are sampled and can never be a meta-token.

**How is it parallel?** Step k feeds one token per position, ``(batch * n_thoughts, seq)``
tokens at once, against a KV cache that holds the text and the earlier steps; the mask of
:mod:`qstar_mini.masks` keeps each position's thought to itself. So t forward passes make
every thought of the batch, instead of seq * t passes one position at a time.
:func:`naive_thoughts` is that slow loop, written plainly, to check against.

**Sampling** follows the official code: hard Gumbel-max, ``argmax(logits / T + g)`` with
``g ~ Gumbel(0, 1)``, which is exact sampling at temperature T (the official code's Gumbel
``tau`` does not matter for the hard sample, so T = 1). The noise g is injectable, so the
parallel and the naive generation can be given the same noise and must then agree token
for token. The log-probability of each sampled token, at the REINFORCE temperature, keeps
its graph: it is what REINFORCE differentiates (:mod:`qstar_mini.losses`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qstar_mini.fast.attention import masked_step
from qstar_mini.fast.block_attention import step_cache
from qstar_mini.lm import body, forward_hidden, lm_head, new_cache, text_log_probs
from qstar_mini.masks import all_step_masks, causal_mask, check_right_padded, step_position_ids
from qstar_mini.meta_tokens import MetaTokens


@dataclass
class Thoughts:
    """Everything :func:`generate_thoughts` makes, and what the talk step continues from.

    ids:      (batch, n_thoughts, seq, t)      T_j for every position; [..., 0] = start,
                                                [..., -1] = end meta-token
    logprobs: (batch, n_thoughts, seq, t - 2)  log p(s_k | x_{<=j}, <|startofthought|>, s_{<k})
                                                at the REINFORCE temperature, with graph
    h_end:    (batch, n_thoughts, seq, hidden) hidden state at <|endofthought|>: the
                                                post-thought state of offset 0
    cache:    DynamicCache of batch * n_thoughts rows: text + t thought steps
    masks:    (batch * n_thoughts, 1, m, seq + m * steps) the last step's additive mask;
                                                step k uses its first seq + m * k keys
    attention_mask: (batch * n_thoughts, seq)  the padding mask, one row per thought
    positions: (batch * n_thoughts, m) or None  the thinking positions (None: all, m = seq)
    steps_done: int                             masked steps fed so far (= t)
    attention: str                              how masked steps attend (qstar_mini.fast.attention)

    With ``positions`` given, the seq axis of ids, logprobs and h_end has length m instead.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    h_end: torch.Tensor
    cache: object
    masks: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor | None
    steps_done: int
    attention: str = "mask"


def plain_forward(model: nn.Module, meta: MetaTokens, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor):
    """Algorithm 1, line 1: h_init <- hidden states of X (an ordinary causal pass).

    input_ids, attention_mask: (batch, seq), right-padded.
    returns: h_init (batch, seq, hidden) and the KV cache of the text (batch rows).
    """
    check_right_padded(attention_mask)
    cache = new_cache()
    dtype = model.get_input_embeddings().weight.dtype
    h_init = forward_hidden(model, meta.embed(model, input_ids), causal_mask(attention_mask, dtype),
                            step_position_ids(attention_mask, 0), cache)
    return h_init, cache


def gumbel_noise(shape, generator: torch.Generator | None = None, device=None,
                 dtype=torch.float32) -> torch.Tensor:
    """Standard Gumbel noise g = -log(-log(u)), u ~ Uniform(0, 1), of the given shape, on ``device``.

    u is drawn where the generator lives and then moved, so a CPU generator gives the same noise
    (and the same thoughts, wherever the logits agree) on a CPU and on a GPU; a generator on the
    GPU draws there (faster for large vocabularies, but another random stream).
    """
    u = torch.rand(shape, generator=generator, device=generator.device if generator else device, dtype=dtype)
    if device is not None:
        u = u.to(device)
    tiny = torch.finfo(dtype).tiny
    return u.clamp_(tiny, 1.0 - 1e-7).log_().neg_().log_().neg_()       # -log(-log(u)), in place: vocab-sized


def sample_tokens(logits: torch.Tensor, meta_ids: tuple[int, ...], temperature: float = 1.0,
                  noise: torch.Tensor | None = None, greedy: bool = False) -> torch.Tensor:
    """Hard Gumbel-max sampling that can never pick a meta-token.

    logits: (..., vocab).  noise: (..., vocab) Gumbel noise or None (then drawn fresh).
    returns: (...,) long token ids.
    """
    scores = text_log_probs(logits.detach(), meta_ids, temperature)
    if not greedy:
        if noise is None:
            noise = gumbel_noise(scores.shape, device=scores.device, dtype=scores.dtype)
        scores += noise.to(scores.dtype)                       # in place: scores is a fresh tensor
    return scores.argmax(-1)


def generate_thoughts(model: nn.Module, meta: MetaTokens, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, cache, thought_length: int, n_thoughts: int,
                      extra_steps: int = 0, *, thought_temperature: float = 1.0,
                      reinforce_temperature: float = 1.0, greedy: bool = False,
                      noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None,
                      positions: torch.Tensor | None = None,
                      attention: str = "mask") -> Thoughts:
    """Algorithm 1, lines 2b-2c: sample T_j for every position j, n_thoughts times, in parallel.

    input_ids, attention_mask: (batch, seq), right-padded; ``cache`` from :func:`plain_forward`
    (batch rows; it is repeated to batch * n_thoughts rows here, thought n of sequence b in
    row b * n_thoughts + n).
    thought_length: t, incl. both meta-tokens. ``extra_steps``: talk steps that will follow
    (their keys are included in the mask built here, once).
    noise: (batch, n_thoughts, m, t - 2, vocab) Gumbel noise, or None to draw it from
    ``generator``. greedy: argmax instead of sampling.
    positions: (batch, m) long, think only after these positions ("think where it matters",
    e.g. the answer); default every position, m = seq. Same thoughts, m / seq of the work.
    attention: ``"mask"`` (the model's attention with the dense Figure 3 mask), ``"blocks"`` or
    ``"flex"`` (the same numbers without computing the masked-out scores; :mod:`qstar_mini.fast.attention`).
    returns: :class:`Thoughts` (ids (batch, n_thoughts, m, t), logprobs (..., t - 2), ...).
    """
    batch, seq = input_ids.shape
    m = seq if positions is None else positions.shape[1]      # thinking positions per row
    rows = batch * n_thoughts
    n_sampled = thought_length - 2
    cache.batch_repeat_interleave(n_thoughts)                  # (rows, heads, seq, head_dim)
    mask_rows = attention_mask.repeat_interleave(n_thoughts, 0)             # (rows, seq)
    pos_rows = None if positions is None else positions.repeat_interleave(n_thoughts, 0)  # (rows, m)
    dtype = model.get_input_embeddings().weight.dtype
    masks = all_step_masks(mask_rows, thought_length + extra_steps, dtype, pos_rows)  # built once
    if attention == "blocks" and preallocation_works(model, meta):   # keys written in place, not copied
        limits = range(1, seq + 1) if pos_rows is None else pos_rows.amax(0) + 1   # text keys each query sees
        cache = step_cache(cache, thought_length + extra_steps, m, model, [int(x) for x in limits])
    if noise is not None:
        noise = noise.reshape(rows, m, n_sampled, -1)

    token = torch.full((rows, m), meta.start_id, dtype=torch.long, device=input_ids.device)
    ids, logprobs = [token], []
    h = None
    for k in range(1, thought_length + 1):                     # step k feeds thought token k
        with masked_step(model, attention, seq, m, k, mask_rows, pos_rows, cache):
            h = forward_hidden(model, meta.embed(model, token), masks[..., : seq + m * k],
                               step_position_ids(mask_rows, k, pos_rows), cache)  # (rows, m, hidden)
        if k == thought_length:
            break                                              # h is the state at <|endofthought|>
        if k == thought_length - 1:
            token = torch.full_like(token, meta.end_id)        # forced end meta-token
        else:
            logits = lm_head(model)(h)                         # (rows, m, vocab)
            step_noise = None if noise is None else noise[:, :, k - 1]
            if step_noise is None and not greedy:
                step_noise = gumbel_noise(logits.shape, generator, device=logits.device)
            token = sample_tokens(logits, meta.ids, thought_temperature, step_noise, greedy)
            logp = text_log_probs(logits, meta.ids, reinforce_temperature)   # (rows, m, vocab)
            logprobs.append(logp.gather(-1, token[..., None])[..., 0])       # (rows, m)
        ids.append(token)

    return Thoughts(
        ids=torch.stack(ids, -1).view(batch, n_thoughts, m, thought_length),
        logprobs=torch.stack(logprobs, -1).view(batch, n_thoughts, m, n_sampled),
        h_end=h.view(batch, n_thoughts, m, -1),
        cache=cache, masks=masks, attention_mask=mask_rows, positions=pos_rows, steps_done=thought_length,
        attention=attention)


PREALLOCATION_KEY = "_qstar_preallocation_works"


def preallocation_works(model: nn.Module, meta: MetaTokens) -> bool:
    """Whether block attention over the preallocated cache gives this model the numbers of block
    attention over the concatenated cache: checked once per model (remembered on it) on two
    random rows, three thought steps and one talk step. False when the model computes its
    attention itself (outside the attention interface), or reads keys of other shapes: then the
    cache grows by concatenation, the same numbers, only slower."""
    works = getattr(model, PREALLOCATION_KEY, None)
    if works is None:
        vocab = model.get_input_embeddings().weight.shape[0]
        device = model.get_input_embeddings().weight.device
        allowed = torch.tensor([i for i in range(min(vocab, 512)) if i not in meta.ids])
        g = torch.Generator().manual_seed(0)
        ids = allowed[torch.randint(len(allowed), (2, 6), generator=g)].to(device)
        mask = torch.ones_like(ids)
        mask[1, 4:] = 0
        training = model.training
        model.eval()
        setattr(model, PREALLOCATION_KEY, False)          # the reference run below must concatenate
        try:
            with torch.no_grad():
                _, cache = plain_forward(model, meta, ids, mask)
                ref = generate_thoughts(model, meta, ids, mask, cache, 3, 1, 1, greedy=True, attention="blocks")
                setattr(model, PREALLOCATION_KEY, True)
                _, cache = plain_forward(model, meta, ids, mask)
                new = generate_thoughts(model, meta, ids, mask, cache, 3, 1, 1, greedy=True, attention="blocks")
                real = mask.bool()[:, None, :]
                works = bool(torch.allclose(new.h_end.float()[real], ref.h_end.float()[real], rtol=1e-3, atol=1e-4))
        except Exception:
            works = False
        finally:
            model.train(training)
        setattr(model, PREALLOCATION_KEY, works)
    return works


@torch.no_grad()
def naive_thoughts(model: nn.Module, meta: MetaTokens, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, thought_length: int, n_thoughts: int, *,
                   thought_temperature: float = 1.0, reinforce_temperature: float = 1.0,
                   greedy: bool = False, noise: torch.Tensor | None = None):
    """The reference: one position at a time, on plain concatenated sequences, no custom mask.

    For every sequence b, thought n and real position j it runs the model on
    ``[x_0 .. x_j, <|startofthought|>, s_1 .. s_{k-1}]`` from scratch to pick s_k. Slow
    (seq * t full passes per thought) and obviously right: :func:`generate_thoughts` must
    give the same tokens and log-probs.

    noise: (batch, n_thoughts, seq, t - 2, vocab) or None with greedy=True.
    returns: ids (batch, n_thoughts, seq, t) and logprobs (batch, n_thoughts, seq, t - 2);
    padded positions are left 0.
    """
    if noise is None and not greedy:
        raise ValueError("naive_thoughts needs the Gumbel noise (or greedy=True) to be comparable")
    batch, seq = input_ids.shape
    n_sampled = thought_length - 2
    ids = torch.zeros(batch, n_thoughts, seq, thought_length, dtype=torch.long)
    logprobs = torch.zeros(batch, n_thoughts, seq, n_sampled, dtype=torch.float64)
    for b in range(batch):
        length = int(attention_mask[b].sum())
        for n in range(n_thoughts):
            for j in range(length):
                thought = [meta.start_id]
                for k in range(n_sampled):
                    tokens = torch.cat([input_ids[b, : j + 1].cpu(), torch.tensor(thought)])
                    embeds = meta.embed(model, tokens[None].to(input_ids.device))
                    h = body(model)(inputs_embeds=embeds, use_cache=False).last_hidden_state[0, -1]
                    logits = lm_head(model)(h)                                  # (vocab,)
                    step_noise = None if greedy else noise[b, n, j, k]
                    token = int(sample_tokens(logits, meta.ids, thought_temperature, step_noise, greedy))
                    logprobs[b, n, j, k] = text_log_probs(logits, meta.ids, reinforce_temperature)[token]
                    thought.append(token)
                ids[b, n, j] = torch.tensor(thought + [meta.end_id])
    return ids, logprobs
