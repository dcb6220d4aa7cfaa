"""What a thought after every token costs, measured: ``qstar-mini bench``.

Rows (all on one machine, in one run, medians of ``repeats`` timings after ``warmup`` runs):

* ``thoughts``: parallel thought generation (Figure 3 masks + KV cache) against two per-position
  loops: the plain reference :func:`qstar_mini.thoughts.naive_thoughts` (recomputes the
  prefix for every token) and a fairer loop that keeps a KV cache per position.
* ``step``: one Quiet-STaR training step (forward + backward) against a plain LM step on the
  same batch. A step processes ``passes = 1 + n_thoughts * (t + n_true - 1)`` tokens per text
  token (the plain pass once, then t thought tokens and n_true - 1 teacher-forced talk tokens
  for every thought), so ``overhead = (step time / plain time) / passes`` is 1.0 when the
  step costs exactly its floor. Attention over the growing cache is the part above the floor;
  the ``attention=blocks`` row (:mod:`qstar_mini.fast.block_attention`) skips the masked-out keys.
* ``memory``: peak memory of a step relative to the plain step, for each ``memory`` mode of
  :mod:`qstar_mini.fast.rescore` (stepwise graph; thoughts re-scored in one pass; that pass with
  layer checkpointing), every mode and the plain step measured the same way (:func:`step_peak_mib`):
  on a CPU, ``peak_mib`` is the peak RSS of a fresh process during one step above its RSS with
  the model loaded (what the machine must have, allocator caches included); on CUDA the
  allocator's peak (``max_memory_allocated``). The ``step`` rows of the same modes give their time cost.
* ``--goals``: the rows behind the performance goals (:data:`GOALS`; docs/performance.md is
  rendered from their JSON by ``--render``), one thread, CPU time; ``--goals --quick`` in a few minutes.
* ``end to end`` (``--e2e``): wall time of ``make demo``'s job and of nbval over all notebooks.
* ``throughput``: model TFLOP/s of a step (6 N per token-pass) against the measured matmul rate,
  for the tiny model and, with ``--sizes tiny,100m`` (the CUDA default), a ~110M config.
* ``--profile mask|blocks`` prints, instead of the table, the torch profiler's costliest
  operators of one official-shaped step: where the time above the floor goes.
* ``inference``: tokens per second with a thought before every token against plain greedy
  generation with a KV cache. Thinking costs t + 1 single-token passes per new token (t thought
  tokens, then the token itself) against 1, so ``passes = t + 1``.
* ``step: qstar_mini vs official code`` (``--official-venv DIR``, opt-in): our training step
  against the released code's (ezelikman/quiet-star, run by ``scripts/official_bench.py`` in the
  venv ``scripts/official_env.sh`` builds) on the same random tiny model and batch, l = 64 and
  128, b = 4, official settings (``official()``: t = 11 / n_ahead 12, n_true = 4 / n_ahead_talk 4,
  n_thoughts = 2 / n_passes 2), CPU, float32, ONE thread on both sides (ours in this process,
  the thread count restored after), eager attention on both (the official file patches eager
  Mistral; ours also with sdpa for the default ``attention``). One row per ``attention`` mode
  (``mask``, ``blocks`` and the config's default): ``median_s`` ours, ``baseline_median_s`` the
  official step, ``ratio`` = official / ours, "how many times faster" ours is; the same from the
  processes' CPU time in ``cpu_s``, ``baseline_cpu_s``, ``cpu_ratio`` (one thread: equal to the
  wall time when the machine is idle, much less inflated than it when other jobs share the cores).

JSON: ``{"machine": ..., "rows": [{"name", "params", "median_s", "baseline_median_s", "ratio",
"passes", "overhead", ...}]}``; fields that do not apply are null. ``ratio`` reads "how many
times": for ``thoughts`` rows the speed-up of the parallel version (baseline / median), for
``step`` rows the cost of the step over the plain step (median / baseline), for ``memory``
rows peak memory over the plain step's, for ``step: qstar_mini vs official code`` rows the
speed-up over the official code (baseline / median).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import warnings

import torch

from qstar_mini.config import MEMORY_MODES, QuietStarConfig
from qstar_mini.errors import ConfigError
from qstar_mini.lm import forward_hidden, lm_head, new_cache
from qstar_mini.masks import causal_mask, step_position_ids
from qstar_mini.meta_tokens import MetaTokens
from qstar_mini.mixing import MixingHead
from qstar_mini.step import quiet_star_step
from qstar_mini.thoughts import generate_thoughts, naive_thoughts, plain_forward, sample_tokens

TINY = dict(hidden_size=128, num_hidden_layers=4, intermediate_size=384)


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def bench_model(vocab: int = 85, device: str = "cpu", dtype=torch.float32, attn: str = "sdpa", **sizes):
    """A randomly initialised model of the tiny base's shape (timings do not depend on weights)."""
    from qstar_mini.models.tiny import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(vocab, **{**TINY, **sizes})
    cfg._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype)
    hidden = cfg.hidden_size
    meta = MetaTokens(vocab - 2, vocab - 1, torch.randn(2, hidden), scale=1.0).to(device=device, dtype=dtype)
    head = MixingHead(hidden).to(device=device, dtype=dtype)
    return model, meta, head


def timeit(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_batch(batch: int, seq: int, vocab: int, device="cpu"):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab - 2, (batch, seq), generator=g).to(device)
    return ids, torch.ones_like(ids)


@torch.no_grad()
def cached_loop_thoughts(model, meta, input_ids, thought_length: int):
    """Per-position generation with an ordinary KV cache (what `model.generate` would do):
    for each position j, prefill x_{<=j} + <|startofthought|>, then decode t - 3 more tokens."""
    out = []
    for j in range(input_ids.shape[1]):
        cache = new_cache()
        tokens = torch.cat([input_ids[:, : j + 1], torch.full_like(input_ids[:, :1], meta.start_id)], 1)
        mask = torch.ones_like(tokens)
        dtype = model.get_input_embeddings().weight.dtype
        h = forward_hidden(model, meta.embed(model, tokens), causal_mask(mask, dtype),
                           step_position_ids(mask, 0), cache)[:, -1:]
        for k in range(thought_length - 3):
            tok = sample_tokens(lm_head(model)(h), meta.ids, greedy=True)
            pos = torch.full_like(tok, j + 2 + k)
            keys = cache.get_seq_length() + 1
            attend_all = torch.zeros(tok.shape[0], 1, 1, keys, dtype=dtype, device=h.device)
            h = forward_hidden(model, meta.embed(model, tok), attend_all, pos, cache)
        out.append(h)
    return out


@torch.no_grad()
def parallel_thoughts(model, meta, input_ids, mask, thought_length: int, n_thoughts: int = 1,
                      attention: str = "mask"):
    _, cache = plain_forward(model, meta, input_ids, mask)
    return generate_thoughts(model, meta, input_ids, mask, cache, thought_length, n_thoughts, greedy=True,
                             attention=attention)


