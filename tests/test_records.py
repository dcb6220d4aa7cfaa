"""Training lines that would silently teach the wrong thing are named, not hidden."""

import warnings

import pytest

from qstar_mini.errors import DataError
from qstar_mini.models.tiny import build_tokenizer
from qstar_mini.records import encode_records, load_records


def test_empty_lines_are_skipped_with_a_count(tmp_path):
    path = tmp_path / "lines.jsonl"
    path.write_text('{"text": "12+3=15"}\n{"text": ""}\n{"text": "   "}\n{"text": "1+1=2"}\n')
    with pytest.warns(UserWarning, match="2 of 4 lines have an empty text"):
        records = load_records(path)
    assert [r["text"] for r in records] == ["12+3=15", "1+1=2"]
    path.write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="every line has an empty text"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_records(path)


def test_characters_outside_the_vocabulary_are_named():
    tok = build_tokenizer()
    with pytest.warns(UserWarning, match=r"2 characters .* become <unk>: 'é', 'ü'"):
        encode_records(tok, [{"text": "12+3=1é5"}, {"text": "ü1+1=2"}], 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # the clean corpus: no warning at all
        encode_records(tok, [{"text": "12+3=15"}], 32)
