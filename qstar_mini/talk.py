"""Talk: what the model predicts *after* its thought (Algorithm 1, lines 2d-2e).

After T_j ends with ``<|endofthought|>`` the model must predict the true continuation
x_{j+1}, x_{j+2}, ..., x_{j+n_true}. The paper supervises n_true tokens, not just the next
one ("non-myopic"): the true tokens are fed back one by one after the thought (teacher
forcing), so offset i's prediction is made from::

    [x_0 .. x_j,  <|startofthought|> s_1 .. s_{t-2} <|endofthought|>,  x_{j+1} .. x_{j+i}]
                                                                 ^ predicts x_{j+i+1}

Offset 0 is read at ``<|endofthought|>`` itself (:attr:`Thoughts.h_end`); offsets
1 .. n_true - 1 need n_true - 1 more masked steps, one per offset, all positions at once,
exactly like the thought steps (the talk mask *is* the thought mask of later steps).

``h_thought`` has shape ``(batch, n_thoughts, seq, n_true, hidden)``: for every position j,
thought n and offset i, the post-thought hidden state that predicts x_{j+1+i}.
"""

from __future__ import annotations

import torch
from torch import nn

from qstar_mini.fast.attention import masked_step
from qstar_mini.lm import body, forward_hidden
from qstar_mini.masks import step_position_ids
from qstar_mini.meta_tokens import MetaTokens
from qstar_mini.thoughts import Thoughts


def shift_left(x: torch.Tensor, i: int, fill=0) -> torch.Tensor:
    """x shifted so that position j holds x_{j+i}; the last i positions get ``fill``.

    x: (batch, seq, ...).  returns: same shape.
    """
    if i == 0:
        return x
    pad = torch.full_like(x[:, :i], fill)
    return torch.cat([x[:, i:], pad], dim=1)


def talk_hidden(model: nn.Module, meta: MetaTokens, thoughts: Thoughts, input_ids: torch.Tensor,
                n_true: int) -> torch.Tensor:
    """Algorithm 1, line 2d: h^thought_{j:j+n_true}, the hidden states after each thought.

    input_ids: (batch, seq). thoughts: from :func:`qstar_mini.thoughts.generate_thoughts`
    (its cache is extended in place by n_true - 1 steps).
    returns: h_thought (batch, n_thoughts, m, n_true, hidden); offset i predicts x_{j+1+i}
    (m = seq, or the number of thinking positions if the thoughts were made for some only).
    Entries whose teacher-forced tokens run past the sequence are computed on padding and
    must be masked by the caller (:func:`qstar_mini.losses.future_targets` says which).
    """
    batch, n_thoughts, m, hidden = thoughts.h_end.shape
    seq = input_ids.shape[1]
    text = input_ids.repeat_interleave(n_thoughts, 0)                      # (rows, seq)
    states = [thoughts.h_end]
    for i in range(1, n_true):
        k = thoughts.steps_done + 1
        if thoughts.positions is None:
            token = shift_left(text, i)                                    # x_{j+i}: (rows, seq)
        else:
            token = text.gather(1, (thoughts.positions + i).clamp(max=seq - 1))  # (rows, m)
        with masked_step(model, thoughts.attention, seq, m, k, thoughts.attention_mask, thoughts.positions,
                         thoughts.cache):
            h = forward_hidden(model, meta.embed(model, token), thoughts.masks[..., : seq + m * k],
                               step_position_ids(thoughts.attention_mask, k, thoughts.positions),
                               thoughts.cache)
        thoughts.steps_done = k
        states.append(h.view(batch, n_thoughts, m, hidden))
    return torch.stack(states, dim=3)


@torch.no_grad()
def naive_talk(model: nn.Module, meta: MetaTokens, input_ids: torch.Tensor,
               attention_mask: torch.Tensor, thought_ids: torch.Tensor, n_true: int) -> torch.Tensor:
    """Reference for :func:`talk_hidden`: each ``[x_{<=j}; T_j; x_{j+1:j+i}]`` run on its own.

    thought_ids: (batch, n_thoughts, seq, t).
    returns: (batch, n_thoughts, seq, n_true, hidden); entries whose teacher-forced tokens
    would run past the real sequence are 0.
    """
    batch, n_thoughts, seq, _ = thought_ids.shape
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    dtype = model.get_input_embeddings().weight.dtype
    out = torch.zeros(batch, n_thoughts, seq, n_true, hidden, dtype=dtype)
    for b in range(batch):
        length = int(attention_mask[b].sum())
        for n in range(n_thoughts):
            for j in range(length):
                n_teacher = min(n_true - 1, length - 1 - j)       # true tokens that exist
                tokens = torch.cat([input_ids[b, : j + 1].cpu(), thought_ids[b, n, j].cpu(),
                                    input_ids[b, j + 1: j + 1 + n_teacher].cpu()])
                embeds = meta.embed(model, tokens[None].to(input_ids.device))
                h = body(model)(inputs_embeds=embeds, use_cache=False).last_hidden_state[0]
                end = j + thought_ids.shape[-1]                   # index of <|endofthought|>
                out[b, n, j, : n_teacher + 1] = h[end: end + n_teacher + 1].cpu()
    return out
