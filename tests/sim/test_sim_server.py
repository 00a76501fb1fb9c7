"""The simulator over HTTP: answers, errors, faults, limits and stats."""

from __future__ import annotations

import json
import time
import urllib.error

import pytest
from aiohttp.test_utils import TestClient, TestServer

from llmap.sim import SimConfig, Simulator
from llmap.sim.server import SimServer

SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["yes", "no"]}, "score": {"type": "number"}},
    "required": ["label", "score"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def plain_sim():
    with Simulator() as sim:
        yield sim


@pytest.fixture
def sim(plain_sim):
    plain_sim.reset_stats()
    return plain_sim


def error_of(result) -> dict:
    return result.json()["error"]


def test_base_url_and_models(sim, http):
    assert sim.base_url.startswith("http://127.0.0.1:") and sim.base_url.endswith("/v1")
    assert sim.port > 0
    result = http(sim.base_url + "/models")
    assert result.status == 200
    assert result.json()["data"][0]["id"] == "sim"


def test_chat_completion_shape_and_usage(sim, post_chat, chat_body, check_schema):
    body = chat_body("classify this", schema=SCHEMA)
    result = post_chat(sim, body)
    assert result.status == 200
    data = result.json()
    assert data["object"] == "chat.completion"
    assert data["model"] == "sim" and data["id"].startswith("chatcmpl-")
    assert isinstance(data["created"], int)
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    answer = json.loads(choice["message"]["content"])
    assert check_schema(answer, SCHEMA) == []
    usage = data["usage"]
    assert usage["prompt_tokens"] == 4 + 4  # ceil(13 / 4) + 4 for one message
    assert usage["completion_tokens"] == -(-len(choice["message"]["content"]) // 4)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert "x-ratelimit-limit-requests" not in result.headers  # no limit configured
    again = post_chat(sim, body).json()
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [("bad-request-x", 400, None), ("missing-model-y", 404, "model_not_found")],
)
def test_terminal_errors_by_model_name(sim, post_chat, chat_body, model, status, code):
    result = post_chat(sim, chat_body(model=model))
    assert result.status == status
    assert error_of(result)["type"] == "invalid_request_error"
    assert error_of(result)["code"] == code


def test_context_length_and_bad_bodies(http, post_chat, chat_body):
    with Simulator(context_chars=100) as small:
        long = post_chat(small, chat_body("x" * 101))
        assert long.status == 400
        assert error_of(long)["code"] == "context_length_exceeded"
        assert post_chat(small, chat_body("x" * 100)).status == 200
        assert post_chat(small, None, raw=b"{not json").status == 400
        assert post_chat(small, {"model": "sim"}).status == 400
        assert post_chat(small, chat_body(stream=True)).status == 400
        schema_bad = chat_body(response_format={"type": "json_schema", "json_schema": {}})
        assert post_chat(small, schema_bad).status == 400
        assert small.stats()["by_status"] == {"200": 1, "400": 5}


def test_require_key(post_chat, chat_body, http):
    with Simulator(require_key="sk-right") as sim:
        wrong = post_chat(sim, chat_body(), headers={"Authorization": "Bearer sk-wrong"})
        assert wrong.status == 401
        assert error_of(wrong) == {
            "message": "Incorrect API key provided.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
        assert post_chat(sim, chat_body()).status == 401
        assert http(sim.base_url + "/models").status == 401
        right = post_chat(sim, chat_body(), headers={"Authorization": "Bearer sk-right"})
        assert right.status == 200


def test_rpm_429_with_openai_headers(post_chat, chat_body):
    with Simulator(rpm=1) as sim:
        first = post_chat(sim, chat_body())
        assert first.status == 200
        assert first.headers["x-ratelimit-limit-requests"] == "1"
        assert first.headers["x-ratelimit-remaining-requests"] == "0"
        second = post_chat(sim, chat_body())
        assert second.status == 429
        assert error_of(second)["code"] == "rate_limit_exceeded"
        assert error_of(second)["type"] == "requests"
        retry = float(second.headers["retry-after"])
        assert 59 < retry <= 60
        assert int(second.headers["retry-after-ms"]) == pytest.approx(retry * 1000, abs=1)
        assert second.headers["x-ratelimit-reset-requests"].endswith("s")
        stats = sim.stats()
        assert stats["by_status"] == {"200": 1, "429": 1}
        assert len(stats["rate_limited_at"]) == 1 and 0 <= stats["rate_limited_at"][0] < 5  # after the first


def test_tpm_429(post_chat, chat_body):
    with Simulator(tpm=100) as sim:
        assert post_chat(sim, chat_body(max_tokens=50)).status == 200
        refused = post_chat(sim, chat_body(max_tokens=50))
        assert refused.status == 429
        assert error_of(refused)["type"] == "tokens"
        assert refused.headers["x-ratelimit-limit-tokens"] == "100"
        too_large = post_chat(sim, chat_body(max_tokens=500))
        assert "Request too large" in error_of(too_large)["message"]


def test_anthropic_header_style(post_chat, chat_body):
    with Simulator(rpm=1, tpm=1000, header_style="anthropic") as sim:
        ok = post_chat(sim, chat_body())
        assert ok.headers["anthropic-ratelimit-requests-limit"] == "1"
        assert ok.headers["anthropic-ratelimit-tokens-limit"] == "1000"
        assert ok.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
        refused = post_chat(sim, chat_body())
        assert refused.status == 429
        assert refused.headers["retry-after"] == "60"
        assert not any(k.startswith("x-ratelimit") for k in refused.headers)


def test_outage_gives_503(post_chat, chat_body):
    with Simulator(outage=(0, 600)) as sim:
        result = post_chat(sim, chat_body())
        assert result.status == 503
        assert error_of(result)["type"] == "server_error"


async def test_outage_window_follows_the_clock(chat_body):
    clock = [0.0]
    server = SimServer(SimConfig(outage=(5, 10)), clock=lambda: clock[0])
    async with TestClient(TestServer(server.make_app())) as client:
        statuses = []
        for now in (1, 5, 9.9, 10):
            clock[0] = now
            response = await client.post("/v1/chat/completions", json=chat_body())
            statuses.append(response.status)
        assert statuses == [200, 503, 503, 200]
        stats = await (await client.get("/stats")).json()
        assert stats["admitted_per_second"] == [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1]


def test_fail_rate_one_gives_5xx(post_chat, chat_body):
    with Simulator(fail_rate=1.0, seed=3) as sim:
        statuses = {post_chat(sim, chat_body()).status for _ in range(12)}
        assert statuses == {500, 503}


def test_faults_are_random_per_request_not_per_body(post_chat, chat_body):
    with Simulator(fail_rate=0.5, seed=1) as sim:
        statuses = {post_chat(sim, chat_body("same body")).status for _ in range(30)}
        assert 200 in statuses and statuses & {500, 503}


def test_malformed_rate_one_gives_unparsable_200(post_chat, chat_body):
    with Simulator(malformed_rate=1.0) as sim:
        result = post_chat(sim, chat_body())
        assert result.status == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(result.text)
        assert sim.stats()["malformed"] == 1


def test_hang_is_never_answered(post_chat, chat_body):
    sim = Simulator(hang_rate=1.0).start()
    try:
        with pytest.raises((TimeoutError, urllib.error.URLError)):
            post_chat(sim, chat_body(), timeout=0.3)
        stats = sim.stats()
        assert stats["hung"] == 1 and stats["by_status"] == {}
    finally:
        started = time.monotonic()
        sim.stop()
    assert time.monotonic() - started < 3


def test_latency_is_awaited_through_the_injected_sleep(post_chat, chat_body, fake_time):
    with Simulator(latency_median=30.0, per_token_ms=1000.0, clock=fake_time.clock, sleep=fake_time.sleep) as sim:
        answer = post_chat(sim, chat_body(max_tokens=5))  # answered now, not in 30 s: the fake sleep moves the clock
        assert answer.status == 200
    completion = answer.json()["usage"]["completion_tokens"]
    assert fake_time.sleeps == [30.0 + completion] and fake_time.now == 30.0 + completion


def test_rate_limits_follow_the_injected_clock(post_chat, chat_body, fake_time):
    with Simulator(rpm=1, clock=fake_time.clock, sleep=fake_time.sleep) as sim:
        assert post_chat(sim, chat_body()).status == 200
        refused = post_chat(sim, chat_body())
        assert refused.status == 429 and refused.headers["retry-after"] == "60"  # exactly: no time passed
        fake_time.advance(59.9)
        assert post_chat(sim, chat_body()).status == 429
        fake_time.advance(0.1)  # one request refilled at 1 rpm
        assert post_chat(sim, chat_body()).status == 200
        assert sim.stats()["by_status"] == {"200": 2, "429": 2}


def test_quota_exhaustion(post_chat, chat_body):
    with Simulator(quota_tokens=10) as sim:
        assert post_chat(sim, chat_body("a long enough prompt to use the quota")).status == 200
        result = post_chat(sim, chat_body())
        assert result.status == 429
        assert error_of(result)["code"] == "insufficient_quota"
        assert "retry-after" not in result.headers
        sim.reset_stats()
        assert post_chat(sim, chat_body()).status == 200


def test_drop_items_over_http(post_chat, chat_body):
    item = {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "v": {"type": "boolean"}},
        "required": ["id", "v"],
        "additionalProperties": False,
    }
    schema = {"type": "array", "items": item}
    rows = json.dumps([{"id": 1}, {"id": 2}])
    with Simulator(drop_item_rate=1.0) as sim:
        data = post_chat(sim, chat_body(rows, schema=schema)).json()
        assert json.loads(data["choices"][0]["message"]["content"]) == []


def test_stats_counts_and_reset(sim, http, post_chat, chat_body):
    post_chat(sim, chat_body(schema=SCHEMA))
    post_chat(sim, chat_body(model="other"))
    post_chat(sim, chat_body(model="missing-model"))
    stats = sim.stats()
    assert stats["requests"] == 3
    assert stats["by_status"] == {"200": 2, "404": 1}
    assert stats["by_model"] == {"sim": 1, "other": 1, "missing-model": 1}
    # "hello": ceil(5 / 4) + 4 = 6 prompt tokens per 200 answer
    assert stats["tokens"]["prompt"] == 2 * 6 and stats["tokens"]["completion"] > 0
    assert sum(stats["admitted_per_second"]) == 2
    assert stats["hung"] == 0 and stats["malformed"] == 0
    assert abs(stats["started_at"] - time.time()) < 60
    assert http(sim.url + "/stats").json() == stats
    reset = http(sim.url + "/stats/reset", {})
    assert reset.status == 200
    assert sim.stats()["requests"] == 0 and sim.stats()["by_status"] == {}


def test_reconfigure_while_serving(post_chat, chat_body, http):
    with Simulator(fail_rate=1.0) as sim:
        assert post_chat(sim, chat_body()).status >= 500
        sim.reconfigure(fail_rate=0.0, rpm=1)
        assert post_chat(sim, chat_body()).status == 200
        assert post_chat(sim, chat_body()).status == 429
        assert http(sim.url + "/config", {"rpm": None}).json()["rpm"] is None
        assert post_chat(sim, chat_body()).status == 200
        assert http(sim.url + "/config", {"fail_rate": 7}).status == 400
        assert http(sim.url + "/config", {"nope": 1}).status == 400
        with pytest.raises(ValueError):
            sim.reconfigure(hang_rate=3)
