"""Checks for the "build it yourself" exercises of the notebooks.

Each exercise asks the student to write one function of Algorithm 1 again; the cell after it
calls one check of this module, e.g. ``checks.check_thought_mask(my_thought_visibility)``.
A check runs the student's function and the package's reference on fresh random inputs
(several sizes, right-padded batches), then either prints one line ending in ``passed`` or
raises :class:`CheckFailed` (an ``AssertionError``) that says precisely what is wrong and
gives a hint. A function that still raises ``NotImplementedError`` gets "not implemented yet".
Every check runs twice: on ``seed`` (0 for the visible check, other values for the hidden tests),
then on a seed drawn from ``os.urandom`` when it runs, so answers precomputed for known inputs
cannot pass (``seed=None`` runs the drawn seed only; a failure there names the seed to repeat it).

**The answer must be the student's own computation.** While the student's function runs:

* the package functions the exercise asks for (:data:`REFERENCES`) are replaced, in every loaded
  ``qstar_mini`` module, in the function's globals and closure, by a stand-in that raises "this
  exercise asks you to write it with torch only; qstar_mini.losses.rewards is disabled ...";
* a profile function (:class:`_Monitor`, ``sys.setprofile``, also for threads it starts) sees
  every call: code from a file of the package (however it was reached: a default argument, a
  dict, a class, a code object reused, ``functools.lru_cache``, a reloaded module, the module's
  file loaded under another name, the FlexAttention predicate), code with the same bytecode as any
  function of the package (``inspect.getsource`` + ``exec``), ``exec``/``eval``/``compile``,
  ``importlib.reload``, ``sys.setprofile``/``settrace`` and ``gc``'s object walks;
* a result must be a plain ``torch.Tensor`` (a subclass could make every comparison true).

Before each check and after each call of the student's function, the check compares the tools it
relies on with what they were when this module was imported (:func:`_make_guard`): its own
functions and their code, defaults and closures, :data:`REFERENCES` and :data:`HINTS`, the
package's functions, the torch functions it compares and builds with, ``torch.Tensor``'s methods,
the builtins, ``sys.modules``; any function in torch's namespaces must be torch's own code, not a
function written in a notebook; no torch function or dispatch mode may be left active. The public
names of this module always give the functions defined here (the module's class sees to it), so a
notebook that assigns ``checks.check_rewards = ...`` gets the real check, which then reports the
assignment. Each of these failures says why and that the instructor sees the message. What stays
possible in-process is listed in docs/grading.md ("What the checks cannot see").

**Noise costs nothing.** nbgrader gives 0 to a check cell that writes to stderr. A check collects
every warning and everything written to stderr (``sys.stderr``, logging handlers, file descriptor
2) by the student's code and by itself, and prints it on stdout under the pass line. A float32
result on float64 inputs is judged at float32's precision; half precision fails, naming the dtype.

**Hints by level.** A failure says what is wrong (which shape, which entries, which rule) without
the answer's code, and points to :func:`hint`: ``checks.hint("check_rewards")`` shows one level
more at each call (1: a nudge, 2: the concept, 3: the formula, see :data:`HINTS`).
tests/teaching/test_grading_messages.py fails where the answer's code appears below level 3.

**Short failures.** A failure is one message: no chained cause, the check's frames marked
``__tracebackhide__`` (pytest and IPython skip them); under IPython (Jupyter, Colab, nbgrader's
autograder) a handler registered on import shows the message alone as the cell's error output. A
crash of the student's code is reported with the line of their code.

==========================  ===============================  =========================================
check                       the student writes               what it catches (besides shapes, dtypes)
==========================  ===============================  =========================================
check_thought_mask          ``thought_visibility`` for one   missing diagonal (own thought, itself);
                            step (notebook 02)               seeing other positions' thoughts; a text
                                                             part that is not causal or misses x_j;
                                                             an additive (float) mask instead of bool;
                                                             a missing head axis or thought block
check_position_ids          ``step_position_ids``            off-by-k positions; the token's index in
                            (notebook 02)                    the KV cache (seq * step + j) instead of
                                                             its place in the text (j + step)
check_meta_init             ``init_embedding`` (notebook 03) the ``<s>`` the tokenizer adds; first /
                                                             last token only; sum instead of mean;
                                                             not detached; a view into the table
check_mix_hidden            hidden-state mixing              w on the wrong side (paper vs code);
                            (notebook 04)                    log-prob mixing; logits or probabilities
                                                             returned; no gradient into w or h
check_future_targets        ``future_targets`` (notebook 05) off-by-one targets (x_{j+i}); targets
                                                             past the end or on padding counted valid;
                                                             unusable ids (-100) where invalid
check_rewards               ``rewards`` with the mean        no baseline; baseline over the wrong axis
                            baseline (notebook 05)           or leave-one-out; invalid entries
                                                             summed; mean instead of sum over offsets;
                                                             sign; a reward that carries gradient
check_reinforce_loss        ``reinforce_loss`` with the      no clamp; indicator without r; sign;
                            clamp (notebook 05)              non-thinking positions counted; mean of
                                                             token log-probs; wrong average, e.g. the
                                                             n_thoughts factor; ``think`` without the
                                                             thought axis; gradient into the reward
check_end_to_end            both notebook-02 functions       the student's mask and position ids drive
                            together                         ``generate_thoughts``; greedy thoughts must
                                                             equal ``naive_thoughts``; names the piece
==========================  ===============================  =========================================

Also: ``check_position_ids`` wants torch.long (int32 is named); ``check_mix_hidden`` names a
sigmoid applied to w; ``check_rewards`` names a global baseline (over thoughts and positions)
and ``valid`` without the thought axis. The loss checks use batch != n_thoughts, so a mask
without the thought axis cannot broadcast silently; its crash is then probed on a square case
to name it.

The inputs come from a private ``torch.Generator`` (``seed`` argument), never from the global
random state, so calling a check does not change what a notebook samples afterwards.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import gc
import importlib
import io
import logging
import operator
import os
import site
import sys
import sysconfig
import tempfile
import threading
import traceback
import types
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch

from qstar_mini.losses import future_targets, reinforce_loss, rewards
from qstar_mini.masks import step_position_ids, thought_visibility
from qstar_mini.mixing import mix_log_probs

__all__ = ["CheckFailed", "check_thought_mask", "check_position_ids", "check_meta_init",
           "check_mix_hidden", "check_future_targets", "check_rewards", "check_reinforce_loss",
           "check_end_to_end", "hint", "HINTS", "REFERENCES"]


class CheckFailed(AssertionError):
    """A student's function disagrees with the reference; the message says how, and a hint.

    Raised without a chained cause, from frames marked ``__tracebackhide__`` (pytest and
    IPython skip them); under IPython a handler registered on import prints the message alone.
    """


# ============================================================================ the references, disabled

#: The package functions that each exercise asks the student to write again, as
#: "module:attribute". While the student's function runs inside a check, each of them is replaced,
#: in every loaded qstar_mini module, in the function's globals and closure, by a stand-in that
#: raises: an answer that calls the reference scores 0.
REFERENCES: dict[str, tuple[str, ...]] = {
    "check_thought_mask": ("qstar_mini.masks:thought_visibility", "qstar_mini.masks:thought_mask",
                           "qstar_mini.masks:all_step_masks", "qstar_mini.masks:one_pass_visibility"),
    "check_position_ids": ("qstar_mini.masks:step_position_ids", "qstar_mini.masks:one_pass_position_ids"),
    "check_meta_init": ("qstar_mini.meta_tokens:init_embedding",),
    "check_mix_hidden": ("qstar_mini.mixing:mix_log_probs",),
    "check_future_targets": ("qstar_mini.losses:future_targets", "qstar_mini.losses:gather_ahead"),
    "check_rewards": ("qstar_mini.losses:rewards",),
    "check_reinforce_loss": ("qstar_mini.losses:reinforce_loss",),
}


class _ReferenceUsed(Exception):
    """Raised by a disabled reference; :func:`_call` turns it into the check's failure."""


def _reference_message(qualname: str) -> str:
    return (f"this exercise asks you to write it with torch only; {qualname} is disabled while your "
            f"function is checked")


def _standin(qualname: str, calls: list[str]) -> Callable:
    def disabled(*args, **kwargs):
        __tracebackhide__ = True
        calls.append(_reference_message(qualname))
        raise _ReferenceUsed(_reference_message(qualname))
    disabled.__name__ = disabled.__qualname__ = qualname.rsplit(".", 1)[-1]
    disabled.__doc__ = f"{qualname}, disabled while a student's function is checked."
    return disabled


# ============================================================================ the grader's tools, guarded

#: Where a failure that the check cannot accept as the student's own work tells the student who sees it.
_SEEN = "the instructor sees this message in your graded notebook"

_THIS_FILE = os.path.abspath(__file__)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(_THIS_FILE))                      # .../qstar_mini


def _installed_dirs() -> tuple[str, ...]:
    """Where installed code lives: the standard library, every site-packages (user's too), torch's
    and this package's folders; never the working folder, where a notebook's own files are."""
    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths |= {os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))), _PACKAGE_DIR}
    with contextlib.suppress(Exception):
        paths |= set(site.getsitepackages()) | {site.getusersitepackages()}
    paths |= {p for p in sys.path if p and ("site-packages" in p or "dist-packages" in p)}
    return tuple(sorted(os.path.join(os.path.abspath(p), "") for p in paths if p))


_TRUSTED_DIRS = _installed_dirs()


def _notebook_code(filename: str) -> bool:
    """Whether code was compiled from a notebook cell (IPython's names for cells) or from a file
    outside the installed code; code that libraries generate (``<string>``, ``<frozen ...>``,
    ``<eval_with_key>``) is not."""
    if filename.startswith("<"):
        return filename.startswith("<ipython-input-")
    return "ipykernel_" in filename or not filename.startswith(_TRUSTED_DIRS)

#: Builtins a student's function has no reason to call, and that take code or the checker apart.
_SUSPECT_BUILTINS = {exec: "exec()", eval: "eval()", compile: "compile()", sys.setprofile: "sys.setprofile()",
                     sys.settrace: "sys.settrace()", gc.get_referrers: "gc.get_referrers()",
                     gc.get_referents: "gc.get_referents()", gc.get_objects: "gc.get_objects()"}
_SUSPECT_CODE = {importlib.reload.__code__: "importlib.reload()"}


def _genuine(obj) -> bool:
    """False for a Python function (or a wrapper of one) written in a notebook (see
    :func:`_notebook_code`): a stand-in for a library's function."""
    for _ in range(8):
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        elif isinstance(obj, property):
            return all(_genuine(f) for f in (obj.fget, obj.fset, obj.fdel) if f is not None)
        elif isinstance(obj, functools.partial):
            obj = obj.func
        elif isinstance(obj, types.MethodType):
            obj = obj.__func__
        elif isinstance(obj, types.FunctionType):
            return not _notebook_code(obj.__code__.co_filename)
        elif callable(obj) and not isinstance(obj, type) and isinstance(getattr(obj, "__wrapped__", None), Callable):
            obj = obj.__wrapped__                                           # functools.lru_cache and friends
        else:
            return True
    return False


def _function_state(obj) -> tuple:
    """What a function's behaviour hangs on besides its identity (code, defaults, closure)."""
    if not isinstance(obj, types.FunctionType):
        return ()
    cells = []
    for cell in obj.__closure__ or ():
        try:
            cells.append(id(cell.cell_contents))
        except ValueError:
            cells.append(None)
    return (obj.__code__, obj.__defaults__, id(obj.__kwdefaults__), tuple(cells))


