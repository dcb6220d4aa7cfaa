"""The benchmark's rows: their pass and FLOP counts are what a step really runs, they print and
serialise; its command line and the GPU check script."""

import json
import os
import subprocess
import sys

import pytest
import torch

from qstar_mini import cli
from qstar_mini.studies.bench import _step, bench_model, format_table, random_batch, step_passes, step_rows, thought_rows
from qstar_mini.config import QuietStarConfig
from qstar_mini.fast.rescore import decoder_layers

KEYS = {"name", "params", "median_s", "baseline_median_s", "ratio", "passes", "overhead"}


def token_passes(model, meta, head, cfg, batch=2, seq=8) -> float:
    """Tokens through the first decoder layer during one step, per text token: counted, not computed."""
    from qstar_mini.models.check import resolve_attention

    ids, mask = random_batch(batch, seq, 85)
    from qstar_mini.thoughts import preallocation_works

    resolve_attention(model, meta, cfg)     # "auto" probes once per model (prepare_model does it in training),
    preallocation_works(model, meta)        # and so does block attention's preallocated cache
    counted = []

    def count(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        counted.append(hidden.shape[0] * hidden.shape[1])

    hook = decoder_layers(model)[0].register_forward_pre_hook(count, with_kwargs=True)
    try:
        _step(model, meta, head, ids, mask, cfg.replace(seq_len=seq))
    finally:
        hook.remove()
    return sum(counted) / (batch * seq)


@pytest.mark.parametrize("t, n_true, n_thoughts", [(4, 2, 2), (5, 1, 3)])   # official (12, 4, 2): the throughput test
def test_pass_count_is_what_a_step_runs_through_the_model(t, n_true, n_thoughts):
    model, meta, head = bench_model()
    cfg = QuietStarConfig(thought_length=t, n_true=n_true, n_thoughts=n_thoughts)
    assert step_passes(cfg) == token_passes(model, meta, head, cfg)
    assert token_passes(model, meta, head, cfg.replace(think=False)) == 1


def test_thought_and_step_rows_are_json_and_tabled():
    rows = thought_rows([6], [4], repeats=1, device="cpu", with_naive=True)
    rows += step_rows([("t", QuietStarConfig(thought_length=4, n_true=2, n_thoughts=2, seq_len=8))], [8],
                      batch=2, repeats=1, device="cpu")
    assert len(rows) == 3                                  # parallel vs loop, vs naive, the step
    for row in rows:
        assert KEYS <= set(row), row
        assert row["median_s"] > 0 and row["baseline_median_s"] > 0 and row["ratio"] > 0
    assert rows[-1]["passes"] == step_passes(QuietStarConfig(thought_length=4, n_true=2, n_thoughts=2))
    table = format_table(json.loads(json.dumps({"machine": "x", "rows": rows})))
    assert len(table.splitlines()) == 2 + len(rows) and "overhead" in table


def test_cli_bench_help_lists_quick_and_json(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0 and "--quick" in out and "--json" in out


def test_inference_row_counts_t_plus_one_passes_per_token():
    from qstar_mini.studies.bench import inference_rows
    (row,) = inference_rows(2, [4], repeats=1, device="cpu")
    assert KEYS <= set(row) and row["passes"] == 5
    assert abs(row["ratio"] - row["median_s"] / row["baseline_median_s"]) < 1e-9
    assert row["tokens_per_s"] > 0 and row["baseline_tokens_per_s"] > 0   # which is faster: timing, not asserted


def test_end_to_end_rows_time_whole_commands():
    from qstar_mini.studies.bench import e2e_rows
    (row,) = e2e_rows([("python", [sys.executable, "-c", "import time; time.sleep(0.2)"])])
    assert KEYS <= set(row) and row["median_s"] >= 0.2 and row["ratio"] is None


def test_memory_rows_cover_every_mode_against_one_plain_peak():
    from qstar_mini.studies.bench import memory_rows
    rows = memory_rows([(16, 3, 1, 2)], batch=1, device="cpu")        # (seq, t, n_true, n_thoughts): small
    assert [r["params"]["memory"] for r in rows] == ["stepwise", "rescore", "rescore_checkpointed"]
    for row in rows:
        assert KEYS <= set(row) and row["median_s"] is None
        assert row["peak_mib"] > row["baseline_peak_mib"] == rows[0]["baseline_peak_mib"] > 0   # thinking costs
        assert abs(row["ratio"] - row["peak_mib"] / row["baseline_peak_mib"]) < 1e-9
        assert row["peak"] == "fresh-process RSS"                    # every mode measured the same way
    assert "MiB or TFLOP/s" in format_table({"machine": "x", "rows": rows})


def test_throughput_rows_count_the_flops_torch_counts():
    """model_flops, 6 N per token-pass: a plain step's agrees with torch's own FLOP counter (within
    3%: attention is not counted); the official-shaped step's is that times the token-passes counted
    through the model. (The counter over the thinking step itself agrees within 1% too, but takes
    12 s: its dispatch is slow on the step's thousands of small ops.)"""
    from torch.utils.flop_counter import FlopCounterMode

    from qstar_mini.studies.bench import throughput_rows
    step, plain = throughput_rows(["tiny"], seq=8, batch=2, repeats=1, device="cpu")
    model, meta, head = bench_model()                              # the "tiny" size
    cfg = QuietStarConfig(thought_length=12, n_true=4, n_thoughts=2, seq_len=8)   # official-shaped
    ids, mask = random_batch(2, 8, 85)
    with FlopCounterMode(display=False) as counter:
        _step(model, meta, head, ids, mask, cfg.replace(think=False))
    assert plain["model_flops"] == pytest.approx(counter.get_total_flops(), rel=0.03)
    assert step["model_flops"] == plain["model_flops"] * token_passes(model, meta, head, cfg)
    for row in (step, plain):
        assert KEYS <= set(row) and row["tflops"] > 0 and row["matmul_tflops"] > 0 and row["ratio"] > 0


def test_bench_refuses_unknown_sizes_and_a_missing_gpu_in_one_line(capsys, monkeypatch):
    assert cli.main(["bench", "--quick", "--sizes", "tiny,huge"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "qstar-mini: error: unknown --sizes ['huge']; choose from ['100m', 'tiny']"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)      # also on a machine with a GPU
    assert cli.main(["bench", "--quick", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "qstar-mini: error: --device cuda but torch.cuda.is_available() is False on this machine"]


@pytest.mark.parametrize("env, device, quick", [({}, "cuda", []), ({"DEVICE": "cpu", "QUICK": "1"}, "cpu", ["--quick"])])
def test_gpu_check_dry_run_runs_step_1_on_the_device_then_the_bench(tmp_path, env, device, quick):
    """``--dry-run`` prints the three python commands (step 1's program compiled, not run): cuda by
    default, the bench command line is one the bench's own parser accepts, and the notebooks run
    under the GPU policy (docs/compatibility.md: every cell runs, outputs not compared)."""
    import argparse

    from qstar_mini.studies.bench import add_bench_arguments
    from qstar_mini.paths import REPO_ROOT
    script = REPO_ROOT / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    base = {k: v for k, v in os.environ.items() if k not in ("DEVICE", "QUICK")}
    out = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, timeout=120,
                         env={**base, **env, "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr
    runs = [line.split()[3:] for line in out.stdout.splitlines() if line.startswith("dry run: ")]
    bench_args = [*quick, "--device", device, "--json", f"{tmp_path}/bench_{device}.json"]
    notebooks = ["-m", "pytest", "-p", "no:cacheprovider", "-q", "--nbval-lax", "--nbval-current-env",
                 "--nbval-cell-timeout=600", "--durations=15", "notebooks/"]
    assert runs == [["-", device], ["-m", "qstar_mini", "bench", *bench_args], notebooks]
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    assert parser.parse_args(bench_args).device == device


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
    from qstar_mini.studies.bench import format_profile, profile_step
    rows = profile_step(seq=16, batch=2, attention="blocks", top=6, repeats=1)
    assert len(rows) == 6 and 0 < sum(r["percent"] for r in rows) <= 100.0 + 1e-9
    assert [r["self_s"] for r in rows] == sorted((r["self_s"] for r in rows), reverse=True)
    assert "aten::mm" in [r["op"] for r in rows]                  # the layers' matmuls: the floor
    assert "aten::_scaled_dot_product" not in " ".join(r["op"] for r in rows)   # blocks bypass sdpa
    assert "operator" in format_profile(rows, "title")


def test_bench_refuses_an_official_venv_without_the_official_files_in_one_line(capsys, tmp_path):
    """--official-venv is checked before any timing: a folder without bin/python, and a venv whose
    transformers holds the stock Mistral files (this very venv), are refused in one line."""
    assert cli.main(["bench", "--quick", "--official-venv", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"qstar-mini: error: --official-venv {tmp_path} has no bin/python; build it with: bash "
        f"scripts/official_env.sh {tmp_path} /path/to/quiet-star-checkout"]
    here = os.path.dirname(os.path.dirname(sys.executable))        # a venv with the stock transformers
    if not os.path.isfile(os.path.join(here, "bin", "python")):
        pytest.skip("not running from a venv with bin/python")
    assert cli.main(["bench", "--quick", "--official-venv", here]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "modeling_mistral.py is not the official Quiet-STaR file" in err[0], err


@pytest.mark.skipif(not os.environ.get("QSTAR_OFFICIAL_VENV"),
                    reason="set QSTAR_OFFICIAL_VENV to the venv of scripts/official_env.sh")
def test_official_rows_time_the_official_step_beside_ours():
    """Opt-in: the official code really runs (its own venv), at a tiny size; ratio = official / ours,
    one row per attention mode (the default marked), and the thread count is given back."""
    from qstar_mini.studies.bench import official_rows
    from qstar_mini.config import official

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rows = official_rows(os.environ["QSTAR_OFFICIAL_VENV"], seqs=(12,), batch=1, repeats=1, warmup=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    default = official().attention
    assert {r["params"]["attention"] for r in rows} == {"mask", "blocks", default}
    assert [r["params"]["attention"] for r in rows if r["params"]["default"]] == [default] * 2   # eager, sdpa
    for row in json.loads(json.dumps(rows)):
        assert KEYS <= set(row) and row["name"].startswith("step: qstar_mini vs official code")
        assert row["median_s"] > 0 and row["baseline_median_s"] > 0
        assert row["ratio"] == pytest.approx(row["baseline_median_s"] / row["median_s"])
        assert row["cpu_ratio"] == pytest.approx(row["baseline_cpu_s"] / row["cpu_s"]) and row["cpu_s"] > 0
        assert row["params"]["threads"] == 1 and row["params"]["t"] == 11 and row["params"]["n_true"] == 4
        assert row["baseline_versions"]["transformers"].startswith("4.37.")


def test_goal_summary_says_met_only_when_the_measured_value_is_on_the_right_side():
    from qstar_mini.studies.bench import GOALS, goal_summary

    rows = [dict(goal="vs_official", value=3.2), dict(goal="overhead", value=1.25), dict(goal="thoughts", value=30.0),
            dict(goal=None, value=99.0)]                     # a reference row is no goal
    summary = {g["goal"]: g for g in goal_summary(rows)}
    assert [g[0] for g in GOALS] == list(summary)
    assert summary["vs_official"]["met"] is True and summary["overhead"]["met"] is False
    assert summary["thoughts"]["met"] is True                # the bound itself counts as met
    assert summary["memory"]["value"] is None and summary["memory"]["met"] is None   # not measured


def test_memory_goal_is_the_lowest_peak_within_the_time_slack():
    from qstar_mini.studies.bench import mark_memory_goal

    rows = [dict(median_s=1.0, ratio=22.0), dict(median_s=1.1, ratio=18.0), dict(median_s=2.3, ratio=9.0)]
    mark_memory_goal(rows)
    assert [r.get("goal") for r in rows] == [None, "memory", None] and rows[1]["value"] == 18.0
    assert rows[2]["time_vs_default"] == pytest.approx(2.3)
    assert mark_memory_goal([dict(median_s=1.0, ratio=22.0)])[0]["goal"] == "memory"   # the default alone


def test_performance_page_block_is_the_committed_goals_json_rendered():
    """docs/performance.md's goal tables are made from docs/results/bench_goals_cpu.json by
    ``qstar-mini bench --render``, not typed: a rerun of the bench updates both at once."""
    from pathlib import Path

    from qstar_mini.studies.bench import GOALS, MARKERS, PERFORMANCE_PAGE, performance_section

    root = Path(__file__).resolve().parents[2]
    result = json.loads((root / "docs/results/bench_goals_cpu.json").read_text())
    page = (root / PERFORMANCE_PAGE).read_text()
    start, end = MARKERS
    assert start in page and end in page
    block = page.split(start, 1)[1].split(end, 1)[0]
    assert block == performance_section(result)
    assert [g["goal"] for g in result["goals"]] == [g[0] for g in GOALS]


def test_performance_page_official_block_is_its_json_rendered():
    """The second goals run, with the official code's step beside ours (at the real width too), is
    rendered from docs/results/bench_goals_official_cpu.json, not typed."""
    from pathlib import Path

    from qstar_mini.studies.bench import PERFORMANCE_PAGE, performance_section

    root = Path(__file__).resolve().parents[2]
    result = json.loads((root / "docs/results/bench_goals_official_cpu.json").read_text())
    page = (root / PERFORMANCE_PAGE).read_text()
    start, end = "<!-- bench-goals-official: start -->\n", "<!-- bench-goals-official: end -->"
    assert page.split(start, 1)[1].split(end, 1)[0] == performance_section(result)
    real = [r for r in result["rows"] if "SmolLM2-135M width" in r["name"] and "official" in r["name"]]
    assert len(real) == 1 and real[0]["params"]["seq"] == 256 and real[0]["cpu_ratio"] > 0


@pytest.mark.parametrize("flag", ["--render", "--readme"])
def test_cli_render_prints_the_block_from_a_json(tmp_path, capsys, flag):
    from qstar_mini.studies.bench import performance_section

    result = {"machine": "m", "command": "qstar-mini bench --goals", "json": "x.json",
              "rows": [dict(name="goal overhead: step vs plain LM step", goal="overhead", value=1.5,
                            params=dict(seq=128, batch=8, attention="blocks", default=True), median_s=2.0,
                            baseline_median_s=0.05, ratio=40.0, passes=29, overhead=1.5)],
              "goals": [dict(goal="overhead", what="w", target="<= 1.1", value=1.5, met=False)]}
    path = tmp_path / "g.json"
    path.write_text(json.dumps(result))
    assert cli.main(["bench", flag, str(path)]) == 0
    out = capsys.readouterr().out
    assert out == performance_section(result) and "| w | <= 1.1 | 1.50 | **no** |" in out


def test_before_after_switches_the_thought_steps_to_the_other_block_attention():
    """``--before``: the module as committed is loaded beside the current one, and the thought steps
    really run on it (its own StepLayer class) with the same numbers, then switch back."""
    from qstar_mini.studies.bench import _block_attention_switch, _load_block_attention_at
    from qstar_mini.thoughts import generate_thoughts, plain_forward

    if subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    before = _load_block_attention_at("HEAD")
    use = _block_attention_switch(before)
    model, meta, _ = bench_model(num_hidden_layers=1)
    ids, mask = random_batch(2, 6, 85)
    outs = []
    try:
        for which in ("before", "after"):
            use(which)
            _, cache = plain_forward(model, meta, ids, mask)
            thoughts = generate_thoughts(model, meta, ids, mask, cache, 3, 1, greedy=True, attention="blocks")
            assert isinstance(thoughts.cache.layers[0], before.StepLayer) == (which == "before")
            outs.append(thoughts.h_end)
    finally:
        use("after")
    torch.testing.assert_close(outs[0], outs[1])


def test_attention_cost_times_both_sides():
    from qstar_mini.studies.bench import attention_cost

    out = attention_cost(rows=2, seq=16, repeats=1)
    assert out["blocks_s"] > 0 and out["sdpa_s"] > 0 and out["ratio"] == pytest.approx(out["blocks_s"] / out["sdpa_s"])
