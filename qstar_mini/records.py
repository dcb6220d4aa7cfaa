"""Training and held-out lines: reading them, turning them into tensors, batching them.

**A record** is one line of text as a dict with at least ``"text"`` (a string). The project's
arithmetic corpus (:mod:`qstar_mini.data`) adds ``"question"`` (the digits), ``"answer"``,
``"has_working"`` (does the text show the working, ``31415=(34894)4``, or only the answer,
``31415=4``) and ``"working"``. Records come from a JSONL file, a folder with
``<split>.jsonl``, a list in memory, or a Hugging Face ``datasets`` name (streamed).

**A line as tokens** is ``<s> text </s>`` (whichever of the two special tokens the tokenizer
has), right-padded with the tokenizer's pad id: :func:`line_ids` and :func:`pad_right`, the one
encoder every module uses (:func:`encode_lines` for plain texts, :func:`encode_records` for
records, whose :class:`Encoded` also says where each line's answer is).

**Batches.** :func:`batch_indices` reads step s's lines from an endless stream of one
permutation per epoch, so the data position *is* the step number; :func:`micro_batch` cuts a
batch to its longest line.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from qstar_mini.data import EQUALS, QA_TEXT_FIELD, TEXT_FIELD_HINT, answer_index, qa_text, read_jsonl
from qstar_mini.errors import ConfigError, DataError

LINES = ("answer_only", "all", "working")


# ============================================================================ reading records

def load_records(data, split: str = "train", text_field: str = "text",
                 max_lines: int | None = None) -> list[dict]:
    """Training lines as dicts with at least ``"text"``.

    data: a JSONL file; a folder holding ``<split>.jsonl`` (e.g. the repo's ``data/``); a list
    of records already in memory; or a Hugging Face ``datasets`` name, optionally ``"name:config"`` (needs the network unless
    cached), whose ``text_field`` column is used. ``text_field="question+answer"``
    (:data:`~qstar_mini.data.QA_TEXT_FIELD`) takes GSM8K-format records instead: each line is the
    question and the worked answer, ``question\nA: answer`` (:func:`~qstar_mini.data.qa_text`).
    Broken files raise a one-line DataError; a record without the text field names the way out.
    """
    qa = text_field == QA_TEXT_FIELD
    fields = ("question", "answer") if qa else (text_field,)
    if isinstance(data, list):                      # records already in memory
        records = [r for r in data if isinstance(r, dict) and all(isinstance(r.get(f), str) for f in fields)]
        if len(records) != len(data):
            raise DataError(f"every record must be a dict with a string {' and '.join(map(repr, fields))} "
                            f"field{TEXT_FIELD_HINT}")
        records = _with_text(records, text_field)
        return _without_empty(records[:max_lines] if max_lines else records, "records")
    path = Path(os.fspath(data)).expanduser()
    if path.is_dir():
        path = path / f"{split}.jsonl"
    text = os.fspath(data)
    looks_local = path.exists() or path.suffix in (".jsonl", ".json") or text.startswith(("/", ".", "~")) \
        or isinstance(data, os.PathLike) or text.count("/") > 1
    if looks_local:                                  # else "name" or "owner/name": a datasets name
        records = _with_text(read_jsonl(path, required=fields, max_records=max_lines,
                                        missing_hint="" if qa else TEXT_FIELD_HINT), text_field)
    elif qa:
        rows = load_hf_dataset(str(data), split, text_field, max_lines, all_fields=True)
        if not all(isinstance(r.get("question"), str) and isinstance(r.get("answer"), str) for r in rows):
            raise DataError(f"dataset {data!r}: --text-field {QA_TEXT_FIELD} needs string question and answer "
                            f"columns (columns: {sorted(rows[0])}); choose the text's column with --text-field")
        records = [{"text": qa_text(r)} for r in rows]
    else:
        records = load_hf_dataset(str(data), split, text_field, max_lines)
    return _without_empty(records[:max_lines] if max_lines else records, data)


def _with_text(records: list[dict], text_field: str) -> list[dict]:
    """Each record with ``"text"`` set from ``text_field`` (or from question and answer for
    :data:`~qstar_mini.data.QA_TEXT_FIELD`)."""
    if text_field == QA_TEXT_FIELD:
        return [dict(r, text=qa_text(r)) for r in records]
    return records if text_field == "text" else [dict(r, text=r[text_field]) for r in records]


def _without_empty(records: list[dict], source) -> list[dict]:
    """Drop lines whose text is empty or only spaces (they would train on ``<s></s>``), saying how many."""
    kept = [r for r in records if r["text"].strip()]
    if len(kept) != len(records):
        warnings.warn(f"{source}: {len(records) - len(kept)} of {len(records)} lines have an empty text "
                      f"and are skipped", stacklevel=3)
    if records and not kept:
        raise DataError(f"{source}: every line has an empty text; nothing to train on")
    return kept


def load_hf_dataset(name: str, split: str, text_field: str, max_lines: int | None, *,
                     all_fields: bool = False) -> list[dict]:
    """The first ``max_lines`` records of a ``datasets`` corpus, streamed: nothing past them is read.

    name: ``"name"``, ``"owner/name"`` or either with ``":config"``. The corpus is opened with
    ``datasets.load_dataset(..., streaming=True)`` and only its first ``max_lines`` records are
    taken, so a corpus of many shards (OpenWebMath) is never downloaded whole; a budget is
    therefore required (one-line DataError without one). Returns ``[{"text": ...}]`` with empty
    texts dropped; with ``all_fields`` every record's own fields instead (``"text"`` added from
    ``text_field`` where it is a string; the caller decides about records without one).
    """
    import itertools

    import datasets

    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    if max_lines is None or max_lines < 1:
        raise DataError(f"--data {name!r} is a datasets name: give a line budget with --max-lines N "
                        f"(its first N records are streamed; the corpus is never downloaded whole)")
    _check_hub_reachable(name)
    try:
        with _quiet_hub():
            stream = datasets.load_dataset(name, config, split=split, streaming=True)
            rows = [dict(row) for row in itertools.islice(iter(stream), max_lines)]
    except Exception as e:  # noqa: BLE001 - any failure is one line
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise DataError(f"--data {name!r} is neither a JSONL file nor a loadable datasets name "
                        f"({type(e).__name__}: {first})") from None
    if not rows:
        raise DataError(f"dataset {name!r} split {split!r} has no records")
    if all_fields:
        return [dict(r, text=r[text_field]) if isinstance(r.get(text_field), str) else r for r in rows]
    if text_field not in rows[0]:
        raise DataError(f"dataset {name!r} has no column {text_field!r} (columns: {sorted(rows[0])}); "
                        f"choose one with --text-field")
    return [{"text": r[text_field]} for r in rows if isinstance(r.get(text_field), str) and r[text_field].strip()]


def _check_hub_reachable(name: str) -> None:
    """Offline, ``datasets`` retries the Hub for half a minute, printing each retry: refuse at
    once instead (unless HF_HUB_OFFLINE / HF_DATASETS_OFFLINE asks for the local cache)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        return
    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        raise DataError(f"--data {name!r}: not a local file, and the Hugging Face Hub cannot be reached from "
                        f"here; give a JSONL file or folder (or set HF_DATASETS_OFFLINE=1 for a cached "
                        f"dataset)") from None


