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
        (413, BadRequest),
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
