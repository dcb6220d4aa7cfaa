"""Fuzzed invariants of one step over random configs, lengths, padding and meta-token settings:
the documented shapes, finite losses, and padding that never leaks into losses or rewards."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qstar_mini.config import QuietStarConfig
from qstar_mini.mixing import MixingHead
from qstar_mini.step import quiet_star_step
from qstar_mini.thoughts import gumbel_noise
from tiny_models import HIDDEN, VOCAB, tiny_meta, tiny_random_model

MODEL = tiny_random_model("llama", "sdpa", dtype=torch.float32)


@st.composite
def cases(draw):
    seq = draw(st.integers(2, 9))
    batch = draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(1, seq), min_size=batch, max_size=batch))
    cfg = QuietStarConfig(
        seq_len=seq, thought_length=draw(st.integers(3, 6)), n_true=draw(st.integers(1, seq - 1)),
        n_thoughts=draw(st.integers(2, 3)), mixing=draw(st.sampled_from(["hidden", "logprob"])),
        mixer_sigmoid=draw(st.booleans()), mixer_bias_init=draw(st.floats(-3, 3)),
        clamp_negative_rewards=draw(st.booleans()), embedding_scale=draw(st.sampled_from([1.0, 100.0])),
        reinforce_temperature=draw(st.sampled_from([1.0, 3.0])), policy_loss_weight=1.0)
    return cfg, lengths, draw(st.integers(0, 2**16))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_step_shapes_finiteness_and_padding(case):
    cfg, lengths, seed = case
    b, l, n, t, k = len(lengths), cfg.seq_len, cfg.n_thoughts, cfg.thought_length, cfg.n_true
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 2, (b, l), generator=g)
    mask = (torch.arange(l)[None] < torch.tensor(lengths)[:, None]).long()
    meta = tiny_meta(torch.float32, scale=cfg.embedding_scale)
    head = MixingHead(HIDDEN, bias_init=cfg.mixer_bias_init)
    noise = gumbel_noise((b, n, l, t - 2, VOCAB), g)

    out = quiet_star_step(MODEL, meta, head, ids, mask, cfg, noise=noise)
    assert out.shapes() == {
        "h_init": (b, l, HIDDEN), "log_p_init": (b, l, k), "valid": (b, l, k), "base_nll": (), "loss": (),
        "thoughts": (b, n, l, t), "thought_logprobs": (b, n, l, t - 2), "h_thought": (b, n, l, k, HIDDEN),
        "w": (b, n, l, k), "log_p_talk": (b, n, l, k), "nll": (b, n, l, k), "rewards": (b, n, l),
        "reinforce": (b, n, l), "talk_nll": (), "policy_loss": (), "policy_trained": (b, l), "policy_counted": (b, l)}
    for name in ("loss", "base_nll", "talk_nll", "policy_loss", "rewards", "w", "nll"):
        assert bool(torch.isfinite(getattr(out, name)).all()), name
    if cfg.mixing == "logprob" or cfg.mixer_sigmoid:
        assert bool(((out.w >= 0) & (out.w <= 1)).all())

    # padding: other ids in the padded slots change nothing that counts
    other = quiet_star_step(MODEL, meta, head, ids.masked_fill(mask == 0, 5), mask, cfg, noise=noise)
    for name in ("loss", "base_nll", "talk_nll", "policy_loss"):
        torch.testing.assert_close(getattr(out, name), getattr(other, name), rtol=1e-5, atol=1e-5)
    pad = ~mask.bool()[:, None].expand(b, n, l)
    assert bool((out.rewards[pad] == 0).all()) and bool((out.reinforce[pad] == 0).all())
    # a valid (j, i) never reads past the real sequence
    j = torch.arange(l)[None, :, None]
    i = torch.arange(k)[None, None, :]
    assert bool((~out.valid | (j + 1 + i < torch.tensor(lengths)[:, None, None])).all())
