"""Conformance of qstar_mini with every decoder-only causal LM the installed transformers can build.

Shared by ``tests/test_conformance.py`` (the pytest suite) and ``tests/conformance_table.py``
(the markdown table of docs/conformance.md), so both run the same checks.

The families are ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` of the installed transformers, not a
hand-picked list: a new release's new family is covered without editing anything here.

For each family (model_type) and attention implementation ("eager", "sdpa"):

* **excluded** (with the reason, computed): the config is an encoder-decoder; the family is a
  composite (its text model lives in a sub-config such as ``text_config``, or it has vision /
  audio sub-configs); its default config cannot be made; the tiny model cannot be built (a
  missing optional dependency, ...); the model's own forward cannot run a float64 right-padded
  text batch (it needs other inputs, or breaks in float64); the class does not support sdpa.
* **refused**: ``prepare_model`` raises a :class:`qstar_mini.errors.QStarError` whose message is
  one line. That is a correct answer. (A one-line refusal of one mode inside a check, e.g.
  ``attention="blocks"``, is reported as such, not as a failure.)
* otherwise **accepted**, and then every check of :data:`CHECKS` must hold (float64):

  ``h_init``      h_init (``plain_forward`` and the step's) = the model's own final hidden
                  states (the input of its LM head, or the last of ``hidden_states``) at the
                  real positions of a right-padded batch;
  ``log_p_init``  the step's log p^init of the true next token (computed however
                  ``quiet_star_step`` computes it) = ``log_softmax`` of the model's own
                  logits (meta-token columns removed, as the step scores);
  ``parallel``    ``generate_thoughts`` = ``naive_thoughts`` (greedy and with shared Gumbel
                  noise), and the talk hidden states = ``naive_talk``;
  ``modes``       ``attention="blocks"`` = ``"mask"`` and ``memory="rescore"`` =
                  ``"stepwise"``: same thoughts, loss and gradients, same noise;
  ``finite``      the step's loss and every gradient are finite.

Any other exception is a failure: a raw ``ValueError`` from inside transformers is exactly what
the package should turn into a one-line refusal.

The tiny model: ``AutoConfig.for_model(model_type, **sizes)`` with every size attribute the
config has set small (:data:`SIZES`: hidden 64, 2 layers, 4 heads, 2 KV heads, MLP 128, head
dim 16, a few experts), the vocabulary of ``qstar_mini.models.tiny.build_tokenizer()`` (before the
meta-tokens: ``prepare_model`` resizes), context 64, sliding windows of :data:`WINDOW` tokens,
and the few settings some families need on top (:data:`OVERRIDES`, each with its reason).
float64, seeded, eval mode, experts run by the eager implementation
(``experts_implementation="eager"``: the default grouped_mm kernels are not float64 ones).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import time
import warnings
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("eager", "sdpa")
CHECKS = ("h_init", "log_p_init", "parallel", "modes", "finite")
FULL = os.environ.get("QSTAR_CONFORMANCE") == "full"

# The run's sizes: seq 8 (rows of 8 and 5 real tokens), thoughts of 4 tokens (2 sampled),
# 2 thoughts per position, 2 true tokens supervised.
STEP = dict(seq_len=8, thought_length=4, n_true=2, n_thoughts=2)
TEXTS = ("3141592", "2718")            # with <s>: 8 and 5 tokens, right-padded to 8
NAIVE_TEXTS_FAST = ("31415", "27")     # the naive loop is slow: a smaller batch by default (6 and 3)

# Tolerances, relative to the largest magnitude of the reference (see rel_diff). float64
# throughout, but most families' modeling code computes some steps in float32 whatever the
# model's dtype (RMSNorm's variance, rotary angles, the eager softmax: ``.to(torch.float32)``),
# so two computations of the same numbers in differently shaped calls (parallel vs naive, one
# pass vs stepwise) agree to float32 rounding only. That looser bound is stated per family by
# :func:`float32_inside`, which finds such upcasts in the family's modeling code.
TOL = {"float64": 1e-9, "float32": 1e-6}
GRAD_TOL = {"float64": 1e-8, "float32": 1e-5}    # gradients sum more terms, and lose more
GRAD_FLOOR = 1e-3     # a parameter's gradient error is relative to max(its own scale, this x the largest)

HIDDEN, LAYERS, HEADS, KV_HEADS, MLP, HEAD_DIM, CONTEXT = 64, 2, 4, 2, 128, 16, 64
# Sliding windows: WINDOW covers the step's span of positions (seq_len + thought_length + n_true - 1
# = 13) but not its keys (a thought step's cache holds 8 + 8 x 5 = 48), like a real model's
# 4096-token window next to a long sequence's thoughts: the model must then be used exactly.
# SMALL_WINDOW is shorter than the span: the package must refuse it or honour it.
WINDOW, SMALL_WINDOW = 16, 4
WINDOW_NAMES = ("sliding_window", "attention_window_size", "sliding_window_size", "local_attention_window_len",
                "window_size", "attention_chunk_size", "local_attention")

# Config attribute -> tiny value, set when the family's default config has the attribute.
SIZES = {
    # width
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "emb_dim", "embedding_dim", "embedding_size",
                     "input_embedding_size", "output_embedding_size", "lru_width", "hidden_dim"), HIDDEN),
    # depth
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers",
                     "num_blocks"), LAYERS),
    # heads
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "decoder_attention_heads",
                     "attention_heads", "num_heads"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "num_query_groups", "multi_query_group_num",
                     "n_kv_heads"), KV_HEADS),
    **dict.fromkeys(("head_dim", "dim_head", "d_head", "attention_head_dim", "attention_head_size",
                     "kv_channels", "d_kv"), HEAD_DIM),
    # MLP
    **dict.fromkeys(("intermediate_size", "ffn_dim", "decoder_ffn_dim", "d_inner", "dff", "dim_ff",
                     "ffn_hidden_size", "n_inner", "feed_forward_size", "intermediate_size_mlp",
                     "dense_intermediate_size", "d_ff"), MLP),
    # positions
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "context_length",
                     "max_target_positions", "seq_length"), CONTEXT),
    # mixture of experts: 4 experts, 2 per token, 1 shared, the first layer dense where configurable
    **dict.fromkeys(("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k"), 2),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size",
                     "shared_experts_intermediate_size", "expert_ffn_hidden_size",
                     "shared_intermediate_size", "expert_intermediate_size"), 32),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "n_group",
                     "topk_group", "num_expert_group", "first_k_dense_replace"), 1),
    # multi-head latent attention and sparse-attention indexers
    **dict.fromkeys(("kv_lora_rank", "q_lora_rank", "o_lora_rank", "v_head_dim", "qk_head_dim",
                     "index_head_dim"), 16),
    **dict.fromkeys(("qk_rope_head_dim", "qk_nope_head_dim"), 8),
    "index_n_heads": 2,
    # linear attention / state-space layers
    **dict.fromkeys(("linear_key_head_dim", "linear_value_head_dim", "linear_head_dim", "mamba_d_head",
                     "mamba_headdim", "mamba_d_state", "state_size", "mamba_chunk_size", "chunk_size"), 16),
    **dict.fromkeys(("linear_num_key_heads",), 2),
    **dict.fromkeys(("linear_num_value_heads", "linear_num_heads"), 4),
    **dict.fromkeys(("n_mamba_heads", "mamba_n_heads"), 8),      # heads x head dim = expand (2) x hidden
    **dict.fromkeys(("time_step_rank", "mamba_dt_rank"), 8),
    # odds and ends
    "rotary_dim": 8, "swa_num_attention_heads": HEADS, "swa_num_key_value_heads": KV_HEADS,
    "swa_head_dim": HEAD_DIM,
    **dict.fromkeys(("pronunciation_vocab_size", "shape_vocab_size", "pronunciation_embed_dim",
                     "shape_embed_dim"), 16),                          # RoCBert's extra embeddings
    "zero_expert_num": 1, "mamba_d_ssm": 128, "ssm_state_size": 16, "mamba_num_heads": 8, "mamba_head_dim": 16,
    "n_groups": 1, "mamba_n_groups": 1, "mamba_ngroups": 1,
    "vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 16,   # Gemma 3n/4 per-layer inputs
    # sliding windows / local attention: see WINDOW (ModernBERT's local_attention counts both sides)
    **dict.fromkeys(WINDOW_NAMES, WINDOW),
}

# Modality words in sub-config names: such a family wraps a text model (tested under its own
# model_type) with other inputs.
MODALITIES = ("text", "vision", "audio", "speech", "image", "video", "visual", "vq", "encoder", "decoder",
              "depth")


class Excluded(Exception):
    """This (family, impl) cannot be tested; the message says why."""


@contextlib.contextmanager
def quiet():
    """Silence transformers' warnings and logging inside the block (the tiny configs are odd on
    purpose), and restore both afterwards so other tests see them unchanged."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def first_line(e: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message`` (and of its cause when the message only announces it)."""
    text = str(e).strip().splitlines()
    line = text[0][:limit] if text else ""
    if line.endswith(":") and len(text) > 1:
        line = f"{line} {text[1].strip()[:limit]}"
    return f"{type(e).__name__}: {line}".rstrip(": ")


