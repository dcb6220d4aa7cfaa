"""The project's own synthetic corpus: lines whose answer is hard to guess but easy to work out.

Why this corpus
---------------
Quiet-STaR's motivating example is the next token of ``12+54=``: a language model that must
write the answer *immediately* has to do the whole sum in one forward pass, while a model that
may first "think" (write working it never shows) can do it step by step. Thoughts help most on
such *difficult tokens*; on easy tokens they have nothing to add.

Our task makes that difficulty extreme and measurable. Task ``sum5``: five random digits, and
the answer is their sum mod 10. The *working* is the five running sums mod 10::

    31415=(34894)4          3, 3+1=4, 4+4=8, 8+1=9, 9+5=14 -> 4: the last running sum is the answer
    31415=4                 the same line, answer only

Each running sum is one easy step (add one digit to the previous sum), so after the working the
answer digit is a copy; without it, a tiny transformer must add five digits in its head and in
practice guesses (about 10%, chance). The gap between the two accuracies is the room a thought
can fill: in Quiet-STaR a thought ``<|startofthought|>34894<|endofthought|>`` (thought length
t = 7 counting the two meta-tokens) can stand in for the visible working ``(34894)``, which sits
between the delimiters :data:`WORK_OPEN` and :data:`WORK_CLOSE` for exactly that reason.

Splits
------
``train``: ``frac_working`` of its lines show the working (chosen at random, exact count), the
rest are answer-only. ``validation`` and ``test``: always half with working (``n // 2`` lines),
half answer-only, whatever ``frac_working`` is; the answer-only test lines are the held-out
evaluation lines. When the question space is large enough (``sum5``: 100000 questions) the
validation and test questions are drawn without replacement and never occur in train; for a small
family (``sum3``: 1000 questions) questions are drawn with replacement and may repeat.

Noisy working (``working_error``)
--------------------------------
Only train lines are corrupted: each running-sum step of shown working is, with probability
``working_error``, replaced by a different random digit, and **the mistake is carried forward**:
later running sums continue from the wrong value, as a student's would. So a line's working is
correct only if none of its steps was corrupted, and a step ``k`` is wrong exactly when
``shown[k] != (shown[k-1] + digit[k]) % 10``. The answer after ``)`` is always the true answer.
Validation and test working is always correct, so base models trained on noisy and on clean
corpora are evaluated on the same lines.

Determinism
-----------
Every random choice comes from a local ``random.Random`` seeded by a string derived from the
config (never from global state), one generator per purpose, so for instance changing
``working_error`` changes which steps are wrong but not the questions, and the test split
depends only on ``task``, ``seed``, ``n_valid`` and ``n_test``. :func:`write_corpus` with the
same config gives byte-identical files.

GSM8K-format lines
------------------
``gsm8k_format.jsonl`` holds templated word problems written for this project (never copied
from GSM8K) in GSM8K's record format ``{"question": ..., "answer": "... \\n#### N"}``, for code
that expects that format.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from qstar_mini.errors import DataError
from qstar_mini.files import write_file_atomic
from qstar_mini.paths import DATA_DIR

WORK_OPEN = "("      # visible working starts after this character
WORK_CLOSE = ")"     # ... and ends before this one; the answer digit follows
EQUALS = "="         # the question ends with this character

SPLITS = ("train", "validation", "test")
GSM_SPLIT = "gsm8k_format"
CONFIG_FILE = "corpus_config.json"


# ----------------------------------------------------------------------------- task families

@dataclass(frozen=True)
class Task:
    """A family of lines: ``n_digits`` random digits, working = their running sums mod 10."""

    name: str
    n_digits: int

    @property
    def n_questions(self) -> int:
        """How many distinct questions the family has (10 ** n_digits)."""
        return 10 ** self.n_digits

    def running_sums(self, question: str) -> list[int]:
        """The true working: running sums mod 10 of the question's digits."""
        sums, total = [], 0
        for ch in question:
            total = (total + int(ch)) % 10
            sums.append(total)
        return sums

    def answer(self, question: str) -> str:
        """The answer digit: the sum of the digits mod 10 (= the last running sum)."""
        return str(self.running_sums(question)[-1])


