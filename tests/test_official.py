"""`official()` against numbers made by the official Quiet-STaR code itself.

The fixture in ``tests/fixtures/official_step/`` was written by ``scripts/official_oracle.py``:
the released ``modeling_mistral.py`` of ezelikman/quiet-star (on transformers 4.37.2), run
forward and backward on a tiny seeded Mistral with fixed Gumbel noise, for n_ahead = 6 and 12, and
for n_ahead = 12 with one thought per position (n_passes = 1, where the official reward is the
improvement over the base) (docs/fidelity.md says how to rerun it). Here the same weights are
loaded into a *stock* transformers Mistral and run through :func:`qstar_mini.step.quiet_star_step`
with :func:`qstar_mini.config.official`; every per-entry tensor, the loss and every gradient
must agree. The last tests switch each departure of qstar_mini on, one at a time, and check
that the fixture notices: a test that cannot fail would prove nothing.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tokenizers.models import BPE
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from qstar_mini.config import official
from qstar_mini.step import prepare_model, quiet_star_step

FIXTURE = Path(__file__).parent / "fixtures" / "official_step"
N_AHEAD = (6, 12)
F64_TOL = 1e-5          # relative error, float64 (the bar; measured errors are far smaller)
F32_TOL = 5e-4          # relative error in float32 against the float64 oracle (measured: below 6e-5)


@lru_cache(maxsize=None)
def setup() -> dict:
    return json.loads((FIXTURE / "setup.json").read_text())


def tokenizer() -> PreTrainedTokenizerFast:
    """The fixture's tokenizer before the meta-tokens are added (qstar_mini adds its own, at the
    same ids): a BPE whose only merge is "-" "-", so "---" is ["--", "-"]."""
    s = setup()
    vocab = {token: i for i, token in enumerate(s["vocab"]) if i not in s["meta_ids"]}
    merges = [tuple(m) for m in s["merges"]]
    core = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")


def load_model(dtype: torch.dtype, attn: str) -> MistralForCausalLM:
    config = MistralConfig.from_pretrained(FIXTURE / "model")
    config._attn_implementation = attn
    model = MistralForCausalLM(config)
    model.load_state_dict(load_file(FIXTURE / "model" / "model.safetensors"))
    return model.to(dtype).train()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    s = setup()
    return torch.tensor(s["input_ids"]), torch.tensor(s["attention_mask"])


def official_tensors(n_ahead: int, n_passes: int = 2) -> dict:
    """The official step's tensors: n_ahead_12.safetensors, or n_ahead_12_n_passes_1 for one pass."""
    suffix = "" if n_passes == setup()["n_passes"] else f"_n_passes_{n_passes}"
    return load_file(FIXTURE / f"n_ahead_{n_ahead}{suffix}.safetensors")


def run_ours(n_ahead: int, dtype=torch.float64, attn="eager", load_head=True, n_passes=2, **changes) -> dict:
    """One official() step of qstar_mini on the fixture; its tensors and gradients."""
    ids, mask = batch()
    sizes = {"seq_len": ids.shape[1], "batch_size": ids.shape[0], "n_passes": n_passes}
    if "thought_length" not in changes:
        sizes["n_ahead"] = n_ahead
    cfg = official(**sizes, **changes)
    model = load_model(dtype, attn)
    tok = tokenizer()
    meta, head = prepare_model(model, tok, cfg)
    theirs = official_tensors(n_ahead, n_passes)
    init = meta.embeddings().detach().clone()
    if load_head:
        head.load_state_dict({k: v.to(dtype) for k, v in load_file(FIXTURE / "head.safetensors").items()})
    out = quiet_star_step(model, meta, head, ids, mask, cfg, noise=theirs["noise"].to(dtype))
    out.loss.backward()
    grads = {k: torch.zeros_like(p) if p.grad is None else p.grad for k, p in model.named_parameters()}
    grads |= {f"head.{k}": p.grad for k, p in head.named_parameters()}
    grads["meta.stored"] = meta.stored.grad
    return {"cfg": cfg, "out": out, "grads": grads, "meta_init": init, "meta_ids": meta.ids}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| in float64 (absolute when b is zero)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30)) if b.norm() > 0 else float((a - b).norm())


def errors(n_ahead: int, ours: dict) -> dict[str, float]:
    """Relative error of every compared quantity, at the entries the official code defines."""
    theirs, out = official_tensors(n_ahead, ours["cfg"].n_passes), ours["out"]
    ids, mask = batch()
    seq, n_true = ids.shape[1], ours["cfg"].n_true
    real = mask.bool()[:, None, :].expand(-1, out.thoughts.shape[1], -1)            # (b, n, l)
    err = {}
    same = (out.thoughts == theirs["thought_ids"])[real].all(-1)                     # (real entries,)
    err["thought_ids"] = 1.0 - float(same.double().mean())
    err["thought_logprobs"] = rel(out.thought_logprobs[real], theirs["thought_logprobs"][real])
    have = ~torch.isnan(theirs["log_p_talk"]) & out.valid[:, None]                   # (b, n, l, n_true)
    err["log_p_talk"] = rel(out.log_p_talk[have], theirs["log_p_talk"][have])
    err["w"] = rel(out.w[have], theirs["w"][have])
    policy = theirs["rewards"].shape[-1]                                             # l - 1 - n_true
    assert policy == seq - 1 - n_true
    err["rewards"] = rel(out.rewards[..., :policy], theirs["rewards"])
    base = -out.log_p_init[:, :-1, 0] * out.valid[:, :-1, 0]                         # (b, l - 1)
    err["base_nll"] = rel(base, theirs["base_nll"])
    err["meta_init"] = rel(ours["meta_init"], theirs["meta_init"])
    for name in ("loss", "talk_loss", "policy_loss"):
        if name in theirs:
            mine = {"loss": out.loss, "talk_loss": out.talk_nll, "policy_loss": out.policy_loss}[name]
            err[name] = rel(mine, theirs[name])
    for key, value in theirs.items():
        if key.startswith("grad."):
            err[key] = rel(ours["grads"][key[len("grad."):]], value)
    return err