def where(e: BaseException) -> str:
    """The innermost frame of a traceback, as ``file:line in function`` (paths from the package root)."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return ""
    outside_torch = [f for f in frames if "/torch/" not in f.filename.replace("\\", "/")]
    frame = (outside_torch or frames)[-1]
    path = frame.filename.replace("\\", "/")
    for root in ("site-packages/", str(REPO_ROOT) + "/"):
        if root in path:
            path = path.split(root, 1)[1]
    return f"{path}:{frame.lineno} in {frame.name}"


# ----------------------------------------------------------------------------- the families

@lru_cache(maxsize=None)
def families() -> tuple[tuple[str, str], ...]:
    """(model_type, CausalLM class name) of every causal LM of the installed transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return tuple(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()))


@lru_cache(maxsize=None)
def default_config(model_type: str):
    """The family's default config (cached; read only)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type)


@lru_cache(maxsize=None)
def exclusion(model_type: str) -> str | None:
    """Why a family is not a decoder-only text LM that can be tried (None: it can). Config level only."""
    try:
        with quiet():
            config = default_config(model_type)
    except Exception as e:  # noqa: BLE001
        return f"its default config cannot be made here ({first_line(e)})"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder config"
    subs = [name for name in getattr(config, "sub_configs", {}) or {}]
    modal = [name for name in subs if any(word in name for word in MODALITIES)]
    if modal:
        return f"composite/multimodal config (sub-configs {', '.join(sorted(subs))})"
    if getattr(config, "add_cross_attention", False):
        return "decoder with cross-attention to an encoder"
    return None


def default_impl(model_type: str) -> str:
    """The one implementation the default run tests: alternate by a hash of the name (stable),
    eager where the class does not support sdpa."""
    impl = IMPLS[zlib.crc32(model_type.encode()) % 2]
    if impl == "sdpa" and sdpa_unsupported(model_type):
        return "eager"
    return impl


@lru_cache(maxsize=None)
def float32_inside(model_type: str) -> str | None:
    """Why the family's float64 numbers agree to float32 rounding only (None: to float64's).

    Read from the source of its modeling module: upcasts to float32 such as
    ``hidden_states.to(torch.float32)`` (RMSNorm), ``softmax(..., dtype=torch.float32)``
    (eager attention) or ``position_ids.float()`` (rotary angles).
    """
    import inspect
    import re
    import sys

    try:
        module = sys.modules[model_class(model_type).__module__]
        source = inspect.getsource(module)
    except Exception:  # noqa: BLE001 - unknown: assume the looser bound
        return "its modeling code could not be read"
    hits = re.findall(r"torch\.float32|\.float\(\)", source)
    if hits:
        return f"its modeling code upcasts to float32 ({len(hits)} places, e.g. {hits[0]})"
    return None


def precision(model_type: str) -> str:
    """"float32" or "float64": which tolerances of TOL / GRAD_TOL apply."""
    return "float32" if float32_inside(model_type) else "float64"


def model_class(model_type: str):
    import transformers

    return getattr(transformers, dict(families())[model_type])


@lru_cache(maxsize=None)
def sdpa_unsupported(model_type: str) -> str | None:
    try:
        with quiet():
            cls = model_class(model_type)
    except Exception as e:  # noqa: BLE001
        return f"class cannot be imported ({first_line(e)})"
    if getattr(cls, "_supports_sdpa", True) is False:
        return f"{cls.__name__} does not support sdpa (_supports_sdpa = False)"
    return None


def cases(full: bool = FULL) -> list[tuple[str, str, str | None]]:
    """(model_type, impl, reason to skip or None): every family, one impl each by default,
    both with ``full``."""
    out = []
    for model_type, _ in families():
        why = exclusion(model_type)
        if why is not None:
            out.append((model_type, "any", why))
            continue
        for impl in (IMPLS if full else (default_impl(model_type),)):
            out.append((model_type, impl, sdpa_unsupported(model_type) if impl == "sdpa" else None))
    return out


# ----------------------------------------------------------------------------- the tiny models

# Hand-stated settings a family needs on top of SIZES to build at this size (each says why).
OVERRIDES = {
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),   # the pattern's repeat count fixes the depth
    "xmod": dict(default_language="en_XX"),                        # its forward needs a language adapter
    "reformer": dict(axial_pos_shape=[8, 8], axial_pos_embds_dim=[32, 32], attn_layers=["local", "lsh"],
                     local_attn_chunk_length=4, lsh_attn_chunk_length=4, num_buckets=2),  # factorised positions
    "zamba": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1,    # two hybrid layers that
                  layers_block_type=["linear_attention", "hybrid"] * 2),           # share their weights
    "xlstm": dict(qk_dim_factor=1.0),                              # its recurrent state assumes qk = v dims
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1,       # one attention layer, one MoE layer
                  expert_layer_period=2, expert_layer_offset=1),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"]),   # its pattern cycles over the depth
    # sizes live in two sub-configs; its attention reads rope_theta and clip_qkv, unset by default
    "dbrx": dict(attn_config=dict(kv_n_heads=KV_HEADS, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(hidden_size=HIDDEN, ffn_hidden_size=MLP, moe_num_experts=4, moe_top_k=2)),
    # one input, one looped and one output layer (its per-layer list interleaves "mlp" blocks)
    "dory": dict(num_hidden_layers=3, n_input_layers=1, n_recurrent_layers=1, n_output_layers=1,
                 layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "dots1": dict(n_routed_experts=4, n_shared_experts=1),         # its default leaves the counts unset
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),   # default leaves it unset
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=64,
                           indexer_compress_ratio=4),              # its indexed attention needs them all
    # its default rope_parameters is empty, but its layers look their layer type up in it
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "zaya": dict(num_experts_per_tok=1),                            # the only value it supports
    "bamba": dict(attn_layer_indices=[1]),                         # default: no attention layer at all
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"]),   # (idem)
    "mamba2": dict(num_heads=8),                                   # heads x head_dim = 2 x hidden
}

# Attributes whose default None means "derive it from the others": set anyway.
DERIVED = ("head_dim", "num_key_value_heads", "intermediate_size", "num_experts_per_tok")
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
SPECIAL_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def tiny_config(model_type: str, vocab_size: int, window: int = WINDOW):
    """The family's config with every size attribute it has made tiny (see :data:`SIZES`).

    Only attributes the default config serialises are set (properties are derived from them), and
    only where the default is a number (a ``None`` window or expert count stays ``None``). Per-layer
    lists are cut to the tiny depth keeping every kind of layer the pattern has (so a hybrid keeps
    its attention layer), and their depth becomes the number of layers when it has more kinds.
    """
    from transformers import AutoConfig

    base = default_config(model_type)
    d = base.to_dict()
    kwargs = {}
    for name, value in SIZES.items():
        if name in d and (isinstance(d[name], int) and not isinstance(d[name], bool)
                          or d[name] is None and name in DERIVED):
            kwargs[name] = value
    for name in WINDOW_NAMES:
        if name in kwargs:
            kwargs[name] = 2 * window if name == "local_attention" else window
    if "kv_lora_rank" in d:                                  # multi-head latent attention:
        if d.get("head_dim") is not None and d.get("head_dim") == d.get("qk_rope_head_dim"):
            kwargs["head_dim"] = SIZES["qk_rope_head_dim"]   # head_dim is the rotary part
        if "num_key_value_heads" in d:
            kwargs["num_key_value_heads"] = HEADS            # keys and values have every head
    if "unpadded_vocab_size" in d and d["unpadded_vocab_size"] is not None:
        kwargs["unpadded_vocab_size"] = vocab_size
    kwargs["vocab_size"] = vocab_size
    for name, value in d.items():                          # token ids inside the small vocabulary
        if name.endswith("token_id") and value is not None and (
                name in SPECIAL_IDS or not isinstance(value, int) or value >= vocab_size):
            kwargs[name] = SPECIAL_IDS.get(name, 3)
    if d.get("is_decoder") is False:
        kwargs["is_decoder"] = True                        # BERT-like models used as causal LMs
    for name in ("dropout", "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                 "hidden_dropout_prob", "attention_probs_dropout_prob", "embed_dropout", "resid_dropout",
                 "activation_dropout", "emb_pdrop", "local_attention_probs_dropout_prob",
                 "lsh_attention_probs_dropout_prob", "mlp_dropout", "embedding_dropout"):
        if isinstance(d.get(name), float):
            kwargs[name] = 0.0
    if isinstance(d.get("per_layer_config"), dict):
        kwargs["per_layer_config"] = {}                    # per-layer exceptions of the full-size model
    if isinstance(d.get("num_kv_shared_layers"), int):
        kwargs["num_kv_shared_layers"] = 0
    depth_name = next((n for n in LAYER_COUNTS if isinstance(d.get(n), int)), None)
    if depth_name is not None:
        depth = d[depth_name]
        lists = {n: v for n, v in d.items() if isinstance(v, list) and len(v) == depth and depth > 1}
        kinds = max((len(set(map(repr, v))) for v in lists.values()), default=1)
        layers = min(max(LAYERS, kinds), 4)
        kwargs[depth_name] = layers
        for name, value in lists.items():
            if all(isinstance(x, int) and not isinstance(x, bool) for x in value) and name in SIZES:
                kwargs[name] = [SIZES[name]] * layers        # e.g. one MLP width per layer
            else:
                kwargs[name] = _spread(value, layers)
    kwargs.update(OVERRIDES.get(model_type, {}))
    with contextlib.redirect_stdout(io.StringIO()):
        return AutoConfig.for_model(model_type, **kwargs)


def _spread(pattern, n):
    """n entries of a per-layer pattern that keep every kind of layer it has, in order of first use."""
    firsts = {}
    for i, x in enumerate(pattern):
        firsts.setdefault(repr(x), i)
    keep = sorted(firsts.values())[:n]
    extra = [i for i in range(len(pattern)) if i not in keep][: n - len(keep)]
    return [pattern[i] for i in sorted(keep + extra)]


def has_window(model_type: str) -> bool:
    """Does the family's config have a sliding window or local attention (read from its default)?"""
    if exclusion(model_type):
        return False
    with quiet():
        d = default_config(model_type).to_dict()
    return any(isinstance(d.get(name), int) and not isinstance(d.get(name), bool) for name in WINDOW_NAMES)


