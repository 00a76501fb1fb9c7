"""Pieces of the batched decoder that need no model: where a JSON answer ends."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp", reason="needs llmap[local]")

from llmap.providers.local.decoder import JsonEnd  # noqa: E402


def _ends_at(pieces: list[str]) -> int | None:
    scan = JsonEnd()
    for i, p in enumerate(pieces):
        if scan.feed(p.encode()):
            return i
    return None


def test_the_answer_ends_where_its_outermost_bracket_closes():
    assert _ends_at(['{"', 'kind', '": "', 'county', '", "n": ', '3', '}']) == 6
    assert _ends_at(["[", "1, ", "[2]", "]"]) == 3
    assert _ends_at(['{"a": {"b": 1}', ', "c": [1, {"d": 2}]', "}"]) == 2


def test_brackets_inside_strings_and_escaped_quotes_do_not_count():
    assert _ends_at(['{"t": "a } b ] {', '"', "}"]) == 2
    assert _ends_at(['{"t": "say \\"}\\" now"', "}"]) == 1
    assert _ends_at(['{"t": "back\\\\"', "}"]) == 1  # an escaped backslash ends the escape
    assert _ends_at(['{"t": "open']) is None
