"""The tiny base model: its character-level tokenizer, its config, its pretraining, its loading.

Quiet-STaR starts from a pretrained LM (Mistral-7B in the paper). Ours is a ~0.8M-parameter
Mistral (the paper's architecture, shrunk) pretrained from scratch on the corpus of
:mod:`qstar_mini.data` on a CPU. After pretraining it has learned two things:

* with visible working, ``31415=(34894)4``, the answer is a copy of the last running sum,
  and it gets it right;
* without it, ``31415=4``, it cannot add five digits in one forward pass: it is at chance.

That gap is the room a thought can fill. :func:`evaluate_base` measures it, and also how often
the model's own *sampled* working ``31415=(....`` is right (the thoughts Quiet-STaR starts from).

Two bases are shipped in ``data/``: ``tiny-base`` (clean working, half the train lines with
working) and ``tiny-base-noisy`` (12% of working steps wrong, 80% of lines with working), whose
own working is right only part of the time, which leaves REINFORCE something to improve.

What they measure (accuracies, NLLs, own working right, pretraining time) is written by
:func:`pretrain` to ``data/<base>/pretrain_report.json`` and tabulated in docs/setup.md, section
"Data and the tiny base model"; it is not repeated here.

Tokenizer: one token per character (``tokenizers`` WordLevel over single characters, every
character split off by the pre-tokenizer, a ``Fuse`` decoder so decoding inserts no spaces).
Like Llama's and Mistral's tokenizers it **adds ``<s>`` at the start automatically**
(``tokenizer(text)``; pass ``add_special_tokens=False`` to get the characters only) and never adds
``</s>``. ``tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text``.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

import torch

from qstar_mini.data import (CONFIG_FILE, WORK_CLOSE, WORK_OPEN, CorpusConfig, answer_index, make_splits,
                   get_task, read_jsonl, split_prompt, task_for_question, working_is_correct)
from qstar_mini.files import make_portable, write_dir_atomic
from qstar_mini.errors import ModelError
from qstar_mini.paths import DATA_DIR, TINY_BASE, looks_local
from qstar_mini.records import encode_lines  # the one encoder; also qstar_mini.models.tiny.encode_lines for the notebooks

# ----------------------------------------------------------------------------- tokenizer

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)            # ids 0, 1, 2, 3
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
PUNCTUATION = "=()+-*/#.,?!:'$"
CHARACTERS = ("0123456789" + "abcdefghijklmnopqrstuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
              + " \n" + PUNCTUATION)
MAX_LENGTH = 512


def build_tokenizer():
    """The character-level tokenizer, a ``transformers.PreTrainedTokenizerFast``.

    Vocabulary (83 tokens): ``<pad> <s> </s> <unk>`` (ids 0-3), then every character of
    :data:`CHARACTERS`; any other character becomes ``<unk>``. ``<s>`` is prepended by the
    post-processor; padding is on the right with ``<pad>`` (never ``</s>``).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char
    tok.decoder = decoders.Fuse()                        # join tokens with nothing in between
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        padding_side="right", clean_up_tokenization_spaces=False, model_max_length=MAX_LENGTH)


# ----------------------------------------------------------------------------- model config

def tiny_config(vocab_size: int, arch: str = "mistral", **overrides):
    """A ~0.8M-parameter decoder-only config: hidden 128, 4 layers, 4 heads (2 KV heads), MLP 384.

    arch: "mistral" (the paper's family; sliding window off) or "llama". Any field can be
    overridden, e.g. ``tiny_config(85, num_hidden_layers=2)``.
    """
    from transformers import LlamaConfig, MistralConfig

    fields = dict(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=384, max_position_embeddings=MAX_LENGTH,
                  tie_word_embeddings=True, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
                  eos_token_id=EOS_ID)
    if arch == "mistral":
        fields["sliding_window"] = None
        cls = MistralConfig
    elif arch == "llama":
        cls = LlamaConfig
    else:
        raise ModelError(f"unknown arch {arch!r}; choose 'mistral' or 'llama'")
    fields.update(overrides)
    return cls(**fields)


def tiny_model(tokenizer=None, arch: str = "mistral", seed: int = 0, **overrides):
    """A freshly initialised tiny causal LM (deterministic given ``seed``)."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    config = tiny_config(len(tokenizer), arch=arch, **overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


# ----------------------------------------------------------------------------- batches

def lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Labels for the LM loss: the ids, with -100 on padding so the loss ignores it.

    input_ids, attention_mask: (batch, seq).  returns: (batch, seq) long.
    (The model shifts them by one position itself: logits[:, i] predicts labels[:, i + 1].)
    """
    return input_ids.masked_fill(attention_mask == 0, -100)


