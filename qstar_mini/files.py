"""Files a run writes: folders replaced atomically, their manifests, JSON and JSON-lines records.

Nothing here knows about models or Quiet-STaR; ``checkpoint`` (a trained run) and ``models``
(a pretrained base) both save through :func:`write_dir_atomic`.

A *manifest* (``manifest.json``) lists every file of a folder with its size and sha256. It is
written last, inside the temporary folder, so it is replaced atomically with the files it
describes; :func:`check_files` then tells a damaged or edited file from a good one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


def write_dir_atomic(out_dir: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_dir)``, then put tmp_dir at ``out_dir`` (replacing an old one).

    The old folder is moved aside first and deleted only once the new one is in place, so at
    every moment ``out_dir`` is either the complete old folder or the complete new one. A write
    that fails for want of space (whatever the library's exception, :func:`as_os_error`) raises
    an OSError about ``out_dir``, which the command line turns into one line and exit status 2.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    try:
        try:
            write(tmp)
        except Exception as e:  # noqa: BLE001 - libraries report a full disk in their own types
            disk = as_os_error(e, out_dir)
            if disk is None:
                raise
            # named after out_dir ("run/checkpoint: No space left on device"): tmp is about to go
            raise OSError(disk.errno, disk.strerror, os.fspath(out_dir)) from None
        os.chmod(tmp, 0o755)                                 # mkdtemp makes it private
        if out_dir.exists():
            os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if old.exists():
                os.replace(old, out_dir)                     # put the previous one back
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def write_file_atomic(path: str | os.PathLike, payload: bytes) -> None:
    """Write to a temporary file in the same folder, then rename it over ``path``: a full disk
    or a kill leaves the old file whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, 0o644)                   # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, value) -> None:
    """``value`` as indented, key-sorted JSON with a final newline."""
    Path(path).write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def append_jsonl(path: Path, record: dict) -> None:
    """Add one JSON line (keys sorted) to ``path``."""
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


# Hugging Face folders that every transformers version we support can read. transformers 5 saves
# a fast tokenizer as class "TokenizersBackend" and the RoPE base inside "rope_parameters";
# transformers 4.57 knows neither: it fails on the first and silently uses its default base
# (10000) without the second. Both versions read the names written here.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"


def make_portable(folder: str | os.PathLike) -> None:
    """Rewrite a ``save_pretrained`` folder's tokenizer_config.json and config.json so that
    transformers 4.57 and 5.x load the same tokenizer and model from it."""
    folder = Path(folder)
    tok_path = folder / "tokenizer_config.json"
    if tok_path.is_file():
        tok = json.loads(tok_path.read_text())
        if tok.get("tokenizer_class") == "TokenizersBackend":
            tok["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
        tok.pop("backend", None)
        write_json(tok_path, tok)
    cfg_path = folder / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        rope = cfg.get("rope_parameters") or {}
        if "rope_theta" in rope:
            cfg["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":           # e.g. llama3 or yarn scaling
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        write_json(cfg_path, cfg)


#: Below this much free space, an unexplained failure to write is taken for a full disk.
NEARLY_FULL_BYTES = 1 << 20


def as_os_error(error: BaseException, where) -> OSError | None:
    """The OSError that ``error`` stands for, or None when it is no file-system error.

    safetensors and tokenizers (Rust) report a full disk as their own exception types whose
    message ends in ``(os error 28)``; that number becomes an OSError about ``where``.
    torch.save's writer says only "unexpected pos ...": any other error while the file system
    of ``where`` has less than NEARLY_FULL_BYTES free is reported as a full disk.
    """
    if isinstance(error, OSError):
        return error
    found = re.search(r"os error (\d+)", str(error))
    if found is not None:
        code = int(found.group(1))
        return OSError(code, os.strerror(code), os.fspath(where))
    try:
        free = shutil.disk_usage(Path(where).parent).free
    except OSError:
        return None
    if free < NEARLY_FULL_BYTES:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(where))
    return None


# ----------------------------------------------------------------------------- manifests

def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (read 1 MiB at a time), as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_table(folder: str | os.PathLike) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of every file in ``folder`` but the manifest."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != MANIFEST}


def write_manifest(folder: str | os.PathLike, **extra) -> dict:
    """Write ``folder/manifest.json``: the format, ``extra`` fields and :func:`file_table`."""
    manifest = {"format": MANIFEST_FORMAT, **extra, "files": file_table(folder)}
    write_json(Path(folder) / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """``folder/manifest.json`` if it is there and well formed (a "files" table of sizes and
    sha256), None if there is none; ValueError naming the problem if it is damaged."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    ok = (manifest.get("format") == MANIFEST_FORMAT if isinstance(manifest, dict) else False) and \
        isinstance(files, dict) and all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
            for v in files.values())
    if not ok:
        raise ValueError(f"{path} is not a manifest of this version of qstar_mini (format "
                         f"{MANIFEST_FORMAT}, a size and sha256 per file)")
    return manifest


def check_files(folder: str | os.PathLike, files: dict[str, dict], *, full: bool = True) -> str | None:
    """The first file of ``files`` (a manifest's table) that ``folder`` does not hold as listed,
    in a few words ("model.safetensors differs from the manifest (sha256)"), or None when all match.

    full: compare every file's sha256 (reads every byte); False compares only the sizes (a
    ``stat`` per file: catches a truncated or half-copied file, not a flipped byte).
    """
    folder = Path(folder)
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} differs from the manifest ({size} bytes, not {expected['bytes']})"
        if full and sha256_file(path) != expected["sha256"]:
            return f"{name} differs from the manifest (sha256)"
    return None