# Add a family by adding an entry; everything else reads this dict.
TASKS: dict[str, Task] = {
    "sum5": Task("sum5", 5),
    "sum3": Task("sum3", 3),
}


def get_task(name: str) -> Task:
    """The registered task family ``name``; DataError naming the known ones otherwise."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None


def task_for_question(question: str) -> Task:
    """The registered family whose questions have ``len(question)`` digits."""
    for task in TASKS.values():
        if task.n_digits == len(question):
            return task
    raise DataError(f"no task has questions of {len(question)} digits ({question!r}); "
                    f"known tasks: {', '.join(sorted(TASKS))}")


def _check_question(question: str, task: Task) -> None:
    if not (isinstance(question, str) and len(question) == task.n_digits and question.isdigit()
            and question.isascii()):
        raise DataError(f"question {question!r} is not {task.n_digits} digits (task {task.name})")


# ----------------------------------------------------------------------------- line helpers

def format_line(question: str, working: str | None, answer: str) -> str:
    """``question=(working)answer`` or, without working, ``question=answer``."""
    if working is None:
        return f"{question}{EQUALS}{answer}"
    return f"{question}{EQUALS}{WORK_OPEN}{working}{WORK_CLOSE}{answer}"


def _shown(text: str, limit: int = 60) -> str:
    """``repr(text)``, its middle elided when it is long (an error message stays one short line)."""
    return repr(text) if len(text) <= limit else f"{text[:limit // 2]!r}...{text[-limit // 2:]!r} ({len(text)} chars)"


def answer_index(text: str) -> int:
    """Character index of the answer digit: just after the last ``)`` if any, else after ``=``.

    >>> answer_index("31415=(34894)4"), answer_index("31415=4")
    (13, 6)
    """
    close = text.rfind(WORK_CLOSE)
    if close >= 0:
        idx = close + 1
    else:
        eq = text.find(EQUALS)
        if eq < 0:
            raise DataError(f"line {_shown(text)} has no {EQUALS!r}; expected question=answer")
        idx = eq + 1
    if idx >= len(text):
        raise DataError(f"line {_shown(text)} has no answer after position {idx - 1}")
    return idx


def split_prompt(text: str) -> str:
    """The part of a line up to and including ``=``: ``"31415=(34894)4" -> "31415="``."""
    eq = text.find(EQUALS)
    if eq < 0:
        raise DataError(f"line {_shown(text)} has no {EQUALS!r}; expected question=answer")
    return text[: eq + 1]


def working_is_correct(question: str, working: str, task: str | Task = "sum5") -> bool:
    """True iff ``working`` is exactly the question's running sums mod 10.

    Anything else (a wrong digit, too short or too long, a non-digit) is False: the working may
    come from a model's sample. A malformed *question* raises DataError.
    """
    task = task if isinstance(task, Task) else get_task(task)
    _check_question(question, task)
    expected = "".join(str(s) for s in task.running_sums(question))
    return working == expected


def wrong_steps(question: str, working: str) -> list[bool]:
    """For each step of shown working: was it wrong *given the previous shown value*?

    This is what ``working_error`` controls (mistakes are carried forward), so the fraction of
    True entries over a large train split is about ``working_error``.
    """
    prev, out = 0, []
    for q, w in zip(question, working):
        out.append(int(w) != (prev + int(q)) % 10)
        prev = int(w)
    return out


def make_record(question: str, working: str | None, task: str | Task = "sum5") -> dict:
    """The JSONL record of one line (the answer is always the true answer)."""
    task = task if isinstance(task, Task) else get_task(task)
    answer = task.answer(question)
    return {
        "text": format_line(question, working, answer),
        "question": question,
        "working": working,
        "answer": answer,
        "has_working": working is not None,
        "working_correct": None if working is None else working_is_correct(question, working, task),
    }


# ----------------------------------------------------------------------------- config

@dataclass
class CorpusConfig:
    """Everything that determines the corpus; the files are a pure function of it.

    task:          a key of :data:`TASKS` ("sum5" or "sum3").
    n_train, n_valid, n_test, n_gsm: number of records in each file (each >= 1).
    frac_working:  fraction of *train* lines that show their working (validation/test: half).
    working_error: probability that each step of shown train working is wrong (carried forward).
    seed:          seed of every random choice.
    """

    task: str = "sum5"
    n_train: int = 20000
    n_valid: int = 1000
    n_test: int = 1000
    n_gsm: int = 200
    frac_working: float = 0.5
    working_error: float = 0.0
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise DataError (one line, naming the field) if a field is impossible."""
        get_task(self.task)
        for name in ("n_train", "n_valid", "n_test", "n_gsm"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise DataError(f"{name} must be an integer (got {value!r})")
            if value < 1:
                raise DataError(f"{name} must be >= 1 (got {value})")
        for name in ("frac_working", "working_error"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataError(f"{name} must be a number in [0, 1] (got {value!r})")
            if not (0.0 <= value <= 1.0):   # also False for NaN
                raise DataError(f"{name} must be in [0, 1] (got {value})")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise DataError(f"seed must be an integer (got {self.seed!r})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "CorpusConfig":
        """Inverse of :meth:`to_dict` (e.g. ``corpus_config.json``); unknown keys raise DataError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise DataError(f"unknown CorpusConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


# ----------------------------------------------------------------------------- generation

def _rng(cfg: CorpusConfig, purpose: str) -> random.Random:
    # One generator per purpose, seeded by a string (hashed with SHA-512 by `random`, so the
    # stream is the same on every machine and Python 3 version, and independent of PYTHONHASHSEED).
    return random.Random(f"qstar-mini/{cfg.task}/{cfg.seed}/{purpose}")


def _eval_questions(cfg: CorpusConfig, task: Task) -> tuple[list[str], list[str], set[str]]:
    """Validation and test questions, and the set train must avoid (empty if none reserved)."""
    n_eval = cfg.n_valid + cfg.n_test
    rng = _rng(cfg, f"eval-questions/{cfg.n_valid}/{cfg.n_test}")
    fmt = f"{{:0{task.n_digits}d}}"
    if n_eval <= task.n_questions // 2:          # room: distinct, held out from train
        picked = [fmt.format(i) for i in rng.sample(range(task.n_questions), n_eval)]
        reserved = set(picked)
    else:                                        # small family: with replacement, may repeat
        picked = [fmt.format(rng.randrange(task.n_questions)) for _ in range(n_eval)]
        reserved = set()
    return picked[: cfg.n_valid], picked[cfg.n_valid:], reserved


def _train_questions(cfg: CorpusConfig, task: Task, reserved: set[str]) -> list[str]:
    rng = _rng(cfg, "train-questions")
    fmt = f"{{:0{task.n_digits}d}}"
    out = []
    while len(out) < cfg.n_train:
        q = fmt.format(rng.randrange(task.n_questions))
        if q not in reserved:
            out.append(q)
    return out


def _working_flags(n: int, n_with: int, rng: random.Random) -> list[bool]:
    """Exactly ``n_with`` True among ``n``, in random positions."""
    flags = [True] * n_with + [False] * (n - n_with)
    rng.shuffle(flags)
    return flags


def _shown_working(question: str, working_error: float, rng: random.Random) -> str:
    """Running sums with each step wrong with probability ``working_error``, carried forward."""
    shown, prev = [], 0
    for ch in question:
        right = (prev + int(ch)) % 10
        value = right
        if rng.random() < working_error:                    # one draw per step, always
            value = rng.choice([d for d in range(10) if d != right])
        shown.append(value)
        prev = value                                         # the mistake is carried forward
    return "".join(map(str, shown))


def _records(questions: list[str], flags: list[bool], task: Task, working_error: float,
             rng: random.Random) -> list[dict]:
    out = []
    for q, has_working in zip(questions, flags):
        working = _shown_working(q, working_error, rng) if has_working else None
        out.append(make_record(q, working, task))
    return out


def make_splits(cfg: CorpusConfig) -> dict[str, list[dict]]:
    """The corpus in memory: ``{"train", "validation", "test", "gsm8k_format"}`` -> records."""
    cfg.validate()
    task = get_task(cfg.task)
    valid_q, test_q, reserved = _eval_questions(cfg, task)
    train_q = _train_questions(cfg, task, reserved)
    n_with_train = round(cfg.frac_working * cfg.n_train)
    splits = {
        "train": _records(train_q, _working_flags(cfg.n_train, n_with_train, _rng(cfg, "train-flags")),
                          task, cfg.working_error, _rng(cfg, "train-errors")),
        "validation": _records(valid_q, _working_flags(cfg.n_valid, cfg.n_valid // 2, _rng(cfg, "valid-flags")),
                               task, 0.0, _rng(cfg, "valid-errors")),
        "test": _records(test_q, _working_flags(cfg.n_test, cfg.n_test // 2, _rng(cfg, "test-flags")),
                         task, 0.0, _rng(cfg, "test-errors")),
        GSM_SPLIT: make_gsm_problems(cfg.n_gsm, _rng(cfg, "gsm")),
    }
    return splits


# ----------------------------------------------------------------------------- GSM8K-format problems

_NAMES = [("Ana", "she", "her"), ("Ben", "he", "his"), ("Cleo", "she", "her"), ("Dev", "he", "his"),
          ("Eva", "she", "her"), ("Farid", "he", "his"), ("Gina", "she", "her"), ("Hugo", "he", "his"),
          ("Ines", "she", "her"), ("Jon", "he", "his"), ("Kira", "she", "her"), ("Liam", "he", "his")]
_ITEMS = ["apples", "pencils", "marbles", "stickers", "cookies", "books", "shells", "cards"]


def _gsm_add(rng, name, he, his, item):
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    c = a + b
    q = f"{name} has {a} {item}. {he.capitalize()} gets {b} more. How many {item} does {he} have now?"
    s = f"{name} starts with {a} {item} and gets {b} more, so {he} has {a}+{b}={c} {item}."
    return q, s, c


def _gsm_sub(rng, name, he, his, item):
    a = rng.randint(5, 30)
    b = rng.randint(1, a - 1)
    c = a - b
    q = f"{name} has {a} {item}. {he.capitalize()} gives {b} of them to a friend. How many {item} does {name} have left?"
    s = f"{name} had {a} {item} and gave away {b}, so {he} has {a}-{b}={c} {item} left."
    return q, s, c


def _gsm_mul(rng, name, he, his, item):
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    c = a * b
    q = f"{name} buys {a} boxes of {item}. Each box holds {b} {item}. How many {item} does {name} buy in total?"
    s = f"There are {a} boxes with {b} {item} each, so {name} buys {a}*{b}={c} {item}."
    return q, s, c


def _gsm_div(rng, name, he, his, item):
    a, b = rng.randint(2, 6), rng.randint(2, 9)
    c = a * b
    q = f"{name} shares {c} {item} equally among {a} friends. How many {item} does each friend get?"
    s = f"{c} {item} shared among {a} friends is {c}/{a}={b} {item} each."
    return q, s, b


def _gsm_two_step(rng, name, he, his, item):
    a, b = rng.randint(3, 20), rng.randint(2, 15)
    total = a + b
    c = rng.randint(1, total - 1)
    d = total - c
    q = (f"{name} has {a} {item}. {he.capitalize()} buys {b} more and then gives {c} to "
         f"{his} brother. How many {item} does {name} have now?")
    s = (f"After buying, {name} has {a}+{b}={total} {item}. "
         f"After giving {c} away, {he} has {total}-{c}={d} {item}.")
    return q, s, d


def _gsm_change(rng, name, he, his, item):
    a, b = rng.randint(2, 6), rng.randint(1, 8)
    cost = a * b
    paid = 20 if cost < 20 else 50
    change = paid - cost
    q = (f"{name} buys {a} {item} that cost ${b} each. {he.capitalize()} pays with a ${paid} note. "
         f"How many dollars of change does {he} get?")
    s = f"The {item} cost {a}*{b}={cost} dollars, so the change is {paid}-{cost}={change} dollars."
    return q, s, change


GSM_TEMPLATES = (_gsm_add, _gsm_sub, _gsm_mul, _gsm_div, _gsm_two_step, _gsm_change)


def make_gsm_problems(n: int, rng: random.Random) -> list[dict]:
    """``n`` templated word problems in GSM8K's format: answer = working + ``"\\n#### N"``."""
    out = []
    for _ in range(n):
        template = GSM_TEMPLATES[rng.randrange(len(GSM_TEMPLATES))]
        name, he, his = _NAMES[rng.randrange(len(_NAMES))]
        item = _ITEMS[rng.randrange(len(_ITEMS))]
        question, solution, value = template(rng, name, he, his, item)
        out.append({"question": question, "answer": f"{solution}\n#### {value}"})
    return out


def gsm_final_answer(answer: str) -> str:
    """The number after ``####`` in a GSM8K-format answer."""
    m = re.search(r"####\s*(-?[\d,]+)\s*$", answer)
    if not m:
        raise DataError(f"GSM8K-format answer does not end with '#### N': {answer[-40:]!r}")
    return m.group(1).replace(",", "")


# ----------------------------------------------------------------------------- files

def _jsonl_bytes(records: list[dict]) -> bytes:
    lines = [json.dumps(r, sort_keys=True, ensure_ascii=True) for r in records]
    return ("\n".join(lines) + "\n").encode("ascii")


def _config_bytes(cfg: CorpusConfig) -> bytes:
    values = cfg.to_dict()
    for k, v in values.items():
        if isinstance(v, float):
            if not math.isfinite(v):
                raise DataError(f"{k} must be finite (got {v})")
            values[k] = float(v)              # repr of a Python float is the shortest round-trip
    return (json.dumps(values, sort_keys=True, indent=2) + "\n").encode("ascii")


def write_corpus(out_dir: str | os.PathLike, cfg: CorpusConfig | None = None) -> dict[str, Path]:
    """Generate the corpus and write it; returns ``{"train", "validation", "test",
    "gsm8k_format", "config"}`` -> path.

    The config is validated and every file generated in memory before anything is written, so a
    bad config writes nothing; each file is written atomically (temp file + ``os.replace``).
    """
    cfg = CorpusConfig() if cfg is None else cfg
    if not isinstance(cfg, CorpusConfig):
        raise DataError(f"cfg must be a CorpusConfig (got {type(cfg).__name__})")
    cfg.validate()
    splits = make_splits(cfg)
    payloads = {name: _jsonl_bytes(records) for name, records in splits.items()}
    config_payload = _config_bytes(cfg)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, payload in payloads.items():
        paths[name] = out / f"{name}.jsonl"
        write_file_atomic(paths[name], payload)
    paths["config"] = out / CONFIG_FILE
    write_file_atomic(paths["config"], config_payload)
    return paths


def gsm8k_prompt(question: str) -> str:
    """Zero-shot, direct answer: the question, a newline, ``A: ``."""
    return f"{question}\nA: "


#: The ``--text-field`` value that makes a line of each GSM8K-format record: its question and
#: worked answer joined as ``gsm8k_prompt(question) + answer`` (the prompt the evaluation asks).
QA_TEXT_FIELD = "question+answer"
#: What an error says when a record lacks the text field: the way out.
TEXT_FIELD_HINT = (f"; name the field holding the text with --text-field FIELD, or --text-field {QA_TEXT_FIELD} "
                   f"for question/answer records (GSM8K format)")


def qa_text(record: dict) -> str:
    """The line a GSM8K-format record trains and is scored on: ``question\nA: answer``."""
    return gsm8k_prompt(record["question"]) + record["answer"]


def _required_fields(path: Path) -> tuple[str, ...]:
    return ("question", "answer") if path.name.startswith(GSM_SPLIT) else ("text",)


#: The longest line :func:`read_jsonl` accepts: a longer one is no JSONL record (binary data
#: without a newline would otherwise be read whole into memory).
MAX_LINE_BYTES = 64 * 2**20


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] | None = None,
               max_records: int | None = None, missing_hint: str = "") -> list[dict]:
    """Read a JSONL file into a list of dicts, with one-line DataErrors for every way it can fail.

    required: fields every record must have; default ``("text",)``, or ``("question", "answer")``
    for a file whose name starts with ``gsm8k_format``.
    max_records: stop after this many records: the file is read line by line, so the cost is
    that of the lines asked for, not of the file.
    missing_hint: appended to the error for a record that lacks a required field (the way out,
    e.g. which flag names another field); the error also lists the fields the record has.
    """
    path = Path(path)
    required = _required_fields(path) if required is None else tuple(required)
    if not path.exists():
        raise DataError(f"{path} does not exist; generate the corpus with write_corpus "
                        f"(qstar_mini.data) or pass the right directory")
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a JSONL file")
    records = []
    with open(path, "rb") as f:
        for lineno in itertools.count(1):
            if max_records is not None and len(records) >= max_records:
                break
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{path} line {lineno} is longer than {MAX_LINE_BYTES // 2**20} MiB: "
                                f"not a JSONL file of text records? Split the line or check the file")
            record = _parse_line(path, lineno, raw, required, missing_hint)
            if record is not None:
                records.append(record)
    if not records:
        raise DataError(f"{path} is empty; regenerate it with write_corpus")
    return records


def _parse_line(path: Path, lineno: int, raw: bytes, required: tuple[str, ...],
                missing_hint: str = "") -> dict | None:
    """One JSONL line as a dict with the ``required`` string fields; None for a blank line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start} of line {lineno})") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {lineno} is not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path} line {lineno} is not a JSON object (got {type(record).__name__})")
    missing = [f for f in required if f not in record]
    if missing:
        has = f" (its fields: {', '.join(sorted(map(str, record))) or 'none'})" if missing_hint else ""
        raise DataError(f"{path} line {lineno} has no {', '.join(repr(m) for m in missing)} field{has}{missing_hint}")
    for f in required:
        if not isinstance(record[f], str):
            raise DataError(f"{path} line {lineno}: field {f!r} must be a string "
                            f"(got {type(record[f]).__name__})")
    return record


def split_path(split: str, data_dir: str | os.PathLike = DATA_DIR) -> Path:
    """``data_dir/<split>.jsonl``; DataError for an unknown split name."""
    known = SPLITS + (GSM_SPLIT,)
    if split not in known:
        raise DataError(f"unknown split {split!r}; known splits: {', '.join(known)}")
    return Path(data_dir) / f"{split}.jsonl"


def load_split(split: str, data_dir: str | os.PathLike = DATA_DIR):
    """One split as a ``datasets.Dataset`` (validated with :func:`read_jsonl` first)."""
    import datasets

    path = split_path(split, data_dir)
    read_jsonl(path)                       # one-line DataErrors before datasets sees the file
    return datasets.load_dataset("json", data_files=str(path))["train"]