def build(model_type: str, impl: str, window: int = WINDOW):
    """(model, tokenizer): the tiny float64 model, seeded, in eval mode, and a fresh tokenizer.

    Raises :class:`Excluded` if the family cannot be built from a tiny config here.
    """
    from transformers import AutoModelForCausalLM

    from qstar_mini.models.tiny import build_tokenizer

    why = exclusion(model_type) or (sdpa_unsupported(model_type) if impl == "sdpa" else None)
    if why:
        raise Excluded(why)
    tokenizer = build_tokenizer()
    try:
        config = tiny_config(model_type, len(tokenizer), window)
    except Exception as e:  # noqa: BLE001
        raise Excluded(f"tiny config rejected ({first_line(e)})") from e
    try:
        with contextlib.redirect_stdout(io.StringIO()), torch.random.fork_rng():
            torch.manual_seed(0)
            extra = {"experts_implementation": "eager"} if _TAKES_EXPERTS else {}   # transformers 5 only
            model = AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=torch.float64, **extra)
    except ImportError as e:
        raise Excluded(f"missing optional dependency ({first_line(e)})") from e
    except Exception as e:  # noqa: BLE001
        raise Excluded(f"tiny model cannot be built ({first_line(e)})") from e
    return model.to(torch.float64).eval(), tokenizer


