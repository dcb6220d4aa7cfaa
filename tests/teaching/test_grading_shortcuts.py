"""Every known way to earn a check's points without writing the answer fails, through the path a
notebook takes: the notebook's imports, the student's exercise cell, then the instructor's check
cell (hidden tests included, as nbgrader's autograder runs it), in one namespace.

Each shortcut was tried on real nbgrader 0.9.6 before the checks were hardened, and 15 of them
earned full points then. Some of them change the interpreter (reload a module, replace
torch.allclose, edit the checks module): the ``interpreter`` fixture puts everything back.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import linecache
import sys
import textwrap

import nbformat
import pytest
import torch

from qstar_mini.paths import REPO_ROOT
from qstar_mini.teaching.checks import CheckFailed

NOTEBOOKS = REPO_ROOT / "notebooks"
CHECK_OF = {"ex02-thought-mask": ("02_masks_and_parallel_thoughts.ipynb", "check02-thought-mask"),
            "ex02-position-ids": ("02_masks_and_parallel_thoughts.ipynb", "check02-position-ids"),
            "ex03-meta-init": ("03_meta_tokens.ipynb", "check03-meta-init"),
            "ex04-mix-hidden": ("04_mixing_head.ipynb", "check04-mix-hidden"),
            "ex05-future-targets": ("05_losses_nll_vs_reinforce.ipynb", "check05-future-targets"),
            "ex05-rewards": ("05_losses_nll_vs_reinforce.ipynb", "check05-rewards"),
            "ex05-reinforce": ("05_losses_nll_vs_reinforce.ipynb", "check05-reinforce")}
SEEN = "the instructor sees this message in your graded notebook"


@pytest.fixture
def interpreter():
    """Undo what a shortcut did to the package, torch, the checks and the interpreter."""
    def spaces():
        return {name: m for name, m in list(sys.modules.items())
                if m is not None and name.split(".")[0] in ("qstar_mini", "torch", "functools", "importlib")}
    modules = dict(sys.modules)
    saved = {name: dict(vars(m)) for name, m in spaces().items()}
    classes = {cls: dict(vars(cls)) for cls in (torch.Tensor, torch.nn.Module, torch.nn.Linear)}
    built = dict(vars(builtins))
    profile = sys.getprofile()
    from qstar_mini.teaching import checks
    references, hints = dict(checks.REFERENCES), dict(checks.HINTS)
    yield
    checks.REFERENCES.clear()
    checks.REFERENCES.update(references)
    checks.HINTS.clear()
    checks.HINTS.update(hints)
    sys.setprofile(profile)
    for name in list(sys.modules):
        if name not in modules:
            if name.startswith("qstar_mini"):       # a module loaded again under another name
                del sys.modules[name]
        elif sys.modules[name] is not modules[name]:
            sys.modules[name] = modules[name]
    for name, before in saved.items():
        ns = vars(modules[name])
        for key in [k for k in ns if k not in before]:
            del ns[key]
        for key, value in before.items():
            if ns.get(key, before) is not value:
                ns[key] = value
    for cls, before in classes.items():
        for key in [k for k in vars(cls) if k not in before]:
            delattr(cls, key)
        for key, value in before.items():
            if vars(cls).get(key, before) is not value:
                setattr(cls, key, value)
    vars(builtins).update(built)
    while torch._C._len_torch_function_stack():
        torch._C._pop_torch_function_stack()
    assert checks._GUARD[0]() is None, checks._GUARD[0]()


def _cells(nb_name: str):
    return nbformat.read(NOTEBOOKS / nb_name, as_version=4).cells


def _run_cell(source: str, namespace: dict, label: str) -> None:
    filename = f"<ipython-input-{abs(hash(label)) % 10**6}>"                 # as IPython names a cell
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), namespace)


def as_notebook(exercise: str, student_cell: str):
    """Run the notebook's imports, ``student_cell`` as the exercise cell, then the instructor's check
    cell; return (the exception of the check cell or None, what it printed, what it wrote to stderr)."""
    nb_name, check_id = CHECK_OF[exercise]
    cells = _cells(nb_name)
    namespace = {"__name__": "__main__"}
    imports = "\n".join(line for c in cells if c.cell_type == "code" for line in c.source.split("\n")
                        if line.startswith(("import ", "from ")) and "qstar_mini.teaching" not in line)
    _run_cell(imports, namespace, "imports")
    _run_cell(textwrap.dedent(student_cell), namespace, exercise)
    check = next(c.source for c in cells if c.metadata.get("nbgrader", {}).get("grade_id") == check_id)
    if "from qstar_mini.teaching import checks" not in check:        # imported by an earlier check cell
        _run_cell("from qstar_mini.teaching import checks", namespace, "earlier check")
    out, err, raised = io.StringIO(), io.StringIO(), None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            _run_cell(check, namespace, check_id)
        except Exception as error:  # noqa: BLE001 - the test reads it
            raised = error
    return raised, out.getvalue(), err.getvalue()


def fails(exercise: str, student_cell: str, *expected: str) -> str:
    raised, out, err = as_notebook(exercise, student_cell)
    assert isinstance(raised, CheckFailed), (raised, out)
    message = str(raised)
    for text in expected:
        assert text in message, message
    return message


REWARDS_HEAD = "from qstar_mini.losses import rewards\n"

SHORTCUTS = {
    "default argument": REWARDS_HEAD + """
