"""Quiet-STaR checkpoints in EleutherAI's lm-evaluation-harness (``lm_eval``), with their thoughts.

:class:`QuietStarLM` is an ``lm_eval`` model, registered as ``qstar-mini`` (and ``qstar_mini``)
when this module is imported. It loads a checkpoint (:func:`qstar_mini.runs.checkpoint.load_checkpoint`)
and answers the harness's three kinds of request:

* ``loglikelihood(context, continuation)``: the sum over the continuation's tokens of
  log p^talk, the mixed post-thought prediction at offset 0 (Algorithm 1, line 2g) after the
  thought made right after the token before it, i.e. the with-thinking NLL of
  :func:`qstar_mini.evaluation.any_text.evaluate_text` (a thought after every token the continuation
  sees; thoughts never enter the text, so the thoughts of earlier context positions do not
  change these predictions and are not made). ``is_greedy``: every continuation token is the
  argmax of its mixed prediction.
* ``loglikelihood_rolling(text)``: the same over every token of ``text`` after ``<s>`` (or
  ``</s>`` when the tokenizer has no ``<s>``), in windows of at most ``max_length`` tokens when
  it is longer, each token scored once.
* ``generate_until(context, gen_kwargs)``: a thought before every generated token, as
  :func:`qstar_mini.inference.generate_with_thoughts` does (same KV-cache steps), stopping at
  ``</s>``, at a stop string of ``until`` (cut off) or after ``max_gen_toks`` tokens.

``think=False`` answers the same requests with the checkpoint's LM alone (line 2a, no thought),
so one harness run per setting gives the comparison; the model Quiet-STaR started from is the
harness's own ``hf`` model. Every distribution is over the text vocabulary (the meta-tokens get
probability 0, as in :mod:`qstar_mini.evaluation`). A context is ``<s>`` + its tokens; its trailing
spaces move to the continuation (the harness's convention), context and continuation are
tokenized separately, and long inputs lose tokens on the left.

Model arguments (``--model_args`` / ``model_args``): ``checkpoint`` (a folder, required; or a
loaded :class:`~qstar_mini.runs.checkpoint.Checkpoint` from Python), ``think`` (true), ``n_thoughts``
(1) and ``greedy_thoughts`` (true; else ``n_thoughts`` thoughts sampled at
``thought_temperature``, 1.0, and the per-token log-probabilities averaged), ``seed`` (0),
``batch_size`` (8; ``auto`` means 8), ``max_length`` (the model's context minus
``thought_length``), ``max_gen_toks`` (256), ``device`` (cuda if available), ``dtype``
(float32, bfloat16 or float16).

**From the command line.** ``lm_eval`` 0.4 finds models only in its own registry (no entry-point
plugins), so a bare ``lm_eval --model qstar-mini`` does not know this model. ``qstar-mini harness``
runs the harness's own command line (:func:`run_lm_eval_cli`) after importing (registering) it,
with the same flags::

    qstar-mini harness --model qstar-mini \\
        --model_args checkpoint=runs/x/checkpoint,think=true --tasks gsm8k --limit 50
    qstar-mini harness --model qstar-mini \\
        --model_args checkpoint=runs/x/checkpoint,think=false --tasks gsm8k --limit 50

``--include_path DIR`` adds task YAML files of your own, as with ``lm_eval``.

**Offline task.** ``gsm8k`` above needs the Hugging Face Hub. This package ships one that does not:
``qstar_gsm8k_format`` (:data:`TASKS_DIR`, added to ``--include_path`` by ``qstar-mini
harness``; from Python ``task_manager=qstar_mini.evaluation.harness.task_manager()``), the
project's ``data/gsm8k_format.jsonl`` asked zero-shot with qstar_mini's own prompt, 6 greedy
tokens and answer extraction, so its ``exact_match`` is the GSM8K-format accuracy of
``qstar-mini eval`` (:func:`qstar_mini.evaluation.gsm8k.gsm8k_eval`)::

    qstar-mini harness --model qstar-mini \
        --model_args checkpoint=runs/x/checkpoint,think=true --tasks qstar_gsm8k_format --limit 50

**From Python**::

    import lm_eval
    import qstar_mini.evaluation.harness                    # registers "qstar-mini"
    results = lm_eval.simple_evaluate(model="qstar-mini", model_args="checkpoint=runs/x/checkpoint",
                                      tasks=["hellaswag"], limit=100)

or pass ``model=QuietStarLM(checkpoint=...)``. ``tests/evaluation/test_harness.py`` runs a multiple-choice,
a rolling-loglikelihood and a ``generate_until`` task written on ``data/gsm8k_format.jsonl`` and
checks every number against qstar_mini's own functions.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from qstar_mini.errors import ConfigError, DataError

try:
    import lm_eval.models  # noqa: F401 - the harness's own models stay registered next to ours
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("qstar_mini.evaluation.harness needs lm_eval: pip install 'qstar-mini[harness]' "
                      f"(lm_eval>=0.4.13,<0.5) ({error})") from None

MODEL_NAMES = ("qstar-mini", "qstar_mini")
#: The task YAML files shipped with qstar_mini (``qstar_gsm8k_format``: offline GSM8K format).
TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
DEFAULT_BATCH = 8
DEFAULT_GEN_TOKENS = 256


def _as_bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"model argument {name} must be true or false (got {value!r})")


def _as_int(value, name: str, low: int) -> int:
    """An integer model argument (an int, or a string of one) of at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"model argument {name} must be an integer (got {value!r})")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"model argument {name} must be an integer (got {value!r})") from None
    if number < low:
        raise ConfigError(f"model argument {name} must be at least {low} (got {value!r})")
    return number


