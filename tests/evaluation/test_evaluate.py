"""The evaluation returns its documented keys with finite values (tiny random models; seconds)."""

import argparse
import json
import math

import pytest
import torch

from qstar_mini.runs.checkpoint import save_checkpoint
from qstar_mini.config import tiny
from qstar_mini.data import read_jsonl
from qstar_mini.cli.eval import add_eval_arguments, run_eval
from qstar_mini.evaluation.token_gains import answer_only, by_difficulty
from qstar_mini.evaluation.thought_quality import best_temperature
from qstar_mini.evaluation.arithmetic import evaluate, format_table, quick_eval
from qstar_mini.evaluation.gsm8k import extract_answer, gsm8k_eval
from qstar_mini.models.tiny import build_tokenizer
from qstar_mini.paths import DATA_DIR
from qstar_mini.step import prepare_model
from tiny_models import small_model

torch.set_num_threads(1)
SUMMARY = {"all_nll", "all_acc", "answer_nll", "answer_acc", "n_tokens", "n_answers"}


@pytest.fixture(scope="module")
def setup():
    cfg = tiny(n_thoughts=2)
    base, tok = small_model(0)
    model, _ = small_model(0)
    meta, head = prepare_model(model, tok, cfg)
    control, _ = small_model(1)
    prepare_model(control, build_tokenizer(), cfg)
    records = answer_only(read_jsonl(DATA_DIR / "test.jsonl"))[:12]
    return model, tok, meta, head, cfg, base, control, records


def finite(x):
    return x is None or (isinstance(x, (int, float)) and math.isfinite(x))


def test_evaluate_keys_and_values(setup):
    model, tok, meta, head, cfg, base, control, records = setup
    gsm = read_jsonl(DATA_DIR / "gsm8k_format.jsonl")
    res = evaluate(model, tok, meta, head, cfg, records, base_model=base, control=control, n_thoughts=2,
                   gsm_records=gsm, gsm_limit=2)
    assert {"n_lines", "base", "control", "quiet_star", "quiet_star_no_thought", "by_difficulty",
            "w_by_position", "examples", "gsm8k"} <= res.keys()
    for name in ("base", "control", "quiet_star", "quiet_star_no_thought"):
        assert SUMMARY <= res[name].keys()
        assert all(finite(v) for v in res[name].values()), name
        assert res[name]["n_answers"] == len(records)
    q = res["quiet_star"]
    for key in ("answer_nll_greedy", "answer_acc_greedy", "w_answer", "w_all", "thought_correct",
                "thought_correct_greedy"):
        assert finite(q[key]) and q[key] is not None, key
    assert 0 <= q["thought_correct"] <= 1
    # an untrained model: its own no-thought prediction is the base's (same weights)
    assert res["quiet_star_no_thought"]["all_nll"] == pytest.approx(res["base"]["all_nll"], abs=1e-3)
    assert sum(b["n"] for b in res["by_difficulty"]) == res["base"]["n_tokens"]
    assert all(finite(b.get("gain_vs_base")) for b in res["by_difficulty"])
    assert len(res["w_by_position"]) == 8                       # <s>31415=4 : positions 0..7
    assert res["gsm8k"]["n"] == 2 and 0 <= res["gsm8k"]["accuracy"] <= 1
    json.dumps(res)                                             # serialisable as it is
    assert "quiet_star" in format_table(res)


def test_thinking_only_before_the_answer(setup):
    """think_where="answer": the mixed prediction at the answer equals the all-positions one
    (same greedy thought), every other token is predicted without a thought."""
    model, tok, meta, head, cfg, base, control, records = setup
    everywhere = evaluate(model, tok, meta, head, cfg, records, n_thoughts=1)
    answer = evaluate(model, tok, meta, head, cfg, records, n_thoughts=1, think_where="answer")
    q, e = answer["quiet_star"], everywhere["quiet_star"]
    assert q["answer_nll_greedy"] == pytest.approx(e["answer_nll_greedy"], abs=1e-4)
    assert q["thought_correct_greedy"] == e["thought_correct_greedy"]
    no_thought = answer["quiet_star_no_thought"]
    n, k = no_thought["n_tokens"], no_thought["n_answers"]
    others = (q["all_nll_greedy"] * n - q["answer_nll_greedy"] * k) / (n - k)
    assert others == pytest.approx((no_thought["all_nll"] * n - no_thought["answer_nll"] * k) / (n - k), abs=1e-3)
    w = answer["w_by_position"]
    assert w[6] is not None and all(v is None for j, v in enumerate(w) if j != 6)   # only at "="


def test_quick_eval_and_temperatures(setup):
    model, tok, meta, head, cfg, base, control, records = setup
    for c in (cfg, cfg.replace(think=False)):
        res = quick_eval(model, tok, meta, head, c, records)
        assert {"answer_nll", "answer_acc", "thought_correct", "thought_correct_greedy"} <= res.keys()
        assert all(finite(v) for v in res.values())
    temps = best_temperature(model, tok, meta, cfg, records, temperatures=(0.5, 1.0))
    assert set(temps["by_temperature"]) == {"0.5", "1", "greedy"}
    assert temps["best"] == max(temps["by_temperature"].values())


