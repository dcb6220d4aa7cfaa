"""FlexAttention on a GPU: is the compiled kernel right, and is it faster than the mask?

    python scripts/gpu_flex_check.py                   # CUDA: checks, then timings; JSON to gpu_out/
    python scripts/gpu_flex_check.py --dry-run         # print the plan, run nothing (any machine)
    python scripts/gpu_flex_check.py --device cpu --sizes tiny --repeats 1   # a slow smoke run on a CPU

Runs from a checkout (the repository root is put on sys.path); nothing is installed.

1. kernel: ``qstar_mini.fast.flex_attention.flex_attention_forward`` (compiled FlexAttention on CUDA)
   on random queries and keys of masked steps 1, 5 and 14, every position thinking and only some,
   right-padded rows, grouped-query heads, against a float64 reference with the dense Figure 3 mask;
   the output and the gradients of q, k, v. Passes when flex's error is at most twice the error of
   the model's own sdpa attention with the dense mask in the same dtype (or under a small floor).
2. step: one official-shaped ``quiet_star_step`` (t = 11, n_true = 4, n_thoughts = 2, l = 64,
   b = 4, tiny model) with attention "mask" and "flex" from the same seed, every position
   thinking and only some: the loss and every gradient. float32 must agree to 1e-4 (relative to
   the largest entry); bfloat16 is reported and must be finite (a bf16 rounding may flip a sampled
   thought token, after which the two runs differ legitimately).
3. timing: median seconds of an official-shaped training step (forward + backward) with attention
   "mask", "blocks" and "flex" on the sizes of ``qstar_mini.studies.bench.SIZES`` (tiny: l = 64, b = 4;
   100m: l = 256, b = 8), with peak memory and, for flex, the first call (compilation) and the
   graphs compiled during the timed calls (should be 0: no recompilation in steady state).

Exit status: 0 every check passed, 1 a check failed, 2 it cannot run here (no CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZE_SHAPES = {"tiny": (64, 4), "100m": (256, 8)}      # size -> (l, b) of the timed step
ATTENTIONS = ("mask", "blocks", "flex")
KERNEL_STEPS = (1, 5, 14)                               # 14 = t + n_true - 1: the last talk step


def _list(choices):
    def parse(text: str) -> list[str]:
        items = [x for x in text.split(",") if x]
        bad = [x for x in items if x not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"{text!r}: choose a comma-separated list from {', '.join(choices)}")
        return items
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda (compiled flex; the point of the script) or cpu (eager flex: a slow smoke run)")
    p.add_argument("--sizes", type=_list(tuple(SIZE_SHAPES)), default=list(SIZE_SHAPES),
                   help="model sizes to time (default tiny,100m)")
    p.add_argument("--dtypes", type=_list(("float32", "bfloat16", "float64")), default=["float32", "bfloat16"],
                   help="dtypes of the checks and timings (default float32,bfloat16; float64 is what the "
                        "notebooks use, also on a GPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per row, after one warm-up (default 5)")
    p.add_argument("--skip", type=_list(("kernel", "step", "timing")), default=[],
                   help="parts to skip, e.g. --skip timing")
    p.add_argument("--out", default=None, help="JSON file (default $OUT/gpu_flex_check.json, else gpu_out/...)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def plan(args) -> list[str]:
    lines = [f"device {args.device}; dtypes {', '.join(args.dtypes)}"]
    if "kernel" not in args.skip:
        lines.append(f"1. kernel: flex vs float64 dense-mask reference at steps {KERNEL_STEPS}, all / some positions")
    if "step" not in args.skip:
        lines.append("2. step: official-shaped quiet_star_step, attention mask vs flex, loss and gradients")
    if "timing" not in args.skip:
        for size in args.sizes:
            l, b = SIZE_SHAPES[size]
            lines.append(f"3. timing {size} (l={l}, b={b}): {', '.join(ATTENTIONS)} x {', '.join(args.dtypes)}, "
                         f"median of {args.repeats}")
    return lines


def _sync(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def kernel_check(device: str, dtype) -> list[dict]:
    """Flex's attention (output and q, k, v gradients) vs a float64 dense reference, beside sdpa's own error."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from qstar_mini.studies.bench import bench_model
    from qstar_mini.fast.flex_attention import flex_attention_forward, structured
    from qstar_mini.masks import thought_visibility

    model, _, _ = bench_model(device=device, dtype=dtype)
    module = model.model.layers[0].self_attn
    g = torch.Generator(device="cpu").manual_seed(0)
    rows, heads, kv_heads, dim, seq = 4, 8, 2, 64, 200
    mask = (torch.arange(seq)[None] < torch.tensor([200, 150, 90, 13])[:, None]).long().to(device)
    some = torch.randint(0, seq, (rows, 48), generator=g).to(device)
    floor = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    out = []
    for positions in (None, some):
        m = seq if positions is None else positions.shape[1]
        for step in KERNEL_STEPS:
            keys = seq + m * step
            q64 = torch.randn(rows, heads, m, dim, generator=g, dtype=torch.float64).to(device)
            k64, v64 = (torch.randn(rows, kv_heads, keys, dim, generator=g, dtype=torch.float64).to(device)
                        for _ in range(2))
            grad = torch.randn(rows, heads, m, dim, generator=g, dtype=torch.float64).to(device)
            visible = thought_visibility(mask, step, positions)                   # (rows, 1, m, keys)

            def run(fn, cast):
                xs = [x.detach().to(cast).clone().requires_grad_() for x in (q64, k64, v64)]
                y = fn(*xs)
                y.backward(grad.to(cast))
                return [y.detach()] + [x.grad for x in xs]

            ref = run(lambda q, k, v: sdpa(q, k, v, attn_mask=visible, scale=dim ** -0.5, enable_gqa=True),
                      torch.float64)
            dense = run(lambda q, k, v: sdpa(q, k, v, attn_mask=visible, scale=dim ** -0.5, enable_gqa=True), dtype)

            def flex(q, k, v):
                with structured(model, seq, m, step, mask, positions):
                    y, _ = flex_attention_forward(module, q, k, v, None, scaling=dim ** -0.5)
                return y.transpose(1, 2)                                            # (rows, heads, m, d)

            got = run(flex, dtype)
            for name, f, d, r in zip(("out", "dq", "dk", "dv"), got, dense, ref):
                err, base = _rel(f, r), _rel(d, r)
                out.append(dict(part="kernel", dtype=str(dtype)[6:], positions="all" if positions is None else "some",
                                step=step, tensor=name, flex_rel_err=err, mask_rel_err=base,
                                ok=bool(err <= max(2 * base, floor))))
    return out


