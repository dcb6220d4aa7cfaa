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