def thought_rows(seqs, lengths, repeats: int, device: str, with_naive: bool = True, dtype=torch.float32):
    model, meta, _ = bench_model(device=device, dtype=dtype)
    rows = []
    for t in lengths:
        for seq in seqs:
            ids, mask = random_batch(1, seq, 85, device)
            par = timeit(lambda: parallel_thoughts(model, meta, ids, mask, t), repeats)
            loop = timeit(lambda: cached_loop_thoughts(model, meta, ids, t), max(1, repeats // 2))
            naive = (timeit(lambda: naive_thoughts(model, meta, ids, mask, t, 1, greedy=True), 1, warmup=0)
                     if with_naive and seq <= 64 else None)      # minutes at seq 128: skipped
            params = dict(seq=seq, t=t, batch=1, n_thoughts=1)
            rows.append(dict(name="thoughts: parallel vs per-position loop with KV cache", params=params,
                             median_s=par, baseline_median_s=loop, ratio=loop / par, passes=None, overhead=None))
            if naive is not None:
                rows.append(dict(name="thoughts: parallel vs naive reference (no cache)", params=params,
                                 median_s=par, baseline_median_s=naive, ratio=naive / par, passes=None,
                                 overhead=None))
    return rows


def step_passes(cfg: QuietStarConfig) -> int:
    """Token-passes of a Quiet-STaR step per text token: 1 plain + n_thoughts * (t + n_true - 1)."""
    return 1 + cfg.n_thoughts * (cfg.thought_length + cfg.n_true - 1)


def _step(model, meta, head, ids, mask, cfg):
    out = quiet_star_step(model, meta, head, ids, mask, cfg, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    meta.zero_grad(set_to_none=True)


def step_rows(settings, seqs, batch: int, repeats: int, device: str, dtype=torch.float32):
    model, meta, head = bench_model(device=device, dtype=dtype)
    rows, plain_s = [], {}
    for label, cfg in settings:
        for seq in seqs:
            cfg_l = cfg.replace(seq_len=seq)
            ids, mask = random_batch(batch, seq, 85, device)
            qs = timeit(lambda: _step(model, meta, head, ids, mask, cfg_l), repeats)
            if seq not in plain_s:      # one baseline per length, shared by the rows; short and noisy: more repeats
                plain_s[seq] = timeit(lambda: _step(model, meta, head, ids, mask, cfg_l.replace(think=False)),
                                      max(10, repeats))
            plain = plain_s[seq]
            passes = step_passes(cfg_l)
            ratio = qs / plain
            rows.append(dict(name=f"step ({label}) vs plain LM step", median_s=qs, baseline_median_s=plain,
                             params=dict(seq=seq, batch=batch, t=cfg.thought_length, n_true=cfg.n_true,
                                         n_thoughts=cfg.n_thoughts, attention=cfg.attention, memory=cfg.memory),
                             ratio=ratio, passes=passes, overhead=ratio / passes))
    return rows


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return 0.0


def peak_rss_during(fn) -> float:
    """Peak RSS above the starting RSS (MiB) while fn() runs, sampled every millisecond."""
    start, peak, done = rss_mib(), [0.0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.001)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], rss_mib()) - start


def _peak_rss_child(settings: dict) -> float:
    """Peak RSS (MiB) above the loaded model of a fresh process running one step of this shape."""
    code = (
        "import json, sys\n"
        "from qstar_mini.studies.bench import _memory_probe\n"
        "print(_memory_probe(json.loads(sys.argv[1])))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(settings)], capture_output=True, text=True,
                         check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def _high_water_mib() -> float | None:
    """The process's peak RSS so far (VmHWM, MiB), None where /proc does not give it."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def peak_rss_above_now(fn) -> float:
    """Peak RSS above the current RSS (MiB) while fn() runs: Linux's exact high-water mark, reset
    first (``/proc/self/clear_refs``), where allowed; else :func:`peak_rss_during`'s sampling."""
    start = rss_mib()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                   # 5: reset the peak RSS to the current RSS
    except OSError:
        return peak_rss_during(fn)
    fn()
    peak = _high_water_mib()
    return peak - start if peak is not None else peak_rss_during(fn)


def _memory_probe(s: dict) -> float:
    """In a fresh process: the model and batch, then one step; its peak RSS above that (MiB)."""
    torch.set_num_threads(1)
    model, meta, head = bench_model(attn=s.get("attn", "sdpa"))
    ids, mask = random_batch(s["batch"], s["seq"], 85)
    cfg = QuietStarConfig(thought_length=s["t"], n_true=s["n_true"], n_thoughts=s["n_thoughts"],
                          seq_len=s["seq"], think=s["think"], memory=s.get("memory", "stepwise"),
                          attention=s.get("attention", "auto"))
    from qstar_mini.models.check import resolve_attention
    from qstar_mini.thoughts import preallocation_works

    resolve_attention(model, meta, cfg)                    # the one-time probes, before the measurement,
    preallocation_works(model, meta)                       # in every mode (the plain step's too)
    return peak_rss_above_now(lambda: _step(model, meta, head, ids, mask, cfg))


def peak_tensor_mib(fn, device: str = "cpu") -> float:
    """Peak memory held by live tensors (parameters included) while fn() runs, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the same quantity from the torch
    profiler's memory timeline (every allocation and free it records), so it does not depend
    on the allocator or on other processes, unlike RSS. Profiling makes fn() ~10x slower.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with _quiet_c_stderr(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # export_memory_timeline is marked deprecated
        # torch 2.11 warns that one profiling cycle keeps only its own events: we run one cycle
        warnings.filterwarnings("ignore", message=".*Profiler clears events", category=UserWarning)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            fn()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "timeline.json")
            prof.export_memory_timeline(path, device="cpu")
            with open(path) as f:
                _, sizes = json.load(f)                 # bytes per category at each event
    return max((sum(s) for s in sizes), default=0.0) / 2**20


@contextlib.contextmanager
def _quiet_c_stderr():
    """Hide what C++ code writes to file descriptor 2 (the profiler's start/stop lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


MEMORY_NAMES = {"stepwise": "stepwise graph (default)", "rescore": "rescore in one pass",
                "rescore_checkpointed": "rescore + layer checkpointing"}


def step_peak_mib(shape: dict, device: str, think: bool = True, memory: str = "stepwise",
                  attention: str = "auto", dtype=torch.float32) -> float:
    """Peak memory of one step (forward + backward) of this shape, measured one way for every mode.

    CPU: the peak RSS of a fresh process during its step, above its RSS with the model, batch and
    one-time probes loaded (:func:`_memory_probe`; the sdpa bench model). It is what the machine
    must have, allocator caches included. CUDA: the allocator's peak (``max_memory_allocated``).
    shape: seq, t, n_true, n_thoughts, batch."""
    if device == "cpu":
        return _peak_rss_child({**shape, "think": think, "memory": memory, "attention": attention})
    model, meta, head = bench_model(device=device, dtype=dtype)
    ids, mask = random_batch(shape["batch"], shape["seq"], 85, device)
    cfg = QuietStarConfig(thought_length=shape["t"], n_true=shape["n_true"], n_thoughts=shape["n_thoughts"],
                          seq_len=shape["seq"], think=think, memory=memory, attention=attention)
    _step(model, meta, head, ids, mask, cfg)               # warm-up: lazy allocations out of the way
    return peak_tensor_mib(lambda: _step(model, meta, head, ids, mask, cfg), device)


def memory_rows(shapes, batch: int, device: str, modes=MEMORY_MODES, dtype=torch.float32):
    """Peak memory of one step (forward + backward) against the plain LM step, per memory mode
    (:mod:`qstar_mini.fast.rescore`), each measured by :func:`step_peak_mib`."""
    rows = []
    for seq, t, n_true, n_thoughts in shapes:
        shape = dict(seq=seq, t=t, n_true=n_true, n_thoughts=n_thoughts, batch=batch)
        plain = step_peak_mib(shape, device, think=False, dtype=dtype)
        for memory in modes:
            step = step_peak_mib(shape, device, memory=memory, dtype=dtype)
            rows.append(dict(name=f"memory: {MEMORY_NAMES[memory]} vs plain LM step", params={**shape, "memory": memory},
                             median_s=None, baseline_median_s=None, ratio=step / max(plain, 1e-9), passes=None,
                             overhead=None, peak_mib=step, baseline_peak_mib=plain, peak="fresh-process RSS"
                             if device == "cpu" else "allocator"))
    return rows


@torch.no_grad()
def plain_generate(model, meta, prompt_ids: torch.Tensor, n_new: int) -> list[int]:
    """Greedy generation with a KV cache, no thoughts: one single-token pass per new token."""
    cache = new_cache()
    mask = torch.ones_like(prompt_ids)
    dtype = model.get_input_embeddings().weight.dtype
    h = forward_hidden(model, meta.embed(model, prompt_ids), causal_mask(mask, dtype),
                       step_position_ids(mask, 0), cache)[:, -1:]
    out, position = [], prompt_ids.shape[1] - 1
    for _ in range(n_new):
        token = sample_tokens(lm_head(model)(h), meta.ids, greedy=True)           # (1, 1)
        out.append(int(token))
        position += 1
        attend_all = torch.zeros(1, 1, 1, cache.get_seq_length() + 1, dtype=dtype, device=h.device)
        h = forward_hidden(model, meta.embed(model, token), attend_all,
                           torch.full_like(token, position), cache)
    return out


def inference_rows(n_new: int, thought_lengths, repeats: int, device: str, dtype=torch.float32):
    """Tokens per second thinking before every token vs plain greedy generation."""
    from qstar_mini.inference import generate_with_thoughts
    from qstar_mini.models.tiny import build_tokenizer

    model, meta, head = bench_model(device=device, dtype=dtype)
    tokenizer = build_tokenizer()
    prompt = "31415="
    prompt_ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]],
                              device=device)
    plain = timeit(lambda: plain_generate(model, meta, prompt_ids, n_new), repeats)
    rows = []
    for t in thought_lengths:
        cfg = QuietStarConfig(thought_length=t, n_true=1, n_thoughts=2, seq_len=64)
        with torch.no_grad():
            thinking = timeit(lambda: generate_with_thoughts(model, tokenizer, meta, head, cfg, prompt, n_new,
                                                             stop_at_eos=False), repeats)
        rows.append(dict(name="inference: thinking before every token vs plain generation",
                         params=dict(new_tokens=n_new, t=t), median_s=thinking, baseline_median_s=plain,
                         ratio=thinking / plain, passes=t + 1, overhead=thinking / plain / (t + 1),
                         tokens_per_s=n_new / thinking, baseline_tokens_per_s=n_new / plain))
    return rows


