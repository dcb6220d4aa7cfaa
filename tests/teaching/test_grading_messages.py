"""What the checks say teaches without giving the answer away (docs/grading.md, "Hints by level").

Every string the checks can show (failure messages, their hints, the hint levels) is read from the
source of ``qstar_mini.teaching.checks``; none but the level-3 hints may hold the answer's code: the
lines of the instructor's solutions, or the code fragments below that make up each answer.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

from qstar_mini.paths import REPO_ROOT
from qstar_mini.teaching import checks

CHECKS_SOURCE = Path(checks.__file__).read_text(encoding="utf-8")

#: Code that is (part of) an exercise's answer. Stating what a student did wrong (e.g. "seq * step + j")
#: is fine; stating what to write is level 3.
ANSWER_CODE = {
    "check_thought_mask": ["torch.eye(", ".tril()", ".repeat(1, step)", "torch.cat([", "attention_mask.bool()[:, None"],
    "check_position_ids": ["j + k", "j + step", "arange(seq) + step", ".expand(batch, seq)"],
    "check_meta_init": ["add_special_tokens=False", ".mean(0)", "[ids].mean", "table[ids", "ids[0]", ".detach().clone()"],
    "check_mix_hidden": ["(1 - w) * h_init", "w * h_thought", "w[..., None]", "log_softmax(lm_head", "lm_head((1",
                         "(1 - w[..., None])"],
    "check_future_targets": ["arange(seq)[:, None]", "+ 1 + torch.arange", "idx.clamp(", ".bool()[:, idx",
                             "masked_fill(~valid, 0)"],
    "check_rewards": ["masked_fill(~valid[:, None]", "valid[:, None]", "keepdim=True", "dim=1", ".sum(-1)",
                      "score - score.mean", "log_p_talk.detach()"],
    "check_reinforce_loss": ["clamp(min=0", "-r *", "-r.", "think[:, None]", ".sum(-1)", "mask.sum()", "r.detach()",
                             "sum() /"],
}


def _normal(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _shown_strings() -> list[tuple[int, str]]:
    """(line, text) of every string literal of checks.py that is not a docstring nor a level-3 hint;
    an f-string's fields become {}."""
    tree = ast.parse(CHECKS_SOURCE)
    docstrings, level3 = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            if node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
                docstrings.add(id(node.body[0].value))
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "HINTS":
            for levels in node.value.values:
                level3.update(id(n) for n in ast.walk(levels.elts[2]))
    out = []
    for node in ast.walk(tree):
        if id(node) in docstrings or id(node) in level3:
            continue
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            out.append((node.lineno, text))
            for v in node.values:
                level3.add(id(v))          # its parts are read as one string
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append((node.lineno, node.value))
    return out


def solution_lines() -> list[str]:
    """The code lines between the solution markers of the instructor notebooks, comments dropped."""
    lines = []
    for path in sorted((REPO_ROOT / "notebooks").glob("0[2-5]_*.ipynb")):
        inside = False
        for cell in nbformat.read(path, as_version=4).cells:
            for line in cell.source.split("\n"):
                if "BEGIN SOLUTION" in line:
                    inside = True
                elif "END SOLUTION" in line:
                    inside = False
                elif inside and cell.cell_type == "code":
                    code = line.split("#")[0].strip()
                    if len(_normal(code)) > 14 and not code.startswith(("return", "def ")):
                        lines.append(code.split("=", 1)[-1] if re.match(r"^[\w, ]+ = ", code) else code)
    return lines


def test_the_scan_reads_messages_and_hints_but_not_level_3():
    shown = " | ".join(text for _, text in _shown_strings())
    assert "was replaced or removed in this notebook" in shown          # a message
    assert checks.HINTS["check_rewards"][1] in shown                    # a level-2 hint
    assert checks.HINTS["check_rewards"][2] not in shown                # level 3 is allowed the formula


@pytest.mark.parametrize("check", sorted(ANSWER_CODE))
def test_no_message_or_hint_below_level_3_shows_the_answers_code(check):
    leaks = [(line, fragment, text) for line, text in _shown_strings() for fragment in ANSWER_CODE[check]
             if _normal(fragment) in _normal(text)]
    assert not leaks, "\n".join(f"checks.py line {line}: {fragment!r} in {text!r}" for line, fragment, text in leaks)


def test_no_message_or_hint_below_level_3_holds_a_line_of_the_solutions():
    solutions = {_normal(line): line for line in solution_lines()}
    assert len(solutions) > 10
    leaks = [(line, code, text) for line, text in _shown_strings() for key, code in solutions.items()
             if key in _normal(text)]
    assert not leaks, "\n".join(f"checks.py line {line}: {code!r} in {text!r}" for line, code, text in leaks)


def test_level_3_gives_the_formula_and_the_levels_grow():
    for name, levels in checks.HINTS.items():
        assert len(levels) == 3, name
        assert any(_normal(f) in _normal(levels[2]) for f in ANSWER_CODE.get(name, [])) or name == "check_end_to_end", name
        assert len(levels[0]) < len(levels[1]) + len(levels[2]), name