def _mode_stacks() -> tuple[Callable[[], int], Callable[[], int]]:
    """How many torch function modes and dispatch modes are active (0 where torch cannot say)."""
    def none() -> int:
        return 0
    return (getattr(torch._C, "_len_torch_function_stack", none), getattr(torch._C, "_len_torch_dispatch_stack", none))


def _make_guard():
    """``tampered() -> str | None``: what of the checker, the package, torch or the builtins it
    relies on differs from when this module was imported (None when nothing does).

    Everything it compares with lives in this closure, taken once at import; a replaced object, a
    function whose code or defaults were changed, an object added to ``torch.Tensor``, a stand-in
    defined in a notebook before the import, a replaced ``sys.modules`` entry are all named."""
    this = sys.modules[__name__]
    own = dict(vars(this))
    own_state = {k: _function_state(v) for k, v in own.items()}
    spaces = {f"{name}.": vars(module) for name, module in sys.modules.items()
              if module is not None and (name == "qstar_mini" or name.startswith("qstar_mini."))
              and name != __name__}
    callables = {prefix: {k: v for k, v in ns.items() if isinstance(v, (types.FunctionType, type,
                                                                        types.BuiltinFunctionType))}
                 for prefix, ns in spaces.items()}
    # torch wraps some of its own functions when a submodule loads (torch._dynamo: manual_seed), so
    # torch is held to identity only for what the checks compare and build with; everything else in
    # these namespaces must at least be torch's own code, not a function written in a notebook
    compared = ("allclose", "equal", "isclose", "cat", "stack", "eye", "arange", "ones", "zeros", "where", "tensor",
                "randn", "rand", "randint", "log_softmax", "softmax", "sigmoid", "nonzero", "is_tensor")
    spaces["torch."] = vars(torch)
    callables["torch."] = {k: getattr(torch, k) for k in compared}
    loose = {"torch.": vars(torch), "torch.nn.functional.": vars(torch.nn.functional),
             "torch.autograd.": vars(torch.autograd), "torch.random.": vars(torch.random)}
    classes = {"torch.Tensor.": torch.Tensor, "torch.nn.Module.": torch.nn.Module, "torch.nn.Linear.": torch.nn.Linear}
    class_dicts = {prefix: dict(vars(cls)) for prefix, cls in classes.items()}
    base_names = frozenset(dir(torch._C.TensorBase))
    names = ("isinstance", "type", "len", "bool", "float", "int", "abs", "min", "max", "sum", "tuple", "list",
             "dict", "set", "zip", "range", "enumerate", "any", "all", "getattr", "hasattr", "id", "iter", "next",
             "print", "str", "repr", "sorted", "round", "callable", "object", "super", "__import__")
    built = {k: getattr(builtins, k) for k in names}
    stdlib = {"sys.setprofile": sys.setprofile, "sys.getprofile": sys.getprofile, "os.urandom": os.urandom,
              "threading.setprofile": threading.setprofile, "warnings.catch_warnings": warnings.catch_warnings,
              "warnings.simplefilter": warnings.simplefilter}
    stdlib_home = {"sys.setprofile": (sys, "setprofile"), "sys.getprofile": (sys, "getprofile"),
                   "os.urandom": (os, "urandom"), "threading.setprofile": (threading, "setprofile"),
                   "warnings.catch_warnings": (warnings, "catch_warnings"),
                   "warnings.simplefilter": (warnings, "simplefilter")}
    modules = {name: module for name, module in sys.modules.items()
               if name in ("torch", "builtins", "sys") or name == "qstar_mini" or name.startswith("qstar_mini.")}
    references = {k: tuple(v) for k, v in REFERENCES.items()}
    hints = {k: tuple(v) for k, v in HINTS.items()}
    stack_fn, stack_dispatch = _mode_stacks()
    get, is_, genuine = dict.get, operator.is_, _genuine
    module_class, module_get = type(this), type(this).__getattribute__

    def torch_patch(value) -> bool:
        """What torch itself sets on its classes after import: torch._dynamo, once anything compiles,
        wraps nn.Module.__init__ and __setstate__ with functions of its own and marks the class
        with a flag (``___needs_generation_tag_patch = False``)."""
        if isinstance(value, bool):
            return True
        return callable(value) and genuine(value) and str(getattr(value, "__module__", "")).startswith("torch.")

    def tampered() -> str | None:
        for key, value in own.items():
            now = get(vars(this), key, own)
            if not is_(now, value):
                return f"checks.{key} was replaced or removed in this notebook"
            if _function_state(value) != own_state[key]:
                return f"the code, defaults or closure of checks.{key} were changed in this notebook"
        if not is_(type(this), module_class) or not is_(module_class.__getattribute__, module_get):
            return "the checks module's class was changed in this notebook"
        if REFERENCES != references or any(tuple(v) != hints[k] for k, v in HINTS.items()) or HINTS.keys() != hints.keys():
            return "checks.REFERENCES or checks.HINTS were changed in this notebook"
        for name, module in modules.items():
            if not is_(sys.modules.get(name), module):
                return f"sys.modules[{name!r}] was replaced in this notebook"
        for prefix, table in callables.items():
            ns = spaces[prefix]
            for key, value in table.items():
                now = get(ns, key, table)
                if not is_(now, value):
                    return f"{prefix}{key} was replaced or removed in this notebook"
                if not genuine(value):
                    return f"{prefix}{key} is a function written in this notebook, not {prefix.rstrip('.')}'s own"
        for prefix, ns in loose.items():
            for key, value in list(ns.items()):
                if callable(value) and not genuine(value):
                    return f"{prefix}{key} is a function written in this notebook, not torch's own"
        for prefix, cls in classes.items():
            before, now = class_dicts[prefix], dict(vars(cls))
            for key in now.keys() - before.keys():
                if key in base_names or (key.startswith("__") and not torch_patch(now[key])):
                    return f"{prefix}{key} was added in this notebook (it overrides torch's own)"
            for key, value in now.items():
                if key in before and not is_(value, before[key]) and key.startswith("__") and not torch_patch(value):
                    return f"{prefix}{key} was replaced in this notebook"
                if not genuine(value):
                    return f"{prefix}{key} is a function written in this notebook, not torch's own"
        for key, value in built.items():
            if not is_(getattr(builtins, key, None), value) or not genuine(value):
                return f"the builtin {key} was replaced in this notebook"
        for key, value in stdlib.items():
            module, attr = stdlib_home[key]
            if not is_(getattr(module, attr, None), value) or not genuine(value):
                return f"{key} was replaced in this notebook"
        if stack_fn() or stack_dispatch():
            return "a torch function or dispatch mode is active (it can change what torch's functions return)"
        return None

    return tampered


#: [tampered]: filled in when the module has been loaded (its snapshot needs every function of it).
_GUARD: list[Callable[[], str | None]] = []


def _verify(check: str) -> None:
    """Fail ``check`` when the checker or the tools it relies on were replaced (see :func:`_make_guard`)."""
    __tracebackhide__ = True
    problem = _GUARD[0]()
    if problem is not None:
        raise CheckFailed(f"{check}: FAILED. {problem}, so this check cannot trust its own tools; restart the "
                          f"kernel and run the notebook without it ({_SEEN})") from None


# ---- the student's function, watched

def _signature(code: types.CodeType) -> tuple:
    """A code object's bytecode, names and constants, not its file, name or line numbers: equal for
    the same source compiled again (a reloaded module, a module file loaded under another name,
    ``inspect.getsource`` + ``exec``)."""
    consts = tuple(_signature(c) if isinstance(c, types.CodeType) else (type(c).__name__, repr(c))
                   for c in code.co_consts)
    return (code.co_code, code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars, consts,
            code.co_argcount, code.co_kwonlyargcount, code.co_flags & 0xFFFF)    # not the __future__ flags


_package_signatures_cache: list[dict] = []


def _package_signatures() -> dict[tuple, str]:
    """{signature: "qstar_mini.module.function"} of every function of the package compiled from its
    files (not from the loaded modules, which a notebook can change); small ones left out."""
    if not _package_signatures_cache:
        out: dict[tuple, str] = {}
        for root, _, files in os.walk(_PACKAGE_DIR):
            for file in files:
                if not file.endswith(".py"):
                    continue
                path = os.path.join(root, file)
                module = os.path.relpath(path, os.path.dirname(_PACKAGE_DIR))[:-3].replace(os.sep, ".")
                try:
                    with open(path, encoding="utf-8") as f:
                        top = compile(f.read(), path, "exec")
                except (OSError, SyntaxError, ValueError):
                    continue
                todo = [top]
                while todo:
                    code = todo.pop()
                    todo.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
                    if code is not top and len(code.co_code) >= 48:
                        out.setdefault(_signature(code), f"{module.removesuffix('.__init__')}.{_qualname(code)}")
        _package_signatures_cache.append(out)
    return _package_signatures_cache[0]


def _package_name(code: types.CodeType) -> str:
    rel = os.path.relpath(code.co_filename, os.path.dirname(_PACKAGE_DIR))[:-3].replace(os.sep, ".")
    return f"{rel.removesuffix('.__init__')}.{_qualname(code)}" if code.co_name != "<module>" else rel


def _qualname(code: types.CodeType) -> str:
    return getattr(code, "co_qualname", code.co_name)                     # co_qualname: Python >= 3.11


class _Monitor:
    """A profile function that watches every call made while the student's function runs: code
    of the package (by its file, or the same bytecode from anywhere else), and the builtins that
    take code or the checker apart, called from outside the standard library and site-packages."""

    def __init__(self, found: list[str]):
        self.found, self.seen = found, set()
        self.signatures = _package_signatures()

    def __call__(self, frame, event, arg):
        if event == "call":
            code = frame.f_code
            if code in self.seen:
                return
            self.seen.add(code)
            name = code.co_filename
            if name == _THIS_FILE:          # the check's own machinery (and its stand-ins, which report)
                return
            if name.startswith(_PACKAGE_DIR + os.sep):
                where = _package_name(code)
                module = sys.modules.get(where.rsplit(".", 1)[0] if code.co_name != "<module>" else where)
                copy = module is None or frame.f_globals is not vars(module)
                self.note(f"your function ran the package's {where}"
                          + (" from a second copy of its module (importlib.reload, or its file loaded under "
                             "another name)" if copy and code.co_name != "<module>" else ""))
            elif code in _SUSPECT_CODE:
                self.note(f"your function called {_SUSPECT_CODE[code]}")
            elif not name.startswith(_TRUSTED_DIRS):        # installed libraries' code is theirs, not a copy
                twin = self.signatures.get(_signature(code))
                if twin is not None:
                    self.note(f"your function ran a copy of the package's {twin} (the same bytecode, e.g. from "
                              f"inspect.getsource and exec, or the module's file loaded again)")
        elif event == "c_call":
            what = _SUSPECT_BUILTINS.get(arg) if isinstance(arg, types.BuiltinFunctionType) else None
            if what is not None and _notebook_code(frame.f_code.co_filename):
                self.note(f"your function called {what}")

    def note(self, what: str) -> None:
        if not self.found or self.found[-1] != what:
            self.found.append(what)


