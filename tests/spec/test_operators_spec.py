"""The job's kind and the operators' tables: defaults, and one-line errors for what does not fit."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmap.errors import SpecError
from llmap.spec import parse_spec


def _doc(kind: str | None = "cluster", **extra) -> dict:
    doc = {"input": {"path": "x.csv"}, "prompt": {"system": "s", "user": "{{ t }}"}, "output": {"path": "o.csv"},
           "model": {"provider": "openai", "name": "m", "base_url": "http://x/v1"}}
    if kind is not None:
        doc["kind"] = kind
    for k, v in extra.items():
        doc[k] = v
    return doc


def _parse(doc):
    return parse_spec(doc, base_dir=Path("."), name="j", source="job.toml")


def test_map_is_the_default_and_keeps_its_fingerprint():
    fields = {"fields": {"k": {"type": "string"}}}
    m = _parse(_doc(None, output={"path": "o.csv", **fields}))
    assert m.kind == "map" and m.result_fields() == {"k": "string"}
    explicit = _parse(_doc("map", output={"path": "o.csv", **fields}))
    assert explicit.request_fingerprint() == m.request_fingerprint()  # map ledgers keep their hashes
    f = _parse(_doc("filter", output={"path": "o.csv", "fields": {"k": {"type": "boolean"}}}))
    assert f.request_fingerprint() != explicit.request_fingerprint()


def test_a_cluster_needs_no_fields_and_every_option_has_a_default():
    s = _parse(_doc())
    assert s.result_fields() == {"_family": "string"}
    assert s.cluster.min_size == 3 and s.cluster.pack == 20 and s.embeddings.provider == "local"
    assert _parse(_doc("resolve")).result_fields() == {"_entity": "string"}
    other = _parse(_doc(cluster={"min_size": 5}))
    assert other.request_fingerprint() != s.request_fingerprint()  # options are part of what makes a row stale


@pytest.mark.parametrize("doc, message", [
    (_doc(None), r"job.toml: \[output\] fields is required; add it"),
    (_doc("reduce"), r"\[output\] fields is required \(kind = 'reduce' answers with them\)"),
    (_doc("sort"), "kind"),
    (_doc(reduce={"by": ["a"]}), r"\[reduce\] is set but kind = 'cluster'; set kind = \"reduce\""),
    (_doc("resolve", resolve={"threshold": 2}), "cosine similarity from -1 to 1"),
    (_doc("resolve", resolve={"nope": 1}), r"unknown key 'nope' in \[resolve\]"),
    (_doc(embeddings={"provider": "openai"}), "needs name"),
    (_doc(embeddings={"name": "bge"}), "runs all-MiniLM-L6-v2 only"),
    (_doc("reduce", output={"path": "o.csv", "keep": ["a"], "fields": {"x": {"type": "string"}}}),
     "name the group's columns in \\[reduce\\] by"),
    (_doc(prompt={"user": "{{ t }}", "examples": [{"input": {"t": 1}, "output": {}}]}), "examples"),
])
def test_bad_operator_specs_are_one_line_errors(doc, message):
    with pytest.raises(SpecError, match=message):
        _parse(doc)
