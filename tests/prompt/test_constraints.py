"""Field constraints: spec checks, the compiled JSON Schema, validation and re-ask."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from _support import ScriptedProvider, with_providers
from llmap import Job
from llmap.errors import AnswerInvalid, SpecError
from llmap.plan import spec_from_dict
from llmap.prompt.pattern import portable_pattern
from llmap.prompt.schema import OutputSchema
from llmap.spec import FieldSpec


def _spec(fields: dict, **output) -> object:
    doc = {"input": {"path": "x.csv"}, "prompt": {"user": "{{ a }}"},
           "output": {"path": "o.parquet", "fields": fields, **output}, "model": {"provider": "openai", "name": "m"}}
    return spec_from_dict(doc, base_dir=Path("."), name="j")


@pytest.mark.parametrize(("field", "words"), [
    ({"type": "string", "minimum": 1}, "minimum applies to integer and number fields, not string"),
    ({"type": "integer", "max_length": 3}, "max_length applies to string fields, not integer"),
    ({"type": "boolean", "pattern": "x"}, "pattern applies to string fields"),
    ({"type": "integer", "minimum": 10, "maximum": 1}, "minimum 10 is greater than maximum 1"),
    ({"type": "string", "min_length": 5, "max_length": 2}, "min_length 5 is greater than max_length 2"),
    ({"type": "string", "pattern": "[a-"}, "is not a valid regular expression"),
    ({"type": "string", "pattern": "(?i)abc"}, "(?...) group, which llama.cpp's grammar cannot express"),
    ({"type": "string", "min_length": -1}, "greater than or equal to 0"),
    ({"type": "string", "enum": ["ab", "abcdef"], "max_length": 3}, "enum value 'abcdef' does not fit"),
    ({"type": "integer", "enum": [1, 900], "maximum": 500}, "enum value 900 does not fit"),
])
def test_bad_constraints_are_spec_errors(field, words):
    with pytest.raises(SpecError) as err:
        _spec({"x": field})
    assert words in str(err.value) and re.search(r"output\.fields(\.x|\] x)", str(err.value))


def test_fallback_and_examples_must_meet_the_constraints():
    fields = {"minutes": {"type": "integer", "minimum": 60, "maximum": 600}}
    with pytest.raises(SpecError, match="fallback does not match .*greater than or equal to 60"):
        _spec(fields, fallback={"minutes": 5})
    doc_fields = {"code": {"type": "string", "pattern": "[A-Z]{2}"}}
    with pytest.raises(SpecError, match="examples #1: output does not match"):
        spec_from_dict({"input": {"path": "x.csv"}, "output": {"path": "o.csv", "fields": doc_fields},
                        "prompt": {"user": "{{ a }}", "examples": [{"input": {"a": 1}, "output": {"code": "abc"}}]},
                        "model": {"provider": "openai", "name": "m"}}, base_dir=Path("."), name="j")
    _spec(fields, fallback={"minutes": 60})  # a valid one is fine


def test_compiled_schema_carries_the_constraints():
    schema = OutputSchema({
        "n": FieldSpec(type="integer", minimum=1, maximum=500),
        "ratio": FieldSpec(type="number", minimum=0, maximum=1, nullable=True),
        "code": FieldSpec(type="string", pattern=r"\d{3}", min_length=3, max_length=3),
        "kind": FieldSpec(type="string", enum=["a", "b"], nullable=True),
        "note": FieldSpec(type="string", nullable=True, description="not stated: null"),
    }).json_schema
    props = schema["properties"]
    assert props["n"] == {"type": "integer", "minimum": 1, "maximum": 500}
    assert props["code"] == {"type": "string", "minLength": 3, "maxLength": 3, "pattern": "^([0-9]{3})$"}
    # nullable without constraints: OpenAI strict mode's [T, "null"]
    assert props["note"] == {"type": ["string", "null"], "description": "not stated: null"}
    # nullable with constraints: anyOf, which llama.cpp's grammar converter keeps (a type list drops them)
    assert props["ratio"] == {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "null"}]}
    assert props["kind"] == {"anyOf": [{"type": "string", "enum": ["a", "b"]}, {"type": "null"}]}
    assert schema["required"] == ["n", "ratio", "code", "kind", "note"]


def test_validation_enforces_constraints_and_nullable():
    s = OutputSchema({"n": FieldSpec(type="integer", minimum=1, maximum=500),
                      "code": FieldSpec(type="string", pattern="[A-Z]{2}"),
                      "note": FieldSpec(type="string", nullable=True, max_length=5)})
    assert s.validate('{"n": 500, "code": "WY", "note": null}') == {"n": 500, "code": "WY", "note": None}
    for bad, words in [('{"n": 1000000000000000, "code": "WY", "note": null}', "less than or equal to 500"),
                       ('{"n": 0, "code": "WY", "note": null}', "greater than or equal to 1"),
                       ('{"n": 5, "code": "xWYx", "note": null}', "should match pattern"),
                       ('{"n": 5, "code": "WY", "note": "too long"}', "at most 5 characters"),
                       ('{"n": null, "code": "WY", "note": null}', "n:")]:
        with pytest.raises(AnswerInvalid, match=words):
            s.validate(bad)


@pytest.mark.parametrize(("pattern", "compiled", "good", "bad"), [
    ("[A-Z]{2}", "^([A-Z]{2})$", "WY", "xWY"),
    (r"^\d{3}$", "^([0-9]{3})$", "123", "12a"),
    (r"\w+@\w+\.com", "^([0-9A-Za-z_]+@[0-9A-Za-z_]+[.]com)$", "a@b.com", "a@bxcom"),
    ("a|bc", "^(a|bc)$", "bc", "abc"),
    (r"[\s,]+", "^([ \\t\\n\\r,]+)$", " , ", "x"),
])
def test_portable_pattern_is_anchored_and_spells_classes(pattern, compiled, good, bad):
    assert portable_pattern(pattern) == compiled
    assert re.search(compiled, good) and not re.search(compiled, bad)


@pytest.mark.parametrize("pattern", [r"\bword", r"(a)\1", "a+?", r"\D", "(?=x)"])
def test_portable_pattern_rejects_what_no_grammar_can_express(pattern):
    with pytest.raises(ValueError, match="llama.cpp's grammar cannot express|lazy quantifier"):
        portable_pattern(pattern)


def test_a_violation_is_re_asked_with_the_error(make_job, monkeypatch):
    answers = iter(['{"minutes": 1000000000000000}', '{"minutes": 390}'])
    p = ScriptedProvider("openai:sim", lambda n, r: next(answers))
    with_providers(monkeypatch, [p])
    job = make_job(1, fields='minutes = { type = "integer", minimum = 60, maximum = 600 }')
    res = Job.from_toml(job).run()
    assert res.counts["done"] == 1 and len(p.requests) == 2
    reask = p.requests[1].messages[-1]["content"]
    assert "less than or equal to 600" in reask and '"maximum":600' in reask
    assert p.requests[0].schema["properties"]["minutes"] == {"type": "integer", "minimum": 60, "maximum": 600}


def test_simulator_answers_satisfy_constraints(make_job, sim):
    fields = "\n".join([
        'minutes = { type = "integer", minimum = 300, maximum = 420 }',
        'share = { type = "number", minimum = 0.5, maximum = 0.75, nullable = true }',
        'code = { type = "string", pattern = "[A-Z]{2}-\\\\d{4}" }',
        'label = { type = "string", min_length = 12, max_length = 14 }',
        'kind = { type = "string", enum = ["x", "y"], nullable = true }',
    ])
    job = make_job(30, fields=fields)
    res = Job.from_toml(job).run()
    assert res.counts["done"] == 30 and res.requests == 30  # no re-asks: every answer met the constraints
    import pyarrow.parquet as pq

    for row in pq.read_table(res.output_path).to_pylist():
        assert 300 <= row["minutes"] <= 420 and 0.5 <= row["share"] <= 0.75
        assert re.fullmatch(r"[A-Z]{2}-[0-9]{4}", row["code"]) and 12 <= len(row["label"]) <= 14
        assert row["kind"] in ("x", "y")


def test_nullable_answer_is_kept_as_null(make_job, monkeypatch):
    p = ScriptedProvider("openai:sim", lambda n, r: json.dumps({"minutes": None}))
    with_providers(monkeypatch, [p])
    job = make_job(2, fields='minutes = { type = "integer", minimum = 60, nullable = true }')
    res = Job.from_toml(job).run()
    import pyarrow.parquet as pq

    assert res.counts["done"] == 2 and [r["minutes"] for r in pq.read_table(res.output_path).to_pylist()] == [None] * 2
