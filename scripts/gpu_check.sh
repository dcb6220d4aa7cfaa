#!/usr/bin/env bash
# The GPU checks of qstar_mini in one run, for a machine with CUDA (a Colab GPU, or the
# project's borrowed H200): correctness on the GPU first, then the benchmark tables.
#
#   bash scripts/gpu_check.sh            # writes gpu_out/ (or $OUT/ when OUT is set)
#   DEVICE=cpu QUICK=1 bash scripts/gpu_check.sh   # a dry run of the same script on a CPU
#   bash scripts/gpu_check.sh --dry-run  # print the python commands instead of running them
#                                        # (step 1's program is only compiled)
#
# Needs torch and transformers (the GPU image's torch 2.11 / transformers 5.17 do); runs
# from the checkout with PYTHONPATH=., nothing is installed. Prints a short table at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DRY_RUN=0; [ "${1:-}" = --dry-run ] && DRY_RUN=1

run_py() {  # $PY "$@", or with --dry-run: print the command (and compile a program given on stdin)
  if [ "$DRY_RUN" = 1 ]; then
    echo "dry run: $PY $*"
    if [ "${1:-}" = - ]; then $PY -c 'import sys; compile(sys.stdin.read(), "gpu_check step 1", "exec")'; fi
  else
    $PY "$@"
  fi
}

echo "== 1. correctness on $DEVICE (parallel == naive, block attention == mask, memory modes agree, bf16 steps finite)"
run_py - "$DEVICE" <<'PYEOF' | tee "$OUT/correctness.txt"
import sys, torch, transformers
sys.path.insert(0, "tests")
from tiny_models import ARCHS, VOCAB, batch, tiny_meta, tiny_random_model
from qstar_mini.studies.bench import bench_model, random_batch
from qstar_mini.config import QuietStarConfig
from qstar_mini.step import quiet_star_step
from qstar_mini.talk import naive_talk, talk_hidden
from qstar_mini.thoughts import generate_thoughts, naive_thoughts, plain_forward

device = sys.argv[1]
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"{torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}")
T, N, N_TRUE = 5, 2, 3
for arch in ARCHS:
    for attn in ("eager", "sdpa"):
        model, meta = tiny_random_model(arch, attn, dtype=torch.float32).to(device), tiny_meta(torch.float32).to(device)
        ids, mask = (x.to(device) for x in batch())
        real = mask.bool()[:, None, :].expand(-1, N, -1)
        with torch.no_grad():
            worst = {}
            for blocks in (False, True):
                _, cache = plain_forward(model, meta, ids, mask)
                th = generate_thoughts(model, meta, ids, mask, cache, T, N, extra_steps=N_TRUE - 1, greedy=True,
                                       block_attention=blocks)
                h = talk_hidden(model, meta, th, ids, N_TRUE)
                worst[blocks] = (th, h)
            naive_ids, naive_lp = naive_thoughts(model, meta, ids, mask, T, N, greedy=True)
        (th, h), (tb, hb) = worst[False], worst[True]
        same = bool((th.ids.cpu()[real.cpu()] == naive_ids[real.cpu()]).all()) and torch.equal(th.ids, tb.ids)
        lp = float((th.logprobs.cpu()[real.cpu()] - naive_lp[real.cpu()].float()).abs().max())
        hd = float((h - hb)[real].abs().max())
        ok = same and lp < 1e-3 and hd < 1e-3
        print(f"{arch:8s} {attn:6s} parallel==naive tokens {same}  max|dlogp| {lp:.1e}  blocks vs mask max|dh| {hd:.1e}  {'OK' if ok else 'FAIL'}")
        assert ok, (arch, attn)

model, meta, head = bench_model(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
ids, mask = random_batch(4, 64, 85, device)
losses = {}
for memory, attention in (("stepwise", "mask"), ("stepwise", "blocks"), ("rescore", "mask"),
                          ("rescore_checkpointed", "mask")):
    cfg = QuietStarConfig(thought_length=12, n_true=4, n_thoughts=2, seq_len=64, memory=memory, attention=attention)
    out = quiet_star_step(model, meta, head, ids, mask, cfg, generator=torch.Generator(device).manual_seed(0))
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    finite = bool(torch.isfinite(out.loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
    losses[memory, attention] = out.loss.item()
    model.zero_grad(set_to_none=True); head.zero_grad(set_to_none=True); meta.zero_grad(set_to_none=True)
    print(f"step {model.dtype} memory={memory:22s} attention={attention:6s} loss {losses[memory, attention]:.4f} "
          f"finite {finite}")
    assert finite
spread = max(losses.values()) - min(losses.values())
print(f"memory modes and attentions agree on the loss within {spread:.1e} ({'OK' if spread < 5e-2 else 'FAIL'})")
assert spread < 5e-2
PYEOF

echo "== 2. benchmark on $DEVICE"
if [ "${QUICK:-0}" = 1 ]; then MODE=--quick; else MODE=; fi
run_py -m qstar_mini bench $MODE --device "$DEVICE" --json "$OUT/bench_$DEVICE.json" | tee "$OUT/bench_$DEVICE.txt"

# The notebooks on a GPU (docs/compatibility.md, "Notebooks on a GPU"): every cell must run and
# every asserted claim hold; saved outputs are not compared (--nbval-lax), because on CUDA the
# training cells run in bf16 and the kernels differ, so printed losses and weights differ from
# the CPU's. Thoughts come from CPU generators, so wherever the logits agree they agree too.
echo "== 3. the notebooks under the GPU nbval policy (notebooks choose cuda themselves when it is there)"
if [ "$DRY_RUN" = 1 ] || $PY -c "import nbval, ipykernel" 2>/dev/null; then
    t0=$(date +%s)
    run_py -m pytest -p no:cacheprovider -q --nbval-lax --nbval-current-env --nbval-cell-timeout=600 \
        --durations=15 notebooks/ 2>&1 | tee "$OUT/notebooks_$DEVICE.txt"
    echo "notebooks: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/notebooks_$DEVICE.txt"
else
    echo "nbval or ipykernel is missing: pip install nbval ipykernel 'ipywidgets>=7.7,<9', then rerun" >&2
    exit 1
fi
echo "== done: $OUT/correctness.txt, $OUT/bench_$DEVICE.json, $OUT/notebooks_$DEVICE.txt"