def _takes_experts_implementation() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


_TAKES_EXPERTS = _takes_experts_implementation()


# ----------------------------------------------------------------------------- one (family, impl)

@dataclass
class Result:
    """The outcome of one check: "pass", "fail" or "refused" (a one-line QStarError), and why."""

    outcome: str
    detail: str = ""
    notes: list = field(default_factory=list)   # modes refused in one line inside a passing check


@dataclass
class Case:
    """One (family, impl): built, run through its own forward, offered to ``prepare_model``.

    status: "excluded" (reason says why), "refused" (reason = the one-line message), "crashed"
    (prepare_model raised anything else, or a refusal of several lines) or "accepted".
    """

    model_type: str
    impl: str
    status: str
    reason: str = ""
    model: object = None
    tokenizer: object = None
    meta: object = None
    head: object = None
    cfg: object = None
    results: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    seconds: float = 0.0
    window: int = WINDOW


def step_config():
    from qstar_mini.config import tiny

    return tiny(**STEP)


def encode(tokenizer, texts):
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def refusal(e: BaseException) -> str | None:
    """The message if ``e`` is the package's one-line refusal, else None."""
    from qstar_mini.errors import NumericalError, QStarError

    if isinstance(e, QStarError) and not isinstance(e, NumericalError):
        text = str(e)
        if text.strip() and "\n" not in text.strip():
            return text.strip()
    return None