def rolling_windows(n_tokens: int, max_length: int) -> list[tuple[int, int, int]]:
    """How to score tokens 1 .. n_tokens - 1 of a sequence with inputs of at most ``max_length``.

    returns: [(start, end, k)]: feed ids[start:end] and score its last k tokens; every token after
    the first is scored exactly once, each with as much left context as the window allows.
    """
    if max_length < 2:
        raise ConfigError(f"max_length must be at least 2 (got {max_length})")
    windows, first = [], 1
    while first < n_tokens:
        end = min(n_tokens, first + max_length - 1)
        windows.append((max(0, end - max_length), end, end - first))
        first = end
    return windows


def _visible(keys: int, device) -> torch.Tensor:
    """Additive mask (1, 1, 1, keys): one new token that sees every cached key."""
    return torch.zeros(1, 1, 1, keys, device=device)


class QuietStarLM(LM):
    """An ``lm_eval`` model that scores and generates with a Quiet-STaR checkpoint's thoughts
    (see the module docstring for the requests and the arguments)."""

    def __init__(self, checkpoint=None, think=True, n_thoughts=1, greedy_thoughts=True, thought_temperature=1.0,
                 seed=0, batch_size=DEFAULT_BATCH, max_length=None, max_gen_toks=DEFAULT_GEN_TOKENS, device=None,
                 dtype="float32", max_batch_size=None, **unknown):
        super().__init__()
        from qstar_mini.runs.checkpoint import Checkpoint, load_checkpoint
        from qstar_mini.cli.eval import DTYPES

        if unknown:
            raise ConfigError(f"unknown model argument(s) {sorted(unknown)} for qstar-mini; see qstar_mini.evaluation.harness")
        if checkpoint is None:
            raise ConfigError("model argument checkpoint is required (checkpoint=runs/<name>/checkpoint)")
        if dtype not in DTYPES:
            raise ConfigError(f"model argument dtype must be one of {sorted(DTYPES)} (got {dtype!r})")
        self.think = _as_bool(think, "think")
        self.greedy_thoughts = _as_bool(greedy_thoughts, "greedy_thoughts")
        self.n_thoughts = 1 if self.greedy_thoughts else _as_int(n_thoughts, "n_thoughts", 1)
        self.thought_temperature = float(thought_temperature)
        if not self.thought_temperature > 0:
            raise ConfigError(f"model argument thought_temperature must be positive (got {thought_temperature!r})")
        auto = isinstance(batch_size, str) and batch_size.startswith("auto")
        self.batch_size = DEFAULT_BATCH if batch_size is None or auto else _as_int(batch_size, "batch_size", 1)
        self.max_gen_toks = _as_int(max_gen_toks, "max_gen_toks", 1)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        ck = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, device=device,
                                                                                  dtype=DTYPES[dtype])
        self.ck = ck
        self.model, self.tokenizer, self.meta, self.head, self.cfg = (ck.model.eval(), ck.tokenizer, ck.meta, ck.head,
                                                                      ck.cfg)
        self._device = next(self.model.parameters()).device
        limit = getattr(self.model.config, "max_position_embeddings", None)
        room = limit - (self.cfg.thought_length if self.think else 0) if isinstance(limit, int) and limit > 0 else 2048
        self.max_length = room if max_length is None else _as_int(max_length, "max_length", 2)
        if self.max_length > room:
            raise ConfigError(f"model argument max_length {self.max_length} exceeds the model's room of {room} "
                              f"positions (its context less the thought's)")
        self.generator = torch.Generator(device=self._device).manual_seed(_as_int(seed, "seed", 0))
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        self.prefix = [bos] if bos is not None else []
        self.start = [bos] if bos is not None else ([eos] if eos is not None else [])

    # ---------------------------------------------------------------- tokens

    @property
    def tokenizer_name(self) -> str:
        return str(self.ck.path)

    def _tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _context(self, context: str) -> list[int]:
        """``<s>`` + the context's tokens; ``</s>`` alone when that is empty (something must predict)."""
        ids = self.prefix + self._tokens(context)
        if not ids:
            ids = self.start
        if not ids:
            raise DataError("an empty context and a tokenizer with neither <s> nor </s>: nothing to predict from")
        return ids

    # ---------------------------------------------------------------- scoring

    def _log_probs(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """log p(next token) at ``positions``: ids, mask (b, l) right-padded, positions (b, m)
        -> (b, m, vocab); the mixed prediction after a thought (mean over the thoughts' log-probs)
        or, with think=False, the LM's own."""
        from qstar_mini.inference import predict_with_thoughts
        from qstar_mini.lm import lm_head, text_log_probs
        from qstar_mini.step import at_positions
        from qstar_mini.thoughts import plain_forward

        if self.think:
            pred = predict_with_thoughts(self.model, self.meta, self.head, self.cfg, ids, mask, self.n_thoughts,
                                         greedy=self.greedy_thoughts, temperature=self.thought_temperature,
                                         generator=self.generator, positions=positions)
            return pred.log_p_talk.mean(1)                                    # (b, m, vocab)
        h_init, _ = plain_forward(self.model, self.meta, ids, mask)           # (b, l, hidden)
        return text_log_probs(lm_head(self.model)(at_positions(h_init, positions)), self.meta.ids).float()

    @torch.no_grad()
    def score(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(sum of log p of the last k tokens of ids, whether each was the argmax) for each
        (ids, k) of ``rows``, 1 <= k < len(ids) <= max_length; batched longest first."""
        out: list = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for s in range(0, len(order), self.batch_size):
            chunk = order[s: s + self.batch_size]
            seq, m = max(len(rows[i][0]) for i in chunk), max(rows[i][1] for i in chunk)
            ids = torch.full((len(chunk), seq), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), seq), dtype=torch.long)
            positions = torch.zeros((len(chunk), m), dtype=torch.long)
            targets = torch.zeros((len(chunk), m), dtype=torch.long)
            valid = torch.zeros((len(chunk), m), dtype=torch.bool)
            for r, i in enumerate(chunk):
                x, k = rows[i]
                ids[r, : len(x)], mask[r, : len(x)] = torch.tensor(x), 1
                first = len(x) - 1 - k                                        # predicts the first scored token
                positions[r, :k] = torch.arange(first, first + k)
                positions[r, k:] = first                                      # padding slots: any real position
                targets[r, :k] = torch.tensor(x[len(x) - k:])
                valid[r, :k] = True
            logp = self._log_probs(ids.to(self._device), mask.to(self._device), positions.to(self._device)).cpu()
            picked = logp.gather(-1, targets[..., None])[..., 0]              # (b, m)
            greedy = logp.argmax(-1) == targets
            for r, i in enumerate(chunk):
                out[i] = (float(picked[r][valid[r]].sum()), bool(greedy[r][valid[r]].all()))
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per request; args (context, continuation)."""
        rows, empty = [], set()
        for n, request in enumerate(requests):
            context, continuation = request.args
            kept = context.rstrip()
            continuation = context[len(kept):] + continuation                 # trailing spaces go along
            ctx, cont = self._context(kept), self._tokens(continuation)
            if not cont:
                empty.add(n)
                continue
            ids = (ctx + cont)[-self.max_length:]
            rows.append((ids, min(len(cont), len(ids) - 1)))
        scored = iter(self.score(rows))
        return [(0.0, True) if n in empty else next(scored) for n in range(len(requests))]

    def loglikelihood_rolling(self, requests) -> list[float]:
        """log p(text) per request, every token after ``<s>`` (or ``</s>``) scored once; args (text,)."""
        totals = []
        for request in requests:
            (text,) = request.args
            ids = self.start + self._tokens(text)
            rows = [(ids[a:b], k) for a, b, k in rolling_windows(len(ids), self.max_length)]
            totals.append(sum(lp for lp, _ in self.score(rows)) if rows else 0.0)
        return totals

    # ---------------------------------------------------------------- generation

    @torch.no_grad()
    def generate_ids(self, ids: list[int], max_new_tokens: int, until=(), greedy: bool = True,
                     temperature: float = 1.0) -> list[int]:
        """New token ids after ``ids``: a thought before each (unless think=False), stopping at
        ``</s>`` (not returned), once the decoded text holds a string of ``until``, or after
        ``max_new_tokens``. Greedy, or sampled at ``temperature``; never a meta-token."""
        from qstar_mini.inference import think_once
        from qstar_mini.lm import forward_hidden, lm_head, text_log_probs
        from qstar_mini.thoughts import gumbel_noise, plain_forward

        model, meta, device = self.model, self.meta, self._device
        x = torch.tensor([ids], device=device)                                 # (1, seq)
        h_init, cache = plain_forward(model, meta, x, torch.ones_like(x))
        h_last, position, new = h_init[:, -1], len(ids) - 1, []               # (1, hidden)
        for _ in range(max_new_tokens):
            if self.think:
                _, _, log_p, _ = think_once(model, meta, self.head, self.cfg, cache, h_last, position,
                                            greedy=self.greedy_thoughts, temperature=self.thought_temperature,
                                            generator=self.generator)
            else:
                log_p = text_log_probs(lm_head(model)(h_last), meta.ids)[0].float()   # (vocab,)
            if greedy:
                token = int(log_p.argmax())
            else:
                token = int((log_p / temperature + gumbel_noise(log_p.shape, self.generator, device=device)).argmax())
            if token == self.tokenizer.eos_token_id:
                break
            new.append(token)
            if until and any(stop in self.tokenizer.decode(new, skip_special_tokens=True) for stop in until):
                break
            position += 1
            h_last = forward_hidden(model, meta.embed(model, torch.tensor([[token]], device=device)),
                                    _visible(cache.get_seq_length() + 1, device),
                                    torch.tensor([[position]], device=device), cache)[:, -1]
        return new

    def generate_until(self, requests) -> list[str]:
        """The continuation of each context, cut before the first stop string; args
        (context, gen_kwargs with until, max_gen_toks, do_sample, temperature)."""
        out = []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = _as_int(kwargs.get("max_gen_toks", self.max_gen_toks), "max_gen_toks", 1)
            temperature = float(kwargs.get("temperature", 0.0) or 0.0)
            greedy = not kwargs.get("do_sample", False) or temperature <= 0
            ids = self._context(context)[-max(1, self.max_length - max_new):]
            text = self.tokenizer.decode(self.generate_ids(ids, max_new, until, greedy, temperature or 1.0),
                                         skip_special_tokens=True)
            cuts = [text.index(stop) for stop in until if stop and stop in text]
            out.append(text[: min(cuts)] if cuts else text)
        return out


register_model(*MODEL_NAMES)(QuietStarLM)


def task_manager(include_path=None, include_defaults: bool = False, metadata: dict | None = None):
    """An ``lm_eval`` TaskManager that knows the shipped tasks (:data:`TASKS_DIR`) and
    ``include_path`` (a folder or a list of folders of your own); lm_eval's own tasks too with
    ``include_defaults`` (indexing them takes about 30 s). ``metadata``: given to the tasks, e.g.
    ``{"path": "FILE.jsonl"}``, another GSM8K-format file for ``qstar_gsm8k_format``."""
    from lm_eval.tasks import TaskManager

    extra = [] if include_path is None else [include_path] if isinstance(include_path, (str, Path)) else include_path
    return TaskManager(include_path=[str(TASKS_DIR), *map(str, extra)], include_defaults=include_defaults,
                       metadata=metadata)


def _with_shipped_tasks(argv: list[str]) -> list[str]:
    """lm_eval's flags with :data:`TASKS_DIR` added to ``--include_path`` (one folder there); no
    flags stay none (lm_eval then prints its help)."""
    if not argv:
        return argv
    for i, arg in enumerate(argv):
        if arg == "--include_path" and i + 1 < len(argv):
            return argv                                   # the user's own folder: theirs alone
        if arg.startswith("--include_path="):
            return argv
    return [*argv, "--include_path", str(TASKS_DIR)]


def run_lm_eval_cli(argv: list[str]) -> None:
    """``qstar-mini harness [lm_eval flags]``: lm_eval's command line on ``argv``, with ``qstar-mini``
    registered (importing this module does that) and the shipped tasks (:data:`TASKS_DIR`) included
    unless ``--include_path`` names a folder of your own. ``lm_eval.__main__.cli_evaluate`` takes no
    arguments and parses ``sys.argv``, so ``sys.argv`` is set for the call and restored after it."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *_with_shipped_tasks(list(argv))]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
