"""The simulator's Anthropic Messages API over HTTP: checks, answers, prompt cache, limits and faults."""

from __future__ import annotations

import pytest

from llmap.sim import Simulator
from llmap.sim.messages import PromptCache, segments

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 500}},
    "required": ["label", "n"],
    "additionalProperties": False,
}
HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "sk-ant-test"}
LONG = "Classify the note. " * 300  # about 1,425 tokens: over the 1,024-token minimum


def body(text: str = "a note", *, tool: bool = True, system: str | None = None, cache: bool = False, **extra):
    b = {"model": "claude-sim", "max_tokens": 256, "messages": [{"role": "user", "content": text}]}
    if system is not None:
        block = {"type": "text", "text": system}
        if cache:
            block["cache_control"] = {"type": "ephemeral"}
        b["system"] = [block]
    if tool:
        b["tools"] = [{"name": "answer", "description": "Record the answer.", "input_schema": SCHEMA}]
        b["tool_choice"] = {"type": "tool", "name": "answer"}
    b.update(extra)
    return b


@pytest.fixture(scope="module")
def shared():
    with Simulator(require_key="sk-ant-test") as s:
        yield s


@pytest.fixture
def sim(shared):
    shared.reset_stats()
    shared.reconfigure(quota_tokens=None, overload_rate=0.0, limit_rate=0.0, rpm=None, itpm=None, otpm=None)
    return shared


@pytest.fixture
def post(http):
    """``post(sim, body, headers=HEADERS)`` -> the HTTP result of ``POST /v1/messages``."""

    def call(sim, b, headers=HEADERS):
        return http(sim.url + "/v1/messages", b, headers=headers)

    return call


def test_forced_tool_answers_with_a_tool_use_block_valid_against_its_schema(sim, check_schema, post):
    r = post(sim, body())
    assert r.status == 200, r.text
    doc = r.json()
    assert doc["type"] == "message" and doc["role"] == "assistant" and doc["stop_reason"] == "tool_use"
    (block,) = doc["content"]
    assert block["type"] == "tool_use" and block["name"] == "answer" and block["id"].startswith("toolu_")
    assert check_schema(block["input"], SCHEMA) == []
    usage = doc["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["cache_creation_input_tokens"] == 0 and usage["cache_read_input_tokens"] == 0


def test_output_config_answers_with_a_json_text_block(sim, check_schema, post):
    import json

    r = post(sim, body(tool=False, output_config={"format": {"type": "json_schema", "schema": SCHEMA}}))
    doc = r.json()
    assert r.status == 200 and doc["stop_reason"] == "end_turn"
    (block,) = doc["content"]
    assert block["type"] == "text" and check_schema(json.loads(block["text"]), SCHEMA) == []


def test_headers_and_max_tokens_are_checked_with_anthropics_bodies(sim, post):
    r = post(sim, body(), headers={"x-api-key": "sk-ant-test"})
    assert r.status == 400 and r.json() == {
        "type": "error", "error": {"type": "invalid_request_error", "message": "anthropic-version: header is required"},
        "request_id": "req_sim"}
    r = post(sim, body(), headers={"anthropic-version": "2023-06-01"})
    assert r.status == 401 and r.json()["error"] == {"type": "authentication_error",
                                                     "message": "x-api-key header is required"}
    r = post(sim, body(), headers={**HEADERS, "x-api-key": "wrong"})
    assert r.status == 401 and r.json()["error"]["message"] == "invalid x-api-key"
    b = body()
    del b["max_tokens"]
    r = post(sim, b)
    assert r.status == 400 and r.json()["error"]["message"] == "max_tokens: Field required"


def test_model_route_for_check(sim, http):
    ok = http(sim.url + "/v1/models/claude-sim", headers=HEADERS)
    assert ok.status == 200 and ok.json()["id"] == "claude-sim"
    assert http(sim.url + "/v1/models/claude-sim", headers={"anthropic-version": "2023-06-01"}).status == 401
    missing = http(sim.url + "/v1/models/missing-model-x", headers=HEADERS)
    assert missing.status == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_a_marked_prefix_is_written_once_then_read(sim, post):
    first = post(sim, body("row 1", system=LONG, cache=True)).json()["usage"]
    second = post(sim, body("row 2", system=LONG, cache=True)).json()["usage"]
    assert first["cache_creation_input_tokens"] > 1024 and first["cache_read_input_tokens"] == 0
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]
    assert second["cache_creation_input_tokens"] == 0
    assert second["input_tokens"] < 10  # only the row's own text comes after the breakpoint
    stats = sim.stats()
    assert stats["cache_reads"] == 1 and stats["tokens"]["cache_read"] == second["cache_read_input_tokens"]


def test_an_unmarked_or_short_prefix_is_not_cached(sim, post):
    for _ in range(2):
        usage = post(sim, body("row", system=LONG)).json()["usage"]  # no cache_control
        assert usage["cache_creation_input_tokens"] == usage["cache_read_input_tokens"] == 0
    for _ in range(2):
        usage = post(sim, body("row", system="short", cache=True)).json()["usage"]  # under 1,024 tokens
        assert usage["cache_creation_input_tokens"] == usage["cache_read_input_tokens"] == 0


def test_the_cache_is_per_model_and_prefix_and_expires_after_five_minutes():
    cache = PromptCache()
    cache.write("k", 0.0)
    assert cache.read("k", 299.0)  # a read starts its life again
    assert cache.read("k", 598.0)
    assert not cache.read("k", 898.1)
    assert not cache.read("other", 1.0)
    segs = segments(body("x", system=LONG, cache=True))
    assert [marked for _, _, marked in segs] == [False, True, False]  # tool, system (marked), the row


def test_limits_send_anthropic_headers_and_429_with_retry_after(sim, post):
    sim.reconfigure(rpm=2, itpm=100_000, otpm=10_000)
    r = post(sim, body())
    h = r.headers
    assert r.status == 200
    for kind in ("requests", "input-tokens", "output-tokens", "tokens"):
        assert {f"anthropic-ratelimit-{kind}-{k}" for k in ("limit", "remaining", "reset")} <= set(h)
    assert h["anthropic-ratelimit-input-tokens-limit"] == "100000"
    assert h["anthropic-ratelimit-requests-reset"].endswith("Z")  # RFC 3339
    post(sim, body())
    r = post(sim, body())
    assert r.status == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert "rate limit of 2 requests per minute" in r.json()["error"]["message"]
    assert int(r.headers["retry-after"]) >= 1


def test_injected_429s_and_529s(sim, post):
    sim.reconfigure(limit_rate=1.0)
    r = post(sim, body())
    assert r.status == 429 and r.headers["retry-after"] == "1"
    sim.reconfigure(limit_rate=0.0, overload_rate=1.0)
    r = post(sim, body())
    assert r.status == 529 and r.json()["error"] == {"type": "overloaded_error", "message": "Overloaded"}


def test_spend_limit_429_has_no_retry_after(sim, post):
    sim.reconfigure(quota_tokens=1)
    post(sim, body())
    r = post(sim, body())
    assert r.status == 429 and "retry-after" not in r.headers
    assert r.json()["error"]["message"] == ("This request would exceed your account's monthly spend limit. "
                                            "Please try again later.")


def test_cut_at_max_tokens_and_refusal(sim, post):
    r = post(sim, body(max_tokens=2)).json()
    assert r["stop_reason"] == "max_tokens" and r["content"][0]["input"] == {} and r["usage"]["output_tokens"] == 2
    r = post(sim, body("please [sim:refuse] this")).json()
    assert r["stop_reason"] == "refusal"