def own_outputs(model, input_ids, attention_mask):
    """The model's own forward: (its final hidden states, its logits).

    The final hidden states are the LM head's input, captured by a hook, and the last of
    ``hidden_states``; most models have one tensor for both. (MiniCPM, for one, scales the
    hidden states between the two; its logits then say whether qstar_mini scales them too.)
    returns: (list of candidate hidden-state tensors, logits)
    """
    seen = []
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda mod, args: seen.append(args[0])) if head is not None else None
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                        use_cache=False)
    finally:
        if hook is not None:
            hook.remove()
    candidates = [seen[-1]] if seen else []
    hidden_states = getattr(out, "hidden_states", None)
    if hidden_states:
        candidates.append(hidden_states[-1])
    return candidates, out.logits


_CASES: dict[tuple[str, str, int], Case] = {}


def prepared(model_type: str, impl: str, window: int = WINDOW) -> Case:
    """The (family, impl) case, built and offered to prepare_model once per process."""
    key = (model_type, impl, window)
    if key not in _CASES:
        start = time.perf_counter()
        with quiet():
            _CASES[key] = _prepare(model_type, impl, window)
        _CASES[key].window = window
        _CASES[key].seconds += time.perf_counter() - start
    return _CASES[key]


def _prepare(model_type: str, impl: str, window: int) -> Case:
    from qstar_mini.step import prepare_model

    try:
        model, tokenizer = build(model_type, impl, window)
    except Excluded as e:
        return Case(model_type, impl, "excluded", str(e))
    ids, mask = encode(tokenizer, TEXTS)
    try:
        own_outputs(model, ids, mask)
    except Exception as e:  # noqa: BLE001
        return Case(model_type, impl, "excluded", f"its own forward fails on a float64 right-padded text batch "
                                                  f"({first_line(e)})")
    cfg = step_config()
    try:
        meta, head = prepare_model(model, tokenizer, cfg)
    except Exception as e:  # noqa: BLE001
        message = refusal(e)
        if message is not None:
            return Case(model_type, impl, "refused", message)
        return Case(model_type, impl, "crashed", f"prepare_model raised {first_line(e, 300)}"
                                                 + (" (a refusal of several lines)" if refusal_type(e) else "")
                                                 + f" [{where(e)}]")
    dtype = model.get_input_embeddings().weight.dtype
    return Case(model_type, impl, "accepted", model=model, tokenizer=tokenizer, meta=meta.to(dtype),
                head=head.to(dtype), cfg=cfg)