class _quiet_hub:
    """Silence huggingface_hub's retry warnings while a dataset is opened (the error, if any,
    is reported as one line by the caller)."""

    def __enter__(self):
        import logging

        self._loggers = [logging.getLogger(n) for n in ("huggingface_hub", "datasets", "fsspec")]
        self._levels = [lg.level for lg in self._loggers]
        for lg in self._loggers:
            lg.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        for lg, level in zip(self._loggers, self._levels):
            lg.setLevel(level)


def select_lines(records: list[dict], lines: str = "answer_only") -> list[dict]:
    """``answer_only``: only ``31415=4`` lines; ``working``: only ``31415=(34894)4`` lines;
    ``all``: every line as in the file (records without ``has_working`` always count)."""
    if lines not in LINES:
        raise ConfigError(f"lines must be one of {LINES} (got {lines!r})")
    if lines == "all":
        chosen = records
    else:
        want = lines == "working"
        chosen = [r for r in records if r.get("has_working", want) == want]
    if not chosen:
        raise DataError(f"no training lines left after lines={lines!r}; use lines='all'")
    return chosen


# ============================================================================ lines as tensors

def line_ids(tokenizer, text: str) -> list[int]:
    """``<s> text </s>`` as token ids, with whichever of ``<s>`` and ``</s>`` the tokenizer has."""
    return _with_specials(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])


