"""The benchmark's rows have the documented JSON shape and its pass count is the step's."""

import json
import os
import subprocess
import sys

import pytest

from qstar_mini.bench import format_table, step_passes, step_rows, thought_rows
from qstar_mini.config import QuietStarConfig

KEYS = {"name", "params", "median_s", "baseline_median_s", "ratio", "passes", "overhead"}


def test_pass_count_is_plain_pass_plus_thought_and_talk_tokens():
    cfg = QuietStarConfig(thought_length=12, n_true=4, n_thoughts=2)
    assert step_passes(cfg) == 1 + 2 * (12 + 4 - 1)


def test_rows_have_the_documented_shape():
    rows = thought_rows([6], [4], repeats=1, device="cpu", with_naive=True)
    rows += step_rows([("t", QuietStarConfig(thought_length=4, n_true=2, n_thoughts=2, seq_len=8))], [8],
                      batch=2, repeats=1, device="cpu")
    for row in rows:
        assert KEYS <= set(row), row
        assert row["median_s"] > 0 and row["baseline_median_s"] > 0
        if row["name"].startswith("thoughts"):     # ratio = speed-up of the parallel version
            assert abs(row["ratio"] - row["baseline_median_s"] / row["median_s"]) < 1e-9
        else:                                       # ratio = cost of the step over the plain one
            assert abs(row["ratio"] - row["median_s"] / row["baseline_median_s"]) < 1e-9
    step = rows[-1]
    assert step["passes"] == 1 + 2 * (4 + 2 - 1)
    assert abs(step["overhead"] - step["ratio"] / step["passes"]) < 1e-12
    json.dumps({"machine": "x", "rows": rows})
    assert "overhead" in format_table({"machine": "x", "rows": rows})


def test_cli_bench_help_lists_quick_and_json():
    out = subprocess.run([sys.executable, "-m", "qstar_mini", "bench", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--quick" in out.stdout and "--json" in out.stdout


def test_inference_row_counts_t_plus_one_passes_per_token():
    from qstar_mini.bench import inference_rows
    (row,) = inference_rows(2, [4], repeats=1, device="cpu")
    assert KEYS <= set(row) and row["passes"] == 5
    assert abs(row["ratio"] - row["median_s"] / row["baseline_median_s"]) < 1e-9
    assert row["tokens_per_s"] > 0 and row["baseline_tokens_per_s"] > row["tokens_per_s"]


def test_end_to_end_rows_time_whole_commands():
    from qstar_mini.bench import e2e_rows
    (row,) = e2e_rows([("python", [sys.executable, "-c", "import time; time.sleep(0.2)"])])
    assert KEYS <= set(row) and row["median_s"] >= 0.2 and row["ratio"] is None


def test_memory_rows_cover_every_mode_against_one_plain_peak():
    from qstar_mini.bench import memory_rows
    rows = memory_rows([(8, 4, 2, 2)], batch=2, device="cpu")
    assert [r["params"]["memory"] for r in rows] == ["stepwise", "rescore", "rescore_checkpointed"]
    for row in rows:
        assert KEYS <= set(row) and row["median_s"] is None
        assert row["baseline_peak_mib"] == rows[0]["baseline_peak_mib"] > 0
        assert abs(row["ratio"] - row["peak_mib"] / row["baseline_peak_mib"]) < 1e-9
    assert "MiB or TFLOP/s" in format_table({"machine": "x", "rows": rows})


def test_throughput_rows_count_6n_flops_per_token_pass_against_the_matmul_rate():
    from qstar_mini.bench import bench_model, matmul_params, throughput_rows
    model, _, _ = bench_model()
    n = sum(p.numel() for p in model.parameters())              # tied head: the table counts once
    assert matmul_params(model) == n
    step, plain = throughput_rows(["tiny"], seq=8, batch=2, repeats=1, device="cpu")
    assert step["passes"] == 1 + 2 * (12 + 4 - 1) and plain["passes"] == 1
    for row in (step, plain):
        assert KEYS <= set(row)
        assert row["model_flops"] == 6 * n * 2 * 8 * row["passes"]
        assert abs(row["tflops"] - row["model_flops"] / row["median_s"] / 1e12) < 1e-12
        assert abs(row["ratio"] - row["tflops"] / row["matmul_tflops"]) < 1e-12


def test_bench_refuses_unknown_sizes_and_a_missing_gpu_in_one_line():
    out = subprocess.run([sys.executable, "-m", "qstar_mini", "bench", "--quick", "--sizes", "tiny,huge"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "qstar-mini: error: unknown --sizes ['huge']; choose from ['100m', 'tiny']"]
    import torch
    if not torch.cuda.is_available():
        out = subprocess.run([sys.executable, "-m", "qstar_mini", "bench", "--quick", "--device", "cuda"],
                             capture_output=True, text=True)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
        assert "torch.cuda.is_available() is False" in out.stderr


def test_gpu_check_script_parses_and_defaults_to_cuda():
    from qstar_mini.paths import REPO_ROOT
    script = REPO_ROOT / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "DEVICE=${DEVICE:-cuda}" in text and "qstar_mini.bench" in text


@pytest.mark.skipif(os.environ.get("QSTAR_SLOW") != "1", reason="about 2 minutes; set QSTAR_SLOW=1")
def test_gpu_check_dry_run_on_cpu(tmp_path):
    from qstar_mini.paths import REPO_ROOT
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = (tmp_path / "correctness.txt").read_text().splitlines()
    assert sum(line.endswith(("OK", "(OK)")) for line in lines) == 8 + 1   # 4 archs x 2 attentions, memory modes
    assert json.loads((tmp_path / "bench_cpu.json").read_text())["rows"]


def test_profile_lists_the_costliest_operators_of_a_step():
    from qstar_mini.bench import format_profile, profile_step
    rows = profile_step(seq=16, batch=2, attention="blocks", top=6, repeats=1)
    assert len(rows) == 6 and 0 < sum(r["percent"] for r in rows) <= 100.0 + 1e-9
    assert [r["self_s"] for r in rows] == sorted((r["self_s"] for r in rows), reverse=True)
    assert "aten::mm" in [r["op"] for r in rows]                  # the layers' matmuls: the floor
    assert "aten::_scaled_dot_product" not in " ".join(r["op"] for r in rows)   # blocks bypass sdpa
    assert "operator" in format_profile(rows, "title")