def refusal_type(e: BaseException) -> bool:
    from qstar_mini.errors import QStarError

    return isinstance(e, QStarError)


# ----------------------------------------------------------------------------- measuring

def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (inf if the shapes differ or a value is not finite where b is)."""
    if a.shape != b.shape:
        return math.inf
    a, b = a.detach().double(), b.detach().double()
    scale = float(b.abs().max()) if b.numel() else 0.0
    err = float((a - b).abs().max()) if b.numel() else 0.0
    if math.isnan(err):
        return math.inf
    return err / scale if scale > 0 else err


def grad_diff(g: torch.Tensor, g0: torch.Tensor, floor: float) -> float:
    """max |g - g0| / max(max |g0|, floor): a gradient that is 0 in exact arithmetic (a key bias)
    is judged against the floor, not against its own rounding noise."""
    if g.shape != g0.shape:
        return math.inf
    err = float((g - g0).abs().max()) if g0.numel() else 0.0
    if math.isnan(err):
        return math.inf
    scale = max(float(g0.abs().max()) if g0.numel() else 0.0, floor)
    return err / scale if scale > 0 else err


def fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.1e}"


def run_check(case: Case, name: str) -> Result:
    """Run one check of :data:`CHECKS` on an accepted case (cached)."""
    if case.status != "accepted":
        raise ValueError(f"{case.model_type} {case.impl} is {case.status}, not accepted")
    if name not in case.results:
        start = time.perf_counter()
        try:
            with quiet(), torch.random.fork_rng():
                case.results[name] = CHECK_FUNCTIONS[name](case)
        except Exception as e:  # noqa: BLE001
            message = refusal(e)
            text, cause = (str(e), e.__cause__) if isinstance(e, StepFailed) else (first_line(e, 200), e)
            case.results[name] = (Result("refused", message) if message is not None
                                  else Result("fail", f"{text} [{where(cause)}]"))
        finally:
            case.model.zero_grad(set_to_none=True)
            case.meta.zero_grad(set_to_none=True)
            case.head.zero_grad(set_to_none=True)
        case.seconds += time.perf_counter() - start
    return case.results[name]


def _verdict(parts: list[tuple[str, float, float]]) -> Result:
    """parts: (what, measured relative difference, tolerance). Fails on the first one over."""
    bad = [f"{what} differs by {fmt(diff)} (relative; tolerance {tol:g})"
           for what, diff, tol in parts if not diff <= tol]
    if bad:
        return Result("fail", "; ".join(bad))
    return Result("pass", ", ".join(f"{what} {fmt(diff)}" for what, diff, _ in parts))


def check_h_init(case: Case) -> Result:
    from qstar_mini.step import quiet_star_step
    from qstar_mini.thoughts import plain_forward

    model, meta = case.model, case.meta
    ids, mask = encode(case.tokenizer, TEXTS)
    real = mask.bool()
    candidates, _ = own_outputs(model, ids, mask)
    with torch.no_grad():
        h, _ = plain_forward(model, meta, ids, mask)
        out = quiet_star_step(model, meta, case.head, ids, mask, case.cfg.replace(think=False))
    same_shape = [c for c in candidates if c.shape == h.shape]
    if not same_shape:
        return Result("fail", f"h_init has shape {tuple(h.shape)}, the model's final hidden states "
                              f"{[tuple(c.shape) for c in candidates]}")
    tol = TOL[precision(case.model_type)]
    # the closest of the model's final hidden states (LM head input, last of hidden_states)
    ref = min(same_shape, key=lambda c: rel_diff(h[real], c[real]))
    return _verdict([("h_init (plain_forward)", rel_diff(h[real], ref[real]), tol),
                     ("h_init (step)", rel_diff(out.h_init[real], ref[real]), tol)])


def check_log_p_init(case: Case) -> Result:
    from qstar_mini.losses import future_targets
    from qstar_mini.step import quiet_star_step

    model, meta, cfg = case.model, case.meta, case.cfg
    ids, mask = encode(case.tokenizer, TEXTS)
    _, logits = own_outputs(model, ids, mask)
    with torch.no_grad():
        out = quiet_star_step(model, meta, case.head, ids, mask, cfg.replace(think=False))
    if logits.shape[:2] != ids.shape:
        return Result("fail", f"the model's logits have shape {tuple(logits.shape)} for ids {tuple(ids.shape)}")
    targets, valid = future_targets(ids, mask, cfg.n_true)
    logits = logits.double()
    if cfg.scoring_vocab == "text":                      # the step scores the text without the meta-tokens
        logits = logits.index_fill(-1, torch.tensor(list(meta.ids)), float("-inf"))
    ref = torch.log_softmax(logits, -1).gather(-1, targets[..., :1])[..., 0]      # (b, l)
    ok = valid[..., 0]
    return _verdict([("log p^init", rel_diff(out.log_p_init[..., 0][ok], ref[ok]), TOL[precision(case.model_type)])])


def check_parallel(case: Case) -> Result:
    from qstar_mini.talk import naive_talk, talk_hidden
    from qstar_mini.thoughts import generate_thoughts, gumbel_noise, naive_thoughts, plain_forward

    model, meta, cfg = case.model, case.meta, case.cfg
    ids, mask = encode(case.tokenizer, TEXTS if FULL else NAIVE_TEXTS_FAST)
    t, n, n_true = cfg.thought_length, cfg.n_thoughts, cfg.n_true
    vocab = len(case.tokenizer)
    batch, seq = ids.shape
    real = mask.bool()[:, None, :].expand(batch, n, seq)
    lengths = mask.sum(-1)
    j = torch.arange(seq)[None, :, None]
    i = torch.arange(n_true)[None, None, :]
    talk_ok = (j + i < lengths[:, None, None])[:, None].expand(batch, n, seq, n_true)
    parts, tol = [], TOL[precision(case.model_type)]
    for greedy in (True, False):
        mode = "greedy" if greedy else "gumbel"
        noise = None if greedy else gumbel_noise((batch, n, seq, t - 2, vocab), torch.Generator().manual_seed(3),
                                                 dtype=torch.float64)
        kw = dict(thought_temperature=cfg.thought_temperature, reinforce_temperature=cfg.reinforce_temperature,
                  greedy=greedy, noise=noise)
        with torch.no_grad():
            _, cache = plain_forward(model, meta, ids, mask)
            par = generate_thoughts(model, meta, ids, mask, cache, t, n, extra_steps=n_true - 1, **kw)
            h_par = talk_hidden(model, meta, par, ids, n_true)
        ref_ids, ref_logp = naive_thoughts(model, meta, ids, mask, t, n, **kw)
        wrong = int((par.ids[real] != ref_ids[real]).sum())
        if wrong:
            return Result("fail", f"{mode}: {wrong} of {int(real.sum()) * t} thought tokens differ from the naive "
                                  f"loop (log-probs differ by {fmt(rel_diff(par.logprobs[real], ref_logp[real]))})")
        parts.append((f"{mode} log p(thought)", rel_diff(par.logprobs[real], ref_logp[real]), tol))
        if greedy or FULL:
            h_ref = naive_talk(model, meta, ids, mask, par.ids, n_true)
            parts.append((f"{mode} talk hidden states", rel_diff(h_par[talk_ok], h_ref[talk_ok]), tol))
    return _verdict(parts)


def _step_runs(case: Case) -> dict:
    """Loss and gradients of quiet_star_step with the same noise: the default step ("mask",
    "stepwise"), attention="blocks" and memory="rescore". A failing variant holds its exception."""
    if "steps" in case.cache:
        return case.cache["steps"]
    from qstar_mini.step import quiet_star_step
    from qstar_mini.thoughts import gumbel_noise

    model, meta, head, cfg = case.model, case.meta, case.head, case.cfg
    ids, mask = encode(case.tokenizer, TEXTS)
    batch, seq = ids.shape
    noise = gumbel_noise((batch, cfg.n_thoughts, seq, cfg.thought_length - 2, len(case.tokenizer)),
                         torch.Generator().manual_seed(0), dtype=torch.float64)
    runs = {}
    for variant, changes in (("mask/stepwise", {}), ("blocks", {"attention": "blocks"}),
                             ("rescore", {"memory": "rescore"})):
        try:
            out = quiet_star_step(model, meta, head, ids, mask, cfg.replace(**changes), noise=noise)
            out.loss.backward()
            grads = {f"{k}.{name}": p.grad.detach().clone()
                     for k, mod in (("model", model), ("meta", meta), ("head", head))
                     for name, p in mod.named_parameters() if p.grad is not None}
            runs[variant] = (out.loss.detach(), out.thoughts, grads)
        except Exception as e:  # noqa: BLE001
            runs[variant] = e
        finally:
            for mod in (model, meta, head):
                mod.zero_grad(set_to_none=True)
    case.cache["steps"] = runs
    return runs


class StepFailed(Exception):
    """quiet_star_step raised something other than a one-line refusal (the message says what)."""


def _raise_if_failed(run, variant):
    if isinstance(run, Exception):
        message = refusal(run)
        if message is not None:
            raise run
        raise StepFailed(f"quiet_star_step ({variant}) raised {first_line(run, 200)}") from run


def check_modes(case: Case) -> Result:
    runs = _step_runs(case)
    _raise_if_failed(runs["mask/stepwise"], "mask/stepwise")
    loss0, thoughts0, grads0 = runs["mask/stepwise"]
    parts, refused = [], []
    for variant in ("blocks", "rescore"):
        run = runs[variant]
        if isinstance(run, Exception) and refusal(run) is not None:
            refused.append(f"{variant} refused: {refusal(run)}")
            continue
        _raise_if_failed(run, variant)
        loss, thoughts, grads = run
        if not torch.equal(thoughts, thoughts0):
            return Result("fail", f"{variant}: other thoughts than the default step with the same noise")
        if grads.keys() != grads0.keys():
            return Result("fail", f"{variant}: gradients for other parameters "
                                  f"({sorted(set(grads) ^ set(grads0))[:3]})")
        kind = precision(case.model_type)
        parts.append((f"{variant} loss", rel_diff(loss, loss0), TOL[kind]))
        largest = max((float(g.abs().max()) for g in grads0.values() if g.numel()), default=0.0)
        worst = max(((grad_diff(grads[k], grads0[k], GRAD_FLOOR * largest), k) for k in grads0), default=(0.0, ""))
        parts.append((f"{variant} gradients (worst: {worst[1]})", worst[0], GRAD_TOL[kind]))
    result = _verdict(parts)
    if result.outcome == "pass" and refused and not parts:
        return Result("refused", "; ".join(refused))
    if refused:
        result.detail += ("; " if result.detail else "") + "; ".join(refused)
        result.notes = refused
    return result


def check_finite(case: Case) -> Result:
    runs = _step_runs(case)
    _raise_if_failed(runs["mask/stepwise"], "mask/stepwise")
    loss, _, grads = runs["mask/stepwise"]
    if not bool(torch.isfinite(loss)):
        return Result("fail", f"loss is {float(loss)}")
    bad = [k for k, g in grads.items() if not bool(torch.isfinite(g).all())]
    if bad:
        return Result("fail", f"non-finite gradients in {len(bad)} parameters, e.g. {bad[0]}")
    if not any(k.startswith("model.") and bool(g.abs().sum() > 0) for k, g in grads.items()):
        return Result("fail", "the model got no gradient")
    return Result("pass", f"loss {float(loss):.4f}, {len(grads)} gradients finite")


CHECK_FUNCTIONS = {"h_init": check_h_init, "log_p_init": check_log_p_init, "parallel": check_parallel,
                   "modes": check_modes, "finite": check_finite}


def run_case(model_type: str, impl: str) -> Case:
    """Prepare and run every check (what the table reports)."""
    case = prepared(model_type, impl)
    if case.status == "accepted":
        for name in CHECKS:
            run_check(case, name)
    return case


def release(case: Case) -> None:
    """Drop the model of a finished case (keep its results)."""
    case.model = case.tokenizer = case.meta = case.head = None
    case.cache.clear()


# ----------------------------------------------------------------------------- the table

def verdict(case: Case) -> tuple[str, str]:
    """(status, detail) of a finished case: "supported", "refused", "excluded" or "fails"."""
    if case.status == "excluded":
        return "excluded", case.reason
    if case.status == "refused":
        return "refused", case.reason
    if case.status == "crashed":
        return "fails", case.reason
    failed = [f"{name}: {r.detail}" for name, r in case.results.items() if r.outcome == "fail"]
    if failed:
        return "fails", "; ".join(failed)
    refused = [f"{name}: {r.detail}" for name, r in case.results.items() if r.outcome == "refused"]
    refused += [f"{name}: {note}" for name, r in case.results.items() for note in r.notes]
    return "supported", "; ".join(refused)


def table(full: bool = FULL, progress=None) -> str:
    """The markdown table of every family for the installed transformers (runs every check)."""
    import transformers

    rows = []
    counts: dict[str, int] = {}
    all_cases = cases(full)
    for model_type, class_name in families():
        per_impl = []
        for mt, impl, skip in all_cases:
            if mt != model_type:
                continue
            if skip is not None:
                per_impl.append((impl, "excluded", skip))
                continue
            case = run_case(model_type, impl)
            per_impl.append((impl, *verdict(case)))
            release(case)
            if progress:
                progress(model_type, impl, per_impl[-1][1])
        statuses = [status for _, status, _ in per_impl]
        family_excluded = exclusion(model_type) is not None
        if family_excluded:
            status, impls, detail = "excluded", "", per_impl[0][2]
        else:
            for candidate in ("fails", "supported", "refused", "excluded"):
                if candidate in statuses:
                    status = candidate
                    break
            impls = ", ".join(impl for impl, st, _ in per_impl if st == "supported")
            groups: dict[str, list[str]] = {}                 # one detail, the impls it is about
            for impl, _, d in per_impl:
                if d:
                    groups.setdefault(d, []).append(impl)
            if len(groups) == 1 and len(next(iter(groups.values()))) == len(per_impl):
                detail = next(iter(groups))
            else:
                detail = "; ".join(f"{', '.join(i)}: {d}" for d, i in groups.items())
        counts[status] = counts.get(status, 0) + 1
        rows.append(f"| `{model_type}` | `{class_name}` | {status} | {impls} | {_cell(detail)} |")
    mode = "both attention implementations" if full else "one attention implementation per family"
    summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    head = [f"Causal LM families of transformers {transformers.__version__} (torch {torch.__version__}), "
            f"tiny float64 models, {mode}: {summary}. Generated by `tests/conformance_table.py`.", "",
            "| family | class | status | tested with | detail |", "|---|---|---|---|---|"]
    return "\n".join(head + rows) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:400]