@contextlib.contextmanager
def _watched(found: list[str]):
    """While active, :class:`_Monitor` watches this thread and the threads it starts; afterwards,
    a switched-off monitor, a torch mode left active or a replaced tool is added to ``found``."""
    monitor = _Monitor(found)
    before_sys, before_threads = sys.getprofile(), threading.getprofile()
    stack_fn, stack_dispatch = _mode_stacks()
    modes = stack_fn(), stack_dispatch()
    threading.setprofile(monitor)
    sys.setprofile(monitor)
    try:
        yield monitor
    finally:
        switched_off = sys.getprofile() is not monitor
        sys.setprofile(before_sys)
        threading.setprofile(before_threads)
        if switched_off:
            monitor.note("your function switched off the check's call monitor (sys.setprofile or sys.settrace)")
        if (stack_fn(), stack_dispatch()) != modes:
            monitor.note("your function left a torch function or dispatch mode active")


def _integrity_message(what: str) -> str:
    return (f"{what}. This exercise asks you to write the computation yourself with torch, in your own "
            f"function; the check cannot accept a result reached this way ({_SEEN})")


# ---- noise: warnings and stderr

@contextlib.contextmanager
def _quiet(noise: list[str]):
    """Collect into ``noise`` every warning and everything written to stderr while active (Python's
    ``sys.stderr``, logging handlers that write there, and file descriptor 2): nbgrader gives 0 to a
    check cell that writes anything to stderr, so a correct answer's warning must not reach it."""
    buffer = io.StringIO()
    streams = {id(s) for s in (sys.stderr, sys.__stderr__) if s is not None}
    for stream in (sys.stderr, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    capture = tempfile.TemporaryFile(mode="w+b")
    with contextlib.ExitStack() as stack:
        stack.callback(capture.close)
        with contextlib.suppress(OSError, ValueError):
            saved_fd = os.dup(2)
            os.dup2(capture.fileno(), 2)
            stack.callback(os.close, saved_fd)
            stack.callback(os.dup2, saved_fd, 2)
        for handler in _logging_handlers():
            if type(handler) is logging.StreamHandler and id(handler.stream) in streams:
                stack.callback(handler.setStream, handler.setStream(buffer))
        caught = stack.enter_context(warnings.catch_warnings(record=True))     # the filters in force stay:
        stack.enter_context(contextlib.redirect_stderr(buffer))                # what would have been shown
        try:
            yield
        finally:
            for w in caught:
                noise.append(f"{w.category.__name__}: {str(w.message).strip()}")
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            capture.seek(0)
            written = capture.read().decode("utf-8", "replace")
            for text in (buffer.getvalue(), written):
                noise.extend(line.strip() for line in text.splitlines() if line.strip())


def _logging_handlers() -> list:
    loggers = [logging.getLogger()] + [v for v in logging.Logger.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers]


# ---- every check: guarded, quiet, and once more on inputs drawn now

_current: dict[str, str] = {}


def _fresh_seed() -> int:
    """A seed nobody can know before the check runs."""
    return int.from_bytes(os.urandom(4), "little") % 2**31


def _check(body: Callable) -> Callable:
    """The public check around ``body(fn..., seed=...)``: refuses to run with replaced tools;
    runs ``body`` on ``seed`` and once more on a seed drawn now (a table of answers precomputed for
    known seeds cannot pass; ``seed=None`` draws only); keeps warnings and stderr of the student's
    code and of the check itself off stderr, and prints them under the one pass line."""
    name = body.__name__
    verify, quiet, fresh, current, out = _verify, _quiet, _fresh_seed, _current, print

    @functools.wraps(body)
    def check(*args, seed: int | None = 0, **kwargs):
        __tracebackhide__ = True
        verify(name)
        noise: list[str] = []
        drawn = fresh()
        runs = [drawn] if seed is None else [seed, drawn]
        details = []
        with quiet(noise):
            for run_seed in runs:
                current.pop(name, None)
                try:
                    body(*args, seed=run_seed, **kwargs)
                except CheckFailed as failure:
                    if run_seed != drawn:
                        raise
                    text = str(failure).replace(
                        f"{name}: FAILED. ",
                        f"{name}: FAILED on inputs drawn at random now (checks.{name}(..., seed={drawn}) "
                        f"repeats them). ", 1)
                    raise CheckFailed(text) from None
                details.append(current.pop(name, ""))
        verify(name)
        out(f"{name}: passed ({details[0]})" if seed is not None else f"{name}: passed ({details[0]}, seed {drawn})")
        if noise:
            shown = "; ".join(dict.fromkeys(noise))
            out(f"{name}: note: your code (or torch) wrote {len(noise)} warning or error line(s); the check kept "
                f"them off stderr so they cost no points, but read them: {shown[:400]}")
    check.__wrapped_body__ = body
    return check


def _guard_module() -> None:
    """Give this module a class whose ``checks.check_rewards`` (and every public name) is always
    the function defined here, even after a notebook assigned something else to it (the check
    then reports it), and whose class cannot be assigned."""
    this = sys.modules[__name__]
    public = {name: vars(this)[name] for name in __all__}
    get_attribute, set_attribute = types.ModuleType.__getattribute__, types.ModuleType.__setattr__

    class GuardedModule(types.ModuleType):
        def __getattribute__(self, name):
            original = public.get(name) if isinstance(name, str) else None
            return original if original is not None else get_attribute(self, name)

        def __setattr__(self, name, value):
            if name == "__class__":
                raise AttributeError("the class of the checks module cannot be changed")
            set_attribute(self, name, value)

    types.ModuleType.__setattr__(this, "__class__", GuardedModule)       # again on a reload: the new functions


def _package_namespaces() -> Iterator[dict]:
    """The namespace of every loaded qstar_mini module (this one included)."""
    for name, module in list(sys.modules.items()):
        if (name == "qstar_mini" or name.startswith("qstar_mini.")) and module is not None:
            yield vars(module)


def _student_parts(fns: Sequence[Callable]) -> Iterator[Callable]:
    """Each function, and what it wraps (functools.partial's func, a bound method's __func__)."""
    for fn in fns:
        seen = set()
        while fn is not None and id(fn) not in seen:
            seen.add(id(fn))
            yield fn
            fn = getattr(fn, "func", None) or getattr(fn, "__func__", None)


@contextlib.contextmanager
def _replaced(fns: Sequence[Callable], everywhere: dict[int, tuple[object, object]],
              in_package: dict[int, tuple[object, object]] | None = None):
    """Swap objects by identity, ``{id(original): (original, replacement)}``, wherever the
    student's functions ``fns`` or the package reach them by name: every qstar_mini module's
    attributes, the functions' globals and closure cells. ``in_package`` takes precedence inside
    the package (a replacement that is the original leaves it alone there). Restored on exit,
    also after an exception."""
    in_package = in_package or {}
    undo: list[tuple[object, object, object]] = []

    def swap(ns: dict, table: list[dict]) -> None:
        for key, value in list(ns.items()):
            for t in table:
                hit = t.get(id(value))
                if hit is not None and hit[0] is value:
                    if hit[1] is not value:
                        undo.append((ns, key, value))
                        ns[key] = hit[1]
                    break

    try:
        done = set()
        for ns in _package_namespaces():
            done.add(id(ns))
            swap(ns, [in_package, everywhere])
        for part in _student_parts(fns):
            g = getattr(part, "__globals__", None)
            if isinstance(g, dict) and id(g) not in done:
                done.add(id(g))
                swap(g, [everywhere])
            for cell in getattr(part, "__closure__", None) or ():
                try:
                    value = cell.cell_contents
                except ValueError:                                     # an empty cell
                    continue
                hit = everywhere.get(id(value))
                if hit is not None and hit[0] is value:
                    undo.append((cell, None, value))
                    cell.cell_contents = hit[1]
        yield
    finally:
        for where, key, value in reversed(undo):
            if key is None:
                where.cell_contents = value
            else:
                where[key] = value


def _resolve(ref: str):
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def _standins(checks: Sequence[str], calls: list[str]) -> dict[int, tuple[object, object]]:
    out = {}
    for check in checks:
        for ref in REFERENCES.get(check, ()):
            original = _resolve(ref)
            out[id(original)] = (original, _standin(ref.replace(":", "."), calls))
    return out


def _direct(fn: Callable, table: dict[int, tuple[object, object]]) -> Callable:
    """``fn``, or the stand-in when ``fn`` is (or wraps, e.g. functools.partial) a reference itself."""
    for part in _student_parts([fn]):
        hit = table.get(id(part))
        if hit is not None and hit[0] is part:
            return hit[1]
    return fn


@contextlib.contextmanager
def _references_disabled(check: str, fn: Callable, calls: list[str]):
    """While active, calling one of ``REFERENCES[check]`` from ``fn`` (or from the package) raises
    and is recorded in ``calls``; yields what to call instead of ``fn`` (the stand-in when ``fn``
    is a reference itself)."""
    table = _standins([check], calls)
    with _replaced([fn], table), _watched(calls):
        yield _direct(fn, table)
    problem = _GUARD[0]() if _GUARD else None
    if problem is not None:
        calls.append(f"while your function ran, {problem.replace(' in this notebook', '')}")


# ============================================================================ hints, by level

#: Progressively more help for each check: level 1 a nudge (what to think about), level 2 the
#: concept, in words, without the answer's code; level 3 the formula. A failure shows level 1 only;
#: :func:`hint` shows more. tests/teaching/test_grading_messages.py keeps the answer's code out of levels 1-2.
HINTS: dict[str, tuple[str, ...]] = {
    "check_thought_mask": (
        "look at the picture of the mask: the keys are the text, then one block of thought tokens per step",
        "the text part is the causal mask with padding; each thought block lets a position see only its own "
        "column (its own thought), the current step's block included",
        "torch.cat([causal (batch, 1, seq, seq), torch.eye(seq, dtype=torch.bool).repeat(1, step) expanded to "
        "(batch, 1, seq, seq * step)], dim=-1)",
    ),
    "check_position_ids": (
        "a position id says where the token would sit in the text, not where it sits in the KV cache",
        "picture the thought written into the text right after its position: each of its tokens takes the next "
        "place; padding does not change the positions of real tokens",
        "(torch.arange(seq) + step).expand(batch, seq), a long tensor: token k of the thought after x_j is at j + k",
    ),
    "check_meta_init": (
        "a meta-token starts from the embeddings of the characters of its text, without the <s> the "
        "tokenizer adds",
        "the tokenizer gives the ids of the characters when asked not to add special tokens; each id is a row of "
        "the model's input-embedding table; the start is a fixed copy of their average, outside the graph",
        "model.get_input_embeddings().weight[tokenizer(text, add_special_tokens=False)['input_ids']].mean(0)"
        ".detach().clone() (how='first': the row of ids[0])",
    ),
    "check_mix_hidden": (
        "mix the two hidden states with w (w weights the thought), then turn the mixed state into log-probs",
        "w is one number per position while the states have a hidden axis, so it must broadcast over that axis; "
        "mix the states first, then map the mixed state to the vocabulary with the LM head and normalise there",
        "torch.log_softmax(lm_head((1 - w[..., None]) * h_init + w[..., None] * h_thought), dim=-1)",
    ),
    "check_future_targets": (
        "the thought after x_j is judged on the n_true tokens that come after x_j",
        "offset i of position j is the token at index j + 1 + i; it is valid only inside the sequence and "
        "on a real (not padding) token",
        "idx = torch.arange(seq)[:, None] + 1 + torch.arange(n_true); valid = (idx < seq) & "
        "attention_mask.bool()[:, idx.clamp(max=seq - 1)]; targets = input_ids[:, idx.clamp(max=seq - 1)] "
        "with 0 where not valid",
    ),
    "check_rewards": (
        "a thought's reward is how much better it predicts the true tokens than the other thoughts of the "
        "same position",
        "a thought is scored by how likely it makes the whole true continuation (only the offsets that exist "
        "and are not padding count); its reward compares that score with the other thoughts of the same "
        "position; a reward is a fixed number, outside the graph",
        "score = log_p_talk.detach().masked_fill(~valid[:, None], 0).sum(-1); "
        "r = score - score.mean(dim=1, keepdim=True)",
    ),
    "check_reinforce_loss": (
        "REINFORCE makes thoughts with a positive reward more likely; the reward is a fixed weight",
        "the official code ignores thoughts that did worse than average; the probability of a thought is that "
        "of all its sampled tokens together; only positions that think count, and the loss must not grow with "
        "the batch",
        "per = (-r.detach().clamp(min=0) * thought_logprobs.sum(-1)).masked_fill(~think[:, None], 0); "
        "scalar = per.sum() / think[:, None].expand_as(per).sum()",
    ),
    "check_end_to_end": (
        "the parallel generation with your mask and position ids must make the same thoughts as the slow "
        "loop that thinks at one position at a time",
        "if it fails, run check_thought_mask and check_position_ids first: they say what differs",
        "a thought token of position j sees x_0..x_j and its own earlier thought tokens, nothing else, and "
        "sits at position j + k",
    ),
}

_hint_level: dict[str, int] = {}


def hint(check: str | Callable, level: int | None = None) -> str:
    """Print (and return) the hints for ``check`` up to ``level`` (1: a nudge, 2: the concept, 3: the
    formula). Without ``level``, one more than the last call showed:
    ``checks.hint("check_rewards")`` twice shows levels 1 and 2."""
    name = check if isinstance(check, str) else getattr(check, "__name__", str(check))
    if name not in HINTS:
        raise ValueError(f"no hints for {name!r}; one of: {', '.join(HINTS)}")
    top = len(HINTS[name])
    if level is None:
        level = min(_hint_level.get(name, 0) + 1, top)
    if not 1 <= level <= top:
        raise ValueError(f"level must be 1..{top} (got {level})")
    _hint_level[name] = max(_hint_level.get(name, 0), level)
    text = "\n".join(f"{name} hint {k + 1}/{top}: {HINTS[name][k]}" for k in range(level))
    print(text)
    return text


def _more(check: str) -> str:
    return f"{HINTS[check][0]}; more: checks.hint({check!r}, 2)"


# ============================================================================ shared helpers

def _fail(check: str, what: str, hint: str | None = None, case: str | None = None):
    __tracebackhide__ = True
    msg = f"{check}: FAILED. {what}"
    if case:
        msg += f"\n  on: {case}"
    if hint:
        msg += f"\n  hint: {hint}"
    raise CheckFailed(msg) from None


def _passed(check: str, detail: str) -> None:
    """What the check verified; :func:`_check` prints it in the one pass line."""
    _current[check] = detail


def _where_in_student_code(e: BaseException) -> str:
    """`` (in f, line: code)`` for the last frame of the traceback outside the package and torch."""
    package = str(importlib.import_module("qstar_mini").__path__[0])
    skip = (package, str(torch.__path__[0]))
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(skip)]
    if not frames or not frames[-1].line:
        return ""
    return f" (in {frames[-1].name}, line: {frames[-1].line.strip()})"


