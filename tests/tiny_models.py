"""Tiny random models of the four tested architectures, built locally (no download)."""

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from qstar_mini.meta_tokens import MetaTokens
from qstar_mini.models.tiny import build_tokenizer, tiny_model

VOCAB = 40          # the last two ids play the meta-tokens in these tests
HIDDEN = 32
ARCHS = ("llama", "mistral", "qwen2", "gpt2")


def tiny_random_model(arch: str, attn: str = "eager", dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, attn_implementation=attn))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None, attn_implementation=attn))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, attn_implementation=attn))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4,
                                           n_positions=128, attn_implementation=attn))
    else:
        raise ValueError(arch)
    return model.to(dtype).eval()


def tiny_meta(dtype=torch.float64, scale: float = 10.0, seed: int = 1) -> MetaTokens:
    g = torch.Generator().manual_seed(seed)
    return MetaTokens(VOCAB - 2, VOCAB - 1, torch.randn(2, HIDDEN, generator=g, dtype=dtype), scale=scale)


def batch(lengths=(7, 5), seq: int = 7, seed: int = 2):
    """Right-padded random text ids (never a meta-token) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 2, (len(lengths), seq), generator=g)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask


def small_model(seed=0):
    """A tiny random model of the tiny base's family with the project's character tokenizer."""
    tok = build_tokenizer()
    model = tiny_model(tok, seed=seed, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64).eval()
    return model, tok
