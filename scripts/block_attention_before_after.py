"""The default training step with block attention as it is now and as it was at another commit,
timed in ONE process, interleaved, on one thread, by CPU time (robust to other jobs on the cores).

    PYTHONPATH=. python scripts/block_attention_before_after.py --before df3f30e \
        --json docs/results/block_attention_before_after_cpu.json

"before" is qstar_mini/fast/block_attention.py at that commit, loaded beside the current one; the
step switches between them through ``structured`` and ``step_cache`` (what the thought steps
call), everything else is shared. Each shape: the plain step, then the two steps in alternating
order, ``--rounds`` times; medians. Overhead = step / plain / passes (docs/performance.md).
"""

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile

import torch

import qstar_mini.fast.block_attention as current
import qstar_mini.thoughts as thoughts
from qstar_mini.config import QuietStarConfig
from qstar_mini.studies.bench import REAL, _step, bench_model, cpu_timeit, machine, random_batch, step_passes

SHAPES = {"tiny-b4": ({}, 4, 128), "tiny-b8": ({}, 8, 128), "real-width": (REAL, 1, 256)}


def load_before(ref: str):
    source = subprocess.run(["git", "show", f"{ref}:qstar_mini/fast/block_attention.py"], check=True,
                            capture_output=True, text=True).stdout
    path = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
    path.write(source)
    path.close()
    spec = importlib.util.spec_from_file_location("qstar_mini.fast._block_attention_before", path.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def switcher(before):
    now = dict(structured=current.structured, step_cache=thoughts.step_cache)

    def use(which: str):
        if which == "before":
            current.structured = before.structured
            thoughts.step_cache = lambda cache, steps, m, model=None, text_limits=None: before.step_cache(
                cache, steps, m, model)
        else:
            current.structured, thoughts.step_cache = now["structured"], now["step_cache"]
    return use


def measure(use, sizes: dict, batch: int, seq: int, rounds: int) -> dict:
    model, meta, head = bench_model(**sizes)
    ids, mask = random_batch(batch, seq, model.get_input_embeddings().weight.shape[0])
    cfg = QuietStarConfig(thought_length=11, n_true=4, n_thoughts=2, seq_len=seq, attention="blocks")
    times = {"plain": [], "before": [], "after": []}
    for i in range(rounds):
        times["plain"].append(cpu_timeit(lambda: _step(model, meta, head, ids, mask, cfg.replace(think=False)), 3))
        for which in ("before", "after") if i % 2 == 0 else ("after", "before"):
            use(which)
            times[which].append(cpu_timeit(lambda: _step(model, meta, head, ids, mask, cfg), 1, warmup=int(i == 0)))
    use("after")
    med = {k: statistics.median(v) for k, v in times.items()}
    passes = step_passes(cfg)
    return dict(plain_s=med["plain"], before_s=med["before"], after_s=med["after"], passes=passes,
                before_overhead=med["before"] / med["plain"] / passes, after_overhead=med["after"] / med["plain"] / passes,
                after_over_before=med["after"] / med["before"], rounds=rounds, times=times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="the git commit whose block_attention.py is 'before'")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated from {list(SHAPES)}")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    use = switcher(load_before(args.before))
    rows = []
    for name in args.shapes.split(","):
        sizes, batch, seq = SHAPES[name]
        rounds = args.rounds if name != "real-width" else max(2, args.rounds // 2)
        row = dict(shape=name, batch=batch, seq=seq, sizes=sizes, **measure(use, sizes, batch, seq, rounds))
        print(f"{name}: b={batch} l={seq} plain {row['plain_s']:.4f} s; before {row['before_s']:.3f} s "
              f"(overhead {row['before_overhead']:.3f}); after {row['after_s']:.3f} s "
              f"(overhead {row['after_overhead']:.3f}); after/before {row['after_over_before']:.3f}", flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "before": args.before, "threads": 1, "clock": "CPU time",
                       "settings": "t=11, n_true=4, n_thoughts=2, attention=blocks", "rows": rows}, f, indent=1)


main()
