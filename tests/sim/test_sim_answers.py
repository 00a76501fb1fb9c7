"""Deterministic answers: valid against the schema, stable per request, packed per id."""

from __future__ import annotations

import json
import random

import pytest

from llmap.sim.answers import (
    completion_tokens,
    extract_ids,
    make_answer,
    message_text,
    prompt_tokens,
    request_seed,
)
from llmap.sim.schema import compile_schema, schema_key

RICH_SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "summary": {"type": "string"},
        "short": {"type": "string", "minLength": 3, "maxLength": 5},
        "count": {"type": "integer"},
        "year": {"type": "integer", "minimum": 1990, "maximum": 1995},
        "above": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 13},
        "score": {"type": "number"},
        "price": {"type": "number", "minimum": 10, "maximum": 20},
        "stars": {"type": "number", "enum": [1.5, 2.5]},
        "ok": {"type": "boolean"},
        "when": {"type": "string", "format": "date"},
        "maybe": {"type": ["string", "null"]},
        "either": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "kind": {"const": "fixed"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "pair": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
        "nested": {
            "type": "object",
            "properties": {"a": {"type": "boolean"}, "b": {"$ref": "#/$defs/point"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
    "required": [
        "label", "summary", "short", "count", "year", "above", "score", "price", "stars",
        "ok", "when", "maybe", "either", "kind", "tags", "pair", "nested",
    ],
    "additionalProperties": False,
    "$defs": {
        "point": {
            "type": "object",
            "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
            "required": ["x", "y"],
            "additionalProperties": False,
        }
    },
}  # fmt: skip

ITEM = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "label": {"type": "string", "enum": ["a", "b", "c"]},
        "score": {"type": "number"},
    },
    "required": ["id", "label", "score"],
    "additionalProperties": False,
}
PACKED_OBJECT = {
    "type": "object",
    "properties": {"results": {"type": "array", "items": ITEM}},
    "required": ["results"],
    "additionalProperties": False,
}
PACKED_ARRAY = {"type": "array", "items": ITEM}


def packed_message(ids: list[object]) -> str:
    rows = [{"id": i, "text": f"row {i} [with brackets]"} for i in ids]
    return "Label each row. Example: [1, 2] is not a row list.\nRows:\n" + json.dumps(rows)


def content_of(body: dict) -> object:
    return json.loads(make_answer(body).content)


@pytest.mark.parametrize("n", range(40))
def test_answers_validate_against_a_rich_schema(n, chat_body, check_schema):
    value = content_of(chat_body(f"request number {n}", schema=RICH_SCHEMA))
    assert check_schema(value, RICH_SCHEMA) == []
    assert list(value) == list(RICH_SCHEMA["properties"])  # schema order kept
    assert value["kind"] == "fixed"
    assert 0 <= value["score"] < 1 and round(value["score"], 2) == value["score"]


def test_the_checker_itself_rejects_wrong_values(check_schema):
    assert check_schema({"label": "other"}, RICH_SCHEMA) != []
    assert check_schema({"id": 1, "label": "a", "score": 0.5}, ITEM) != []
    assert check_schema({"id": "1", "label": "a", "score": 0.5, "x": 1}, ITEM) != []


def test_values_vary_across_requests(chat_body):
    values = [content_of(chat_body(f"text {n}", schema=RICH_SCHEMA)) for n in range(30)]
    assert len({v["label"] for v in values}) == 3
    assert len({v["score"] for v in values}) > 10
    assert {v["ok"] for v in values} == {True, False}


def test_same_request_same_answer_key_order_and_max_tokens_do_not_matter(chat_body):
    body = chat_body("same", schema=RICH_SCHEMA, temperature=0.2)
    shuffled = dict(reversed(list(json.loads(json.dumps(body)).items())))
    shuffled["max_tokens"] = 500
    assert make_answer(body).content == make_answer(shuffled).content
    assert request_seed(body) == request_seed(shuffled)


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other"},
        {"temperature": 0.9},
        {"messages": [{"role": "user", "content": "different"}]},
    ],
)
def test_seed_depends_on_model_temperature_and_messages(change, chat_body):
    body = chat_body("same", schema=RICH_SCHEMA, temperature=0.2)
    assert request_seed(body) != request_seed({**body, **change})