def _with_specials(tokenizer, ids) -> list[int]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return ([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else [])


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists of any lengths as one right-padded batch.

    rows: n lists of ids.  returns: input_ids (n, seq) long, padded with ``pad_id``, and
    attention_mask (n, seq) long, 1 on real tokens; seq = the longest row.
    """
    seq = max(len(x) for x in rows)
    input_ids = torch.full((len(rows), seq), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), seq), dtype=torch.long)
    for i, x in enumerate(rows):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        attention_mask[i, : len(x)] = 1
    return input_ids, attention_mask


def encode_lines(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each text as ``<s> text </s>`` (:func:`line_ids`), right-padded, never cut.

    returns: input_ids (n, seq) long, attention_mask (n, seq) long (1 = real token).
    """
    return pad_right([line_ids(tokenizer, t) for t in texts], tokenizer.pad_token_id)


@dataclass
class Encoded:
    """Lines as tensors, each ``<s> line </s>``, right-padded and cut at seq_len.

    input_ids, attention_mask: (n, seq) long.
    answer_pos: (n,) long, token index of the answer digit (-1 when the line has none).
    think_pos:  (n,) long, the one thinking position of ``think_where="answer"``: the token
                just before the answer digit on a line *without* visible working (the ``=``
                of ``31415=4``); -1 on lines that show their working or have no answer.
    questions:  the records' "question" field (None when absent), to check thoughts.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_pos: torch.Tensor
    think_pos: torch.Tensor
    questions: list

    def __len__(self) -> int:
        return len(self.input_ids)


#: A line longer than (seq_len + HEAD_MARGIN) * HEAD_CHARS_PER_TOKEN characters is tokenized
#: only that far (:func:`tokenize_head`): a 1 MB line then costs what seq_len tokens cost.
HEAD_CHARS_PER_TOKEN = 32
HEAD_MARGIN = 16


def tokenize_head(tokenizer, text: str, seq_len: int) -> tuple[dict, str]:
    """(encoding with offsets, the text it encodes): the first ``seq_len`` tokens of ``text``
    without tokenizing all of a long text.

    Only the first (seq_len + HEAD_MARGIN) * HEAD_CHARS_PER_TOKEN characters are tokenized; cutting
    the text changes at most the tokens of the word cut in two, so when that head still gives
    seq_len + HEAD_MARGIN tokens, its first seq_len are the whole text's. Otherwise (tokens
    longer than HEAD_CHARS_PER_TOKEN characters on average) the whole text is tokenized.
    """
    # verbose=False: no "longer than the model's maximum" warning, encode_records counts the cut lines
    kwargs = dict(add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    limit = (seq_len + HEAD_MARGIN) * HEAD_CHARS_PER_TOKEN
    if len(text) > limit:
        enc = tokenizer(text[:limit], **kwargs)
        if len(enc["input_ids"]) >= seq_len + HEAD_MARGIN:
            return enc, text[:limit]
    return tokenizer(text, **kwargs), text


def encode_records(tokenizer, records: list[dict], seq_len: int) -> Encoded:
    """Tokenize each record's text as ``<s> text </s>`` (:func:`line_ids`), cut at ``seq_len``,
    right-pad (:func:`pad_right`), and find each line's answer token.

    Lines longer than ``seq_len`` tokens are truncated, with a warning that counts them; a very
    long line is tokenized only as far as needed (:func:`tokenize_head`)."""
    shift = 1 if tokenizer.bos_token_id is not None else 0
    rows, answer_pos, think_pos, cut, unknown = [], [], [], 0, {}
    for r in records:
        enc, head = tokenize_head(tokenizer, r["text"], seq_len)
        _note_unknown(tokenizer, head, enc, unknown)
        ids = _with_specials(tokenizer, enc["input_ids"])                   # = line_ids(tokenizer, text)
        pos, before = -1, -1
        try:
            char = answer_index(r["text"])
            starts = [s for s, _ in enc["offset_mapping"]]
            pos = starts.index(char) + shift if char in starts else -1
            if pos > 0 and r["text"][char - 1] == EQUALS:       # answer right after "=": no working
                before = pos - 1
        except DataError:
            pass
        cut += len(ids) > seq_len
        rows.append(ids[:seq_len])
        ok = 0 < pos < min(len(ids), seq_len)
        answer_pos.append(pos if ok else -1)
        think_pos.append(before if ok else -1)
    if unknown:
        shown = ", ".join(repr(c) for c in sorted(unknown)[:8])
        warnings.warn(f"{sum(unknown.values())} characters in the lines are not in the tokenizer's vocabulary and "
                      f"become {tokenizer.unk_token}: {shown}{', ...' if len(unknown) > 8 else ''}; clean the "
                      f"data or use a model whose tokenizer covers them", stacklevel=2)
    if cut:
        warnings.warn(f"{cut} of {len(records)} lines are longer than seq_len={seq_len} tokens and were "
                      f"truncated; raise --seq-len to keep them whole", stacklevel=2)
    input_ids, attention_mask = pad_right(rows, tokenizer.pad_token_id)
    return Encoded(input_ids, attention_mask, torch.tensor(answer_pos), torch.tensor(think_pos),
                   [r.get("question") for r in records])


def _note_unknown(tokenizer, text: str, enc, unknown: dict) -> None:
    """Count the characters of ``text`` that tokenized to the unknown token (``<unk>``)."""
    unk = tokenizer.unk_token_id
    if unk is None or unk not in enc["input_ids"]:
        return
    for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        if token == unk and text[start:end] != tokenizer.unk_token:
            piece = text[start:end] or "?"
            unknown[piece] = unknown.get(piece, 0) + 1


# ============================================================================ batches

def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Line indices of step ``step``: positions step*B .. step*B + B - 1 of the endless stream
    ``randperm(n, seed + 0), randperm(n, seed + 1), ...`` (one permutation per epoch)."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    out, perms = [], {}
    for p in positions:
        epoch, i = divmod(p, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(perms[epoch][i]))
    return torch.tensor(out)


def micro_batch(enc: Encoded, lines: torch.Tensor, device):
    """The lines ``lines`` of ``enc`` on ``device``, cut to the longest of them.

    returns: input_ids (b, seq), attention_mask (b, seq), think_pos (b,).
    """
    seq = int(enc.attention_mask[lines].sum(1).max())
    return (enc.input_ids[lines, :seq].to(device), enc.attention_mask[lines, :seq].to(device),
            enc.think_pos[lines].to(device))


def held_out_records(data, eval_data, eval_lines: int):
    """Held-out answer-only lines for the periodic evaluation (None: no evaluation)."""
    if isinstance(eval_data, list):
        records = eval_data
    else:
        path = None
        if eval_data is not None:
            path = Path(eval_data)
        elif isinstance(data, (str, os.PathLike)) and Path(data).exists():
            guess = Path(data) if Path(data).is_dir() else Path(data).parent
            if (guess / "validation.jsonl").exists():
                path = guess / "validation.jsonl"
        if path is None:
            return None
        records = read_jsonl(path)
    records = [r for r in records if not r.get("has_working", False) and r.get("question")]
    return records[:eval_lines] or None
