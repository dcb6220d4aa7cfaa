"""What block attention costs against the plain pass's fused attention, one layer, one thread, CPU time.

    PYTHONPATH=. python scripts/attention_cost.py --rows 16 --seq 128

The default step's overhead over its floor is what its thought steps cost above a plain
token-pass. This times that part alone, for the tiny model's heads (2 KV heads x 2, head dim 32):
the masked steps' block attention (:class:`qstar_mini.fast.block_attention._StepAttention`, forward
and backward over t + n_true - 1 = 14 steps, the causal text mask, ``rows`` = batch x thoughts)
against the plain pass's attention over the same rows, 14 times (sdpa with the causal mask, fused,
forward and backward): what the floor already pays for attention. Medians of interleaved runs.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import qstar_mini.fast.block_attention as ba

KV_HEADS, GROUP, DIM, STEPS = 2, 2, 32, 14


class _Layer:
    """What _StepAttention needs of a StepLayer: its buffers."""

    def __init__(self, rows, seq):
        self.state, self.shape = ba._StepBuffers(), (rows, KV_HEADS, seq, STEPS, DIM)

    def buffers(self, key, value):
        if self.state.key_buffer is None:
            self.state.key_buffer, self.state.value_buffer = key.new_empty(self.shape), value.new_empty(self.shape)
        return self.state.key_buffer, self.state.value_buffer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows, seq = args.rows, args.seq
    leaf = lambda *shape: (torch.randn(*shape) * DIM ** -0.25).requires_grad_()
    k_text, v_text = leaf(rows, KV_HEADS, seq, DIM), leaf(rows, KV_HEADS, seq, DIM)
    steps = [(leaf(rows, KV_HEADS, seq, GROUP, DIM), leaf(rows, KV_HEADS, seq, DIM), leaf(rows, KV_HEADS, seq, DIM))
             for _ in range(STEPS)]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    mask = torch.zeros(rows, 1, seq, seq).masked_fill(~causal, torch.finfo(torch.float32).min)
    chunks = ba.query_chunks(list(range(1, seq + 1)), ba.chunk_size(seq))
    q_plain, k_plain = leaf(rows, KV_HEADS * GROUP, seq, DIM), leaf(rows, KV_HEADS * GROUP, seq, DIM)

    def blocks():
        layer, link, total = _Layer(rows, seq), None, 0
        for step, (q, k_new, v_new) in enumerate(steps, 1):
            out, link = ba._StepAttention.apply(q, k_new, v_new, k_text, v_text, link, mask, chunks, layer, step)
            total = total + out.sum()
        total.backward()

    def plain():
        for _ in range(STEPS):
            F.scaled_dot_product_attention(q_plain, k_plain, k_plain, is_causal=True).sum().backward()

    times = {"block attention, 14 steps": [], "fused causal sdpa, 14 passes": []}
    for _ in range(args.repeats):
        for name, fn in zip(times, (blocks, plain)):
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in med.items():
        print(f"{name}: {t * 1e3:.1f} ms (rows {rows}, l {seq}, one layer, forward + backward, CPU time)")
    print(f"ratio: {med['block attention, 14 steps'] / med['fused causal sdpa, 14 passes']:.2f}")


main()
