"""README's Algorithm 1 map names every line of Algorithm 1 and only importable, documented functions."""

import importlib
import re
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
_START = README.index("## Algorithm 1 map")
SECTION = README[_START:README.index("\n## ", _START + 1)]


def test_every_line_of_algorithm_1_is_mapped():
    rows = [line for line in SECTION.splitlines() if line.startswith("| ") and "---" not in line]
    labels = {row.split("|")[1].strip().split(".")[0].split(" ")[0] for row in rows[1:]}
    expected = {"1", "3"} | {f"2{c}" for c in "abcdefghijk"}
    assert expected <= labels, sorted(expected - labels)


def test_mapped_functions_import_and_document_shapes():
    names = sorted(set(re.findall(r"`(qstar_mini\.[a-z_]+\.[A-Za-z_]+)`", SECTION)))
    assert len(names) >= 15
    for name in names:
        module, attr = name.rsplit(".", 1)
        obj = getattr(importlib.import_module(module), attr)
        doc = obj.__doc__ or ""
        assert doc.strip(), f"{name} has no docstring"
        if callable(obj) and not isinstance(obj, type):
            assert "(" in doc and ")" in doc, f"{name}'s docstring gives no shapes"
