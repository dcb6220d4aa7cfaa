"""``qstar-mini eval``: its flags, and the evaluation they choose (:mod:`qstar_mini.evaluation`).

``--model`` is a Quiet-STaR checkpoint or a plain model (:func:`is_plain_model`: a fetched
model's name such as ``smollm2``, a folder with ``config.json`` and none of a checkpoint's own
files, or a Hugging Face name). A plain model has no thoughts: :func:`run_plain_eval` reports its
per-token NLL, perplexity and accuracy (and the answer-digit figures on the arithmetic corpus,
GSM8K-format accuracy without thinking) and says which rows are omitted.

:func:`run_eval` loads the checkpoint (and the base and control models), reads the held-out
text, detects what it is (:func:`qstar_mini.evaluation.any_text.detect_data_kind`) and runs
:func:`~qstar_mini.evaluation.arithmetic.evaluate` on the arithmetic corpus or
:func:`~qstar_mini.evaluation.any_text.evaluate_text` on any other text; it prints a table and the JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from qstar_mini.runs.checkpoint import CONFIG_FILE, HEAD_FILE, META_FILE, check_checkpoint, load_checkpoint, load_config
from qstar_mini.cli.args import check_device
from qstar_mini.data import read_jsonl
from qstar_mini.errors import CheckpointError, ConfigError, DataError
from qstar_mini.files import write_file_atomic
from qstar_mini.evaluation.any_text import ARITHMETIC, ARITHMETIC_METRICS, ARITHMETIC_RULE, PLAIN_OMITTED, detect_data_kind, evaluate_plain, evaluate_text, format_plain_table, format_text_table, is_datasets_name, is_gsm_record, load_eval_records
from qstar_mini.evaluation.token_gains import answer_only
from qstar_mini.evaluation.commonsense_qa import commonsense_qa_eval, load_commonsense_qa
from qstar_mini.evaluation.arithmetic import evaluate, format_table
from qstar_mini.evaluation.gsm8k import load_gsm8k
from qstar_mini.models.tiny import load_model
from qstar_mini.paths import DATA_DIR, TINY_BASE, looks_local
from qstar_mini.runs.folder import check_file_writable

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``qstar-mini eval``."""
    p = parser
    p.add_argument("--checkpoint", "--model", dest="checkpoint", required=True,
                   help="what to evaluate: a Quiet-STaR checkpoint folder (runs/<name>/checkpoint), or a plain "
                        "model (a fetched model's name such as smollm2, a folder with config.json, a Hugging "
                        "Face name): then only the no-thought rows apply")
    p.add_argument("--control", default=None, help="checkpoint folder of the no-thought control")
    p.add_argument("--base", default=None,
                   help="the base model folder or name (default: the one the checkpoint was trained from); '' to skip")
    p.add_argument("--data", default=str(DATA_DIR / "test.jsonl"),
                   help="held-out text: a JSONL file, a folder with <split>.jsonl, or a datasets name[:config] "
                        "(streamed: only --lines records are read); default data/test.jsonl")
    p.add_argument("--split", default="test", help="split of a folder or datasets name (default %(default)s)")
    p.add_argument("--text-field", default="text",
                   help="the field holding the text (default %(default)s); 'question+answer' for GSM8K-format "
                        "question/answer records: each line is the question, '\\nA: ' and the answer "
                        "(records without the field but with GSM8K-format question/answer get that too)")
    p.add_argument("--all-lines", action="store_true",
                   help="arithmetic corpus only: also lines with working (default: answer-only)")
    p.add_argument("--lines", type=int, default=500, help="held-out lines to use (default %(default)s)")
    p.add_argument("--n-thoughts", type=int, default=4, help="sampled thoughts per position (default %(default)s)")
    p.add_argument("--think-where", choices=("all", "answer"), default=None,
                   help="arithmetic corpus only: think before every token or only before the answer "
                        "(default: as trained); other text always thinks before every token")
    p.add_argument("--seq-len", type=int, default=None,
                   help="cut lines at this many tokens (default 512, at most the model's context - thought_length)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="lines per forward pass on text other than the arithmetic corpus (default %(default)s)")
    p.add_argument("--gsm8k", default=None,
                   help="GSM8K-format JSONL, 'hub' for real GSM8K via datasets, or '' to skip (default: "
                        "data/gsm8k_format.jsonl for the arithmetic corpus, the data itself when it has "
                        "GSM8K-format question/answer fields, else none)")
    p.add_argument("--gsm-limit", type=int, default=50, help="GSM8K problems to ask (default %(default)s)")
    p.add_argument("--commonsense-qa", default="",
                   help="CommonsenseQA-format JSONL, 'hub' for the real one via datasets, or '' to skip (default)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="weights' dtype (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampled thoughts (default %(default)s)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    return p


def _check_eval_args(args: argparse.Namespace) -> None:
    """One-line ConfigErrors for impossible values, before anything is loaded."""
    for flag, name, low in (("--lines", "lines", 1), ("--n-thoughts", "n_thoughts", 1), ("--gsm-limit", "gsm_limit", 1),
                            ("--batch-size", "batch_size", 1), ("--seq-len", "seq_len", 2)):
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise ConfigError(f"{flag} must be at least {low} (got {value})")
    if not str(getattr(args, "text_field", "text")).strip():
        raise ConfigError("--text-field must name a field (got an empty name)")


def _text_seq_len(checkpoint, asked: int | None) -> int:
    """--seq-len for text: default 512; at most the model's context minus the thought's positions.
    Read from the checkpoint's configs (no weights loaded), so a bad value fails at once."""
    from transformers import AutoConfig

    path = check_checkpoint(checkpoint)
    thought_length = load_config(path).thought_length
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception:  # noqa: BLE001 - load_checkpoint reports a broken config in one line
        config = None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(config, "max_position_embeddings", None)
    room = limit - thought_length if isinstance(limit, int) and limit > thought_length else None
    if asked is None:
        return 512 if room is None else max(2, min(512, room))
    if room is not None and asked > room:
        raise ConfigError(f"--seq-len {asked} + thought_length {thought_length} exceeds the model's context of "
                          f"{limit}; use --seq-len {room} or less")
    return asked


def is_plain_model(spec: str) -> bool:
    """True when ``--model`` names a plain model rather than a Quiet-STaR checkpoint: a fetched
    model's short name (``smollm2``), a folder with ``config.json`` and none of a checkpoint's own
    files (meta-tokens, mixing head, qstar_config.json), or a name that is no local path (a
    Hugging Face name). Anything else is taken for a checkpoint (and refused as one, in one line)."""
    from qstar_mini.models.pretrained import KNOWN

    if spec in KNOWN:
        return True
    path = Path(spec).expanduser()
    if path.is_dir():
        return (path / "config.json").is_file() and not any((path / f).exists()
                                                              for f in (META_FILE, HEAD_FILE, CONFIG_FILE))
    return not (path.exists() or looks_local(spec))


def _check_checkpoint_spec(spec: str) -> None:
    """A --model that is no folder and no model name: one line naming the three ways to give one."""
    from qstar_mini.models.pretrained import KNOWN

    if not Path(spec).expanduser().is_dir():
        raise CheckpointError(f"--model {spec} does not exist (or is not a folder); give a checkpoint folder "
                              f"(runs/<name>/checkpoint), a model folder with config.json, or a fetched model's "
                              f"name ({', '.join(sorted(KNOWN))}; qstar-mini models fetch NAME)")


def _model_seq_len(model, asked: int | None) -> int:
    """--seq-len for a plain model: default 512, at most its context (max_position_embeddings)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limit = getattr(config, "max_position_embeddings", None)
    if asked is None:
        return 512 if not isinstance(limit, int) else max(2, min(512, limit))
    if isinstance(limit, int) and asked > limit:
        raise ConfigError(f"--seq-len {asked} exceeds the model's context of {limit}; use --seq-len {limit} or less")
    return asked


def _commonsense(args, model, tokenizer, **thinking) -> dict:
    """CommonsenseQA-format accuracy on --commonsense-qa (a file, or 'hub')."""
    csqa = (load_commonsense_qa(limit=args.gsm_limit) if args.commonsense_qa == "hub"
            else read_jsonl(args.commonsense_qa, required=("question", "answerKey")))
    if not all(isinstance(r.get("choices"), dict) and {"label", "text"} <= r["choices"].keys() for r in csqa):
        raise DataError(f"{args.commonsense_qa}: every record needs choices {{\"label\": [...], \"text\": [...]}}")
    return commonsense_qa_eval(model, tokenizer, csqa, limit=args.gsm_limit, **thinking)


def _emit(args, header: str, table: str, result: dict) -> int:
    """Print the header and table; the JSON to --json (atomically) or to stdout."""
    print(header)
    print(table)
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.json:
        write_file_atomic(args.json, (text + "\n").encode())    # a full disk keeps the old file whole
    else:
        print(text)
    return 0


def run_plain_eval(args: argparse.Namespace, records: list[dict], source: str, kind: str, why: str) -> int:
    """``qstar-mini eval --model NAME_OR_FOLDER`` for a plain model: the no-thought rows only
    (:func:`~qstar_mini.evaluation.any_text.evaluate_plain`), with notes on what is omitted and why."""
    for flag, value in (("--base", args.base), ("--control", args.control), ("--think-where", args.think_where)):
        if value:
            raise ConfigError(f"{flag} applies to a Quiet-STaR checkpoint; --model {args.checkpoint} is a plain "
                              f"model, evaluated as itself: drop {flag}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.checkpoint, dtype=DTYPES[args.dtype], device=device)
    seq_len = _model_seq_len(model, args.seq_len)
    gsm = _gsm_records(args.gsm8k, kind, records, args.gsm_limit)
    if kind == ARITHMETIC:
        records = records if args.all_lines else answer_only(records)
    records = records[: args.lines]
    result = evaluate_plain(model, tokenizer, records, kind=kind, seq_len=seq_len, batch_size=args.batch_size,
                            gsm_records=gsm, gsm_limit=args.gsm_limit)
    applies = "per-token NLL, perplexity and top-1 accuracy of the plain model"
    if kind == ARITHMETIC:
        applies += ", and at the answer digit after '='"
    if gsm is not None:
        applies += "; GSM8K-format zero-shot accuracy without thinking"
    notes = [PLAIN_OMITTED]
    if gsm is None:
        notes.append(_no_gsm_note(args))
    result["notes"] = notes
    result["data"] = {"source": source, "kind": kind, "detected": why, "text_field": args.text_field}
    result["plain_model"] = str(args.checkpoint)
    if args.commonsense_qa:
        result["commonsense_qa"] = _commonsense(args, model, tokenizer)
    header = (f"model: {args.checkpoint}: a plain model (no Quiet-STaR checkpoint, no thoughts)\n"
              f"data: {source}: {why}; applies: {applies}")
    return _emit(args, header, format_plain_table(result), result)


def _trainer_state(path) -> dict:
    """The checkpoint's trainer_state.json ({} when it has none); one line if it is damaged."""
    state = Path(path) / "trainer_state.json"
    if not state.exists():
        return {}
    try:
        values = json.loads(state.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{state} cannot be read ({type(e).__name__}); use a copy of the run, "
                              f"or name the base model with --base") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{state} holds a {type(values).__name__}, not a trainer state; use a copy "
                              f"of the run, or name the base model with --base")
    return values


def _trained_think_where(path) -> str:
    """The think_where a checkpoint was trained with (trainer_state.json), "all" if unknown."""
    return _trainer_state(path).get("think_where", "all")


def _gsm_records(spec, kind: str, records: list[dict], limit: int):
    """The GSM8K-format problems to ask (see ``--gsm8k``), or None."""
    if spec == "":
        return None
    if spec == "hub":
        return load_gsm8k(limit=limit)
    if spec:
        return read_jsonl(spec, required=("question", "answer"))
    if kind == ARITHMETIC:
        return read_jsonl(DATA_DIR / "gsm8k_format.jsonl")
    return [r for r in records if is_gsm_record(r)] or None


def _no_gsm_note(args: argparse.Namespace) -> str:
    """Why no GSM8K-format accuracy is reported: skipped by the flag, or no problems in the data."""
    if args.gsm8k == "":
        return "GSM8K-format accuracy: skipped (--gsm8k '')"
    return ("GSM8K-format accuracy: omitted, the data has no GSM8K-format question/answer fields "
            "(--gsm8k FILE asks other problems)")


def _load_control(path, device, dtype):
    """The control's model; a checkpoint trained with thoughts is refused (the comparison
    would silently be Quiet-STaR against Quiet-STaR)."""
    control = load_checkpoint(path, device=device, dtype=dtype)
    if control.cfg.think:
        raise ConfigError(f"--control {path} was trained with thoughts (think=True); give the no-thought "
                          f"control's checkpoint (qstar-mini train --no-think)")
    return control.model


def run_eval(args: argparse.Namespace) -> int:
    """``qstar-mini eval``: evaluate a checkpoint on any text, print the table, optionally write JSON.

    The arithmetic corpus (:func:`detect_data_kind`) gets :func:`evaluate` (answer accuracy,
    thoughts right, ...); any other text :func:`evaluate_text`, with a note saying which
    metrics are omitted and why.
    """
    _check_eval_args(args)
    check_device(args.device)
    if args.json:
        check_file_writable(args.json, "--json")        # before the evaluation, not after it
    plain = is_plain_model(args.checkpoint)
    if not plain:
        _check_checkpoint_spec(args.checkpoint)
    records, source = load_eval_records(args.data, split=args.split, text_field=args.text_field,
                                        max_lines=args.lines if is_datasets_name(args.data) else None)
    kind, why = detect_data_kind(records)
    if plain:
        return run_plain_eval(args, records, source, kind, why)
    seq_len = None if kind == ARITHMETIC else _text_seq_len(args.checkpoint, args.seq_len)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    ck = load_checkpoint(args.checkpoint, device=device, dtype=dtype)
    base_name = args.base if args.base is not None else _trainer_state(ck.path).get("model", str(TINY_BASE))
    if not isinstance(base_name, str):
        raise CheckpointError(f"{ck.path / 'trainer_state.json'}: its model {base_name!r} is no folder or name; "
                              f"name the base model with --base")
    base = load_model(base_name, dtype=dtype, device=device)[0] if base_name else None
    control = _load_control(args.control, device, dtype) if args.control else None
    gsm = _gsm_records(args.gsm8k, kind, records, args.gsm_limit)
    data = {"source": source, "kind": kind, "detected": why, "text_field": args.text_field}
    if kind == ARITHMETIC:
        records = (records if args.all_lines else answer_only(records))[: args.lines]
        think_where = args.think_where or _trained_think_where(ck.path)
        result = evaluate(ck.model, ck.tokenizer, ck.meta, ck.head, ck.cfg, records, base_model=base,
                          control=control, n_thoughts=args.n_thoughts, seed=args.seed, think_where=think_where,
                          gsm_records=gsm, gsm_limit=args.gsm_limit)
        result["notes"] = []
        header = f"data: {source}: {why}; every metric applies"
    else:
        records = records[: args.lines]
        result = evaluate_text(ck.model, ck.tokenizer, ck.meta, ck.head, ck.cfg, records, base_model=base,
                               control=control, n_thoughts=args.n_thoughts, seed=args.seed, seq_len=seq_len,
                               batch_size=args.batch_size, gsm_records=gsm, gsm_limit=args.gsm_limit)
        notes = [f"{ARITHMETIC_METRICS}: omitted, the data is not the project's arithmetic corpus "
                 f"(detected when {ARITHMETIC_RULE})"]
        if gsm is None:
            notes.append(_no_gsm_note(args))
        if (args.think_where or _trained_think_where(ck.path)) == "answer":
            notes.append("the checkpoint was trained to think only before the answer digit; on this text it "
                         "thinks before every token")
        result["notes"] = notes
        header = f"data: {source}: {why}; per-token NLL with and without thinking, gain and which tokens benefit apply"
    result["data"] = data
    if args.commonsense_qa:
        result["commonsense_qa"] = _commonsense(args, ck.model, ck.tokenizer, meta=ck.meta, head=ck.head, cfg=ck.cfg)
    return _emit(args, header, format_table(result) if kind == ARITHMETIC else format_text_table(result), result)
