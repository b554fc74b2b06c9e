"""The bad-input table (devkit/bad_input.py) and its rendering in docs/RELIABILITY.md."""

from __future__ import annotations

from pathlib import Path

from devkit import bad_input

REPO = Path(__file__).resolve().parent.parent


def test_reliability_doc_shows_the_table_the_tests_use():
    text = bad_input.DOC.read_text()
    assert bad_input.document_with_table(text) == text, (
        "docs/RELIABILITY.md is out of date: run python -m devkit.bad_input --write"
    )


def test_every_row_names_a_test_that_exists():
    ids = [r.id for r in bad_input.ROWS]
    assert len(ids) == len(set(ids))
    for r in bad_input.ROWS:
        path, name = r.test.split("::")
        assert f"def {name}(" in (REPO / path).read_text(), r.test
