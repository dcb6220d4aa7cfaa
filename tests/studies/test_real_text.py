"""The SmolLM2 experiment's pieces (qstar_mini.studies.real_text), on the tiny model: fast.

* the split by template: no held-out question, with numbers, names, pronouns and items masked,
  occurs in training (and the masking is not vacuous: the file's first/last split shares some);
* the token categories of a worked answer;
* the control's loss is the Quiet-STaR loss with w = 0 and no REINFORCE (same weights on the
  same scored entries);
* the evaluation's mixed prediction after given thoughts is the training step's;
* random and shuffled thoughts keep the meta-tokens and change the content;
* run_experiment end to end (2 seeds, 2 steps) and its Markdown table;
* docs/real-model.md's table is the rendering of docs/results/real_report.json.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from qstar_mini.data import _ITEMS, _NAMES
from qstar_mini.errors import ConfigError
from qstar_mini.models.tiny import load_model
from qstar_mini.paths import DATA_DIR, REPO_ROOT, TINY_BASE
from qstar_mini.step import prepare_model, quiet_star_step
from qstar_mini.studies import real_text as rt

REPORT = REPO_ROOT / "docs" / "results" / "real_report.json"
PAGE = REPO_ROOT / "docs" / "real-model.md"


def skeleton(question: str) -> str:
    """The question with its numbers, names, pronouns and items masked."""
    names = "|".join(n for n, _, _ in _NAMES)
    text = re.sub(r"\d+", "N", question)
    text = re.sub(rf"\b({names})\b", "NAME", text)
    text = re.sub(r"\b([Hh]e|[Ss]he|his|her)\b", "PRON", text)
    return re.sub(rf"\b({'|'.join(_ITEMS)})\b", "ITEM", text)


def test_no_held_out_template_occurs_in_training():
    problems = rt.problem_lines(DATA_DIR / "gsm8k_format.jsonl")
    assert sorted({rt.template_of(q) for q, _ in problems}) == sorted(rt.TEMPLATES)    # each matches one
    train, test = rt.split_by_template(problems, rt.RealSettings().held_out)
    assert len(train) + len(test) == len(problems) and len(test) >= 50
    seen = {skeleton(q) for q, _ in train}
    assert not [q for q, _ in test if skeleton(q) in seen]
    # The masking finds repeats where there are some: the file's first 150 / last 50 share templates.
    naive = {skeleton(q) for q, _ in problems[:150]}
    assert sum(skeleton(q) in naive for q, _ in problems[150:]) >= 40
    with pytest.raises(ConfigError, match="matches 0 of the project's templates"):
        rt.template_of("What is the capital of France?")


def test_token_categories_of_a_worked_answer():
    question = "Ana has 4 apples."
    line = f"{question} She eats 4*4=16 of them. #### 16"
    pieces = re.findall(r" ?####| ?[A-Za-z]+|\d|[^\sA-Za-z\d]| ", line)   # digits one by one, as SmolLM2
    offsets, at = [], 0
    for piece in pieces:
        start = line.index(piece, at)
        offsets.append((start, start + len(piece)))
        at = start + len(piece)
    cats = rt.token_categories(line, offsets, len(question) + 1)
    got = [(line[a:b], c) for (a, b), c in zip(offsets, cats) if c is not None]
    # Answer tokens are those that start after the space joining question and answer: " She"
    # carries that space and is left out (as in the saved report).
    assert got == [(" eats", "words"), (" ", "words"), ("4", "other_digit"), ("*", "operator"),
                   ("4", "other_digit"), ("=", "operator"), ("1", "result"), ("6", "result"), (" of", "words"),
                   (" them", "words"), (".", "words"), (" ####", "hash"), (" ", "words"), ("1", "other_digit"),
                   ("6", "other_digit")]
    assert all(c is None for (a, _), c in zip(offsets, cats) if a < len(question) + 1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tok = load_model(TINY_BASE)
    settings = rt.RealSettings(seq_len=224, thought_length=4)
    cfg = settings.config(0)
    meta, head = prepare_model(model, tok, cfg)
    train, test = rt.split_by_template(rt.problem_lines(), settings.held_out)
    data = rt.encode(tok, train[:4], cfg.seq_len)
    return model, tok, meta, head, cfg, data


def test_encoded_lines_mark_the_results_and_refuse_a_short_seq_len(tiny):
    model, tok, meta, head, cfg, data = tiny
    pos = data.positions(("result",))
    for row, line in zip(range(len(data.lines)), data.lines):
        digits = "".join(tok.decode(data.ids[row, j + 1]) for j in pos[row].tolist() if j >= 0)
        assert digits == "".join(line[a:b] for a, b in rt.result_spans(line))
    with pytest.raises(ConfigError, match="raise seq_len to"):
        rt.encode(tok, [(data.lines[0][:10], data.lines[0])], 40)


def test_the_control_loss_is_the_quiet_star_loss_with_w_zero_and_no_reinforce(tiny):
    model, tok, meta, head, cfg, data = tiny
    pos = data.positions(("result",))
    control = rt.control_step(model, meta, cfg, data.ids, data.mask, pos)
    zero = cfg.replace(mixer_sigmoid=False, policy_loss_weight=0.0)   # w = the head's output, made 0 below
    with torch.no_grad():
        saved = [p.clone() for p in head.parameters()]
        for p in head.parameters():
            p.zero_()
    try:
        step = quiet_star_step(model, meta, head, data.ids, data.mask, zero, positions=pos,
                               generator=torch.Generator().manual_seed(0))
    finally:
        with torch.no_grad():
            for p, s in zip(head.parameters(), saved):
                p.copy_(s)
    assert float(step.w.detach().abs().max()) == 0.0
    assert float(control.detach()) == pytest.approx(float(step.loss.detach()), abs=1e-5)
    # and it is not the plain NLL of every token (the scored entries weigh more)
    plain = quiet_star_step(model, meta, None, data.ids, data.mask, cfg.replace(think=False)).loss
    assert abs(float(control.detach()) - float(plain.detach())) > 1e-3


def test_the_evaluations_mixed_prediction_is_the_training_steps(tiny):
    model, tok, meta, head, cfg, data = tiny
    pos = data.positions(("result",))
    model.eval()
    step = quiet_star_step(model, meta, head, data.ids, data.mask, cfg, positions=pos,
                           generator=torch.Generator().manual_seed(3))
    thoughts = rt.own_thoughts(model, meta, cfg, data.ids, data.mask, pos, torch.Generator().manual_seed(3))
    assert torch.equal(thoughts, step.thoughts)
    nll = rt.thought_nll(model, meta, head, cfg, data.ids, data.mask, pos, thoughts)
    expected = (-step.log_p_talk[..., 0].mean(1)).masked_fill(pos < 0, float("nan"))
    torch.testing.assert_close(nll, expected, rtol=0, atol=1e-4, equal_nan=True)
    other = rt.thought_nll(model, meta, head, cfg, data.ids, data.mask, pos,
                           rt.shuffled_thoughts(thoughts, pos, torch.Generator().manual_seed(0)))
    assert not torch.allclose(other[pos >= 0], nll[pos >= 0])


def test_random_and_shuffled_thoughts_change_only_the_content(tiny):
    model, tok, meta, head, cfg, data = tiny
    pos = data.positions(("result",))
    own = rt.own_thoughts(model, meta, cfg, data.ids, data.mask, pos, torch.Generator().manual_seed(1))
    real = pos >= 0
    shuffled = rt.shuffled_thoughts(own, pos, torch.Generator().manual_seed(2))
    a, b = own.permute(0, 2, 1, 3)[real], shuffled.permute(0, 2, 1, 3)[real]   # (slots, n, t)
    assert sorted(map(str, a.tolist())) == sorted(map(str, b.tolist()))        # the same thoughts, moved
    assert torch.equal(shuffled.permute(0, 2, 1, 3)[~real], own.permute(0, 2, 1, 3)[~real])
    assert (a != b).any(-1).any(-1).float().mean() > 0.5
    allowed = torch.tensor([5, 6, 7])
    rand = rt.random_thoughts(own, allowed, torch.Generator().manual_seed(0))
    assert torch.equal(rand[..., [0, -1]], own[..., [0, -1]])                  # the meta-tokens stay
    assert torch.isin(rand[..., 1:-1], allowed).all()
    with pytest.raises(ConfigError, match="at least two thinking positions"):
        rt.shuffled_thoughts(own[:1, :, :1], pos[:1, :1], torch.Generator())


def test_run_experiment_end_to_end_on_the_tiny_model(tmp_path):
    settings = rt.RealSettings(model=str(TINY_BASE), seq_len=224, thought_length=4, seeds=(0, 1), steps=2,
                               train_lines=6, test_lines=6)
    report = rt.run_experiment(settings, tmp_path, log=lambda *a: None)
    saved = json.loads((tmp_path / "real_report.json").read_text())
    assert saved["complete"] and [s["seed"] for s in saved["per_seed"]] == [0, 1]
    assert set(saved["test_templates"]) <= {"change", "two_step"} and "two_step" not in saved["train_templates"]
    for s in saved["per_seed"]:
        assert set(s["nll"]) == set(rt.ARMS)
        assert s["nll"]["random"]["words"] is None and s["nll"]["quiet_star"]["result"] > 0
        assert s["nll"]["base"] == saved["per_seed"][0]["nll"]["base"]
    own = [s["nll"]["quiet_star"]["result"] for s in saved["per_seed"]]
    assert saved["summary"]["nll"]["quiet_star"]["result"]["mean"] == pytest.approx(sum(own) / 2)
    table = rt.render_table(report)
    assert "not run" in table and "Quiet-STaR, random thoughts" in table and "± " in table
    with pytest.raises(ConfigError, match="held_out must name some but not all"):
        rt.RealSettings(held_out=("nope",)).validate()


def _close(a, b) -> bool:
    """Equal nested dicts and lists, floats within 1e-12 relative."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)
    return a == b


