"""Where the project's own files live, found from the package (never from the working directory).

Notebooks run with ``notebooks/`` as the working directory (nbval does that), scripts from
anywhere: every default path is computed here from the location of this file.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
TINY_BASE = DATA_DIR / "tiny-base"            # base whose visible working is always right
TINY_BASE_NOISY = DATA_DIR / "tiny-base-noisy"  # base whose working is only partly right
RUNS_DIR = REPO_ROOT / "runs"


def looks_local(name: str) -> bool:
    """A filesystem path rather than a Hub id ("name" or "owner/name")?"""
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        return True
    first = name.split("/")[0]
    return Path(name).exists() or ("/" in name and Path(first).is_dir())
