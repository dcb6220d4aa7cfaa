"""make browser-check: the explorer notebooks (01, 02, 08) in a real JupyterLab, in a real browser.

    python scripts/browser_check.py [--keep DIR]

Starts JupyterLab (this environment's, ``make setup`` installs it) on copies of the three
notebooks in a temporary folder (the browser saves what it runs: the repository's notebooks are
never touched), opens each in Chromium through Playwright, runs all cells from the Run menu, and
for every explorer moves its first slider with the keyboard and checks that the explorer's view
(its HTML, its picture) changed: the widgets are drawn and the kernel redraws them.

Needs: ``pip install playwright`` and a Chromium; Debian's (``apt-get install chromium``) is used
at /usr/bin/chromium, or CHROMIUM=/path/to/chrome (Playwright's own browsers are not downloaded).
Exit status 0 when every explorer responded; one line per notebook on stdout.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = {                     # notebook: how many explorers it displays
    "01_algorithm_at_a_glance.ipynb": 1,
    "02_masks_and_parallel_thoughts.ipynb": 1,
    "08_thinking_at_inference.ipynb": 1,
}
RUN_TIMEOUT_S = 300
NB = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook"   # the notebook on show (other tabs stay in the page)

# What an explorer shows, without its controls: the HTML views and the pictures.
VIEW_JS = """e => [...e.querySelectorAll('.widget-html-content, .widget-output img, .jupyter-widgets-output-area img')]
    .map(x => x.tagName === 'IMG' ? x.src : x.innerHTML).join('|')"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(root: Path, port: int, token: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")                        # containers and CI often run as root
    # Settings and workspaces of its own: every cell rendered (JupyterLab 4 otherwise only draws the
    # cells in view, and their prompts could not be read), no news prompt, no restored tabs.
    settings = root / ".lab-settings"
    for plugin, values in {"notebook-extension/tracker": '{"windowingMode": "none"}',
                           "apputils-extension/notification": '{"fetchNews": "false"}'}.items():
        path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(values)
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(root / ".lab-workspaces")}
    log = open(root / "jupyterlab.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"browser-check: JupyterLab exited ({proc.returncode}); see {root / 'jupyterlab.log'}")
            time.sleep(0.5)
    proc.terminate()
    sys.exit(f"browser-check: JupyterLab did not answer on port {port} in 60 s; see {root / 'jupyterlab.log'}")


def run_all(page, name: str) -> None:
    """Run > Run All Cells, then wait until every code cell has an execution count."""
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    deadline, last, still_since = time.time() + RUN_TIMEOUT_S, None, time.time()
    while time.time() < deadline:
        prompts = page.locator(f"{NB} .jp-CodeCell .jp-InputPrompt").all_inner_texts()
        if prompts and all(p.strip() not in ("[ ]:", "[*]:", "") for p in prompts):
            return
        if prompts != last:
            last, still_since = prompts, time.time()
        elif "[*]:" not in [p.strip() for p in prompts] and time.time() - still_since > 30:
            done = sum(p.strip() not in ("[ ]:", "") for p in prompts)
            raise AssertionError(f"{name}: Run All stopped after {done} of {len(prompts)} code cells (an error?)")
        time.sleep(1)
    raise AssertionError(f"{name}: Run All did not finish in {RUN_TIMEOUT_S} s")


def accept_kernel_dialog(page) -> None:
    """JupyterLab may ask which kernel to start: take the one it proposes (the notebook's)."""
    try:
        page.locator(".jp-Dialog .jp-mod-accept").click(timeout=15_000)
    except Exception:                                            # no dialog: nothing to do
        pass


def check_notebook(page, base: str, name: str, expected: int) -> str:
    t0 = time.time()
    page.goto(f"{base}/lab/tree/{name}")
    page.wait_for_selector(f"{NB} .jp-CodeCell", timeout=60_000)
    accept_kernel_dialog(page)
    page.wait_for_selector("#jp-main-statusbar :text('Idle')", timeout=120_000)
    run_all(page, name)
    explorers = page.locator(f"{NB} .jp-OutputArea-output .widget-vbox:not(.widget-vbox .widget-vbox)")
    explorers.first.wait_for(timeout=30_000)
    found = explorers.count()
    assert found == expected, f"{name}: {found} explorers drawn, expected {expected}"
    moved = []
    for i in range(found):
        box = explorers.nth(i)
        box.scroll_into_view_if_needed()
        before = box.evaluate(VIEW_JS)
        assert before, f"{name}: explorer {i} shows no view"
        handle = box.locator(".noUi-handle, .ui-slider-handle").first
        label = box.locator(".widget-slider .widget-label").first.inner_text()
        handle.focus()
        after = before
        for key in ("ArrowRight", "ArrowLeft", "ArrowLeft"):  # at its maximum, right does nothing
            handle.press(key)
            deadline = time.time() + 20
            while time.time() < deadline and (after := box.evaluate(VIEW_JS)) == before:
                time.sleep(0.2)
            if after != before:
                break
        assert after != before, f"{name}: moving {label!r} did not change explorer {i}'s view"
        moved.append(label)
    return f"{name}: ran all, {found} explorer(s); moved {', '.join(repr(m) for m in moved)}: view changed ({time.time() - t0:.0f} s)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (notebooks as run, JupyterLab's log)")
    args = parser.parse_args()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("browser-check: no playwright; `pip install playwright` (its browsers are not needed)")
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).exists():
        sys.exit(f"browser-check: no Chromium at {chromium}; `apt-get install chromium` or set CHROMIUM")

    root = Path(args.keep or tempfile.mkdtemp(prefix="qstar-mini-browser-check-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    for name in NOTEBOOKS:
        shutil.copy(REPO_ROOT / "notebooks" / name, root / name)
    port, token = free_port(), secrets.token_hex(16)
    t0 = time.time()
    lab = start_lab(root, port, token)
    failures = 0
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--no-sandbox", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/lab?token={token}")    # the token becomes a cookie
            page.wait_for_selector(".lm-MenuBar-itemLabel", timeout=120_000)
            for name, expected in NOTEBOOKS.items():
                try:
                    print(check_notebook(page, f"http://127.0.0.1:{port}", name, expected), flush=True)
                except Exception as e:                                 # report every notebook
                    failures += 1
                    page.screenshot(path=str(root / f"{name}.png"), full_page=True)
                    print(f"{name}: FAILED: {str(e).splitlines()[0]} (screenshot {root / (name + '.png')})",
                          flush=True)
            browser.close()
    finally:
        lab.terminate()
        try:
            lab.wait(timeout=20)
        except subprocess.TimeoutExpired:
            lab.kill()
        if not args.keep and not failures:
            shutil.rmtree(root, ignore_errors=True)
    print(f"browser-check: {'passed' if not failures else f'{failures} notebook(s) FAILED'} "
          f"in {time.time() - t0:.0f} s" + (f" (kept {root})" if args.keep or failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