# ----------------------------------------------------------------------------- evaluation

def _answer_positions(tokenizer, texts: list[str]):
    """Token ids (with ``<s>``), mask and, per line, the token index of its answer digit.

    returns: input_ids (n, seq), attention_mask (n, seq), positions (n,) long.
    """
    enc = tokenizer(texts, padding=True, return_offsets_mapping=True, return_tensors="pt")
    positions = []
    for i, text in enumerate(texts):
        char = answer_index(text)
        starts = enc["offset_mapping"][i, :, 0]
        ends = enc["offset_mapping"][i, :, 1]
        hit = ((starts == char) & (ends > starts) & (enc["attention_mask"][i] == 1)).nonzero()
        if len(hit) == 0:
            raise ModelError(f"the tokenizer has no token starting at the answer of {text!r}")
        positions.append(int(hit[0, 0]))
    return enc["input_ids"], enc["attention_mask"], torch.tensor(positions)


def digit_token_ids(tokenizer) -> list[int]:
    """The ids of the ten digit tokens "0".."9" (the answer alphabet)."""
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in "0123456789"]
    if any(len(x) != 1 for x in ids):
        raise ModelError("the tokenizer does not encode each digit as one token; "
                         "evaluate_base needs a digit-level tokenizer such as build_tokenizer()")
    return [x[0] for x in ids]


@torch.no_grad()
def _teacher_forced(model, tokenizer, texts: list[str], batch_size: int) -> tuple[list[bool], list[float]]:
    """Per line: is the greedy *digit* at the answer right, and -log p(answer) over the full vocab."""
    device = next(model.parameters()).device
    digits = torch.tensor(digit_token_ids(tokenizer), device=device)           # (10,)
    correct, nll = [], []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start: start + batch_size]
        input_ids, attention_mask, pos = _answer_positions(tokenizer, chunk)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        rows = torch.arange(len(chunk))
        pred_logits = logits[rows, (pos - 1).to(device)].float()          # (n, vocab): predicts pos
        target = input_ids[rows, pos].to(device)                          # (n,)
        logp = torch.log_softmax(pred_logits, dim=-1)
        correct += (digits[pred_logits[:, digits].argmax(-1)] == target).tolist()
        nll += (-logp[rows, target]).tolist()
    return correct, nll


@torch.no_grad()
def sample_continuations(model, tokenizer, prompts: list[str], n_tokens: int,
                         temperature: float = 1.0, generator: torch.Generator | None = None) -> list[str]:
    """Continue each prompt by ``n_tokens`` tokens (greedy if ``temperature == 0``), no KV cache.

    Prompts are tokenized with ``<s>``; all must have the same number of tokens (no padding).
    Internally ids are (n, seq) growing to (n, seq + n_tokens). Returns the decoded continuations
    (special tokens kept, so a sampled ``</s>`` shows up as text).
    """
    device = next(model.parameters()).device
    encoded = tokenizer(prompts)["input_ids"]
    if len({len(x) for x in encoded}) != 1:
        raise ModelError("sample_continuations needs prompts of equal token length (no padding); "
                         "group them by length")
    ids = torch.tensor(encoded, device=device)                              # (n, seq)
    new = []
    for _ in range(n_tokens):
        logits = model(input_ids=ids).logits[:, -1].float()                  # (n, vocab)
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)
        new.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    new_ids = torch.stack(new, dim=1).cpu()                                 # (n, n_tokens)
    return [tokenizer.decode(row.tolist(), skip_special_tokens=False) for row in new_ids]


def _mean(values):
    return None if not values else round(float(sum(values)) / len(values), 4)


def _own_working(model, tokenizer, questions: list[str], task, temperature: float, generator):
    """The model writes ``question=(`` + working + ``)`` + answer; are working and answer right?"""
    prompts = [f"{q}=" + WORK_OPEN for q in questions]
    outs = sample_continuations(model, tokenizer, prompts, task.n_digits + 2, temperature, generator)
    working_ok, answer_ok = [], []
    for q, out in zip(questions, outs):
        working, closed, rest = out.partition(WORK_CLOSE)
        working_ok.append(working_is_correct(q, working, task))
        answer_ok.append(bool(closed) and rest[:1] == task.answer(q))
    return working_ok, answer_ok