def step_check(device: str, dtype) -> list[dict]:
    """quiet_star_step with attention mask vs flex: loss and gradients, same seed."""
    import torch

    from qstar_mini.studies.bench import bench_model, random_batch
    from qstar_mini.config import QuietStarConfig
    from qstar_mini.step import quiet_star_step

    model, meta, head = bench_model(device=device, dtype=dtype)
    ids, mask = random_batch(4, 64, 85, device)
    mask[1, 50:], mask[3, 20:] = 0, 0                                  # right padding
    cfg = QuietStarConfig(thought_length=11, n_true=4, n_thoughts=2, seq_len=64)
    some = torch.tensor([[3, 10, 40], [5, 30, 49], [0, 1, 2], [7, 19, -1]], device=device)
    out = []
    for positions in (None, some):
        runs = []
        for attention in ("mask", "flex"):
            res = quiet_star_step(model, meta, head, ids, mask, cfg.replace(attention=attention), positions=positions,
                                  generator=torch.Generator(device=device).manual_seed(0))
            res.loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True), head.zero_grad(set_to_none=True), meta.zero_grad(set_to_none=True)
            runs.append((res.loss.detach(), res.thoughts, grads))
        (l0, t0, g0), (l1, t1, g1) = runs
        grad_err = max(_rel(g1[n], g0[n]) for n in g0)
        loss_err = _rel(l1, l0)
        same_ids = float((t0 == t1).double().mean())
        finite = bool(torch.isfinite(l1)) and all(bool(torch.isfinite(g).all()) for g in g1.values())
        ok = finite and (dtype == torch.bfloat16 or (loss_err < 1e-4 and grad_err < 1e-4))
        out.append(dict(part="step", dtype=str(dtype)[6:], positions="all" if positions is None else "some",
                        loss_rel_err=loss_err, grad_rel_err=grad_err, same_thought_ids=same_ids, ok=ok))
    return out