def _call(check: str, fn: Callable, args: tuple, case: str, signature: str, crash_hint: str | None = None,
          diagnose: Callable[[BaseException], tuple[str, str] | None] | None = None):
    """Run the student's function with the references disabled; turn NotImplementedError, a call of
    a reference and crashes into clear failures (``diagnose`` may name the mistake behind a crash)."""
    __tracebackhide__ = True
    calls: list[str] = []
    error = None
    try:
        with _references_disabled(check, fn, calls) as target:
            out = target(*args)
    except NotImplementedError:
        error = (f"{check}: not implemented yet. In the exercise cell, replace `# YOUR CODE HERE` and "
                 f"`raise NotImplementedError()` with your code, run that cell, then this one.")
    except CheckFailed:
        raise
    except Exception as e:  # noqa: BLE001 - any crash of the student's code is reported, with the input
        if calls:
            out = None
        else:
            named = diagnose(e) if diagnose is not None else None
            if named is not None:
                _fail(check, named[0], named[1], case)
            error = (f"{check}: FAILED. your function raised {type(e).__name__}: {e}{_where_in_student_code(e)}"
                     f"\n  on: {case}\n  hint: {crash_hint + '; ' if crash_hint else ''}the expected signature "
                     f"is {signature}; print the shapes of the arguments and of your intermediate tensors to "
                     f"find the mismatch")
    if calls:                       # even if the student's code caught the stand-in's error
        _fail(check, calls[0] if calls[0].startswith("this exercise") else _integrity_message(calls[0]),
              "write the computation with torch operations yourself; the package's function is what your "
              "answer is compared with", case)
    if error is not None:
        raise CheckFailed(error) from None
    return out


