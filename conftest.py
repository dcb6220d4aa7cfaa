"""Repository-wide pytest setup (the options themselves live in pyproject.toml).

pyproject.toml names the nbval sanitiser as ``notebooks/sanitize.cfg``, a path relative to
where pytest was started. Resolve it against the repository root so that ``pytest`` also
works when started from a subfolder (``cd tests && pytest``).
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent

# Jupyter's autosaves are never tests, wherever they are.
collect_ignore_glob = ["**/.ipynb_checkpoints/*"]


def pytest_configure(config):
    sanitize = getattr(config.option, "nbval_sanitize_with", None)
    if sanitize and not Path(sanitize).is_absolute() and not Path(sanitize).exists():
        candidate = REPO_ROOT / sanitize
        if candidate.exists():
            config.option.nbval_sanitize_with = str(candidate)