def test_by_difficulty_bins():
    base = torch.tensor([0.05, 0.3, 2.5, 2.6, 5.0])
    q = torch.tensor([0.05, 0.3, 0.5, 2.6, 5.0])
    rows = by_difficulty(base, {"quiet_star": q, "control": base})
    hard = [r for r in rows if r["bin"] == "[2, 3)"][0]
    assert hard["n"] == 2 and hard["gain_vs_base"] == pytest.approx(1.0) and hard["gain_vs_control"] == pytest.approx(1.0)
    assert [r for r in rows if r["bin"] == "[0, 0.1)"][0]["gain_vs_base"] == 0


def test_gsm8k_answer_extraction_and_plain_path(setup):
    model, tok, *_ = setup
    assert extract_answer("so 3+4=7 #### 7") == "7"
    assert extract_answer(" 1,234 apples") == "1234"
    assert extract_answer("no idea") is None
    res = gsm8k_eval(model, tok, read_jsonl(DATA_DIR / "gsm8k_format.jsonl"), limit=2, max_new_tokens=2)
    assert res["n"] == 2 and res["thinking"] is False


def test_commonsense_qa_format(setup):
    from qstar_mini.evaluation.commonsense_qa import commonsense_prompt, commonsense_qa_eval, next_token_log_probs

    model, tok, meta, head, cfg, *_ = setup
    record = {"question": "Where do fish live?", "answerKey": "B",
              "choices": {"label": ["A", "B", "C"], "text": ["sky", "water", "desert"]}}
    assert commonsense_prompt(record).endswith("C) desert\nAnswer:")
    plain = next_token_log_probs(model, tok, "12345=")
    thinking = next_token_log_probs(model, tok, "12345=", meta=meta, head=head, cfg=cfg)
    assert plain.shape == thinking.shape and torch.isfinite(thinking[: min(meta.ids)]).all()
    assert torch.isinf(thinking[list(meta.ids)]).all()                       # never a meta-token
    for kw in ({}, {"meta": meta, "head": head, "cfg": cfg}):
        res = commonsense_qa_eval(model, tok, [record, record], **kw)
        assert res["n"] == 2 and res["accuracy"] in (0.0, 1.0)


def test_run_eval_prints_a_table_and_writes_json(setup, tmp_path, capsys):
    model, tok, meta, head, cfg, base, control, records = setup
    save_checkpoint(tmp_path / "ck", model, tok, meta, head, cfg)
    base.save_pretrained(tmp_path / "base")
    build_tokenizer().save_pretrained(tmp_path / "base")
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:4]))
    (tmp_path / "csqa.jsonl").write_text(json.dumps({"question": "Where do fish live?", "answerKey": "B",
                                                      "choices": {"label": ["A", "B"], "text": ["sky", "water"]}}) + "\n")
    parser = add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--checkpoint", str(tmp_path / "ck"), "--base", str(tmp_path / "base"),
                              "--data", str(tmp_path / "test.jsonl"), "--gsm8k", "", "--n-thoughts", "1",
                              "--commonsense-qa", str(tmp_path / "csqa.jsonl"), "--json", str(tmp_path / "out.json")])
    assert run_eval(args) == 0
    assert "answer NLL" in capsys.readouterr().out
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["quiet_star"]["answer_nll"] is not None and result["commonsense_qa"]["n"] == 1


def test_plots_return_figures_and_write_pngs(tmp_path):
    import matplotlib
    from matplotlib.figure import Figure

    from qstar_mini.teaching import plots as viz
    from qstar_mini.masks import thought_visibility

    metrics = [{"kind": "train", "step": s, "loss": 3.0 / s, "base_nll": 2.0, "talk_nll": 1.0 / s} for s in range(1, 20)]
    evals = [{"step": s, "thought_correct": 0.3 + s / 100} for s in (0, 10, 20)]
    rows = by_difficulty(torch.tensor([0.05, 2.5, 2.6]), {"quiet_star": torch.tensor([0.05, 0.5, 2.6])})
    figs = {
        "losses": viz.plot_losses({"quiet_star": metrics, "control": metrics}, path=tmp_path / "a" / "losses.png"),
        "thoughts": viz.plot_thought_accuracy({"quiet_star": [evals, evals]}, reference={"base best": 0.6},
                                              path=tmp_path / "thoughts.png"),
        "benefit": viz.plot_which_tokens_benefit(rows, path=tmp_path / "benefit.png"),
        "w": viz.plot_w_over_positions([0.1, None, 0.9], tokens=list("31="), path=tmp_path / "w.png"),
        "bars": viz.plot_model_bars({"base": {"answer_nll": 3.0, "answer_acc": 0.1},
                                     "quiet_star": {"answer_nll": {"mean": 0.2, "std": 0.1},
                                                    "answer_acc": {"mean": 0.9, "std": 0.02}}},
                                    path=tmp_path / "bars.png"),
        "mask": viz.plot_mask(None, thought_visibility(torch.ones(1, 4), 2)[0, 0], 4, path=tmp_path / "mask.png"),
    }
    for name, fig in figs.items():
        assert isinstance(fig, Figure), name
    assert len(list(tmp_path.rglob("*.png"))) == 6
    assert matplotlib.get_backend().lower() == "agg"             # headless here
    with pytest.raises(ValueError):
        viz.plot_mask(None, torch.ones(2, 2, 2), 2)
    import matplotlib.pyplot as plt
    plt.close("all")