def my_rewards(log_p_talk, valid, _r=rewards):
    return _r(log_p_talk, valid)
""",
    "dict": REWARDS_HEAD + """
TOOLS = {"r": rewards}
def my_rewards(log_p_talk, valid):
    return TOOLS["r"](log_p_talk, valid)
""",
    "class staticmethod": REWARDS_HEAD + """
class Tools:
    r = staticmethod(rewards)
def my_rewards(log_p_talk, valid):
    return Tools.r(log_p_talk, valid)
""",
    "factory closure": """
def make():
    import qstar_mini.losses as L
    r = L.rewards
    def my_rewards(log_p_talk, valid):
        return r(log_p_talk, valid)
    return my_rewards
my_rewards = make()
""",
    "types.FunctionType": REWARDS_HEAD + """
import types
twin = types.FunctionType(rewards.__code__, rewards.__globals__, "twin", rewards.__defaults__)
def my_rewards(log_p_talk, valid):
    return twin(log_p_talk, valid)
""",
    "inspect.getsource + exec": REWARDS_HEAD + """
import inspect, qstar_mini.losses as L
space = dict(vars(L))
exec(inspect.getsource(rewards), space)
def my_rewards(log_p_talk, valid):
    return space["rewards"](log_p_talk, valid)
""",
    "importlib.reload": """
import importlib, qstar_mini.losses as L
def my_rewards(log_p_talk, valid):
    return importlib.reload(L).rewards(log_p_talk, valid)
""",
    "module file under another name": """
import importlib.util, qstar_mini.losses as L
spec = importlib.util.spec_from_file_location("qstar_mini.my_losses", L.__file__)
mine = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mine)
def my_rewards(log_p_talk, valid):
    return mine.rewards(log_p_talk, valid)
""",
    "functools.lru_cache": REWARDS_HEAD + """
import functools
cached = functools.lru_cache(rewards)
def my_rewards(log_p_talk, valid):
    return cached(log_p_talk, valid)
""",
    "replacing checks.check_rewards": """
from qstar_mini.teaching import checks
checks.check_rewards = lambda fn, seed=0: print("check_rewards: passed")
def my_rewards(log_p_talk, valid):
    return torch.zeros(log_p_talk.shape[:3], dtype=log_p_talk.dtype)
""",
    "replacing torch.allclose": """
torch.allclose = lambda *args, **kwargs: True
def my_rewards(log_p_talk, valid):
    return torch.zeros(log_p_talk.shape[:3], dtype=log_p_talk.dtype)
""",
    "tensor subclass, comparisons always true": """
class Agreeable(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.allclose, torch.equal):
            return True
        return super().__torch_function__(func, types, args, kwargs or {})
def my_rewards(log_p_talk, valid):
    return torch.zeros(log_p_talk.shape[:3], dtype=log_p_talk.dtype).as_subclass(Agreeable)
""",
    "emptying checks.REFERENCES": REWARDS_HEAD + """
from qstar_mini.teaching import checks
checks.REFERENCES.clear()
def my_rewards(log_p_talk, valid):
    return rewards(log_p_talk, valid)
""",
    "answers precomputed for the check seeds": """
from qstar_mini.teaching import checks as _c
from qstar_mini.losses import rewards as _r
ANSWERS = {}
for _seed in (0, 11, 12):                      # the visible and the hidden seeds of the instructor notebook
    for _valid, _lp, _ in _c._loss_cases(_seed):
        ANSWERS[_lp.numpy().tobytes()] = _r(_lp, _valid)
def my_rewards(log_p_talk, valid):
    return ANSWERS[log_p_talk.detach().numpy().tobytes()].clone()
""",
    # found while hardening the checks
    "the reference's code on the student's function": REWARDS_HEAD + """
def my_rewards(log_p_talk, valid):
    pass
my_rewards.__code__ = rewards.__code__
my_rewards.__defaults__ = rewards.__defaults__
my_rewards.__globals__.update({k: v for k, v in rewards.__globals__.items() if k not in my_rewards.__globals__})
""",
    "the reference in a thread": REWARDS_HEAD + """