def _quietly(fn: Callable, *args):
    """``fn(*args)`` or None if it raises (for probes that try to name a mistake)."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001
        return None


def _need_tensor(check: str, value, what: str, case: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        _fail(check, f"{what} must be a torch.Tensor, got {type(value).__name__}", case=case)
    if type(value) not in (torch.Tensor, torch.nn.Parameter):
        _fail(check, f"{what} is a {type(value).__name__}, a subclass of torch.Tensor; return a plain "
                     f"torch.Tensor (a subclass can change how tensors compare, so the check cannot accept it; "
                     f"{_SEEN})", case=case)
    return value


def _plain(out):
    """A tuple as a plain tuple (a tuple subclass cannot change what its items are)."""
    if isinstance(out, tuple) and type(out) is not tuple:
        return tuple.__new__(tuple, [tuple.__getitem__(out, i) for i in range(tuple.__len__(out))])
    return out


def _need_shape(check: str, got: torch.Tensor, expected: Sequence[int], what: str, case: str,
                hint: str | None = None) -> None:
    if tuple(got.shape) != tuple(expected):
        _fail(check, f"{what} has shape {tuple(got.shape)}, expected {tuple(expected)}", hint, case)


def _padding_mask(lengths: Sequence[int], seq: int) -> torch.Tensor:
    """(batch, seq) long, right-padded: row b has lengths[b] ones then zeros."""
    return (torch.arange(seq)[None, :] < torch.tensor(list(lengths))[:, None]).long()


def _random_lengths(g: torch.Generator, batch: int, seq: int) -> list[int]:
    """Row 0 full (the longest row sets seq), the others random in 1..seq."""
    return [seq] + torch.randint(1, seq + 1, (batch - 1,), generator=g).tolist()


def _fmt(x) -> str:
    if isinstance(x, torch.Tensor):
        x = x.detach().tolist()
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, list):
        return "[" + ", ".join(_fmt(v) for v in x) + "]"
    return str(x)


def _same(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6, single: bool = False) -> bool:
    """Equal within ``atol`` (and rtol 1e-5); within float32's precision (atol 1e-5, rtol 1e-4) when
    either is float32 or ``single`` (a result computed in float32 from float64 inputs is right)."""
    if a.shape != b.shape:
        return False
    rtol = 1e-5
    if single or torch.float32 in (a.dtype, b.dtype):
        atol, rtol = max(atol, 1e-5), 1e-4
    return bool(torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol))


def _dtype_note(got: torch.Tensor, expected: torch.dtype) -> str:
    """`` (your result is torch.float16, ...)`` when a lower precision may explain a difference."""
    if got.dtype == expected or not got.is_floating_point():
        return ""
    if got.dtype == torch.float32:
        return (f" (your result is torch.float32, the inputs {expected}: float32 is accepted within its precision, "
                f"so this is more than rounding)")
    return f" (your result is {got.dtype}, the inputs {expected}: compute in the inputs' dtype, or at least in float32)"


# ============================================================================ notebook 02: masks

def _mask_cases(seed: int):
    g = torch.Generator().manual_seed(seed)
    cases = [((3,), 3, 1), ((4, 2), 4, 2), ((5, 3, 1), 5, 3), ((6, 6), 6, 1)]
    for _ in range(4):
        seq = int(torch.randint(2, 9, (1,), generator=g))
        batch = int(torch.randint(1, 4, (1,), generator=g))
        step = int(torch.randint(1, 5, (1,), generator=g))
        cases.append((tuple(_random_lengths(g, batch, seq)), seq, step))
    return cases


def _key_name(k: int, seq: int) -> str:
    if k < seq:
        return f"text token x_{k}"
    return f"thought step {k // seq} of position {k % seq}"


def _diagnose_mask(got: torch.Tensor, exp: torch.Tensor, am: torch.Tensor, step: int) -> tuple[str, str]:
    """What differs on real query rows, in words, and a hint."""
    batch, seq = am.shape
    real_q = am.bool()[:, None, :, None].expand_as(exp)          # compare real query rows only
    missing = exp & ~got & real_q
    extra = got & ~exp & real_q
    k = torch.arange(exp.shape[-1])
    j = torch.arange(seq)[:, None]
    text = (k < seq)[None, :]                                    # (1, keys)
    own = ((k % seq)[None, :] == j) & ~text                      # thought blocks, column j
    problems, hints = [], []

    def first(where: torch.Tensor) -> str:
        b, _, q, key = where.nonzero()[0].tolist()
        return f"(batch row {b}, query position {q}, key {key} = {_key_name(key, seq)})"

    sel = missing & own
    if sel.any():
        current = sel & ((k // seq) == step)[None, None, None, :]
        problems.append(f"{int(sel.sum())} entries where a thought token cannot see its own position's "
                        f"thought tokens (the diagonal of a thought block), e.g. {first(sel)}")
        hints.append("every thought block is an identity matrix: query j sees column j of each of the "
                     f"`step` blocks{', including the current one (itself)' if bool(current.any()) else ''}")
    sel = extra & ~text & ~own
    if sel.any():
        problems.append(f"{int(sel.sum())} entries where a position sees ANOTHER position's thought, "
                        f"e.g. {first(sel)}")
        hints.append("a position's thought is private: in the thought blocks only column j (torch.eye) is True")
    sel = missing & text
    if sel.any():
        problems.append(f"{int(sel.sum())} entries where a thought cannot see real text before it, e.g. {first(sel)}")
        hints.append("the text part is the causal mask: query j sees x_i for every real i <= j, x_j included")
    sel = extra & text & (k[None, :] > j)
    if sel.any():
        problems.append(f"{int(sel.sum())} entries where a thought sees FUTURE text (i > j), e.g. {first(sel)}")
        hints.append("the text part must be lower-triangular: query j sees the text keys 0..j only")
    if not problems:
        sel = missing | extra
        problems.append(f"{int(sel.sum())} entries differ, e.g. {first(sel)}")
    return "; ".join(problems), " / ".join(hints) or _more("check_thought_mask")


@_check
def check_thought_mask(fn: Callable, seed: int = 0) -> None:
    """Exercise: ``fn(attention_mask, step) -> (batch, 1, seq, seq * (1 + step))`` bool mask of
    thought step ``step`` (reference :func:`qstar_mini.masks.thought_visibility`).

    Compared on real query rows (padded rows only need one visible key). With right padding a
    real query never reaches a padded key through the causal part, so padding shows up only in
    the padded rows, whose outputs are never used."""
    name = "check_thought_mask"
    cases = _mask_cases(seed)
    for lengths, seq, step in cases:
        am = _padding_mask(lengths, seq)
        case = f"attention_mask={_fmt(am)}, step={step}"
        exp = thought_visibility(am, step)
        got = _need_tensor(name, _call(name, fn, (am.clone(), step), case,
                                       "fn(attention_mask (batch, seq), step: int) -> (batch, 1, seq, seq * (1 + step)) bool"),
                           "the mask", case)
        if got.dtype != torch.bool:
            if got.is_floating_point() and bool((got < -1).any()):
                _fail(name, f"you returned an additive {got.dtype} mask (0 / large negative)", case=case,
                      hint="return the boolean form (True = may attend); masks.to_additive converts it")
            _fail(name, f"the mask has dtype {got.dtype}, expected torch.bool (True = may attend)", case=case,
                  hint="build it from boolean tensors, or turn the result into bool")
        batch = am.shape[0]
        expected_shape = (batch, 1, seq, seq * (1 + step))
        if tuple(got.shape) == (batch, seq, seq * (1 + step)):
            _fail(name, f"the mask has shape {tuple(got.shape)}, expected {expected_shape}", case=case,
                  hint="Hugging Face wants a head axis of size 1: (batch, 1, query, key); use [:, None]")
        if tuple(got.shape) == (batch, 1, seq, seq * step):
            _fail(name, f"the mask has shape {tuple(got.shape)}, expected {expected_shape}", case=case,
                  hint="the keys are the seq text tokens FOLLOWED by `step` blocks of seq thought tokens")
        _need_shape(name, got, expected_shape, "the mask", case,
                    hint="keys = seq text tokens + one block of seq tokens per thought step fed so far")
        real_q = am.bool()[:, None, :, None].expand_as(exp)
        if not torch.equal(got & real_q, exp & real_q):
            what, hint = _diagnose_mask(got, exp, am, step)
            _fail(name, what, hint, case)
        if not bool(got.any(-1).all()):
            _fail(name, "a padded query row sees nothing at all: softmax over no keys gives NaN", case=case,
                  hint="keep each position's own diagonal even at padding (the reference does)")
    _passed(name, f"{len(cases)} random padded batches, steps 1-4")


@_check
def check_position_ids(fn: Callable, seed: int = 0) -> None:
    """Exercise: ``fn(attention_mask, step) -> (batch, seq)`` position ids of the tokens fed at
    ``step`` (0 = the text; reference :func:`qstar_mini.masks.step_position_ids`).
    Compared at real positions."""
    name = "check_position_ids"
    g = torch.Generator().manual_seed(seed)
    cases = [((4,), 4, 0), ((4, 2), 4, 1), ((5, 3), 5, 3)]
    for _ in range(4):
        seq = int(torch.randint(2, 10, (1,), generator=g))
        cases.append((tuple(_random_lengths(g, int(torch.randint(1, 4, (1,), generator=g)), seq)), seq,
                      int(torch.randint(0, 8, (1,), generator=g))))
    for lengths, seq, step in cases:
        am = _padding_mask(lengths, seq)
        case = f"attention_mask={_fmt(am)}, step={step}"
        exp = step_position_ids(am, step)
        got = _need_tensor(name, _call(name, fn, (am.clone(), step), case,
                                       "fn(attention_mask (batch, seq), step: int) -> (batch, seq) long"),
                           "the position ids", case)
        if got.is_floating_point() or got.dtype == torch.bool:
            _fail(name, f"position ids have dtype {got.dtype}, expected an integer dtype (torch.long)", case=case,
                  hint="torch.arange(seq) is already long")
        if got.dtype != torch.long:
            _fail(name, f"position ids have dtype {got.dtype}, expected torch.long (int64)", case=case,
                  hint="the model looks position ids up in its rotary / position tables, which want int64: "
                       "drop the dtype= argument (torch.arange gives long) or call .long()")
        if tuple(got.shape) == (seq,):
            _fail(name, f"position ids have shape {(seq,)}, expected {tuple(am.shape)}", case=case,
                  hint="one row per sequence of the batch: the ids have the shape of attention_mask")
        _need_shape(name, got, am.shape, "the position ids", case)
        real = am.bool()
        if torch.equal(got[real], exp[real]):
            continue
        j = torch.arange(seq).expand_as(am)
        diff = (got - exp)[real]
        if torch.equal(got[real], (seq * step + j)[real]) and step > 0:
            _fail(name, "you gave thought tokens their index in the KV cache (seq * step + j)", case=case,
                  hint="the position id says where the token would sit in the TEXT: thought token k of "
                       "position j comes right after x_j and the thought tokens before it")
        if bool((diff == diff[0]).all()):
            _fail(name, f"every position id is off by {int(diff[0]):+d} (got {_fmt(got[0])}, expected {_fmt(exp[0])} "
                        f"for row 0)", case=case,
                  hint="x_j itself is at position j, and the first thought token, <|startofthought|>, comes "
                       "right after it in the text")
        b, pos = (got != exp).logical_and(real).nonzero()[0].tolist()
        _fail(name, f"position ids differ, first at batch row {b}, position {pos}: got {int(got[b, pos])}, "
                    f"expected {int(exp[b, pos])}", case=case,
              hint="position ids do not depend on padding here; " + _more(name))
    _passed(name, f"{len(cases)} random padded batches, steps 0-7")


# ============================================================================ notebook 03: meta-tokens

def _small_model_and_tokenizer(seed: int):
    from qstar_mini.models.tiny import build_tokenizer, tiny_model

    tok = build_tokenizer()
    model = tiny_model(tok, seed=seed, hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                       num_attention_heads=2, num_key_value_heads=1)
    return model, tok


def _keeps_global_rng(check: Callable) -> Callable:
    """``check`` run inside ``torch.random.fork_rng``: building its random model or layers draws from
    torch's global generator, which must not change what the notebook samples afterwards (so the
    outputs after a check cell do not depend on how many checks, hidden tests included, ran)."""
    @functools.wraps(check)
    def keeping(*args, **kwargs):
        __tracebackhide__ = True
        with torch.random.fork_rng(devices=[]):
            return check(*args, **kwargs)
    return keeping


@_check
@_keeps_global_rng
def check_meta_init(fn: Callable, seed: int = 0, model=None, tokenizer=None, how: str = "mean") -> None:
    """Exercise: ``fn(model, tokenizer, text) -> (hidden,)``, the embedding a meta-token starts
    from, without ``<s>`` (reference :func:`qstar_mini.meta_tokens.init_embedding`):
    ``how="mean"`` (the exercise, the tiny preset's ``meta_init``) the mean of the input
    embeddings of the tokens of ``text``; ``how="first"`` (the official code) the embedding of
    its first token. A tuple ``(vector, ids)`` like the reference's is accepted too."""
    from qstar_mini.meta_tokens import init_embedding

    name = "check_meta_init"
    if how not in ("mean", "first"):
        raise ValueError(f"how must be 'mean' or 'first' (got {how!r})")
    if model is None or tokenizer is None:
        model, tokenizer = _small_model_and_tokenizer(seed)
    table = model.get_input_embeddings().weight
    before = table.detach().clone()
    texts = ["---", "(", ")", "=(", "31415"]           # the model (from seed) is what a drawn seed changes
    for text in texts:
        case = f"text={text!r}, how={how!r}"
        exp, _ = init_embedding(model, tokenizer, text, how)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out = _call(name, fn, (model, tokenizer, text), case, "fn(model, tokenizer, text: str) -> (hidden,) tensor")
        got = _need_tensor(name, out[0] if isinstance(out, tuple) else out, "the embedding", case)
        hidden = table.shape[1]
        if tuple(got.shape) == (len(ids), hidden) and len(ids) > 1:
            _fail(name, f"you returned one row per token, shape {tuple(got.shape)}; expected ({hidden},)", case=case,
                  hint="average over the tokens (the first axis)" if how == "mean" else "keep the first token's row only")
        if tuple(got.shape) == (1, hidden):
            _fail(name, f"shape (1, {hidden}), expected ({hidden},)", case=case, hint="drop the extra axis: [0] or .squeeze(0)")
        _need_shape(name, got, (hidden,), "the embedding", case)
        if got.requires_grad:
            _fail(name, "the embedding still carries the graph of the embedding table (requires_grad=True)",
                  case=case, hint="it is a starting value, a copy: .detach() (then .clone())")
        start, size = table.untyped_storage().data_ptr(), table.untyped_storage().nbytes()
        if start <= got.data_ptr() < start + size:
            _fail(name, "you returned a view into the model's embedding table", case=case,
                  hint=".clone() it: otherwise changing one changes the other")
        if not torch.equal(table.detach(), before):
            _fail(name, "your function changed the model's embedding table", case=case,
                  hint="only read the table; add_meta_tokens writes the new rows later")
        if _same(got, exp):
            continue
        bos = tokenizer.bos_token_id
        rows = before[ids]
        if bos is not None and _same(got, torch.cat([before[[bos]], rows]).mean(0)):
            _fail(name, "your mean includes the <s> token the tokenizer adds at the start", case=case,
                  hint="the tokenizer adds <s> by itself unless you ask it not to add special tokens")
        if bos is not None and how == "first" and _same(got, before[bos]):
            _fail(name, "you took the <s> token the tokenizer adds at the start", case=case,
                  hint="the tokenizer adds <s> by itself unless you ask it not to add special tokens")
        if how == "mean" and len(ids) > 1 and _same(got, rows[0]):
            _fail(name, f"you used only the first token of {text!r} ({len(ids)} tokens): that is the official "
                        f"code's rule (how='first'), not the mean this exercise asks for", case=case,
                  hint="average the embeddings of ALL its tokens")
        if how == "first" and len(ids) > 1 and _same(got, rows.mean(0)):
            _fail(name, f"you averaged the {len(ids)} tokens of {text!r}; the official code takes the first only",
                  case=case, hint="the official initial_start_token rule keeps the first token's embedding only")
        if len(ids) > 1 and _same(got, rows[-1]):
            _fail(name, f"you used only the last token of {text!r} ({len(ids)} tokens)", case=case,
                  hint="average the embeddings of ALL its tokens" if how == "mean"
                  else "the official code takes the FIRST token")
        if len(ids) > 1 and _same(got, rows.sum(0)):
            _fail(name, "you summed the token embeddings", case=case,
                  hint="the mean keeps the size of an ordinary embedding; a sum grows with the number of tokens" if how == "mean"
                  else "the official code takes the first token's row only")
        rule = "the mean embedding of the tokens" if how == "mean" else "the embedding of the first of the tokens"
        _fail(name, f"the embedding differs from {rule} {ids} of {text!r} "
                    f"(max difference {float((got.detach().double() - exp.double()).abs().max()):.3g})", case=case,
              hint=_more(name))
    _passed(name, f"{len(texts)} texts on a random tiny model" + (", official first-token rule" if how == "first" else ""))


# ============================================================================ notebook 04: mixing

@_check
@_keeps_global_rng
def check_mix_hidden(fn: Callable, seed: int = 0) -> None:
    """Exercise: the official hidden-state mixing,
    ``fn(lm_head, h_init, h_thought, w) -> log_softmax(lm_head((1 - w) * h_init + w * h_thought))``
    of shape (..., vocab); w (...) weights the THOUGHT and is unbounded
    (reference :func:`qstar_mini.mixing.mix_log_probs` in mode "hidden")."""
    name = "check_mix_hidden"
    g = torch.Generator().manual_seed(seed)
    hidden, vocab = 8, 11
    head = torch.nn.Linear(hidden, vocab, bias=False).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g, dtype=torch.float64))
    shapes = [(3,), (2, 4), (2, 3, 5, 2)]
    for lead in shapes:
        h0 = torch.randn(*lead, hidden, generator=g, dtype=torch.float64)
        h1 = torch.randn(*lead, hidden, generator=g, dtype=torch.float64)
        w = torch.randn(*lead, generator=g, dtype=torch.float64) * 1.5            # unbounded
        w.view(-1)[0], w.view(-1)[-1] = 0.0, 1.0
        case = f"h_init, h_thought of shape {tuple(h0.shape)}, w of shape {tuple(w.shape)} (values {w.min():.2f}..{w.max():.2f})"
        ins = [t.clone().requires_grad_(True) for t in (h0, h1, w)]
        got = _need_tensor(name, _call(name, fn, (head, *ins), case,
                                       "fn(lm_head, h_init (..., hidden), h_thought (..., hidden), w (...)) -> (..., vocab)",
                                       "w has one axis fewer than the states (no hidden axis): give it a trailing axis of size 1 so that it broadcasts"),
                           "log p^talk", case)
        _need_shape(name, got, (*lead, vocab), "log p^talk", case,
                    hint="w has no hidden axis: give it a trailing axis of size 1; apply lm_head to the mixed hidden state")
        ref_ins = [t.clone().requires_grad_(True) for t in (h0, h1, w)]
        exp = mix_log_probs(head, *ref_ins, "hidden")
        single = got.dtype != torch.float64          # computed in float32: judged at float32's precision
        if got.dtype not in (torch.float64, torch.float32):
            _fail(name, f"log p^talk has dtype {got.dtype}; the inputs are torch.float64", case=case,
                  hint="half precision loses the differences between log-probs: keep the inputs' dtype")
        if not _same(got, exp, atol=1e-8, single=single):
            with torch.no_grad():
                wv = w[..., None]
                lp0, lp1 = torch.log_softmax(head(h0), -1), torch.log_softmax(head(h1), -1)
                mix = head((1 - wv) * h0 + wv * h1)
                alternatives = [
                    (torch.log_softmax(head(wv * h0 + (1 - wv) * h1), -1),
                     "you weighted the BASE state with w", "in the official code w weights the thought and "
                     "1 - w the base state (the paper's w, on log-probs, weights the base: opposite sides)"),
                    ((1 - wv) * lp0 + wv * lp1, "you mixed log-probabilities (the paper's formula)",
                     "the official code mixes the HIDDEN states, then applies lm_head and log_softmax"),
                    (wv * lp0 + (1 - wv) * lp1, "you mixed log-probabilities, w on the base (the paper's formula)",
                     "here the official code mixes the hidden states, w on the thought, then applies lm_head and log_softmax"),
                    (torch.log_softmax(head((1 - torch.sigmoid(wv)) * h0 + torch.sigmoid(wv) * h1), -1),
                     "you applied a sigmoid to w", "w is the mixing weight as given (the official code uses the raw, "
                     "unbounded score of the mixing head): use w itself, not torch.sigmoid(w)"),
                    (torch.log_softmax(head(torch.sigmoid(wv) * h0 + (1 - torch.sigmoid(wv)) * h1), -1),
                     "you applied a sigmoid to w and weighted the BASE state with it",
                     "use w itself, no sigmoid, and let it weight the thought"),
                    (mix, "you returned logits", "finish with torch.log_softmax(..., dim=-1)"),
                    (torch.softmax(mix, -1), "you returned probabilities", "use log_softmax, not softmax"),
                ]
            for value, what, hint in alternatives:
                if _same(got, value, atol=1e-8, single=single):
                    _fail(name, what, hint, case)
            diff = (got.detach() - exp.detach()).abs()
            _fail(name, f"log p^talk differs from the reference (max difference {diff.max().item():.3g})"
                        f"{_dtype_note(got, torch.float64)}", case=case,
                  hint=_more(name))
        weights = torch.randn(got.shape, generator=g, dtype=torch.float64)
        grads_got = torch.autograd.grad((got * weights).sum(), ins, allow_unused=True)
        grads_exp = torch.autograd.grad((exp * weights).sum(), ref_ins)
        for label, gg, ge in zip(("h_init", "h_thought", "w"), grads_got, grads_exp):
            if gg is None or not bool(gg.abs().sum() > 0):
                _fail(name, f"no gradient reaches {label}", case=case,
                      hint=("the mixing head learns through w: do not .detach() it or turn it into a number"
                            if label == "w" else f"do not .detach() {label}: the LM learns through it"))
            if not _same(gg, ge, atol=1e-8, single=single):
                _fail(name, f"the gradient with respect to {label} differs from the reference's", case=case,
                      hint="use only differentiable torch operations on the inputs")
    _passed(name, f"{len(shapes)} shapes, w unbounded, values and gradients")