def time_steps(device: str, size: str, dtype, repeats: int) -> list[dict]:
    """Median seconds of an official-shaped step per attention; flex's first call and recompilations.

    The attentions take turns (one warm-up each, then ``repeats`` rounds of mask, blocks, flex), so a
    change in the machine's load during the run falls on all three alike. ``cpu_s``: the process's CPU
    time of a step, which other processes on a shared machine disturb less than wall time.
    """
    import torch
    from torch._dynamo.utils import counters

    from qstar_mini.studies.bench import SIZES, _step, bench_model, random_batch
    from qstar_mini.config import QuietStarConfig

    spec = dict(SIZES[size])
    vocab = spec.pop("vocab")
    model, meta, head = bench_model(vocab=vocab, device=device, dtype=dtype, **spec)
    seq, batch = SIZE_SHAPES[size]
    ids, mask = random_batch(batch, seq, vocab, device)
    cfgs = {a: QuietStarConfig(thought_length=11, n_true=4, n_thoughts=2, seq_len=seq, attention=a)
            for a in ATTENTIONS}

    def one(attention):
        _sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        _step(model, meta, head, ids, mask, cfgs[attention])
        _sync(device)
        return time.perf_counter() - wall, time.process_time() - cpu

    first = {a: one(a)[0] for a in ATTENTIONS}                     # warm-up (compiles flex on CUDA)
    peak = {}
    for a in ATTENTIONS:                                           # peak memory of one step each
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            one(a)
            peak[a] = torch.cuda.max_memory_allocated() / 2**20
    graphs = counters["stats"]["unique_graphs"]
    times = {a: [] for a in ATTENTIONS}
    for _ in range(repeats):
        for a in ATTENTIONS:
            times[a].append(one(a))
    recompiled = counters["stats"]["unique_graphs"] - graphs
    return [dict(part="timing", size=size, dtype=str(dtype)[6:], seq=seq, batch=batch, attention=a,
                 median_s=statistics.median(w for w, _ in times[a]), cpu_s=statistics.median(c for _, c in times[a]),
                 first_call_s=first[a], peak_mib=peak.get(a), graphs_compiled_while_timed=recompiled, ok=True)
            for a in ATTENTIONS]


def _print_rows(rows: list[dict]) -> None:
    for r in rows:
        if r["part"] == "kernel":
            print(f"kernel {r['dtype']:8s} {r['positions']:4s} step {r['step']:2d} {r['tensor']:3s}  flex err "
                  f"{r['flex_rel_err']:.2e}  mask err {r['mask_rel_err']:.2e}  {'ok' if r['ok'] else 'FAIL'}", flush=True)
        elif r["part"] == "step":
            print(f"step   {r['dtype']:8s} {r['positions']:4s} loss err {r['loss_rel_err']:.2e}  grad err "
                  f"{r['grad_rel_err']:.2e}  same thought ids {r['same_thought_ids']:.3f}  {'ok' if r['ok'] else 'FAIL'}", flush=True)
        else:
            peak = "" if r["peak_mib"] is None else f"  peak {r['peak_mib']:8.1f} MiB"
            print(f"timing {r['size']:4s} {r['dtype']:8s} l={r['seq']} b={r['batch']} {r['attention']:6s} "
                  f"median {r['median_s']:.4f} s (cpu {r['cpu_s']:.4f} s)  first {r['first_call_s']:.2f} s{peak}  "
                  f"recompiled {r['graphs_compiled_while_timed']}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    print("\n".join(plan(args)))
    if args.dry_run:
        print("dry run: nothing executed")
        return 0
    import torch
    import transformers

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_flex_check: torch.cuda.is_available() is False here; run it on a GPU machine, or "
              "--device cpu for a slow smoke run", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {name}", flush=True)
    dtypes = [getattr(torch, d) for d in args.dtypes]
    out = Path(args.out or Path(os.environ.get("OUT", "gpu_out")) / "gpu_flex_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []

    def save():                                     # after every part: a run cut short keeps what it measured
        out.write_text(json.dumps(dict(machine=name, torch=torch.__version__, rows=rows), indent=1))

    for dtype in dtypes:
        checks = []
        if "kernel" not in args.skip:
            checks += kernel_check(args.device, dtype)
        if "step" not in args.skip:
            checks += step_check(args.device, dtype)
        _print_rows(checks)
        rows += checks
        save()
    if "timing" not in args.skip:
        for size in args.sizes:
            for dtype in dtypes:
                new = time_steps(args.device, size, dtype, args.repeats)
                _print_rows(new)
                rows += new
                save()
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} rows ok; JSON: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