SIZES = {
    "tiny": dict(vocab=85, **TINY),                              # the project's tiny base, ~0.8M parameters
    "100m": dict(vocab=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, intermediate_size=2048),  # ~110M, a GPT-2-small-sized Mistral
}


def matmul_tflops(device: str, dtype=torch.float32, n: int | None = None, repeats: int = 5) -> float:
    """The machine's measured dense matmul rate in TFLOP/s: an n x n by n x n product (2 n^3 FLOPs)."""
    n = n or (8192 if device == "cuda" else 1024)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    return 2 * n ** 3 / timeit(lambda: a @ b, repeats) / 1e12


def matmul_params(model) -> int:
    """Parameters a token meets in matrix multiplies: all but the input embedding table (whose
    lookup is not a matmul); a tied LM head is counted once, as the head."""
    total = sum(p.numel() for p in model.parameters())
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return total if head is embedding else total - embedding.numel()


def throughput_rows(sizes, seq: int, batch: int, repeats: int, device: str, dtype=torch.float32):
    """Achieved TFLOP/s of a Quiet-STaR step (official shape) and of a plain LM step, against the
    measured matmul rate. Model FLOPs by the usual convention: 6 N per token-pass (forward 2 N,
    backward 4 N; N = :func:`matmul_params`), attention and the mixing head not counted, so the
    achieved fraction is a lower bound."""
    rate = matmul_tflops(device, dtype)
    cfg = QuietStarConfig(thought_length=12, n_true=4, n_thoughts=2, seq_len=seq)
    rows = []
    for size in sizes:
        spec = dict(SIZES[size])
        vocab = spec.pop("vocab")
        model, meta, head = bench_model(vocab=vocab, device=device, dtype=dtype, **spec)
        ids, mask = random_batch(batch, seq, vocab, device)
        n_params = matmul_params(model)
        for label, c, passes in (("Quiet-STaR step (official-shaped)", cfg, step_passes(cfg)),
                                 ("plain LM step", cfg.replace(think=False), 1)):
            seconds = timeit(lambda: _step(model, meta, head, ids, mask, c), repeats)
            flops = 6 * n_params * batch * seq * passes
            achieved = flops / seconds / 1e12
            rows.append(dict(name=f"throughput: {label}, TFLOP/s vs measured matmul rate",
                             params=dict(size=size, params_m=round(n_params / 1e6, 1), dtype=str(dtype).replace("torch.", ""),
                                         seq=seq, batch=batch),
                             median_s=seconds, baseline_median_s=None, ratio=achieved / rate, passes=passes,
                             overhead=None, tflops=achieved, matmul_tflops=rate, model_flops=flops))
    return rows