import threading
def my_rewards(log_p_talk, valid):
    out = []
    worker = threading.Thread(target=lambda: out.append(rewards.__wrapped__(log_p_talk, valid)
                                                         if hasattr(rewards, "__wrapped__") else
                                                         TOOLS[0](log_p_talk, valid)))
    worker.start(); worker.join()
    return out[0]
TOOLS = [rewards]
""",
    "the call monitor switched off": REWARDS_HEAD + """
import sys
TOOLS = [rewards]
def my_rewards(log_p_talk, valid):
    sys.setprofile(None)
    return TOOLS[0](log_p_talk, valid)
""",
    "a torch function mode left active": """
from torch.overrides import TorchFunctionMode
class Yes(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.allclose, torch.equal):
            return True
        return func(*args, **(kwargs or {}))
def my_rewards(log_p_talk, valid):
    Yes().__enter__()
    return torch.zeros(log_p_talk.shape[:3], dtype=log_p_talk.dtype)
""",
    "a private helper of the checks replaced": """
from qstar_mini.teaching import checks
vars(checks)["_same"] = lambda *args, **kwargs: True
def my_rewards(log_p_talk, valid):
    return torch.zeros(log_p_talk.shape[:3], dtype=log_p_talk.dtype)
""",
    "a builtin replaced": """
import builtins
real_isinstance = builtins.isinstance
builtins.isinstance = lambda obj, cls: True if cls is torch.Tensor else real_isinstance(obj, cls)
def my_rewards(log_p_talk, valid):
    return [0.0]
""",
    "sys.modules replaced": """
import sys, types
fake = types.ModuleType("qstar_mini.teaching.checks")
fake.check_rewards = lambda fn, seed=0: print("check_rewards: passed")
sys.modules["qstar_mini.teaching.checks"] = fake
def my_rewards(log_p_talk, valid):
    return torch.zeros(log_p_talk.shape[:3], dtype=log_p_talk.dtype)
""",
}

#: What each failure must say besides that the instructor sees it.
SAYS = {
    "default argument": "ran the package's qstar_mini.losses.rewards",
    "dict": "ran the package's qstar_mini.losses.rewards",
    "class staticmethod": "ran the package's qstar_mini.losses.rewards",
    "factory closure": "qstar_mini.losses.rewards is disabled",
    "types.FunctionType": "ran the package's qstar_mini.losses.rewards",
    "inspect.getsource + exec": "ran a copy of the package's qstar_mini.losses.rewards (the same bytecode",
    "importlib.reload": "called importlib.reload()",
    "module file under another name": "from a second copy of its module",
    "functools.lru_cache": "ran the package's qstar_mini.losses.rewards",
    "replacing checks.check_rewards": "checks.check_rewards was replaced",
    "replacing torch.allclose": "torch.allclose was replaced",
    "tensor subclass, comparisons always true": "a subclass of torch.Tensor; return a plain torch.Tensor",
    "emptying checks.REFERENCES": "checks.REFERENCES or checks.HINTS were changed",
    "answers precomputed for the check seeds": "FAILED on inputs drawn at random now",
    "the reference's code on the student's function": "ran the package's qstar_mini.losses.rewards",
    "the reference in a thread": "ran the package's qstar_mini.losses.rewards",
    "the call monitor switched off": "called sys.setprofile()",
    "a torch function mode left active": "torch function or dispatch mode",
    "a private helper of the checks replaced": "checks._same was replaced",
    "a builtin replaced": "the builtin isinstance was replaced",
    "sys.modules replaced": "sys.modules['qstar_mini.teaching.checks'] was replaced",
}


@pytest.mark.parametrize("name", list(SHORTCUTS))
def test_a_shortcut_fails_through_the_notebooks_check_cell(name, interpreter):
    message = fails("ex05-rewards", SHORTCUTS[name], SAYS[name])
    if name != "answers precomputed for the check seeds":
        assert SEEN in message or "is disabled while your function is checked" in message, message


def test_the_flex_attention_predicate_does_not_answer_the_mask_exercise(interpreter):
    fails("ex02-thought-mask", """
from torch.nn.attention.flex_attention import create_mask
from qstar_mini.fast import flex_attention
def my_thought_visibility(attention_mask, step):
    batch, seq = attention_mask.shape
    visible = flex_attention.figure3_visible(seq, seq, attention_mask)
    return create_mask(visible, batch, None, seq, seq * (1 + step), device="cpu")
""", "ran the package's qstar_mini.fast.flex_attention.figure3_visible", SEEN)


def test_every_shortcut_has_its_expected_message():
    assert SHORTCUTS.keys() == SAYS.keys() and len(SHORTCUTS) >= 15 + 6


# ---- correct answers keep their points, and write nothing to stderr

CORRECT_WITH_NOISE = {
    "ex03-meta-init": """
