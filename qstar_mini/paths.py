"""Where the project's own files live, found from the package (never from the working directory).

Notebooks run with ``notebooks/`` as the working directory (nbval does that), scripts from
anywhere: every default path is computed here from the location of this file.

Two layouts:

* a checkout (``pip install -e .``, ``make``, Colab's setup cell): ``data/`` and ``runs/`` next
  to the package, in the repository;
* a plain install (``pip install .`` or ``pip install git+URL``, no checkout): the wheel carries
  the corpus and the tiny base models as ``qstar_mini/_data`` (pyproject.toml), and runs go to
  ``runs/`` in the working directory.

The checkout's ``data/`` wins whenever there is one.
"""

from pathlib import Path

# The one address of the repository (pyproject.toml's [project.urls] Repository; a test checks
# they agree, and that every notebook's setup cell and badge and README use it).
REPO_URL = "https://github.com/qstar-mini/qstar_mini"

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
INSTALLED_DATA_DIR = PACKAGE_DIR / "_data"     # the copy inside the wheel (absent in a checkout)


def in_checkout(root: Path = REPO_ROOT) -> bool:
    """Is ``root`` this project's repository (rather than site-packages)?"""
    return (root / "pyproject.toml").is_file() and (root / "qstar_mini" / "paths.py").is_file()


if in_checkout() or not INSTALLED_DATA_DIR.is_dir():
    DATA_DIR = REPO_ROOT / "data"
    RUNS_DIR = REPO_ROOT / "runs"
else:
    DATA_DIR = INSTALLED_DATA_DIR
    RUNS_DIR = Path.cwd() / "runs"
TINY_BASE = DATA_DIR / "tiny-base"            # base whose visible working is always right
TINY_BASE_NOISY = DATA_DIR / "tiny-base-noisy"  # base whose working is only partly right


def looks_local(name: str) -> bool:
    """A filesystem path rather than a Hub id ("name" or "owner/name")?"""
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        return True
    first = name.split("/")[0]
    return Path(name).exists() or ("/" in name and Path(first).is_dir())