def profile_step(seq: int = 128, batch: int = 8, attention: str = "mask", memory: str = "stepwise",
                 device: str = "cpu", dtype=torch.float32, top: int = 12, repeats: int = 3) -> list[dict]:
    """Where an official-shaped step's time goes: the torch profiler's top operators by self time.

    Runs ``repeats`` steps (forward + backward) after two warm-ups on the tiny model's shape.
    returns: [{"op", "self_s", "percent", "calls"}], most time first, over ``top`` rows.
    """
    from torch.profiler import ProfilerActivity, profile

    model, meta, head = bench_model(device=device, dtype=dtype)
    ids, mask = random_batch(batch, seq, 85, device)
    cfg = QuietStarConfig(thought_length=12, n_true=4, n_thoughts=2, seq_len=seq, attention=attention, memory=memory)
    for _ in range(2):
        _step(model, meta, head, ids, mask, cfg)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with _quiet_c_stderr(), profile(activities=activities) as prof:
        for _ in range(repeats):
            _step(model, meta, head, ids, mask, cfg)
        if device == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events)
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [dict(op=e.key, self_s=getattr(e, attr) / 1e6 / repeats, percent=100 * getattr(e, attr) / total,
                 calls=e.count // repeats) for e in events[:top]]


def format_profile(rows: list[dict], title: str) -> str:
    lines = [title, f"{'operator':52s} {'self s/step':>11s} {'%':>6s} {'calls':>7s}"]
    lines += [f"{r['op'][:52]:52s} {r['self_s']:11.4f} {r['percent']:6.1f} {r['calls']:7d}" for r in rows]
    return "\n".join(lines)


OFFICIAL_SEQS = (64, 128)       # the lengths of the official-code comparison (docs: the performance goals)


def official_venv_python(venv: str) -> str:
    """``venv``'s python, once it is seen to hold the official Quiet-STaR Mistral files
    (``scripts/official_env.sh``); otherwise a one-line :class:`ConfigError` naming the fix."""
    from qstar_mini.paths import REPO_ROOT

    hint = f"build it with: bash scripts/official_env.sh {venv} /path/to/quiet-star-checkout"
    python = os.path.join(venv, "bin", "python")
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise ConfigError(f"--official-venv {venv} has no bin/python; {hint}")
    if not (REPO_ROOT / "scripts" / "official_bench.py").is_file():
        raise ConfigError("--official-venv needs scripts/official_bench.py: run the bench from a checkout of "
                          "the repository")
    find = subprocess.run([python, "-c", "import importlib.util as u; s = u.find_spec('transformers'); "
                                         "print(s.origin if s else '')"], capture_output=True, text=True)
    origin = find.stdout.strip()
    if find.returncode or not origin:
        raise ConfigError(f"--official-venv {venv}: transformers is not installed there; {hint}")
    modeling = os.path.join(os.path.dirname(origin), "models", "mistral", "modeling_mistral.py")
    try:
        with open(modeling) as f:
            official_file = "n_ahead_talk" in f.read()
    except OSError:
        official_file = False
    if not official_file:
        raise ConfigError(f"--official-venv {venv}: {modeling} is not the official Quiet-STaR file; {hint}")
    return python


def official_step_seconds(python: str, seq: int, batch: int, repeats: int, warmup: int, dims: dict) -> dict:
    """Run ``scripts/official_bench.py`` for one length in the official venv: its JSON output."""
    from qstar_mini.paths import REPO_ROOT

    cmd = [python, str(REPO_ROOT / "scripts" / "official_bench.py"), "--seqs", str(seq), "--batch", str(batch),
           "--repeats", str(repeats), "--warmup", str(warmup), "--threads", "1", "--dims", json.dumps(dims)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("PYTHONPATH", None)          # the official venv must not see this venv's packages
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ConfigError(f"the official step failed in {python}: {tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def timeit_wall_and_cpu(fn, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Medians of the wall time and of this process's CPU time of fn() in seconds (CPU only)."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return statistics.median(wall), statistics.median(cpu)


def _official_dims(shape) -> dict:
    """The model shape ``scripts/official_bench.py --dims`` builds its Mistral from: ``shape``'s."""
    return {k: getattr(shape, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "num_key_value_heads", "intermediate_size", "max_position_embeddings",
                                           "tie_word_embeddings", "rms_norm_eps")}


def official_rows(venv: str, seqs=OFFICIAL_SEQS, batch: int = 4, repeats: int = 3, warmup: int = 1,
                  sdpa: bool = True) -> list[dict]:
    """Our training step against the official code's, one thread each, same model shape and batch.

    For each length: the official step (a subprocess in ``venv``), then ours in this process
    with ``official()`` settings (t = 11, n_true = 4, n_thoughts = 2) for each ``attention``
    mode (the default first, then ``mask``, ``blocks``), eager attention like the official code
    (and sdpa for the default mode when ``sdpa``). CPU, float32. ratio = official / ours, from
    wall times; cpu_ratio the same from each process's CPU time (robust to a shared machine).
    """
    from qstar_mini.config import official
    from qstar_mini.models.tiny import tiny_config

    python = official_venv_python(venv)
    cfg0 = official(batch_size=batch)
    attentions = list(dict.fromkeys([cfg0.attention, "mask", "blocks"]))
    shape = tiny_config(85, **TINY)
    dims = _official_dims(shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        models = {impl: bench_model(attn=impl) for impl in (("eager", "sdpa") if sdpa else ("eager",))}
        rows = []
        for seq in seqs:
            theirs = official_step_seconds(python, seq, batch, repeats, warmup, dims)
            baseline, baseline_cpu = theirs["rows"][0]["median_s"], theirs["rows"][0]["cpu_median_s"]
            ids, mask = random_batch(batch, seq, 85)
            for attention in attentions:
                cfg = cfg0.replace(seq_len=seq, attention=attention)
                default = attention == cfg0.attention
                for impl in [i for i in models if i == "eager" or default]:
                    model, meta, head = models[impl]
                    ours, ours_cpu = timeit_wall_and_cpu(lambda: _step(model, meta, head, ids, mask, cfg),
                                                         repeats, warmup)
                    label = f"attention={attention}{' (default)' if default else ''}, {impl}"
                    rows.append(dict(name=f"step: qstar_mini vs official code, {label}",
                                     params=dict(seq=seq, batch=batch, attention=attention, attn=impl,
                                                 default=default, t=cfg.thought_length, n_true=cfg.n_true,
                                                 n_thoughts=cfg.n_thoughts, threads=1, memory=cfg.memory),
                                     median_s=ours, baseline_median_s=baseline, ratio=baseline / ours,
                                     passes=step_passes(cfg), overhead=None,
                                     cpu_s=ours_cpu, baseline_cpu_s=baseline_cpu, cpu_ratio=baseline_cpu / ours_cpu,
                                     baseline_times_s=theirs["rows"][0]["times_s"],
                                     baseline_versions=theirs["versions"]))
    finally:
        torch.set_num_threads(threads)
    return rows


def e2e_rows(commands: list[tuple[str, list[str]]]) -> list[dict]:
    """Wall time of whole commands (one run each), e.g. ``make demo``'s pipeline and nbval."""
    from qstar_mini.paths import REPO_ROOT

    rows = []
    for name, argv in commands:
        start = time.perf_counter()
        subprocess.run(argv, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows.append(dict(name=f"end to end: {name}", params=dict(command=" ".join(argv[1:])),
                         median_s=time.perf_counter() - start, baseline_median_s=None, ratio=None,
                         passes=None, overhead=None))
    return rows


E2E_COMMANDS = [
    ("make demo (base completions + demo pipeline)", [sys.executable, "-m", "qstar_mini", "demo"]),
    ("nbval over all notebooks", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "notebooks"]),
]


def measure_all(quick: bool = True, device: str | None = None, e2e: bool = False, dtype=None,
        sizes: tuple[str, ...] | None = None, official_venv: str | None = None) -> dict:
    """Every row in one run. dtype: default float32 on CPU, bfloat16 on CUDA. sizes: the model
    sizes of the throughput rows (default ``tiny`` on CPU, ``tiny`` and ``100m`` on CUDA).
    official_venv: also the rows against the official code (:func:`official_rows`; CPU, one
    thread, whatever device and dtype the other rows use)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    sizes = sizes or (("tiny", "100m") if device == "cuda" else ("tiny",))
    torch.manual_seed(0)
    tiny = QuietStarConfig(thought_length=7, n_true=2, n_thoughts=4, seq_len=64)
    official_shape = QuietStarConfig(thought_length=12, n_true=4, n_thoughts=2, seq_len=64)
    variants = [("official-shaped, attention=blocks", official_shape.replace(attention="blocks"))]  # less waste
    variants += [(f"official-shaped, memory={m}", official_shape.replace(memory=m))
                 for m in MEMORY_MODES if m != "stepwise"]                 # what the memory trade costs
    kw = dict(device=device, dtype=dtype)
    if quick:
        rows = thought_rows([32, 64], [8], repeats=3, with_naive=False, **kw)
        rows += step_rows([("tiny", tiny), ("official-shaped", official_shape)] + variants, [64],
                          batch=4, repeats=3, **kw)
        rows += memory_rows([(64, 12, 4, 2)], batch=4, **kw)
        rows += inference_rows(32, [7], repeats=3, **kw)
        rows += throughput_rows(sizes, seq=64, batch=4, repeats=3, **kw)
    else:
        rows = thought_rows([32, 64, 128], [8, 12], repeats=3, **kw)
        rows += step_rows([("tiny", tiny), ("official-shaped", official_shape)] + variants, [64, 128],
                          batch=8, repeats=3, **kw)
        rows += memory_rows([(64, 12, 4, 2), (128, 12, 4, 2), (64, 8, 4, 2), (128, 8, 4, 2)], batch=8, **kw)
        rows += inference_rows(64, [7, 12], repeats=3, **kw)
        rows += throughput_rows(sizes, seq=128, batch=8, repeats=3, **kw)
    if e2e:
        rows += e2e_rows(E2E_COMMANDS)
    if official_venv:
        rows += official_rows(official_venv)
    return {"machine": machine(), "dtype": str(dtype).replace("torch.", ""), "quick": quick, "rows": rows}


# ------------------------------------------------------------------------------ goals (#20)

# SmolLM2-135M's dimensions (a Llama; the bench model is the same computation as a Mistral without
# sliding window), random weights. The goals run 4 of its 30 layers at b = 1: the whole model's step
# at b = 2, l = 256 needs more than 16 GB (it was killed for memory on a 23 GB machine).
REAL = dict(vocab=49152, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
            num_hidden_layers=4)

GOALS = (
    # key, what, target, how it compares
    ("vs_official", "default training step vs the official code's, l = 128, b = 4 (times faster)", 3.0, ">="),
    ("overhead_b4", "default step's overhead over its pass floor, tiny model, b = 4, l = 128", 1.1, "<="),
    ("overhead", "default step's overhead over its pass floor, tiny model, b = 8, l = 128", 1.1, "<="),
    ("overhead_real", "default step's overhead over its pass floor, SmolLM2-135M's width (4 of its 30 layers), "
                      "b = 1, l = 256", 1.1, "<="),
    ("thoughts", "gradient-free parallel thoughts (auto) vs the per-position loop with a KV cache, l = 64, t = 8 "
                 "(times faster)", 30.0, ">="),
    ("memory", "lowest peak memory of a mode within 1.2x the default step's time, vs the plain step, l = 64, "
               "b = 4 (fresh-process RSS)", 10.0, "<="),
)


def cpu_timeit(fn, repeats: int, warmup: int = 1) -> float:
    """Median CPU time of fn() in seconds (this process; with one thread, the work itself, which
    other jobs on a shared machine disturb far less than wall time)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def _overhead_rows(key, sizes, batch, seq, attentions, repeats, label) -> list[dict]:
    """The step (official settings) against the plain step on one batch: overhead over the pass floor."""
    from qstar_mini.models.check import resolve_attention

    model, meta, head = bench_model(**sizes)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids, mask = random_batch(batch, seq, vocab)
    cfg0 = QuietStarConfig(thought_length=11, n_true=4, n_thoughts=2, seq_len=seq)
    default = resolve_attention(model, meta, cfg0)
    plain = cpu_timeit(lambda: _step(model, meta, head, ids, mask, cfg0.replace(think=False)), max(5, repeats))
    rows = []
    for attention in dict.fromkeys([default, *attentions]):
        cfg = cfg0.replace(attention=attention)
        t = cpu_timeit(lambda: _step(model, meta, head, ids, mask, cfg), repeats)
        overhead = t / plain / step_passes(cfg)
        rows.append(dict(name=f"goal overhead: step vs plain LM step, {label}", goal=key if attention == default else None,
                         params=dict(seq=seq, batch=batch, t=11, n_true=4, n_thoughts=2, attention=attention,
                                     default=attention == default),
                         median_s=t, baseline_median_s=plain, ratio=t / plain, passes=step_passes(cfg),
                         overhead=overhead, value=overhead))
    return rows


def _thought_rows(repeats: int, quick: bool) -> list[dict]:
    """Gradient-free thoughts for one row, l = 64, t = 8: the cached per-position loop against the
    parallel steps with the attention ``auto`` takes without gradient (and, in full, the other one),
    and the floor: t + 1 plain forward passes over the l tokens (what parallel generation runs)."""
    from qstar_mini.models.check import sampling_attention

    model, meta, _ = bench_model()
    ids, mask = random_batch(1, 64, 85)
    cfg = QuietStarConfig(thought_length=8, seq_len=64)
    chosen = sampling_attention(model, meta, cfg, 1, 64)
    loop = cpu_timeit(lambda: cached_loop_thoughts(model, meta, ids, 8), max(1, repeats - 1 if quick else repeats))
    with torch.no_grad():
        floor = 9 * cpu_timeit(lambda: plain_forward(model, meta, ids, mask), 10)
    rows = []
    for attention in [chosen] if quick else dict.fromkeys([chosen, "mask", "blocks"]):
        t = cpu_timeit(lambda: parallel_thoughts(model, meta, ids, mask, 8, attention=attention), max(5, repeats))
        rows.append(dict(name="goal thoughts: parallel vs per-position loop with KV cache",
                         goal="thoughts" if attention == chosen else None,
                         params=dict(seq=64, t=8, batch=1, n_thoughts=1, attention=attention,
                                     default=attention == chosen),
                         median_s=t, baseline_median_s=loop, ratio=loop / t, passes=9, overhead=t / floor,
                         value=loop / t, floor_s=floor, floor_ratio=loop / floor))
    return rows


def _memory_goal_rows(repeats: int, quick: bool) -> list[dict]:
    """Peak memory (:func:`step_peak_mib`) and CPU time of each memory mode, b = 4, l = 64, official
    settings. The goal's value: the lowest peak ratio among the modes within 1.2x the default's time."""
    model, meta, head = bench_model()
    ids, mask = random_batch(4, 64, 85)
    shape = dict(seq=64, t=11, n_true=4, n_thoughts=2, batch=4)
    cfg0 = QuietStarConfig(thought_length=11, n_true=4, n_thoughts=2, seq_len=64)
    plain = step_peak_mib(shape, "cpu", think=False)
    rows = []
    for memory in MEMORY_MODES:
        cfg = cfg0.replace(memory=memory)
        t = cpu_timeit(lambda: _step(model, meta, head, ids, mask, cfg), max(2, repeats - 1) if quick else repeats)
        peak = step_peak_mib(shape, "cpu", memory=memory)
        rows.append(dict(name="goal memory: peak memory vs plain LM step", goal=None,
                         params=dict(seq=64, batch=4, t=11, n_true=4, n_thoughts=2, attention=cfg.attention,
                                     memory=memory, default=memory == "stepwise"),
                         median_s=t, baseline_median_s=None, ratio=peak / plain, passes=None, overhead=None,
                         peak_mib=peak, baseline_peak_mib=plain, peak="fresh-process RSS"))
    return mark_memory_goal(rows)


def mark_memory_goal(rows: list[dict], slack: float = 1.2) -> list[dict]:
    """Of memory rows (the default mode's first), the one with the lowest peak ratio among those
    within ``slack`` x the default's time becomes the memory goal's row; each gets time_vs_default."""
    for row in rows:
        row["time_vs_default"] = row["median_s"] / rows[0]["median_s"]
    best = min((r for r in rows if r["time_vs_default"] <= slack), key=lambda r: r["ratio"])
    best["goal"], best["value"] = "memory", best["ratio"]
    return rows


def official_real_rows(venv: str, seq: int = 256, batch: int = 1, repeats: int = 1, warmup: int = 1) -> list[dict]:
    """Our default step against the official code's at SmolLM2-135M's width (:data:`REAL`: its
    hidden size, heads and vocabulary, 4 of its 30 layers), one thread each, eager attention in
    both, official settings, random weights. ratio = official / ours from each process's CPU time."""
    from qstar_mini.config import official
    from qstar_mini.models.tiny import tiny_config

    python = official_venv_python(venv)
    sizes = {k: v for k, v in REAL.items() if k != "vocab"}
    shape = tiny_config(REAL["vocab"], **{**TINY, **sizes})
    dims = _official_dims(shape)
    theirs = official_step_seconds(python, seq, batch, repeats, warmup, dims)["rows"][0]
    cfg = official(batch_size=batch, seq_len=seq)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, meta, head = bench_model(attn="eager", **REAL)
        ids, mask = random_batch(batch, seq, REAL["vocab"])
        ours, ours_cpu = timeit_wall_and_cpu(lambda: _step(model, meta, head, ids, mask, cfg), repeats, warmup)
    finally:
        torch.set_num_threads(threads)
    return [dict(name="step: qstar_mini vs official code, SmolLM2-135M width (4 layers)",
                 params=dict(seq=seq, batch=batch, attention=cfg.attention, attn="eager", default=True,
                             t=cfg.thought_length, n_true=cfg.n_true, n_thoughts=cfg.n_thoughts, threads=1,
                             memory=cfg.memory),
                 median_s=ours, baseline_median_s=theirs["median_s"], ratio=theirs["median_s"] / ours,
                 passes=step_passes(cfg), overhead=None, cpu_s=ours_cpu, baseline_cpu_s=theirs["cpu_median_s"],
                 cpu_ratio=theirs["cpu_median_s"] / ours_cpu)]


def goal_rows(official_venv: str | None = None, repeats: int = 3, quick: bool = False) -> list[dict]:
    """The rows behind :data:`GOALS`, on one CPU thread, timed by CPU time, official settings
    (t = 11 = n_ahead - 1, n_true = 4, n_thoughts = 2), the default attention (in full, the
    dense-mask reference beside it). Without ``official_venv`` the first goal is not measured;
    ``quick`` leaves out the real-width row and the references (a few minutes on 2 idle cores)."""
    from qstar_mini.config import official

    assert official().attention == QuietStarConfig().attention     # the preset trains with the default too
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        refs = () if quick else ("mask",)
        rows = _overhead_rows("overhead_b4", {}, 4, 128, refs, repeats, "tiny model")
        rows += _overhead_rows("overhead", {}, 8, 128, refs, repeats, "tiny model")
        if not quick:
            rows += _overhead_rows("overhead_real", REAL, 1, 256, (), 1, "SmolLM2-135M width, 4 layers")
        rows += _thought_rows(repeats, quick)
        rows += _memory_goal_rows(repeats, quick)
    finally:
        torch.set_num_threads(threads)
    if official_venv:
        for row in official_rows(official_venv, sdpa=False):
            if row["params"]["seq"] == 128 and row["params"]["default"]:
                row["goal"], row["value"] = "vs_official", row["cpu_ratio"]
            rows.append(row)
        if not quick:
            rows += official_real_rows(official_venv)
    return rows


def goal_summary(rows: list[dict]) -> list[dict]:
    """Each goal of :data:`GOALS` with its measured value (None: not measured) and whether it is met."""
    out = []
    for key, what, target, op in GOALS:
        found = [r for r in rows if r.get("goal") == key]
        value = found[0]["value"] if found else None
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out.append(dict(goal=key, what=what, target=f"{op} {target:g}", value=value, met=met))
    return out


def format_goals(summary: list[dict]) -> str:
    """The goals as a markdown table (README's Performance section is this, from the JSON)."""
    lines = ["| goal | target | measured | met |", "| --- | --- | --- | --- |"]
    for g in summary:
        value = "not measured" if g["value"] is None else f"{g['value']:.2f}"
        met = "-" if g["met"] is None else ("yes" if g["met"] else "**no**")
        lines.append(f"| {g['what']} | {g['target']} | {value} | {met} |")
    return "\n".join(lines)


def format_goal_rows(rows: list[dict]) -> str:
    """Every row of a goals run as a markdown table: time (CPU s), baseline, ratio, memory."""
    lines = ["| row | settings | CPU s | baseline CPU s | ratio | overhead | peak MiB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    skip = ("default", "t", "n_true", "n_thoughts", "threads", "memory", "attn")
    for r in rows:
        p = dict(r["params"])
        settings = ", ".join(f"{k}={v}" for k, v in p.items() if k not in skip)
        if p.get("memory", "stepwise") != "stepwise":
            settings += f", memory={p['memory']}"
        if p.get("default"):
            settings += " (default)"
        cpu = r.get("cpu_s", r["median_s"])
        base = r.get("baseline_cpu_s", r["baseline_median_s"])
        ratio = r.get("cpu_ratio", r["ratio"])
        f = lambda v, spec: "-" if v is None else format(v, spec)
        peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f} / {r['baseline_peak_mib']:.0f}"
        lines.append(f"| {r['name']} | {settings} | {f(cpu, '.3f')} | {f(base, '.3f')} | {f(ratio, '.2f')} | "
                     f"{f(r.get('overhead'), '.2f')} | {peak} |")
    return "\n".join(lines)


PERFORMANCE_PAGE = "docs/performance.md"
MARKERS = ("<!-- bench-goals: start -->\n", "<!-- bench-goals: end -->")


def performance_section(result: dict) -> str:
    """What docs/performance.md shows between its bench markers, made from a goals JSON only."""
    link = os.path.relpath(result["json"], os.path.dirname(PERFORMANCE_PAGE))     # from the page's folder
    return (f"Measured by `{result['command']}` on {result['machine']}, one thread, CPU time "
            f"(medians; the JSON is [`{result['json']}`]({link})).\n\n"
            + format_goals(result["goals"]) + "\n\n" + format_goal_rows(result["rows"]) + "\n")


def format_table(result: dict) -> str:
    lines = [f"machine: {result['machine']}, {result.get('dtype', 'float32')}",
             f"{'row':70s} {'params':44s} {'median s':>9s} {'baseline':>9s} {'ratio':>7s} {'passes':>6s} "
             f"{'overhead':>8s} {'MiB or TFLOP/s':>14s}"]
    for r in result["rows"]:
        defaults = {"memory": "stepwise", "attention": "mask"}
        p = ",".join(f"{k}={v}" for k, v in r["params"].items() if defaults.get(k) != v)
        f = lambda v, spec: "-" if v is None else format(v, spec)
        if r.get("peak_mib") is not None:
            peak = f"{r['peak_mib']:.0f} / {r['baseline_peak_mib']:.0f}"
        elif r.get("tflops") is not None:
            peak = f"{r['tflops']:.3g} / {r['matmul_tflops']:.3g}"
        else:
            peak = "-"
        lines.append(f"{r['name'][:70]:70s} {p[:44]:44s} {f(r['median_s'], '9.4f')} "
                     f"{f(r['baseline_median_s'], '9.4f')} {f(r['ratio'], '7.2f')} {f(r['passes'], '6d')} "
                     f"{f(r['overhead'], '8.2f')} {peak:>14s}")
    return "\n".join(lines)



# ----------------------------------------------------------- block attention: cost, before and after

BEFORE_AFTER_SHAPES = {"tiny-b4": ({}, 4, 128), "tiny-b8": ({}, 8, 128), "real-width": (REAL, 1, 256)}


def _load_block_attention_at(ref: str):
    """qstar_mini/fast/block_attention.py as it was at git commit ``ref``, loaded beside the current one."""
    import importlib.util
    import tempfile

    from qstar_mini.paths import REPO_ROOT

    source = subprocess.run(["git", "-C", str(REPO_ROOT), "show", f"{ref}:qstar_mini/fast/block_attention.py"],
                            capture_output=True, text=True)
    if source.returncode:
        raise ConfigError(f"--before {ref}: {source.stderr.strip() or 'git show failed'}")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source.stdout)
    spec = importlib.util.spec_from_file_location("qstar_mini.fast._block_attention_before", f.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _block_attention_switch(before):
    """use("before") / use("after"): what the thought steps call (``structured``, ``step_cache``)."""
    import qstar_mini.fast.block_attention as current
    import qstar_mini.thoughts as thoughts

    now = dict(structured=current.structured, step_cache=thoughts.step_cache)

    def old_step_cache(cache, steps, m, model=None, text_limits=None):
        return before.step_cache(cache, steps, m, model)

    def use(which: str):
        current.structured = before.structured if which == "before" else now["structured"]
        thoughts.step_cache = old_step_cache if which == "before" else now["step_cache"]
    return use


def before_after_rows(ref: str, shapes=tuple(BEFORE_AFTER_SHAPES), rounds: int = 5) -> list[dict]:
    """The default step with block attention now and as it was at commit ``ref``, in ONE process:
    per shape the plain step, then the two steps in alternating order, ``rounds`` times (the
    real-width shape half as many, at least 2), one thread, CPU time, medians."""
    use = _block_attention_switch(_load_block_attention_at(ref))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for name in shapes:
            sizes, batch, seq = BEFORE_AFTER_SHAPES[name]
            model, meta, head = bench_model(**sizes)
            ids, mask = random_batch(batch, seq, model.get_input_embeddings().weight.shape[0])
            cfg = QuietStarConfig(thought_length=11, n_true=4, n_thoughts=2, seq_len=seq, attention="blocks")
            times = {"plain": [], "before": [], "after": []}
            for i in range(rounds if name != "real-width" else max(2, rounds // 2)):
                times["plain"].append(cpu_timeit(lambda: _step(model, meta, head, ids, mask, cfg.replace(think=False)), 3))
                for which in ("before", "after") if i % 2 == 0 else ("after", "before"):
                    use(which)
                    times[which].append(cpu_timeit(lambda: _step(model, meta, head, ids, mask, cfg), 1, warmup=int(i == 0)))
            use("after")
            med = {k: statistics.median(v) for k, v in times.items()}
            passes = step_passes(cfg)
            rows.append(dict(shape=name, batch=batch, seq=seq, sizes=sizes, plain_s=med["plain"], before_s=med["before"],
                             after_s=med["after"], passes=passes, before_overhead=med["before"] / med["plain"] / passes,
                             after_overhead=med["after"] / med["plain"] / passes,
                             after_over_before=med["after"] / med["before"], rounds=len(times["plain"]), times=times))
    finally:
        use("after")
        torch.set_num_threads(threads)
    return rows


def attention_cost(rows: int = 16, seq: int = 128, repeats: int = 7) -> dict:
    """Block attention over a step's 14 masked steps (forward and backward, the tiny model's heads:
    2 KV heads x 2, head dim 32, the causal text mask) against what the floor already pays for
    attention, the fused causal sdpa over the same rows 14 times; one layer, one thread, CPU time,
    medians of interleaved runs. rows: batch x thoughts (16: b = 8 with 2 thoughts)."""
    import qstar_mini.fast.block_attention as ba

    kv, group, dim, steps = 2, 2, 32, 14
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    leaf = lambda *shape: (torch.randn(*shape) * dim ** -0.25).requires_grad_()
    k_text, v_text = leaf(rows, kv, seq, dim), leaf(rows, kv, seq, dim)
    inputs = [(leaf(rows, kv, seq, group, dim), leaf(rows, kv, seq, dim), leaf(rows, kv, seq, dim)) for _ in range(steps)]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    mask = torch.zeros(rows, 1, seq, seq).masked_fill(~causal, torch.finfo(torch.float32).min)
    chunks = ba.query_chunks(list(range(1, seq + 1)), ba.chunk_size(seq))
    q_plain, k_plain = leaf(rows, kv * group, seq, dim), leaf(rows, kv * group, seq, dim)

    class Layer:                                     # what _StepAttention needs of a StepLayer
        def __init__(self):
            self.state = ba._StepBuffers()

        def buffers(self, key, value):
            if self.state.key_buffer is None:
                shape = (rows, kv, seq, steps, dim)
                self.state.key_buffer, self.state.value_buffer = key.new_empty(shape), value.new_empty(shape)
            return self.state.key_buffer, self.state.value_buffer

    def blocks():
        layer, link, total = Layer(), None, 0
        for step, (q, k_new, v_new) in enumerate(inputs, 1):
            out, link = ba._StepAttention.apply(q, k_new, v_new, k_text, v_text, link, mask, chunks, layer, step)
            total = total + out.sum()
        total.backward()

    def plain():
        for _ in range(steps):
            torch.nn.functional.scaled_dot_product_attention(q_plain, k_plain, k_plain, is_causal=True).sum().backward()

    times = {"blocks": [], "sdpa": []}
    try:
        for _ in range(repeats):
            for name, fn in (("blocks", blocks), ("sdpa", plain)):
                start = time.process_time()
                fn()
                times[name].append(time.process_time() - start)
    finally:
        torch.set_num_threads(threads)
    blocks_s, sdpa_s = statistics.median(times["blocks"]), statistics.median(times["sdpa"])
    return dict(rows=rows, seq=seq, blocks_s=blocks_s, sdpa_s=sdpa_s, ratio=blocks_s / sdpa_s)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="the short version (under 2 minutes on 2 CPU cores); with --goals, the goals without "
                             "the real-width row and the references (a few minutes)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--sizes", default=None,
                        help=f"model sizes for the throughput rows, comma-separated from {sorted(SIZES)} "
                             f"(default: tiny on CPU, tiny,100m on CUDA)")
    parser.add_argument("--profile", choices=["mask", "blocks", "flex"], default=None,
                        help="instead of the table: where an official-shaped step's time goes (torch profiler, "
                             "l=128, b=8) with this attention")
    parser.add_argument("--e2e", action="store_true",
                        help="also time `make demo`'s job and nbval over all notebooks (about 10 minutes more)")
    parser.add_argument("--goals", action="store_true",
                        help="instead of the table: the rows behind the performance goals (docs/performance.md), "
                             "one thread, CPU time; with --official-venv also the goal against the official code")
    parser.add_argument("--render", "--readme", dest="render", metavar="JSON", default=None,
                        help="print docs/performance.md's goals block made from a --goals JSON, and exit (--readme: the old name)")
    parser.add_argument("--before", metavar="COMMIT", default=None,
                        help="instead of the table: the default step with block attention now and as it was at "
                             "this git commit, in one process, interleaved, one thread, CPU time (tiny model b=4 "
                             "and b=8, l=128; SmolLM2-135M's width, 4 layers, b=1, l=256; minutes)")
    parser.add_argument("--attention-cost", action="store_true",
                        help="instead of the table: block attention over a step's 14 masked steps against the "
                             "fused causal sdpa the floor pays, one layer, 16 rows, l=128, one thread, CPU time")
    parser.add_argument("--official-venv", metavar="DIR", default=None,
                        help="also time the official Quiet-STaR step (ezelikman/quiet-star) against ours, one CPU "
                             "thread, l=64 and 128, b=4; DIR: the venv scripts/official_env.sh builds (a few "
                             "minutes more)")


def run_bench(args) -> int:
    from qstar_mini.runs.folder import check_file_writable

    if args.json:
        check_file_writable(args.json, "--json")          # before minutes of timing, not after
    sizes = None
    if args.sizes is not None:
        sizes = tuple(x.strip() for x in args.sizes.split(",") if x.strip())
        if not sizes:
            raise ConfigError(f"--sizes {args.sizes!r} names no size; choose from {sorted(SIZES)}")
        unknown = [x for x in sizes if x not in SIZES]
        if unknown:
            raise ConfigError(f"unknown --sizes {unknown}; choose from {sorted(SIZES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch.cuda.is_available() is False on this machine")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    official_venv = getattr(args, "official_venv", None)
    if official_venv:
        if args.profile:
            raise ConfigError("--official-venv adds rows to the table; --profile prints no table: give one of them")
        official_venv_python(official_venv)              # before minutes of timing, not after
    if getattr(args, "render", None):
        with open(args.render) as f:
            print(performance_section(json.load(f)), end="")
        return 0
    if getattr(args, "before", None) or getattr(args, "attention_cost", False):
        return _run_block_attention_study(args)
    if getattr(args, "goals", False):
        rows = goal_rows(official_venv, quick=args.quick)
        result = {"machine": machine(), "command": "qstar-mini bench --goals" + (" --quick" if args.quick else "")
                  + (" --official-venv DIR" if official_venv else "") + (f" --json {args.json}" if args.json else ""),
                  "json": args.json, "rows": rows, "goals": goal_summary(rows)}
        print(format_goals(result["goals"]))
        print(format_goal_rows(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return 0
    if args.profile:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        rows = profile_step(attention=args.profile, device=device,
                            dtype=dtype or (torch.bfloat16 if device == "cuda" else torch.float32))
        print(format_profile(rows, f"official-shaped step (t=12, n_true=4, n_thoughts=2), l=128, b=8, "
                                   f"attention={args.profile}, {machine()}"))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": machine(), "profile": args.profile, "rows": rows}, f, indent=1)
        return 0
    result = measure_all(quick=args.quick, device=args.device, e2e=args.e2e, dtype=dtype, sizes=sizes,
                 official_venv=official_venv)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _run_block_attention_study(args) -> int:
    """``--before COMMIT`` and ``--attention-cost``: print, and write the JSON with ``--json``."""
    if args.before:
        rows = before_after_rows(args.before)
        for r in rows:
            print(f"{r['shape']}: b={r['batch']} l={r['seq']} plain {r['plain_s']:.4f} s; before {r['before_s']:.3f} s "
                  f"(overhead {r['before_overhead']:.3f}); after {r['after_s']:.3f} s (overhead "
                  f"{r['after_overhead']:.3f}); after/before {r['after_over_before']:.3f}")
        result = {"machine": machine(), "before": args.before, "threads": 1, "clock": "CPU time",
                  "settings": "t=11, n_true=4, n_thoughts=2, attention=blocks", "rows": rows}
    else:
        result = {"machine": machine(), "threads": 1, "clock": "CPU time", **attention_cost()}
        print(f"block attention, 14 steps: {result['blocks_s'] * 1e3:.1f} ms; fused causal sdpa, 14 passes: "
              f"{result['sdpa_s'] * 1e3:.1f} ms (rows 16, l 128, one layer, forward + backward); "
              f"ratio {result['ratio']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