# ============================================================================ notebook 05: losses

def _target_cases(seed: int):
    g = torch.Generator().manual_seed(seed)
    cases = [((6, 4), 6, 2), ((5,), 5, 1), ((7, 3, 5), 7, 3)]
    for _ in range(3):
        seq = int(torch.randint(3, 10, (1,), generator=g))
        n_true = int(torch.randint(1, min(4, seq - 1) + 1, (1,), generator=g))
        cases.append((tuple(_random_lengths(g, int(torch.randint(1, 4, (1,), generator=g)), seq)), seq, n_true))
    out = []
    for lengths, seq, n_true in cases:
        am = _padding_mask(lengths, seq)
        ids = torch.randint(4, 40, am.shape, generator=g).masked_fill(am == 0, 0)
        out.append((ids, am, n_true))
    return out


@_check
def check_future_targets(fn: Callable, seed: int = 0) -> None:
    """Exercise: ``fn(input_ids, attention_mask, n_true) -> (targets, valid)``, both
    (batch, seq, n_true): targets[b, j, i] = x_{j+1+i}, valid False past the end or on padding
    (reference :func:`qstar_mini.losses.future_targets`). Targets are compared where valid."""
    name = "check_future_targets"
    cases = _target_cases(seed)
    for ids, am, n_true in cases:
        case = f"input_ids={_fmt(ids)}, attention_mask={_fmt(am)}, n_true={n_true}"
        exp_t, exp_v = future_targets(ids, am, n_true)
        out = _call(name, fn, (ids.clone(), am.clone(), n_true), case,
                    "fn(input_ids (batch, seq), attention_mask (batch, seq), n_true) -> (targets, valid)")
        if not (isinstance(out, tuple) and len(out) == 2):
            _fail(name, f"return a pair (targets, valid); got {type(out).__name__}", case=case)
        got_t = _need_tensor(name, out[0], "targets", case)
        got_v = _need_tensor(name, out[1], "valid", case)
        shape = (*ids.shape, n_true)
        _need_shape(name, got_t, shape, "targets", case, hint="one target per (sequence, position j, offset i)")
        _need_shape(name, got_v, shape, "valid", case)
        if got_v.dtype != torch.bool:
            _fail(name, f"valid has dtype {got_v.dtype}, expected torch.bool", case=case)
        if got_t.is_floating_point() or got_t.dtype == torch.bool:
            _fail(name, f"targets have dtype {got_t.dtype}, expected torch.long (token ids)", case=case)
        if bool((got_t < 0).any()):
            _fail(name, "some targets are negative (e.g. -100 or -1 where invalid)", case=case,
                  hint="targets feed .gather(), so every entry must be a real id: put 0 where valid is False")
        seq = ids.shape[1]
        j = torch.arange(seq)[:, None]
        i = torch.arange(n_true)[None, :]
        if not torch.equal(got_v, exp_v):
            past_end = (j + 1 + i >= seq)[None].expand_as(exp_v)
            extra, missing = got_v & ~exp_v, exp_v & ~got_v
            b, pos, off = (extra | missing).nonzero()[0].tolist()
            where = f"e.g. batch row {b}, position j={pos}, offset i={off} (target index j+1+i={pos + 1 + off})"
            if bool((extra & past_end).any()):
                _fail(name, f"targets past the end of the sequence are marked valid, {where}", case=case,
                      hint="x_{j+1+i} exists only when j + 1 + i < seq")
            if bool(extra.any()):
                _fail(name, f"padding tokens are marked as valid targets, {where}", case=case,
                      hint="valid also needs attention_mask at index j + 1 + i")
            _fail(name, f"real targets are marked invalid, {where}", case=case,
                  hint="a target is valid when its index j + 1 + i is inside the sequence and not padding; "
                       f"more: checks.hint({name!r}, 2)")
        if torch.equal(got_t[exp_v], exp_t[exp_v]):
            continue
        idx = (j + i).clamp(max=seq - 1)
        if torch.equal(got_t[exp_v], ids[:, idx][exp_v]):
            _fail(name, "targets are off by one: you gave x_{j+i}, the token the model already sees at offset 0",
                  case=case, hint="the thought after x_j predicts the NEXT token first: targets[b, j, i] = x_{j+1+i}")
        idx2 = (j + 2 + i).clamp(max=seq - 1)
        if torch.equal(got_t[exp_v], ids[:, idx2][exp_v]):
            _fail(name, "targets are off by one: you gave x_{j+2+i}", case=case,
                  hint="offset 0 is the very next token: targets[b, j, i] = x_{j+1+i}")
        b, pos, off = ((got_t != exp_t) & exp_v).nonzero()[0].tolist()
        _fail(name, f"targets differ at batch row {b}, position j={pos}, offset i={off}: got {int(got_t[b, pos, off])}, "
                    f"expected x_{pos + 1 + off} = {int(exp_t[b, pos, off])}", case=case,
              hint=_more(name))
    _passed(name, f"{len(cases)} random padded batches, n_true 1-4")


def _loss_cases(seed: int, sizes=((2, (6, 4, 5), 6, 2), (4, (5, 5, 2), 5, 1), (3, (7, 3), 7, 3))):
    """(valid, log_p_talk, attention_mask) for several sizes, garbage in the invalid entries.

    batch != n_thoughts (and batch > 1) in every default size, so that a ``valid`` without the
    thought axis cannot broadcast silently against log_p_talk (it would line up with the thoughts)."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for n_thoughts, lengths, seq, n_true in sizes:
        am = _padding_mask(lengths, seq)
        ids = torch.randint(4, 40, am.shape, generator=g)
        _, valid = future_targets(ids, am, n_true)
        lp = -torch.rand(len(lengths), n_thoughts, seq, n_true, generator=g, dtype=torch.float64) * 3
        garbage = -50 * torch.rand(lp.shape, generator=g, dtype=torch.float64)  # differs per thought,
        lp = torch.where(valid[:, None], lp, garbage)       # as log p^talk computed on padding does
        cases.append((valid, lp, am))
    return cases


def _rewards_without_thought_axis(lp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The rewards of a student who masked with ``valid`` as it comes, (batch, seq, n_true): it
    broadcasts against (batch, n_thoughts, seq, n_true) only when batch == n_thoughts, and then
    thought n is masked with sequence n's validity."""
    score = lp.detach().masked_fill(~valid, 0.0).sum(-1)
    return score - score.mean(1, keepdim=True)


