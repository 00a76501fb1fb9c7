"""The simulator's structured-output dialects, reasoning-model parameters and constrained strings."""

from __future__ import annotations

import json
import re

import pytest

from llmap.providers.base import error_for_response
from llmap.sim import Simulator
from llmap.sim.answers import make_answer, prompt_schema
from llmap.sim.regex import pattern_gen

SCHEMA = {"type": "object", "properties": {"kind": {"type": "string", "enum": ["city", "county"]},
                                           "n": {"type": "integer", "minimum": 60, "maximum": 600}},
          "required": ["kind", "n"], "additionalProperties": False}


def test_json_object_with_a_schema_and_a_schema_in_the_prompt_answer_like_json_schema(chat_body, check_schema):
    strict = make_answer(chat_body("Laramie", schema=SCHEMA)).content
    as_object = make_answer(chat_body("Laramie", response_format={"type": "json_object", "schema": SCHEMA})).content
    body = chat_body("Laramie")
    body["messages"].insert(0, {"role": "system", "content": "Sort. Reply with only a JSON object that matches "
                                                             "this JSON Schema: " + json.dumps(SCHEMA)})
    prompted = make_answer(body).content
    assert strict == as_object == prompted and check_schema(json.loads(strict), SCHEMA) == []
    assert prompt_schema([{"role": "user", "content": "JSON Schema: not json"}]) is None


@pytest.mark.parametrize("style", ["openai", "llama-cpp-python"])
def test_a_refused_response_format_is_answered_like_the_real_server(chat_body, post_chat, style):
    with Simulator(response_formats="json_object", format_error=style) as sim:
        refused = post_chat(sim, chat_body("x", schema=SCHEMA))
        ok = post_chat(sim, chat_body("x", response_format={"type": "json_object", "schema": SCHEMA}))
        assert ok.status == 200
    err = error_for_response(refused.status, refused.json())
    if style == "openai":
        assert refused.status == 400 and refused.json()["error"]["param"] == "response_format"
        assert type(err).__name__ == "BadRequest"
    else:  # python -m llama_cpp.server 0.3.36: a 500 whose body is pydantic's validation error
        assert refused.status == 500 and refused.json()["error"]["type"] == "internal_server_error"
        assert type(err).__name__ == "BadRequest"
        assert str(err) == ("HTTP 500: 1 validation error: body.response_format.type: Input should be 'text' or "
                            "'json_object' (got 'json_schema')")


def test_a_server_that_takes_no_response_format(chat_body, post_chat):
    with Simulator(response_formats="") as sim:
        assert post_chat(sim, chat_body("x", response_format={"type": "json_object"})).status == 400
        assert post_chat(sim, chat_body("x")).status == 200


@pytest.mark.parametrize("model", ["o1-mini", "o3", "gpt-5-nano"])
def test_reasoning_models_refuse_max_tokens_and_temperature(chat_body, post_chat, model):
    with Simulator() as sim:
        r = post_chat(sim, chat_body("x", model=model, max_tokens=10, temperature=0))
        assert r.status == 400 and r.json()["error"]["param"] == "max_tokens"
        assert r.json()["error"]["code"] == "unsupported_parameter"
        r = post_chat(sim, chat_body("x", model=model, max_completion_tokens=10, temperature=0))
        assert r.status == 400 and r.json()["error"]["code"] == "unsupported_value"
        assert "does not support 0 with this model" in r.json()["error"]["message"]
        assert post_chat(sim, chat_body("x", model=model, max_completion_tokens=10)).status == 200
        assert post_chat(sim, chat_body("x", model="gpt-4o-mini", max_tokens=10, temperature=0)).status == 200


@pytest.mark.parametrize("pattern", ["^([A-Z]{2}-[0-9]{4})$", "^(a|bc|d+)$", "^([^ ]+@[a-z]+[.]com)$", "x?y*z"])
def test_pattern_strings_match(pattern):
    gen = pattern_gen(pattern, 0, None)
    assert gen is not None
    values = {gen(h) for h in range(50)}
    assert all(re.search(pattern, v) for v in values) and len(values) > 1
    assert gen(7) == gen(7)  # deterministic


def test_pattern_with_length_bounds_or_impossible():
    gen = pattern_gen("^([a-z]+)$", 5, 6)
    assert all(5 <= len(gen(h)) <= 6 for h in range(30))
    assert pattern_gen("^(ab)$", 5, None) is None  # no string of that length matches: the caller falls back
