"""README is the front door: short, its project layout names every module and nothing else, and
no link in README or the docs pages leads nowhere.

The layout is the first code block under "## Project layout", a tree written with two spaces of
indentation per level: each line is a name (a folder ends in "/") and, after it, what it holds.
"""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_LINES = 450
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]


def layout_paths(text: str) -> list[str]:
    """The repository paths the layout tree names, in its order ("qstar_mini/fast/rescore.py")."""
    section = text.split("\n## Project layout\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\n(.*?)```", section, re.S)
    assert block, "README's Project layout has no code block"
    stack: list[str] = []
    paths = []
    for line in block[1].splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0 and indent // 2 <= len(stack), f"layout: bad indentation: {line!r}"
        del stack[indent // 2:]
        name = line.split()[0]
        parent = "".join(stack)
        assert stack == [] or parent.endswith("/"), f"layout: {line!r} sits under a file"
        paths.append(parent + name)
        stack.append(name)
    return paths


def on_disk(folder: str, pattern: str) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob(pattern)
            if p.is_file() and "__pycache__" not in p.parts}


def test_readme_is_at_most_450_lines():
    lines = README.read_text().count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines; move detail to a docs/ page (at most {MAX_LINES})"


def test_layout_names_only_what_exists():
    for path in layout_paths(README.read_text()):
        target = ROOT / path.rstrip("/")
        assert target.exists(), f"README's layout names {path}, which does not exist"
        assert target.is_dir() == path.endswith("/"), f"README's layout: {path} (a folder ends in '/')"


def test_layout_names_every_module_and_script():
    named = set(layout_paths(README.read_text()))
    missing = sorted((on_disk("qstar_mini", "*.py") | on_disk("scripts", "*")) - named)
    assert not missing, f"README's Project layout does not name: {missing}"


def test_layout_is_checked_against_the_disk(tmp_path, monkeypatch):
    """The check above sees a module that appears, and a name that disappears."""
    fake = tmp_path / "repo"
    for folder in ("qstar_mini", "scripts"):
        for path in on_disk(folder, "*.py" if folder == "qstar_mini" else "*"):
            (fake / path).parent.mkdir(parents=True, exist_ok=True)
            (fake / path).touch()
    for name in ("notebooks", "data", "docs", "configs", "tests", ".ci"):
        (fake / name).mkdir(exist_ok=True)
    for name in ("pyproject.toml", "Makefile", "environment.yml", ".ci/run",
                 "qstar_mini/evaluation/lm_eval_tasks/qstar_gsm8k_format.yaml"):
        (fake / name).touch()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    test_layout_names_only_what_exists()
    test_layout_names_every_module_and_script()
    (fake / "qstar_mini" / "fast" / "new_kernel.py").touch()
    with pytest.raises(AssertionError, match="qstar_mini/fast/new_kernel.py"):
        test_layout_names_every_module_and_script()
    (fake / "qstar_mini" / "fast" / "new_kernel.py").unlink()
    (fake / "qstar_mini" / "fast" / "rescore.py").unlink()
    with pytest.raises(AssertionError, match="qstar_mini/fast/rescore.py"):
        test_layout_names_only_what_exists()


# ---- links ---------------------------------------------------------------------------------------

def without_code(text: str) -> str:
    """Markdown outside fenced code blocks (a link-like text in code is not a link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchors(page: Path) -> set[str]:
    """GitHub's anchor for each heading of a Markdown page: lower case, punctuation dropped,
    spaces to hyphens, a repeat numbered."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", without_code(page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def relative_links(page: Path) -> list[str]:
    targets = re.findall(r"\]\(([^)\s]+)\)", without_code(page.read_text()))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]          # no http:, mailto:


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_relative_link_leads_somewhere(page):
    broken = []
    for link in relative_links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link} (no such heading in {target.name})")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_anchors_follow_githubs_rule(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# A page\n\n## Past the base's best temperature? Long runs\n\n## Notes\n\n"
                    "```\n## not a heading\n```\n\n### Notes\n\n## `--out` and resume (FSDP)\n")
    assert anchors(page) == {"a-page", "past-the-bases-best-temperature-long-runs", "notes",
                             "notes-1", "--out-and-resume-fsdp"}


# ---- names of the package --------------------------------------------------------------------------

WHEEL_ONLY = {"qstar_mini/_data"}          # made when the wheel is built (pyproject), not in a checkout


def module_file(parts: list[str]) -> Path | None:
    base = ROOT.joinpath(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def defines(source: str, name: str) -> bool:
    """A top-level or class-level def, class, assignment, field or import of ``name``."""
    return bool(re.search(rf"^\s*(?:(?:async\s+)?def|class)\s+{name}\b|^\s*{name}\s*[:=]|^\s*(?:from\s+\S+\s+)?import\s+.*\b{name}\b",
                          source, re.M))


def stale_names(text: str) -> list[str]:
    """Every ``qstar_mini.a.b`` dotted name and ``qstar_mini/a/b.py`` path in ``text`` that the
    package does not have (a URL's path is not a name)."""
    stale = []
    for name in sorted(set(re.findall(r"(?<![\w/.])qstar_mini(?:\.[A-Za-z_]\w*)+", text))):
        parts = name.split(".")
        i = next((i for i in range(len(parts), 0, -1) if module_file(parts[:i])), 0)
        if i == 0:
            stale.append(name)
        elif i < len(parts) and not defines(module_file(parts[:i]).read_text(), parts[i]):
            stale.append(name)
    for path in sorted(set(re.findall(r"(?<![\w/.-])qstar_mini/[\w/.]*\w", text))):
        if path not in WHEEL_ONLY and not (ROOT / path).exists():
            stale.append(path)
    return stale


#: The research log records what was, under the names it had then.
HISTORY = [ROOT / "docs" / "research-log.md"]


@pytest.mark.parametrize("page", [p for p in PAGES if p not in HISTORY],
                         ids=[p.relative_to(ROOT).as_posix() for p in PAGES if p not in HISTORY])
def test_every_package_name_on_a_page_exists(page):
    assert not stale_names(page.read_text()), f"{page.relative_to(ROOT)} names what does not exist"


def test_stale_names_are_found():
    assert stale_names("`qstar_mini.step.quiet_star_step`, qstar_mini/fast/rescore.py, "
                       "https://github.com/qstar-mini/qstar_mini/blob/main/x") == []
    assert stale_names("`qstar_mini.evaluate.evaluate`, `qstar_mini.step.no_such_function`, "
                       "qstar_mini/support.py") == ["qstar_mini.evaluate.evaluate",
                                                    "qstar_mini.step.no_such_function", "qstar_mini/support.py"]