def _probe_rewards(fn: Callable) -> Callable[[BaseException], tuple[str, str] | None]:
    """After a crash: does ``fn`` run when batch == n_thoughts, and then give the rewards of a
    missing thought axis on ``valid``?"""
    def diagnose(e: BaseException):
        if not isinstance(e, RuntimeError):
            return None
        valid, lp, _ = _loss_cases(1, sizes=((3, (5, 3, 4), 5, 2),))[0]
        calls: list[str] = []
        with _references_disabled("check_rewards", fn, calls) as target:
            got = _quietly(target, lp.clone().requires_grad_(True), valid.clone())
        if calls or not isinstance(got, torch.Tensor) or not _same(got.detach(), _rewards_without_thought_axis(lp, valid)):
            return None
        return ("valid has no thought axis: (batch, seq, n_true) against log_p_talk (batch, n_thoughts, seq, "
                "n_true) fails here and, when batch == n_thoughts, silently masks thought n with sequence n's "
                "validity", "give valid a thought axis of size 1 right after the batch axis, so that it broadcasts over the thoughts")
    return diagnose


@_check
def check_rewards(fn: Callable, seed: int = 0) -> None:
    """Exercise: ``fn(log_p_talk, valid) -> r`` (batch, n_thoughts, seq): each thought's summed
    log p^talk of its valid true tokens, minus the mean over the thoughts of the same position,
    without gradient (reference :func:`qstar_mini.losses.rewards` with baseline "mean")."""
    name = "check_rewards"
    cases = _loss_cases(seed)
    for valid, lp, _ in cases:
        b, n, seq, n_true = lp.shape
        case = f"log_p_talk of shape {tuple(lp.shape)} (batch, n_thoughts, seq, n_true), valid of shape {tuple(valid.shape)}"
        lp_in = lp.clone().requires_grad_(True)
        got = _need_tensor(name, _call(name, fn, (lp_in, valid.clone()), case,
                                       "fn(log_p_talk (batch, n_thoughts, seq, n_true), valid (batch, seq, n_true)) -> (batch, n_thoughts, seq)",
                                       diagnose=_probe_rewards(fn)),
                           "the reward", case)
        if tuple(got.shape) == (b, n, seq, n_true):
            _fail(name, f"the reward has shape {tuple(got.shape)}: one per offset", case=case,
                  hint="one reward per thought: sum log p^talk over the n_true offsets (the last axis)")
        _need_shape(name, got, (b, n, seq), "the reward", case)
        if got.requires_grad:
            _fail(name, "the reward carries gradient (requires_grad=True)", case=case,
                  hint="a reward is a number that weights log p(T_j), not something to optimise: "
                       "cut it from the graph")
        exp = rewards(lp, valid, "mean")
        if _same(got, exp):
            continue
        masked = lp.masked_fill(~valid[:, None], 0.0)
        score = masked.sum(-1)
        loo = score - (score.sum(1, keepdim=True) - score) / max(n - 1, 1)
        alternatives = [
            (score, "no baseline: you returned each thought's total log p^talk",
             "subtract a baseline, the mean score of the thoughts of the same position (the thought axis)"),
            (-exp, "the sign is flipped", "the reward is log p^talk (higher = better), not the NLL"),
            (lp.sum(-1) - lp.sum(-1).mean(1, keepdim=True), "invalid entries (past the end, padding) were summed",
             "leave out the entries where valid is False before summing (valid has no thought axis: it is the same for every thought)"),
            (masked.mean(-1) - masked.mean(-1).mean(1, keepdim=True), "you averaged over the n_true offsets",
             "sum over the offsets: the log-prob of the whole continuation is the sum of its tokens' log-probs"),
            (score - score.mean(2, keepdim=True), "the baseline is a mean over POSITIONS (dim 2)",
             "the baseline is the mean over the n_thoughts thoughts of the same position: the thought axis"),
            (score - score.mean(0, keepdim=True), "the baseline is a mean over the BATCH (dim 0)",
             "the baseline is the mean over the n_thoughts thoughts of the same position: the thought axis"),
            (score - score.mean((1, 2), keepdim=True), "the baseline is one global mean over all thoughts AND "
             "positions of a sequence", "take the baseline per position: the mean over the thoughts only (the thought axis), "
             "so each position's thoughts compete among themselves"),
            (score - score.mean(), "the baseline is one global mean over the whole batch (all sequences, thoughts "
             "and positions)", "take the baseline per position: the mean over the thoughts only (the thought axis), so each "
             "position's thoughts compete among themselves"),
            (loo, "you used a leave-one-out baseline (the mean of the OTHER thoughts)",
             "the official baseline is the plain mean over all thoughts, the thought itself included"),
        ]
        for value, what, hint in alternatives:
            if _same(got, value.detach()):
                _fail(name, what, hint, case)
        bi, ni, ji = (~torch.isclose(got.detach().double(), exp, atol=1e-6)).nonzero()[0].tolist()
        _fail(name, f"rewards differ, first at (batch {bi}, thought {ni}, position {ji}): got "
                    f"{got.detach()[bi, ni, ji].item():.4f}, expected {exp[bi, ni, ji].item():.4f}", case=case,
              hint=_more(name))
    _passed(name, f"{len(cases)} random batches, 2-4 thoughts, padding")


def _reinforce_case(g: torch.Generator, b: int, n: int, seq: int, n_sampled: int):
    r = torch.randn(b, n, seq, generator=g, dtype=torch.float64)
    r[0, 0, 0], r[0, 1, 0] = 0.7, -0.7                                            # both signs for sure
    lp = -torch.rand(b, n, seq, n_sampled, generator=g, dtype=torch.float64) * 4
    think = torch.rand(b, seq, generator=g) < 0.75
    think[0, 0], think[-1, -1] = True, False
    return r, lp, think


def _probe_reinforce(fn: Callable) -> Callable[[BaseException], tuple[str, str] | None]:
    """After a crash: does ``fn`` run when batch == n_thoughts, and then mask thought n with
    sequence n's ``think`` (the thought axis missing)?"""
    def diagnose(e: BaseException):
        if not isinstance(e, RuntimeError):
            return None
        r, lp, think = _reinforce_case(torch.Generator().manual_seed(1), 3, 3, 5, 2)
        think[1] = ~think[0]                                        # rows differ, so the mix-up shows
        calls: list[str] = []
        with _references_disabled("check_reinforce_loss", fn, calls) as target:
            out = _quietly(target, r.clone().requires_grad_(True), lp.clone().requires_grad_(True), think.clone())
        wrong = (-r.clamp(min=0) * lp.sum(-1)).masked_fill(~think, 0.0)
        if calls or not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)
                         and _same(out[0].detach(), wrong)):
            return None
        return ("think has no thought axis: (batch, seq) against the per-thought loss (batch, n_thoughts, seq) "
                "fails here and, when batch == n_thoughts, silently uses sequence n's think for thought n",
                "give think a thought axis of size 1 right after the batch axis, so that it broadcasts over the thoughts")
    return diagnose


@_check
def check_reinforce_loss(fn: Callable, seed: int = 0) -> None:
    """Exercise: ``fn(r, thought_logprobs, think) -> (per_thought, scalar)``: per thought
    ``-max(r, 0) * log p(T_j)`` (0 where not thinking), and its mean over thinking positions
    and thoughts; no gradient into r (reference :func:`qstar_mini.losses.reinforce_loss`,
    clamp on)."""
    name = "check_reinforce_loss"
    g = torch.Generator().manual_seed(seed)
    sizes = [(2, 3, 6, 3), (1, 4, 5, 5), (3, 2, 4, 2)]               # batch != n_thoughts (see _loss_cases)
    for b, n, seq, n_sampled in sizes:
        r, lp, think = _reinforce_case(g, b, n, seq, n_sampled)
        case = (f"r of shape {tuple(r.shape)} (batch, n_thoughts, seq), thought_logprobs of shape "
                f"{tuple(lp.shape)}, think of shape {tuple(think.shape)}")
        r_in, lp_in = r.clone().requires_grad_(True), lp.clone().requires_grad_(True)
        out = _call(name, fn, (r_in, lp_in, think.clone()), case,
                    "fn(r (batch, n_thoughts, seq), thought_logprobs (batch, n_thoughts, seq, t - 2), think (batch, seq)) "
                    "-> (per_thought (batch, n_thoughts, seq), scalar)", diagnose=_probe_reinforce(fn))
        if not (isinstance(out, tuple) and len(out) == 2):
            _fail(name, f"return a pair (per_thought_loss, scalar_loss); got {type(out).__name__}", case=case)
        per, scalar = _need_tensor(name, out[0], "per_thought", case), _need_tensor(name, out[1], "the scalar loss", case)
        _need_shape(name, per, (b, n, seq), "per_thought", case,
                    hint="log p(T_j) sums the t - 2 sampled tokens (last axis); one loss per thought")
        if scalar.dim() != 0:
            _fail(name, f"the scalar loss has shape {tuple(scalar.shape)}, expected ()", case=case)
        exp_per, exp_scalar = reinforce_loss(r, lp, think, clamp_negative=True)
        mask = think[:, None].expand(b, n, seq)
        if not _same(per, exp_per):
            unclamped, _ = reinforce_loss(r, lp, think, clamp_negative=False)
            logp = lp.sum(-1)
            alternatives = [
                (unclamped, "negative rewards were not clamped: worse-than-average thoughts are pushed down too",
                 "the official code keeps only positive rewards; a negative one counts as 0 (with two thoughts, only the better one learns)"),
                (-exp_per, "the sign is flipped: minimising your loss makes good thoughts LESS likely",
                 "minimising the loss must make a thought with a positive reward MORE likely"),
                ((-r.clamp(min=0) * logp), "positions where think is False got a loss",
                 "a position where think is False (padding, no target) gets no loss"),
                ((-(r > 0).double() * logp).masked_fill(~mask, 0), "you used only the indicator 1[r > 0]",
                 "weight each thought by its reward itself (clamped at 0), not only by whether it is positive"),
                ((-r.clamp(min=0) * lp.mean(-1)).masked_fill(~mask, 0), "log p(T_j) is a mean of token log-probs",
                 "the log-probability of the thought is the SUM over its sampled tokens"),
            ]
            for value, what, hint in alternatives:
                if _same(per, value.detach()):
                    _fail(name, what, hint, case)
            bi, ni, ji = (~torch.isclose(per.detach().double(), exp_per, atol=1e-6)).nonzero()[0].tolist()
            _fail(name, f"per_thought differs, first at (batch {bi}, thought {ni}, position {ji}): got "
                        f"{per.detach()[bi, ni, ji].item():.4f}, expected {exp_per[bi, ni, ji].item():.4f} "
                        f"(r = {r[bi, ni, ji].item():.4f}, think = {bool(think[bi, ji])})", case=case,
                  hint=_more(name))
        if not _same(scalar, exp_scalar):
            if _same(scalar, exp_per.mean()):
                _fail(name, "the scalar is the mean over ALL entries, non-thinking positions included", case=case,
                      hint="average over the entries of thinking positions only (every thought of each)")
            if _same(scalar, exp_per.sum()):
                _fail(name, "the scalar is a sum", case=case,
                      hint="take the mean over thinking positions and thoughts, so it does not grow with the batch")
            if n > 1 and _same(scalar, exp_scalar * n):
                _fail(name, f"the scalar is n_thoughts = {n} times too large ({scalar.detach().item():.4f}, expected "
                            f"{exp_scalar.item():.4f}): you divided by the number of thinking positions", case=case,
                      hint="every thought of a thinking position is one entry of the mean: divide by the number of "
                           "(thought, thinking position) pairs, not of positions")
            _fail(name, f"the scalar loss is {scalar.detach().item():.4f}, expected {exp_scalar.item():.4f}", case=case,
                  hint="mean of per_thought over the entries where think is True")
        if not scalar.requires_grad:
            _fail(name, "the loss carries no gradient", case=case,
                  hint="REINFORCE trains the LM through thought_logprobs: do not .detach() them or use .item()")
        scalar.backward()
        if r_in.grad is not None and bool(r_in.grad.abs().sum() > 0):
            _fail(name, "gradient flows into the reward r", case=case,
                  hint="the reward is a fixed weight: cut it from the graph; REINFORCE differentiates only log p(T_j)")
        lp_ref = lp.clone().requires_grad_(True)
        reinforce_loss(r, lp_ref, think)[1].backward()
        if lp_in.grad is None or not _same(lp_in.grad, lp_ref.grad, atol=1e-9, single=per.dtype != torch.float64):
            _fail(name, "the gradient with respect to thought_logprobs differs from the reference's", case=case,
                  hint="the loss must stay a differentiable function of thought_logprobs (no .item(), no .detach())")
    _passed(name, f"{len(sizes)} random batches, rewards of both signs, values and gradients")