def evaluate_base(model, tokenizer, records, *, seed: int = 0, batch_size: int = 256) -> dict:
    """How well a base model answers with and without working, and how good its own working is.

    records: dicts with "text", "question", "has_working" (e.g. the test split).
    Teacher-forced, at the answer digit:
      answer_acc_with_working, answer_nll_with_working   on ``31415=(34894)4``
      answer_acc_answer_only,  answer_nll_answer_only    on ``31415=4``
      room_acc = the difference of the two accuracies: the room thinking can fill.
    Accuracy is the argmax over the ten digit tokens (like the official code's evaluation, which
    compares the logits of the digit tokens only): after ``31415=`` the most likely token is ``(``
    (half the train lines show working), so an argmax over the whole vocabulary would score 0
    without telling us anything. The NLL is over the whole vocabulary, as the LM loss sees it,
    so answer-only NLL is about ln 10 + ln 2 = 3.0 for a model that cannot add in its head.
    The model's own working, for the answer-only questions, prompted with ``31415=(``:
      working_correct_sampled (temperature 1), working_correct_greedy: fraction whose running sums
      are all right; answer_acc_after_sampled_working, ..._greedy_working: fraction whose answer
      after its own ``)`` is right (sampled, resp. greedy, like the working before it).
      Sampling uses a CPU generator seeded with ``seed``.
    """
    records = list(records)
    if not records:
        raise ModelError("evaluate_base needs at least one record")
    was_training = model.training
    model.eval()
    try:
        with_w = [r["text"] for r in records if r["has_working"]]
        without = [r for r in records if not r["has_working"]]
        acc_w, nll_w = _teacher_forced(model, tokenizer, with_w, batch_size) if with_w else ([], [])
        acc_o, nll_o = (_teacher_forced(model, tokenizer, [r["text"] for r in without], batch_size)
                        if without else ([], []))
        report = {
            "n_with_working": len(with_w), "n_answer_only": len(without),
            "answer_acc_with_working": _mean(acc_w), "answer_nll_with_working": _mean(nll_w),
            "answer_acc_answer_only": _mean(acc_o), "answer_nll_answer_only": _mean(nll_o),
        }
        report["room_acc"] = (None if not (acc_w and acc_o)
                              else round(report["answer_acc_with_working"] - report["answer_acc_answer_only"], 4))
        questions = [r["question"] for r in without]
        generator = torch.Generator().manual_seed(seed)
        by_task: dict[str, list[str]] = {}
        for q in questions:                          # same task = same prompt length: no padding
            by_task.setdefault(task_for_question(q).name, []).append(q)
        results = {"sampled": ([], []), "greedy": ([], [])}
        for name, qs in sorted(by_task.items()):
            task = get_task(name)
            for kind, temperature in (("sampled", 1.0), ("greedy", 0.0)):
                for start in range(0, len(qs), batch_size):
                    w, a = _own_working(model, tokenizer, qs[start: start + batch_size], task,
                                        temperature, generator)
                    results[kind][0].extend(w)
                    results[kind][1].extend(a)
        report.update({
            "n_sampled": len(questions),
            "working_correct_sampled": _mean(results["sampled"][0]),
            "working_correct_greedy": _mean(results["greedy"][0]),
            "answer_acc_after_sampled_working": _mean(results["sampled"][1]),
            "answer_acc_after_greedy_working": _mean(results["greedy"][1]),
            "seed": seed,
        })
        return report
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------- pretraining

