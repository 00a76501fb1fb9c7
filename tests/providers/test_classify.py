"""classify_status / error_for_response: HTTP status + error body -> llmap.errors class."""

from __future__ import annotations

import pytest

from llmap.errors import (
    AuthError,
    BadRequest,
    ContextTooLong,
    FatalProviderError,
    MalformedResponse,
    Overloaded,
    QuotaExhausted,
    RateLimited,
    RequestTimeout,
)
from llmap.providers.base import classify_status, error_for_response


def openai_body(code=None, message="", type_=None):
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, MalformedResponse),
        (301, FatalProviderError),
        (400, BadRequest),
        (401, AuthError),
        (402, QuotaExhausted),
        (403, AuthError),
        (404, BadRequest),
        (405, BadRequest),
        (408, RequestTimeout),
        (409, Overloaded),
        (413, ContextTooLong),  # Anthropic request_too_large: the request's own size
        (422, BadRequest),
        (429, RateLimited),
        (500, Overloaded),
        (502, Overloaded),
        (503, Overloaded),
        (504, Overloaded),
        (529, Overloaded),
        (600, FatalProviderError),
    ],
)
def test_status_alone(status, expected):
    assert classify_status(status, None) is expected


def test_openai_context_length_code():
    body = openai_body("context_length_exceeded", "This model's maximum context length is 8192")
    assert classify_status(400, body) is ContextTooLong


@pytest.mark.parametrize(
    "message",
    [
        "This model's maximum context length is 4096 tokens. However, you requested 5000",
        "the request exceeds the available context size, try increasing it",
        "prompt is too long: 210000 tokens > 200000 maximum",
    ],
)
def test_context_length_by_message(message):
    assert (
        classify_status(400, openai_body(None, message, "invalid_request_error")) is ContextTooLong
    )


def test_anthropic_prompt_too_long():
    body = {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "prompt is too long"},
    }
    assert classify_status(400, body) is ContextTooLong


def test_insufficient_quota_is_fatal_not_a_rate_limit():
    body = openai_body(
        "insufficient_quota", "You exceeded your current quota", "insufficient_quota"
    )
    assert classify_status(429, body) is QuotaExhausted


def test_plain_429_body_is_a_rate_limit():
    body = openai_body("rate_limit_exceeded", "Rate limit reached: too many tokens per min")
    assert classify_status(429, body) is RateLimited


def test_context_wording_on_5xx_stays_transient():
    assert classify_status(500, openai_body(None, "context length")) is Overloaded


@pytest.mark.parametrize(
    "body",
    [
        {"error": "maximum context length exceeded"},
        {"detail": "maximum context length exceeded"},
        {"error": {"detail": "maximum context length exceeded"}},
    ],
)
def test_loose_bodies(body):
    assert classify_status(400, body) is ContextTooLong


@pytest.mark.parametrize("body", [None, {}, {"error": None}, {"error": 3}, ["x"], "text"])
def test_odd_bodies_fall_back_to_the_status(body):
    assert classify_status(400, body) is BadRequest


def test_error_for_response_rate_limited_carries_retry_after():
    error = error_for_response(
        429,
        openai_body("rate_limit_exceeded", "slow down"),
        {"Retry-After": "2", "retry-after-ms": "1500"},
        model="m",
        row_key="r1",
        attempt=3,
    )
    assert isinstance(error, RateLimited)
    assert error.retry_after == pytest.approx(1.5)
    assert (error.model, error.row_key, error.attempt, error.status) == ("m", "r1", 3, 429)
    assert str(error) == "HTTP 429: slow down"


def test_error_for_response_rate_limited_without_headers():
    error = error_for_response(429)
    assert isinstance(error, RateLimited)
    assert error.retry_after is None
    assert str(error) == "HTTP 429"


def test_error_for_response_other_classes_and_message():
    error = error_for_response(401, {"error": {"message": "bad key"}}, message="auth failed")
    assert isinstance(error, AuthError)
    assert str(error) == "auth failed"
    assert error.status == 401


# -- request-validation errors: a 500 that is really a bad request ----------------------------------

LLAMA_CPP_VALIDATION = {"error": {
    "message": "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), 'msg': "
               "\"Input should be 'text' or 'json_object'\", 'input': 'json_schema', 'ctx': {'expected': \"'text' or "
               "'json_object'\"}}\n\n  File \"/srv/venv/lib/python3.11/site-packages/llama_cpp/server/app.py\", "
               "line 376, in create_chat_completion\n    POST /v1/chat/completions",
    "type": "internal_server_error", "param": None, "code": None}}


@pytest.mark.parametrize("body", [
    LLAMA_CPP_VALIDATION,
    {"error": {"message": "2 validation errors: messages Field required; temperature Input should be a valid number",
               "type": "internal_server_error"}},
    {"error": {"message": "1 validation error: extra_forbidden: Extra inputs are not permitted"}},
    {"detail": [{"loc": ["body", "messages"], "msg": "Field required", "type": "missing"}]},
])
def test_a_500_request_validation_error_is_a_bad_request(body):
    assert classify_status(500, body) is BadRequest


def test_other_500s_stay_transient():
    sorry = openai_body(None, "The server had an error while processing your request.")
    assert classify_status(500, sorry) is Overloaded
    assert classify_status(503, LLAMA_CPP_VALIDATION) is Overloaded  # only a 500 is read this way


def test_server_messages_become_one_short_line():
    err = error_for_response(500, LLAMA_CPP_VALIDATION)
    assert str(err) == ("HTTP 500: 1 validation error: body.response_format.type: Input should be 'text' or "
                        "'json_object' (got 'json_schema')")
    fastapi = error_for_response(422, {"detail": [{"loc": ["body", "messages"], "msg": "Field required"}]})
    assert str(fastapi) == "HTTP 422: 1 validation error: body.messages: Field required"
    long = error_for_response(400, openai_body(None, "x " * 400 + "\n  more"))
    assert "\n" not in str(long) and len(str(long)) <= 310
