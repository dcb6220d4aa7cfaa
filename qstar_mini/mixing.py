"""The mixing head: how much to trust the post-thought prediction (Algorithm 1, lines 2f-2g).

A freshly added thought is noise, and a model forced to use it would get worse before it got
better. So Quiet-STaR keeps the base prediction and learns a weight w that mixes in the
post-thought one: a shallow MLP reads the two hidden states ``[h_init; h_thought]`` of the
same (position, offset) and outputs one scalar.

Two variants, switchable with ``QuietStarConfig.mixing``. Mind that they use w for
*opposite* sides:

``"hidden"`` (the official code, the default)
    ``w`` weights the **thought**, is unbounded (no sigmoid), and mixes hidden states::

        h_talk = (1 - w) * h_init + w * h_thought;     log p^talk = log_softmax(lm_head(h_talk))

    Because the LM head is linear, this is exactly mixing the *logits* (not the log-probs).
    The head's last layer starts at zero, so w = 0 and the mix *is* the base prediction at
    the start of training, bit for bit. (Beware: at w = 0 every thought gets the same
    mixed prediction, so all rewards are 0 until the head has taken a step.) Option
    ``mixer_sigmoid=True`` bounds w to [0, 1]; with ``mixer_bias_init=-3`` it starts at 0.05:
    the tiny preset does that.

``"logprob"`` (the paper's formula)
    ``w`` in [0, 1] (a sigmoid) weights the **base** prediction, and log-probs are mixed::

        log p^talk = w * log p^init + (1 - w) * log p^thought

    This is a weighted geometric mean of the two distributions, not renormalised (as in the
    paper): ``-log p^talk`` of the true token is the w-weighted mean of the two NLLs. With the
    last layer at zero, w = sigmoid(mixer_bias_init) (0.5 without a bias); set
    ``mixer_bias_init`` high (e.g. 5) to start close to the base model.

**They are one mix, up to a normaliser.** log p = z - logsumexp(z) for logits z, and the
logsumexp is one number per row, so renormalising the paper's mix gives
``softmax(w * z_init + (1 - w) * z_thought)``: logit mixing, as in ``"hidden"``, with w and
1 - w swapped. What the paper's unnormalised formula adds is ``log Z = logsumexp_v(w log
p^init(v) + (1 - w) log p^thought(v))``, the same for every token of the row and <= 0 (Hölder's
inequality), so its NLL is always at least the renormalised one. Notebook 04 shows both.
"""

from __future__ import annotations

import torch
from torch import nn

from qstar_mini.config import MIXING_MODES
from qstar_mini.errors import ConfigError
from qstar_mini.lm import text_log_probs


OFFICIAL_INIT_STD = 0.02   # transformers' ``initializer_range``: the official head's N(0, 0.02)


class MixingHead(nn.Module):
    """Shallow MLP ``[h_init; h_thought] -> scalar``, last layer zero-initialised.

    ``depth`` hidden layers of ``mixer_hidden`` units (default: the model width), ReLU after
    each. Official code (``use_complex_talk_head``): depth 2, no bias on the last layer,
    ``Linear(2h, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, 1, bias=False)``.
    ``bias_init``: None for no last-layer bias (official), else its starting value.
    ``init``: the other layers' start, "official" (:func:`official_init`, what ``official()``'s
    ``mixer_init`` asks :func:`~qstar_mini.step.prepare_model` for) or "default" (PyTorch's).
    h_init, h_thought: (..., hidden).  returns: (...,) the raw score a.
    """

    def __init__(self, hidden: int, mixer_hidden: int | None = None, bias_init: float | None = None,
                 depth: int = 2, init: str = "default"):
        super().__init__()
        width = mixer_hidden or hidden
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(2 * hidden if i == 0 else width, width), nn.ReLU()]
        layers.append(nn.Linear(width, 1, bias=bias_init is not None))
        self.net = nn.Sequential(*layers)
        if init == "official":
            official_init(self.net)
        elif init != "default":
            raise ConfigError(f"unknown mixing-head init {init!r}; choose 'official' or 'default'")
        nn.init.zeros_(self.net[-1].weight)
        if bias_init is not None:
            nn.init.constant_(self.net[-1].bias, bias_init)

    def forward(self, h_init: torch.Tensor, h_thought: torch.Tensor) -> torch.Tensor:
        x = torch.cat([h_init, h_thought], dim=-1).to(self.net[0].weight.dtype)
        return self.net(x)[..., 0]


@torch.no_grad()
def official_init(net: nn.Sequential) -> None:
    """The official head's start: the model's ``_init_weights`` gives every ``nn.Linear`` of it
    weights N(0, 0.02) and biases 0 (PyTorch's own init would give U(+-1/sqrt(fan_in)) to
    both); the official forward then zeroes the last layer's weight on its first call, which
    :class:`MixingHead` does at once."""
    for layer in net:
        if isinstance(layer, nn.Linear):
            layer.weight.normal_(0.0, OFFICIAL_INIT_STD)
            if layer.bias is not None:
                layer.bias.zero_()


def _unknown_mode(mode: str) -> ConfigError:
    """Every mode has its own branch: a new one must be written, never fall back to another."""
    return ConfigError(f"unknown mixing mode {mode!r}; valid modes: {', '.join(MIXING_MODES)}")


def mixing_weight(head: MixingHead, h_init: torch.Tensor, h_thought: torch.Tensor, mode: str,
                  sigmoid: bool = False) -> torch.Tensor:
    """Algorithm 1, line 2f: w_{j:j+n_true}.

    h_init, h_thought: (..., hidden), e.g. (batch, n_thoughts, seq, n_true, hidden).
    returns: w (...): for mode "hidden" the thought's weight, unbounded as in the official code,
    or in [0, 1] with ``sigmoid=True`` (then ``mixer_bias_init=-3`` starts it at 0.05); for
    mode "logprob" the base's weight, always in [0, 1].
    """
    if mode == "hidden":
        a = head(h_init, h_thought)
        return torch.sigmoid(a) if sigmoid else a
    if mode == "logprob":
        return torch.sigmoid(head(h_init, h_thought))
    raise _unknown_mode(mode)


def mix_log_probs(lm_head: nn.Module, h_init: torch.Tensor, h_thought: torch.Tensor, w: torch.Tensor,
                  mode: str, meta_ids: tuple[int, ...] = ()) -> torch.Tensor:
    """Algorithm 1, line 2g: log p^talk, the mixed prediction, over the whole vocabulary.

    h_init, h_thought: (..., hidden).  w: (...) from :func:`mixing_weight`.
    meta_ids: the columns removed from the softmax (``cfg.scoring_vocab == "text"``); the
    official code keeps every column (pass ``()``).
    returns: (..., vocab) log p^talk (-inf at ``meta_ids``).
    """
    if mode == "hidden":
        w = w[..., None].to(h_init.dtype)
        return text_log_probs(lm_head((1 - w) * h_init + w * h_thought), meta_ids)
    if mode != "logprob":
        raise _unknown_mode(mode)
    w = w[..., None].to(h_init.dtype)
    log_p_init = text_log_probs(lm_head(h_init), meta_ids)
    log_p_thought = text_log_probs(lm_head(h_thought), meta_ids)
    # Removed meta-token columns are -inf in both; w * -inf would make NaN gradients, so mix the
    # other columns only and put -inf back afterwards.
    meta = ~torch.isfinite(log_p_init) | ~torch.isfinite(log_p_thought)
    mixed = w * log_p_init.masked_fill(meta, 0.0) + (1 - w) * log_p_thought.masked_fill(meta, 0.0)
    return mixed.masked_fill(meta, float("-inf"))