def my_init_embedding(model, tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    table = model.get_input_embeddings().weight
    return torch.tensor(table[ids].mean(0))             # warns: copy-construct from a tensor
""",
    "ex05-rewards": """
import warnings, sys, os, logging
def my_rewards(log_p_talk, valid):
    warnings.warn("a student's own warning")
    print("debugging to stderr", file=sys.stderr)
    os.write(2, b"written to file descriptor 2\\n")
    logging.getLogger("student").warning("a logged warning")
    score = log_p_talk.detach().masked_fill(~valid[:, None], 0.0).sum(-1)
    return score - score.mean(dim=1, keepdim=True)
""",
    "ex04-mix-hidden": """
def my_mix_hidden(lm_head, h_init, h_thought, w):        # computed in float32 on float64 inputs
    w = w[..., None]
    return torch.log_softmax(lm_head((1 - w) * h_init + w * h_thought).float(), dim=-1)
""",
}


@pytest.mark.parametrize("exercise", list(CORRECT_WITH_NOISE))
def test_a_correct_answer_that_warns_passes_and_writes_nothing_to_stderr(exercise, capfd, interpreter):
    raised, out, err = as_notebook(exercise, CORRECT_WITH_NOISE[exercise])
    captured = capfd.readouterr()
    assert raised is None, raised
    assert err == "" and captured.err == "", (err, captured.err)
    assert out.count(": passed") == 3, out
    if exercise != "ex04-mix-hidden":
        assert ": note: your code (or torch) wrote" in out, out


def test_the_instructors_solutions_pass_through_the_same_path(interpreter):
    """... and print what the instructor notebooks saved (nbval compares it in `make test`)."""
    for exercise, (nb_name, check_id) in CHECK_OF.items():
        cells = {c.metadata.get("nbgrader", {}).get("grade_id"): c for c in _cells(nb_name)}
        raised, out, err = as_notebook(exercise, cells[exercise].source)
        assert raised is None and err == "" and out.count(": passed") == 3, (exercise, raised, out, err)
        saved = "".join(o.get("text", "") for o in cells[check_id].outputs if o.output_type == "stream")
        assert out == saved, (exercise, out, saved)


def test_a_replacement_made_before_the_checks_are_imported_is_refused():
    """Notebooks 02-04 import the checks in their first check cell, after the exercise: the
    guard's snapshot then holds the replacement, which is refused because its code is a notebook's."""
    import subprocess

    program = textwrap.dedent('''
        import linecache, torch
        cell = "torch.allclose = lambda *args, **kwargs: True\\n"
        linecache.cache["<ipython-input-1>"] = (len(cell), None, [cell], "<ipython-input-1>")
        exec(compile(cell, "<ipython-input-1>", "exec"), {"torch": torch})
        from qstar_mini.teaching import checks
        try:
            checks.check_rewards(lambda lp, valid: torch.zeros(lp.shape[:3], dtype=lp.dtype))
        except checks.CheckFailed as error:
            print(error)
    ''')
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300,
                            cwd=REPO_ROOT)
    assert "torch.allclose is a function written in this notebook, not torch's own" in result.stdout, result
    assert SEEN in result.stdout


def test_torch_compiling_after_the_checks_are_imported_is_not_tampering():
    """The first time anything compiles, torch._dynamo wraps nn.Module.__init__ and __setstate__ with
    functions of its own and flags the class (torch 2.6 did it during the low row of the
    compatibility matrix): the guard must not call that tampering, and a correct answer passes."""
    import subprocess

    solution = next(c.source for c in _cells("05_losses_nll_vs_reinforce.ipynb")
                    if c.metadata.get("nbgrader", {}).get("grade_id") == "ex05-rewards")
    program = textwrap.dedent('''
        import linecache, sys, torch
        from qstar_mini.teaching import checks
        before = dict(vars(torch.nn.Module))
        from torch._dynamo.mutation_guard import install_generation_tagging_init
        install_generation_tagging_init()
        print("patched:", dict(vars(torch.nn.Module)) != before)
        cell, namespace = sys.argv[1], {"torch": torch}
        linecache.cache["<ipython-input-1>"] = (len(cell), None, cell.splitlines(True), "<ipython-input-1>")
        exec(compile(cell, "<ipython-input-1>", "exec"), namespace)
        checks.check_rewards(namespace["my_rewards"])
    ''')
    result = subprocess.run([sys.executable, "-c", program, solution], capture_output=True, text=True,
                            timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-2000:]
    assert "check_rewards: passed" in result.stdout, result.stdout
    if "patched: True" not in result.stdout:       # torch 2.15 no longer patches nn.Module there
        pytest.skip(f"torch {torch.__version__} leaves nn.Module alone when it compiles: nothing to tell apart")
