"""Files a run writes: folders replaced atomically, JSON and JSON-lines records.

Nothing here knows about models or Quiet-STaR; ``checkpoint`` (a trained run) and ``models``
(a pretrained base) both save through :func:`write_dir_atomic`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def write_dir_atomic(out_dir: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_dir)``, then put tmp_dir at ``out_dir`` (replacing an old one).

    The old folder is moved aside first and deleted only once the new one is in place, so at
    every moment ``out_dir`` is either the complete old folder or the complete new one.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    try:
        write(tmp)
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
