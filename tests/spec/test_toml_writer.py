"""llmap.spec.toml: job documents written as TOML read back the same."""

from __future__ import annotations

import math
import tomllib

import pytest

from llmap.spec.toml import dumps, value

DOC = {
    "name": "bells-1a2b",
    "input": {"path": "../shared/data/b c.csv", "key": ["district_id", "grade_level"], "where": "state = 'WY'"},
    "prompt": {"system": 'You "quote" and \\ escape.', "user": "Line: {{ a }}\nNotes:\t{{ b }}\\n\n",
               "examples": [{"input": {"a": 1, "b": 'q"'}, "output": {"k": "x", "m": None}},
                            {"input": {"a": 2, "b": "ü ☃"}, "output": {"k": "y", "m": 3.5}}]},
    "output": {"path": "out/x.csv", "fields": {"kind": {"type": "string", "enum": ["a", "b"]},
                                                "two words": {"type": "integer", "nullable": True}}},
    "model": [{"provider": "openai", "name": "gpt-4o-mini", "price_in": 0.15, "escalate_if": "m < 1"},
              {"provider": "openai", "name": "gpt-4o", "price_in": 2.5}],
    "limits": {"concurrency": 2, "hedge_tail": False},
}


def test_a_document_reads_back_the_same_without_its_nulls():
    text = dumps(DOC, comments={"input.key": "guessed", "output.fields": "fields\nmore", "prompt.user+": "below"},
                 header="a job")
    back = tomllib.loads(text)
    want = {**DOC, "prompt": {**DOC["prompt"], "examples": [
        {"input": {"a": 1, "b": 'q"'}, "output": {"k": "x"}}, DOC["prompt"]["examples"][1]]}}
    assert back == want
    assert text.startswith("# a job\n") and "# guessed" in text and "# fields\n# more\n[output.fields]" in text
    assert text.count("[[model]]") == 2 and '"two words" = ' in text


@pytest.mark.parametrize("bad", [math.nan, math.inf, object()])
def test_values_toml_cannot_hold_are_refused(bad):
    with pytest.raises(ValueError, match="cannot be written"):
        value(bad)


@pytest.mark.parametrize("s", ["a\x01b\nc", 'ends with a quote"\n', 'has """ inside\n', "\r\n"])
def test_awkward_strings_read_back(s):
    assert tomllib.loads(f"v = {value(s)}")["v"] == s