def test_the_page_shows_the_reports_table():
    """docs/real-model.md between its markers is exactly render_table of the saved report: editing
    either alone fails here (re-render with update_page)."""
    report = json.loads(REPORT.read_text())
    assert report["complete"] and len(report["per_seed"]) >= 3
    assert set(report["per_seed"][0]["nll"]) == set(rt.ARMS)
    # the per-seed numbers behind it (to rounding: Python's statistics module sums differently by version)
    assert _close(report["summary"], rt.summarise(report["per_seed"]))
    assert rt.page_table(PAGE) == rt.render_table(report)


def test_readmes_headline_is_the_rendering_of_the_report():
    """README's short table (between <!-- real-headline --> markers) is render_headline of the saved
    report; skipped only while README has no such markers."""
    readme = (REPO_ROOT / "README.md").read_text()
    if "<!-- real-headline -->" not in readme:
        pytest.skip("README has no <!-- real-headline --> markers (yet)")
    report = json.loads(REPORT.read_text())
    assert rt.page_table(REPO_ROOT / "README.md", "real-headline") == rt.render_headline(report)


def test_update_page_writes_what_page_table_reads(tmp_path):
    report = json.loads(REPORT.read_text())
    page = tmp_path / "page.md"
    page.write_text("top\n<!-- real-headline -->\nold\n<!-- /real-headline -->\nbottom\n")
    rt.update_page(page, report, "real-headline")
    assert rt.page_table(page, "real-headline") == rt.render_headline(report)
    assert page.read_text().startswith("top\n") and page.read_text().endswith("bottom\n")
    assert "| Quiet-STaR, random thoughts | " in rt.render_headline(report)
    with pytest.raises(ConfigError, match="lacks the markers <!-- real-table -->"):
        rt.update_page(page, report)
