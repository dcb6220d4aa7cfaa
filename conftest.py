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
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_RepositoryScheduling(), "qstar-repository-scheduling")
    sanitize = getattr(config.option, "nbval_sanitize_with", None)
    if sanitize and not Path(sanitize).is_absolute() and not Path(sanitize).exists():
        candidate = REPO_ROOT / sanitize
        if candidate.exists():
            config.option.nbval_sanitize_with = str(candidate)


# `make test` runs two pytest-xdist workers (`pytest -n 2`). Everything that writes into the
# repository's runs/ (the notebooks: 06-08 share runs/course, 06 and 09 have folders of their own) or
# watches it for changes (tests/cli/test_cli_matrix.py asserts that runs/, data/ and notebooks/ stay
# untouched) must run on one worker, in collection order: nbval also needs a notebook's cells in
# order, in one kernel. The scheduler below sends them as one unit of work and shares out the rest
# test by test. It replaces `--dist loadgroup` and the `xdist_group` mark, which pytest-xdist 3.8
# ignores on pytest 9.2 (it renames node ids, and pytest 9.2 ids cannot be renamed that way).
# Plain `pytest` (one process) does not use it.
SERIAL_UNIT = "repository"


def serial_unit(nodeid: str) -> str:
    """The unit of work a test id belongs to: SERIAL_UNIT, or the test on its own."""
    path = nodeid.split("::", 1)[0]
    return SERIAL_UNIT if path.endswith(".ipynb") or path.endswith("test_cli_matrix.py") else nodeid


class _RepositoryScheduling:
    """pytest-xdist plugin (registered only when pytest-xdist is there): the scheduler above."""

    @staticmethod
    def pytest_xdist_make_scheduler(config, log):
        from xdist.scheduler import LoadScopeScheduling

        class RepositoryScheduling(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                return serial_unit(nodeid)

        return RepositoryScheduling(config, log)