@pytest.mark.parametrize("n_ahead", N_AHEAD)
def test_fixture_exercises_every_term(n_ahead):
    """The oracle's numbers are not trivially zero: the policy loss and some rewards are not."""
    theirs = official_tensors(n_ahead)
    assert theirs["thought_ids"].shape[-1] == n_ahead - 1              # start + (n_ahead - 3) + end
    assert float(theirs["policy_loss"].abs()) > 0
    assert float((theirs["rewards"] > 0).double().mean()) > 0.1
    assert float(theirs["w"].abs().mean()) > 1e-3


def test_official_preset_is_the_fixtures_n_ahead_12():
    """At its defaults official() is the run the fixture's n_ahead = 12 half recorded."""
    s, cfg = setup(), official()
    assert (cfg.n_ahead, cfg.n_ahead_talk, cfg.n_passes) == (12, s["n_ahead_talk"], s["n_passes"])
    assert (cfg.embedding_scale, cfg.reinforce_temperature) == (s["embedding_scale"], s["reinforce_temperature"])
    assert (cfg.policy_loss_weight, cfg.base_loss_weight) == (s["policy_beta"], s["original_loss_weight"])
    assert cfg.start_init == cfg.end_init == s["initial_start_token"] == s["initial_end_token"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("n_ahead", N_AHEAD)
def test_official_step_equals_the_official_code_float64(n_ahead, attn):
    ours = run_ours(n_ahead, torch.float64, attn)
    assert ours["meta_ids"] == tuple(setup()["meta_ids"])
    err = errors(n_ahead, ours)
    worst = {k: v for k, v in err.items() if v > F64_TOL}
    assert not worst, f"differs from the official code: {worst}"


@pytest.mark.parametrize("n_ahead", N_AHEAD)
def test_official_step_equals_the_official_code_float32(n_ahead):
    """float32 against the float64 oracle: the same thoughts, loss and gradients to F32_TOL."""
    err = errors(n_ahead, run_ours(n_ahead, torch.float32))
    assert err["thought_ids"] == 0.0
    worst = {k: v for k, v in err.items() if v > F32_TOL}
    assert not worst, f"float32 differs from the official code: {worst}"


def test_one_pass_fixture_rewards_the_improvement_over_the_base():
    """With n_passes = 1 the official code skips its mean baseline: the reward it trains on is the
    raw one, sum_i (log p^talk - log p^init), and some of it is positive (so a policy loss)."""
    theirs = official_tensors(12, n_passes=1)
    assert theirs["thought_ids"].shape[1] == 1
    assert torch.equal(theirs["rewards"], theirs["rewards_raw"])
    assert float((theirs["rewards"] > 0).double().mean()) > 0.1 and float(theirs["policy_loss"]) > 0
    s = setup()["one_pass"]
    assert (s["n_ahead"], s["n_passes"]) == (12, 1)


def test_official_one_pass_step_equals_the_official_code():
    """official(n_passes=1) takes reward_baseline="base" and then equals the official one-pass step:
    thoughts, rewards, policy loss, loss and every gradient."""
    ours = run_ours(12, torch.float64, n_passes=1)
    assert ours["cfg"].reward_baseline == "base" and ours["cfg"].n_thoughts == 1
    err = errors(12, ours)
    worst = {k: v for k, v in err.items() if v > F64_TOL}
    assert not worst, f"differs from the official one-pass step: {worst}"


def test_one_pass_without_the_base_is_caught():
    """reward_baseline="none" (the sum of log p^talk, always <= 0) leaves no positive reward: the
    policy loss is 0 against the official one's, and the fixture sees it."""
    err = errors(12, run_ours(12, torch.float64, n_passes=1, reward_baseline="none"))
    assert err["policy_loss"] > 0.99 and err["loss"] > 0.5, err


# Each of qstar_mini's departures, switched on alone, must move something the fixture checks.
DEPARTURES = {
    "meta-tokens out of the scoring softmax": dict(scoring_vocab="text"),
    "summed log p(T_j)": dict(reinforce_reduction="sum"),
    "pooled talk NLL": dict(talk_nll_pooling="pooled"),
    "REINFORCE over every real position": dict(policy_positions="real"),
    "mean meta-token init": dict(meta_init="mean"),
}


@pytest.mark.parametrize("name", DEPARTURES)
def test_each_departure_is_caught(name):
    err = errors(12, run_ours(12, torch.float64, **DEPARTURES[name]))
    assert max(err.values()) > 100 * F64_TOL, f"the fixture does not see '{name}': {err}"


def test_wrong_thought_length_and_mixing_head_are_caught():
    # n_ahead mapped to t (the old off-by-one): the noise no longer fits the thought length
    with pytest.raises(Exception):
        run_ours(12, torch.float64, thought_length=12)
    # qstar_mini's one-hidden-layer head with a bias cannot hold the official head's weights
    with pytest.raises(RuntimeError, match="net.4.weight|Unexpected key|Missing key"):
        run_ours(12, torch.float64, mixer_depth=1, mixer_bias_init=0.0)