# ============================================================================ notebook 02: end to end

class _StudentPiece(Exception):
    """A student's mask or position-id function crashed or returned something unusable inside
    the parallel generation; the message says which and how."""


class _NotImplementedPiece(_StudentPiece):
    """One of the two pieces still raises NotImplementedError (the stub of the student copy)."""


def _as_package_fn(fn: Callable, label: str, calls: list[str], qualname: str,
                   expected: Callable[[torch.Tensor, int], tuple[torch.dtype, tuple[int, ...]]], first: str) -> Callable:
    """The student's ``fn(attention_mask, step)`` in the package's signature, its output checked;
    a call back into the package's own function from inside it counts as using the reference."""
    active = []

    def from_student(attention_mask, step, positions=None):
        __tracebackhide__ = True
        if active:                                     # the student's code called the package's function
            calls.append(_reference_message(qualname))
            raise _ReferenceUsed(_reference_message(qualname))
        if positions is not None:
            raise _StudentPiece(f"{label} was asked for thinking positions only (an internal error of the check)")
        active.append(True)
        try:
            with _watched(calls):
                got = fn(attention_mask.clone(), step)
        except NotImplementedError:
            raise _NotImplementedPiece(f"{label} is not implemented yet") from None
        except (_ReferenceUsed, _StudentPiece):
            raise
        except Exception as e:  # noqa: BLE001 - reported with the place in the student's code
            raise _StudentPiece(f"{label} raised {type(e).__name__}: {e}{_where_in_student_code(e)}") from None
        finally:
            active.clear()
        dtype, shape = expected(attention_mask, step)
        if type(got) is not torch.Tensor or got.dtype != dtype or tuple(got.shape) != shape:
            what = (f"a {type(got).__name__} (the generation needs a plain torch.Tensor)" if type(got) is not torch.Tensor
                    else f"dtype {got.dtype}, shape {tuple(got.shape)}")
            raise _StudentPiece(f"{label} returned {what} at step {step}; the generation needs {dtype} of shape "
                                f"{shape} (run {first} first)")
        return got
    return from_student


def _end_to_end_setup(seed: int):
    """A tiny random float64 model, random meta-token embeddings and a right-padded batch; the
    global random state is left as it was."""
    from qstar_mini.meta_tokens import MetaTokens
    from qstar_mini.models.tiny import build_tokenizer, tiny_model

    with torch.random.fork_rng(devices=[]):
        tok = build_tokenizer()
        model = tiny_model(tok, seed=seed, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64).double().eval()
    g = torch.Generator().manual_seed(seed)
    vocab, hidden = model.get_input_embeddings().weight.shape
    meta = MetaTokens(vocab - 2, vocab - 1, torch.randn(2, hidden, generator=g, dtype=torch.float64), scale=10.0)
    am = _padding_mask((6, 4, 5), 6)
    ids = torch.randint(4, vocab - 2, am.shape, generator=g).masked_fill(am == 0, 0)
    return model, meta, ids, am


@_check
def check_end_to_end(visibility_fn: Callable, position_ids_fn: Callable, seed: int = 0) -> None:
    """Exercise (notebook 02, after both pieces): the student's ``thought_visibility`` and
    ``step_position_ids`` (both ``fn(attention_mask, step)``) drive the package's parallel thought
    generation: :func:`qstar_mini.thoughts.generate_thoughts` builds the Figure-3 mask
    (``masks.all_step_masks`` -> ``thought_mask`` -> ``thought_visibility``) and the position ids
    (``step_position_ids``, also in :func:`~qstar_mini.thoughts.plain_forward`), and both are the
    student's for the duration. Greedily, the thoughts must equal the naive loop's
    (:func:`qstar_mini.thoughts.naive_thoughts`): the same tokens, log-probs within 1e-6.

    On a mismatch each piece is tried alone with the package's other one, to name the one that
    makes the difference. The references are disabled for the student's code as in every check."""
    __tracebackhide__ = True
    from qstar_mini import masks
    from qstar_mini.thoughts import generate_thoughts, naive_thoughts, plain_forward

    name = "check_end_to_end"
    model, meta, ids, am = _end_to_end_setup(seed)
    t, n = 4, 1
    case = (f"a random tiny model, input_ids={_fmt(ids)}, attention_mask={_fmt(am)}, thoughts of {t} tokens "
            f"(both meta-tokens included), greedy")
    ref_ids, ref_logp = naive_thoughts(model, meta, ids, am, t, n, greedy=True)
    real = am.bool()[:, None, :].expand(ids.shape[0], n, ids.shape[1])
    ref_mask, ref_pos = masks.thought_visibility, masks.step_position_ids

    def run(use_mask: bool, use_pos: bool):
        __tracebackhide__ = True
        calls: list[str] = []
        everywhere = _standins(["check_thought_mask", "check_position_ids"], calls)
        vis_student, pos_student = _direct(visibility_fn, everywhere), _direct(position_ids_fn, everywhere)
        mask_fn = (_as_package_fn(vis_student, "your mask function", calls, "qstar_mini.masks.thought_visibility",
                                  lambda a, k: (torch.bool, (a.shape[0], 1, a.shape[1], a.shape[1] * (1 + k))),
                                  "check_thought_mask") if use_mask else ref_mask)
        pos_fn = (_as_package_fn(pos_student, "your position-id function", calls,
                                 "qstar_mini.masks.step_position_ids", lambda a, k: (torch.long, tuple(a.shape)),
                                 "check_position_ids") if use_pos else ref_pos)
        in_package = {id(v): (v, v) for v in (masks.thought_mask, masks.all_step_masks, masks.one_pass_visibility,
                                              masks.one_pass_position_ids)}
        in_package[id(ref_mask)] = (ref_mask, mask_fn)
        in_package[id(ref_pos)] = (ref_pos, pos_fn)
        got, problem, unimplemented = None, None, False
        try:
            with _replaced([visibility_fn, position_ids_fn], everywhere, in_package), torch.no_grad():
                _, cache = plain_forward(model, meta, ids, am)
                out = generate_thoughts(model, meta, ids, am, cache, t, n, greedy=True)
                got = (out.ids, out.logprobs)
        except _StudentPiece as e:
            problem, unimplemented = str(e), isinstance(e, _NotImplementedPiece)
        except _ReferenceUsed:
            pass
        tampered = _GUARD[0]()
        if tampered is not None:
            calls.append(f"while your functions ran, {tampered.replace(' in this notebook', '')}")
        if calls:
            _fail(name, calls[0] if calls[0].startswith("this exercise") else _integrity_message(calls[0]),
                  "write both functions with torch operations yourself", case)
        if unimplemented:          # worded as every check's stub message ("check_...: not implemented yet")
            raise CheckFailed(f"{name}: not implemented yet ({problem}). Write both exercises above, run their "
                              f"cells, then this one.") from None
        if problem is not None:
            _fail(name, problem, _more(name), case)
        return got

    def differs(got) -> str | None:
        got_ids, got_logp = got
        if not torch.equal(got_ids[real], ref_ids[real]):
            b, k, j, s = ((got_ids != ref_ids) & real[..., None]).nonzero()[0].tolist()
            return (f"the parallel thoughts differ from the naive loop's, first at sequence {b}, position {j}, "
                    f"thought token {s}: {int(got_ids[b, k, j, s])} instead of {int(ref_ids[b, k, j, s])}")
        gap = (got_logp[real] - ref_logp[real]).abs().max().item()
        if gap > 1e-6:
            return (f"the parallel thoughts have the naive loop's tokens but not its log-probs (max difference "
                    f"{gap:.3g}): the attention sees something the loop does not")
        return None

    problem = differs(run(True, True))
    if problem is None:
        _passed(name, f"your mask and position ids gave the naive loop's thoughts at all {int(am.sum())} "
                      f"real positions")
        return
    mask_problem, pos_problem = differs(run(True, False)), differs(run(False, True))
    if mask_problem and not pos_problem:
        _fail(name, f"your mask is wrong: with it, {mask_problem}; your position ids alone give the right "
                    f"thoughts", "run check_thought_mask on your mask function: it says which entries differ", case)
    if pos_problem and not mask_problem:
        _fail(name, f"your position ids are wrong: with them, {pos_problem}; your mask alone gives the right "
                    f"thoughts", "run check_position_ids on your position-id function: it says where", case)
    _fail(name, problem, "both your mask and your position ids play a part: run check_thought_mask and "
                         "check_position_ids first", case)


# ============================================================================ IPython: the message alone

def _show_check_failed(shell, etype, value, tb, tb_offset=None):
    """IPython custom exception handler: a failed check shows its message, no traceback.

    IPython discards what a handler returns when it runs a cell, so the handler shows the error
    itself, through ``shell._showtraceback``: a terminal prints it, a kernel sends it as the cell's
    error output (ename, evalue, traceback = the message), which is what nbgrader's autograder
    reads to give the check cell 0 points."""
    stb = [f"{etype.__name__}: {value}"]
    shell._showtraceback(etype, value, stb)
    return stb


def _register_ipython(shell=None) -> bool:
    """Make ``shell`` (default: the running IPython, if any) print a :class:`CheckFailed` as its
    message alone. Leaves a shell that already has another custom handler alone. True if registered."""
    if shell is None:
        try:
            from IPython import get_ipython
        except ImportError:
            return False
        shell = get_ipython()
    if shell is None or not hasattr(shell, "set_custom_exc"):
        return False
    current = tuple(getattr(shell, "custom_exceptions", ()) or ())
    if current and all(getattr(c, "__name__", "") != "CheckFailed" for c in current):
        return False
    shell.set_custom_exc((CheckFailed,), _show_check_failed)
    return True


_register_ipython()

_guard_module()
_GUARD.append(_make_guard())
