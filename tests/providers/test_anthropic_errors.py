"""Anthropic's error bodies mapped at the boundary (classify_status / error_for_response), with the
bodies and wording its API reference and real answers use."""

from __future__ import annotations

import pytest

from llmap.errors import (
    AuthError,
    BadRequest,
    ContextTooLong,
    Overloaded,
    QuotaExhausted,
    RateLimited,
)
from llmap.providers.base import classify_status, error_for_response


def body(type_: str, message: str) -> dict:
    return {"type": "error", "error": {"type": type_, "message": message}, "request_id": "req_011CSLsW7mFqvHHn"}


SPEND = "This request would exceed your account's monthly spend limit. Please try again later."
ITPM = ("This request would exceed your organization's rate limit of 30,000 input tokens per minute (org: 9d50ef40, "
        "model: claude-sonnet-4-6). For details, refer to: https://docs.claude.com/en/api/rate-limits. You can see "
        "the response headers for current usage. Please reduce the prompt length or the maximum tokens requested, or "
        "try again later.")


@pytest.mark.parametrize(("status", "type_", "message", "expected"), [
    (400, "invalid_request_error", "max_tokens: Field required", BadRequest),
    (400, "invalid_request_error", "prompt is too long: 210351 tokens > 200000 maximum", ContextTooLong),
    (400, "invalid_request_error", "Your credit balance is too low to access the Anthropic API. Please go to Plans "
                                   "& Billing to upgrade or purchase credits.", QuotaExhausted),
    (401, "authentication_error", "invalid x-api-key", AuthError),
    (403, "permission_error", "Your API key does not have permission to use the specified resource.", AuthError),
    (404, "not_found_error", "model: claude-nope", BadRequest),
    (413, "request_too_large", "Request exceeds the maximum allowed number of bytes.", ContextTooLong),
    (429, "rate_limit_error", ITPM, RateLimited),
    (429, "rate_limit_error", SPEND, QuotaExhausted),
    (500, "api_error", "Internal server error", Overloaded),
    (529, "overloaded_error", "Overloaded", Overloaded),
])
def test_anthropic_bodies(status, type_, message, expected):
    assert classify_status(status, body(type_, message)) is expected


def test_spend_limit_stops_the_run_with_or_without_retry_after():
    # Anthropic sends this 429 with a long retry-after; a monthly limit does not come back in minutes.
    for headers in ({}, {"retry-after": "3600"}):
        exc = error_for_response(429, body("rate_limit_error", SPEND), headers, model="anthropic:claude")
        assert isinstance(exc, QuotaExhausted) and "spend limit" in str(exc)


def test_a_rate_limit_keeps_its_retry_after():
    exc = error_for_response(429, body("rate_limit_error", ITPM), {"retry-after": "12"}, model="anthropic:claude")
    assert isinstance(exc, RateLimited) and exc.retry_after == 12.0
    assert str(exc).startswith("HTTP 429: This request would exceed your organization's rate limit")