@pytest.mark.parametrize("schema", [PACKED_OBJECT, PACKED_ARRAY])
def test_packed_answer_has_one_item_per_id_in_order(schema, chat_body, check_schema):
    ids = ["r3", "r1", "r2", "r10"]
    value = content_of(chat_body(packed_message(ids), schema=schema))
    assert check_schema(value, schema) == []
    items = value if schema is PACKED_ARRAY else value["results"]
    assert [item["id"] for item in items] == ids


def test_packed_ids_keep_their_json_type(chat_body):
    value = content_of(chat_body(packed_message([7, 3, 5]), schema=PACKED_OBJECT))
    assert [item["id"] for item in value["results"]] == [7, 3, 5]


def test_packed_ids_come_from_the_last_user_message(chat_body):
    body = chat_body(packed_message(["x", "y"]), schema=PACKED_OBJECT)
    body["messages"] = [
        {"role": "system", "content": json.dumps([{"id": "sys"}])},
        {"role": "user", "content": json.dumps([{"id": "old"}])},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": packed_message(["x", "y"])}]},
    ]
    assert [i["id"] for i in content_of(body)["results"]] == ["x", "y"]


def test_packed_schema_without_ids_still_validates(chat_body, check_schema):
    value = content_of(chat_body("no rows here", schema=PACKED_OBJECT))
    assert check_schema(value, PACKED_OBJECT) == []


def test_drop_and_corrupt_item_rates(chat_body, check_schema):
    body = chat_body(packed_message(["a", "b", "c"]), schema=PACKED_OBJECT)
    dropped = json.loads(make_answer(body, rng=random.Random(1), drop_item_rate=1.0).content)
    assert dropped["results"] == []
    corrupt = json.loads(make_answer(body, rng=random.Random(1), corrupt_item_rate=1.0).content)
    assert [i["id"] for i in corrupt["results"]] == ["a", "b", "c"]
    assert all(check_schema(item, ITEM) != [] for item in corrupt["results"])
    # without an rng, the rates do nothing
    clean = json.loads(make_answer(body, drop_item_rate=1.0, corrupt_item_rate=1.0).content)
    assert check_schema(clean, PACKED_OBJECT) == []
    assert len(clean["results"]) == 3


def test_extract_ids_skips_brackets_that_are_not_rows():
    messages = [{"role": "user", "content": packed_message(["p", "q"])}]
    assert extract_ids(messages) == ["p", "q"]
    assert extract_ids([{"role": "user", "content": "see [1, 2] and [oops"}]) is None
    assert extract_ids([]) is None


def test_json_object_and_plain_text(chat_body):
    as_object = make_answer(chat_body("x", response_format={"type": "json_object"}))
    assert isinstance(json.loads(as_object.content), dict)
    text = make_answer(chat_body("x"))
    assert text.finish_reason == "stop" and text.content.startswith("Simulated answer")
    cut = make_answer(chat_body("x", max_tokens=2))
    assert cut.finish_reason == "length" and len(cut.content) == 8


def test_bad_schemas_raise_value_error(chat_body):
    bad_ref = {"type": "object", "properties": {"a": {"$ref": "#/$defs/nowhere"}}}
    with pytest.raises(ValueError):
        make_answer(chat_body("x", schema=bad_ref))
    with pytest.raises(ValueError):
        make_answer(chat_body("x", response_format={"type": "json_schema", "json_schema": {}}))


def test_recursive_ref_terminates(chat_body, check_schema):
    tree = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "children": {"type": "array", "items": {"$ref": "#"}},
        },
        "required": ["name", "children"],
        "additionalProperties": False,
    }
    value = content_of(chat_body("tree", schema=tree))
    assert check_schema(value, tree) == []


def test_schema_analysis_is_cached():
    key = schema_key(PACKED_OBJECT)
    compile_schema(key)
    hits = compile_schema.cache_info().hits
    plan = compile_schema(key)
    assert compile_schema.cache_info().hits == hits + 1
    assert plan.pack_key == "results"
    assert compile_schema(schema_key(PACKED_ARRAY)).pack_key == ""
    assert compile_schema(schema_key(RICH_SCHEMA)).pack_key is None


def test_token_counts():
    messages = [{"role": "system", "content": "abcd" * 10}, {"role": "user", "content": "abc"}]
    assert prompt_tokens(messages) == 11 + 8  # ceil(43 / 4) + 4 per message
    assert completion_tokens("") == 0 and completion_tokens("abcde") == 2
    assert message_text([{"type": "text", "text": "a"}, {"type": "image_url"}]) == "a"
