"""Conformance: qstar_mini on every decoder-only causal LM family the installed transformers has.

The families are ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (all of them, not a hand-picked list), each
built as a tiny random float64 model (``tests/conformance_models.py`` says how, and what each
check compares). For every family ``prepare_model`` must either refuse the model with the
package's one-line error, or accept it, and then:

* ``h_init``: the plain pass gives the model's own final hidden states (right-padded batch);
* ``log_p_init``: the step's log p^init is the model's own log-softmax;
* ``parallel``: parallel thoughts (Figure 3 masks + KV cache) equal the naive loop;
* ``modes``: attention="blocks" and memory="rescore" give the default step's loss and gradients;
* ``finite``: the step's loss and gradients are finite.

A family whose sliding window is shorter than the step's span must be refused or honoured
(``test_a_window_shorter_than_the_step_is_refused_or_honoured``).

By default each family is tested with one attention implementation (eager or sdpa, fixed by a
hash of its name) and a smaller batch for the naive loops: about a minute on two cores. Both
implementations and the full batch:

    QSTAR_CONFORMANCE=full python -m pytest tests/test_conformance.py

The table of docs/conformance.md: ``python tests/conformance_table.py PATH [--full]``.
"""

from __future__ import annotations

import pytest

import conformance_models as cm

# Computed at collection time from the installed transformers (see cm.exclusion): the families
# that are not tried at all, and why. Build-time exclusions (a missing optional dependency, a
# model whose own forward cannot run a float64 text batch) are found when the family is built
# and reported as skips with their reason.
EXCLUDED = {model_type: cm.exclusion(model_type) for model_type, _ in cm.families()
            if cm.exclusion(model_type) is not None}
CASES = cm.cases()


def _params(cases):
    return [pytest.param(model_type, impl, id=f"{model_type}-{impl}",
                         marks=[pytest.mark.skip(reason=skip)] if skip else [])
            for model_type, impl, skip in cases]


PARAMS = _params(CASES)
WINDOWED = _params([(model_type, impl, skip) for model_type, impl, skip in CASES
                    if skip is None and cm.has_window(model_type)])


def _case(model_type, impl, window=cm.WINDOW):
    case = cm.prepared(model_type, impl, window)
    if case.status == "excluded":
        pytest.skip(f"excluded: {case.reason}")
    return case


def test_every_causal_lm_family_is_walked():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    walked = {model_type for model_type, _, _ in CASES}
    assert walked == set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    # the harness itself works: the project's four reference architectures are tried, and most
    # families are not excluded at the config level
    assert not {"llama", "mistral", "qwen2", "gpt2"} & set(EXCLUDED)
    assert len(EXCLUDED) < len(walked) / 2, EXCLUDED
    assert all(reason and "\n" not in reason for reason in EXCLUDED.values())


@pytest.mark.parametrize("model_type,impl", PARAMS)
def test_prepare_model_accepts_or_refuses_in_one_line(model_type, impl):
    case = _case(model_type, impl)
    if case.status not in ("accepted", "refused"):
        pytest.fail(f"{model_type} {impl}: {case.reason}", pytrace=False)


@pytest.mark.parametrize("check", cm.CHECKS)
@pytest.mark.parametrize("model_type,impl", PARAMS)
def test_accepted_model_conforms(model_type, impl, check):
    case = _case(model_type, impl)
    if case.status == "refused":
        pytest.skip(f"refused: {case.reason}")
    if case.status != "accepted":
        pytest.skip(f"not prepared (see test_prepare_model_accepts_or_refuses_in_one_line): {case.reason}")
    try:
        result = cm.run_check(case, check)
    finally:
        if all(name in case.results for name in cm.CHECKS):
            cm.release(case)                      # every check done: free the model
    if result.outcome == "refused":
        pytest.skip(f"refused in {check}: {result.detail}")
    if result.outcome != "pass":
        pytest.fail(f"{model_type} {impl} {check}: {result.detail}", pytrace=False)


@pytest.mark.parametrize("model_type,impl", WINDOWED)
def test_a_window_shorter_than_the_step_is_refused_or_honoured(model_type, impl):
    """With a sliding window of SMALL_WINDOW (4) tokens, shorter than the step's span (13), the
    package must refuse the model in one line or reproduce its windowed hidden states exactly."""
    case = _case(model_type, impl, cm.SMALL_WINDOW)
    try:
        if case.status == "refused":
            return
        if case.status != "accepted":
            pytest.fail(f"{model_type} {impl} (window {cm.SMALL_WINDOW}): {case.reason}", pytrace=False)
        for check in ("h_init", "log_p_init"):
            result = cm.run_check(case, check)
            if result.outcome not in ("pass", "refused"):
                pytest.fail(f"{model_type} {impl} (window {cm.SMALL_WINDOW}) {check}: {result.detail}", pytrace=False)
    finally:
        cm.release(case)


DOC = cm.REPO_ROOT / "docs" / "conformance.md"


def test_the_published_table_matches_this_run():
    """docs/conformance.md (README and docs/setup.md link it) says, for this transformers version, what this run
    finds: the same families, and each one supported, refused or excluded as the table says."""
    import re

    import transformers

    text = DOC.read_text()
    version = re.search(r"transformers (\S+) \(torch", text).group(1)
    if version != transformers.__version__:
        pytest.skip(f"docs/conformance.md is for transformers {version}; regenerate it with "
                    f"python tests/conformance_table.py docs/conformance.md --full")
    rows = dict(re.findall(r"^\| `([^`]+)` \| `[^`]+` \| (\w+) \|", text, flags=re.M))
    assert set(rows) == {model_type for model_type, _, _ in CASES}
    wrong = {}
    for model_type, impl, skip in CASES:
        if skip is not None:
            continue
        status = cm.prepared(model_type, impl).status
        published = rows[model_type]
        if (published == "supported") != (status == "accepted") and status != "excluded":
            wrong[f"{model_type}-{impl}"] = (published, status)
    assert not wrong, f"docs/conformance.md is out of date (published, now): {wrong}"