def _lr_lambda(steps: int, warmup: int, min_ratio: float = 0.1):
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def pretrain(out_dir, data_dir=DATA_DIR, corpus: CorpusConfig | None = None, steps: int = 4000,
             batch_size: int = 64, lr: float = 2e-3, seed: int = 0, arch: str = "mistral",
             progress: bool = True, *, warmup_steps: int = 100, weight_decay: float = 0.01,
             eval_records: list[dict] | None = None) -> dict:
    """Pretrain a tiny base from scratch on the corpus's train lines and save it to ``out_dir``.

    Data: ``corpus`` generated in memory if given, else ``data_dir/train.jsonl`` (and its
    ``corpus_config.json``). Each sequence is ``<s> line </s>``; batches (batch_size, seq) are
    right-padded and the loss ignores padding. AdamW, linear warmup then cosine decay to 10% of
    ``lr``, gradient clipping at 1.0. Deterministic given ``seed`` (and the thread count).
    Evaluation: :func:`evaluate_base` on the test split (or ``eval_records``).
    Saves model (safetensors) + tokenizer + ``pretrain_report.json`` atomically; returns the report.
    """
    from tqdm.auto import tqdm

    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ModelError(f"steps, batch_size and lr must be positive (got {steps}, {batch_size}, {lr})")
    out_dir = Path(out_dir)
    if corpus is not None:
        splits = make_splits(corpus)
        train, test, corpus_dict = splits["train"], splits["test"], corpus.to_dict()
    else:
        data_dir = Path(data_dir)
        train, test = read_jsonl(data_dir / "train.jsonl"), read_jsonl(data_dir / "test.jsonl")
        cfg_path = data_dir / CONFIG_FILE
        corpus_dict = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
    eval_records = test if eval_records is None else eval_records

    tokenizer = build_tokenizer()
    model = tiny_model(tokenizer, arch=arch, seed=seed)
    model.train()
    input_ids, attention_mask = encode_lines(tokenizer, [r["text"] for r in train])  # (n, seq)
    n = len(input_ids)

    decay = [p for name, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for name, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, min(warmup_steps, steps)))
    generator = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(n, generator=generator), 0

    losses, history = [], []
    start = time.time()
    bar = tqdm(range(steps), disable=not progress, desc="pretrain", leave=False)
    for step in bar:
        if cursor + batch_size > n:                         # new epoch, new order
            order, cursor = torch.randperm(n, generator=generator), 0
        idx = order[cursor: cursor + batch_size]
        cursor += batch_size
        mask = attention_mask[idx]                          # (batch, seq)
        seq = int(mask.sum(1).max())                        # trim shared padding
        ids, mask = input_ids[idx, :seq], mask[:, :seq]
        loss = model(input_ids=ids, attention_mask=mask, labels=lm_labels(ids, mask)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step == steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            history.append([step + 1, round(recent, 4)])
            bar.set_postfix(loss=f"{recent:.3f}")
    seconds = time.time() - start
    model.eval()

    report = {
        "arch": arch, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
        "warmup_steps": warmup_steps, "weight_decay": weight_decay,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "n_train_lines": n, "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
        "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "loss_history": history,
        "corpus": corpus_dict,
        "eval": evaluate_base(model, tokenizer, eval_records, seed=seed),
        "torch_version": torch.__version__,
    }

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        make_portable(tmp)
        (tmp / "pretrain_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")

    write_dir_atomic(out_dir, write)
    return report


# ----------------------------------------------------------------------------- loading

def load_model(name_or_path=TINY_BASE, dtype: torch.dtype = torch.float32,
               attn_implementation: str | None = None, device=None):
    """Load a causal LM and its tokenizer (``trust_remote_code=False``, safetensors only).

    name_or_path: a directory made by ``save_pretrained`` (default: the shipped tiny base), the
    short name of a real model fetched once with ``qstar-mini models fetch NAME`` (``"smollm2"``:
    SmolLM2-135M-Instruct, see :mod:`qstar_mini.models.pretrained`; a string equal to such a name
    always means that model, write ``"./smollm2"`` for a folder of that name) or a Hugging Face
    model name (needs the network unless cached). Returns ``(model, tokenizer)``,
    the model in eval mode on ``device``; the tokenizer pads on the right and has a pad token
    (``eos`` if it had none, with a warning). Failures raise a one-line :class:`ModelError`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(name_or_path, str):
        from qstar_mini.models.pretrained import KNOWN, resolve

        if name_or_path in KNOWN:                 # "smollm2" -> its cache folder, or how to fetch it
            name_or_path = resolve(name_or_path)
    name = os.fspath(name_or_path)
    local = isinstance(name_or_path, Path) or looks_local(name)
    if local:
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelError(f"model path {name} does not exist; pass a directory made by "
                             f"save_pretrained or a Hugging Face model name")
        if not (path / "config.json").is_file():
            raise ModelError(f"model path {name} has no config.json; pass a directory made by "
                             f"save_pretrained or a Hugging Face model name")
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        if pickles and not any(path.glob("*.safetensors")):
            raise ModelError(f"model path {name} holds only pickle weights ({', '.join(pickles[:3])}); qstar_mini "
                             f"loads safetensors only (unpickling can run code): save the model with "
                             f"save_pretrained(..., safe_serialization=True) where you trust it")
        name = str(path)
    kwargs = dict(trust_remote_code=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model_kwargs = dict(kwargs, use_safetensors=True, dtype=dtype)
        if attn_implementation is not None:
            model_kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(name, **model_kwargs)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - every loading failure becomes one line
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        if local:
            raise ModelError(f"could not load the model in {name} ({type(e).__name__}: {first})") from e
        raise ModelError(f"could not load {name!r}: not found locally and it could not be downloaded "
                         f"from the Hugging Face hub (network?) ({type(e).__name__}: {first})") from e
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"the tokenizer of {name} has neither a pad nor an eos token")
        warnings.warn(f"the tokenizer of {name} has no pad token; using eos ({tokenizer.eos_token!r}) "
                      f"for padding", stacklevel=2)
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer
