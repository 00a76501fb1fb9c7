"""Rate-limit header parsing: OpenAI durations, Anthropic instants, Retry-After."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from llmap.control.headers import (
    Budget,
    parse_duration,
    parse_rate_limit_headers,
    parse_reset,
    parse_retry_after,
)

T0 = datetime(2024, 8, 1, 12, 0, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("12ms", 0.012),
        ("1m30.5s", 90.5),
        ("1h2m3s", 3723.0),
        ("0s", 0.0),
        ("17.28s", 17.28),
        ("2m59.56s", 179.56),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("250us", 0.00025),
        ("3µs", 3e-6),
        ("500ns", 5e-7),
        ("1d", 86400.0),
        ("1m", 60.0),
        ("1ms1s", 1.001),
        (" 3s ", 3.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("20", 20.0),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", "  ", "s", "ms", "1x", "-1s", "-3", "1s2", "abc", "1 s", "nan", "inf", "1s ms", "1.2.3s"],
)
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_parse_reset_accepts_rfc3339_instants():
    assert parse_reset("2024-08-01T12:00:02.5Z", wall_now=T0) == pytest.approx(2.5)
    assert parse_reset("2024-08-01T14:00:03+02:00", wall_now=T0) == pytest.approx(3.0)
    assert parse_reset("2024-08-01T12:00:01", wall_now=T0) == pytest.approx(1.0)  # naive = UTC


def test_parse_reset_instant_in_the_past_is_zero():
    assert parse_reset("2024-08-01T11:59:00Z", wall_now=T0) == 0.0


def test_parse_reset_prefers_durations():
    assert parse_reset("1m30.5s", wall_now=T0) == pytest.approx(90.5)


def test_parse_reset_rejects_garbage():
    with pytest.raises(ValueError):
        parse_reset("soon", wall_now=T0)


@pytest.mark.parametrize(
    ("text", "seconds"), [("20", 20.0), ("1.5", 1.5), (" 0 ", 0.0), ("-4", 0.0)]
)
def test_parse_retry_after_seconds(text, seconds):
    assert parse_retry_after(text, wall_now=T0) == pytest.approx(seconds)


def test_parse_retry_after_http_date():
    assert parse_retry_after("Thu, 01 Aug 2024 12:00:30 GMT", wall_now=T0) == pytest.approx(30.0)
    assert parse_retry_after("Thu, 01 Aug 2024 11:00:30 GMT", wall_now=T0) == 0.0


def test_parse_retry_after_rfc3339():
    assert parse_retry_after("2024-08-01T12:00:04Z", wall_now=T0) == pytest.approx(4.0)


@pytest.mark.parametrize("text", ["later", "", "inf"])
def test_parse_retry_after_rejects(text):
    with pytest.raises(ValueError):
        parse_retry_after(text, wall_now=T0)


def test_openai_headers():
    info = parse_rate_limit_headers(
        {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-remaining-requests": "59",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-limit-tokens": "150000",
            "x-ratelimit-remaining-tokens": "149984",
            "x-ratelimit-reset-tokens": "6m0s",
        },
        wall_now=T0,
    )
    assert info.requests == Budget(limit=60, remaining=59, reset_s=1.0)
    assert info.tokens == Budget(limit=150000, remaining=149984, reset_s=360.0)
    assert info.retry_after_s is None


def test_anthropic_headers():
    info = parse_rate_limit_headers(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": "2024-08-01T12:00:01Z",
            "anthropic-ratelimit-tokens-limit": "40000",
            "anthropic-ratelimit-tokens-remaining": "39000",
            "anthropic-ratelimit-tokens-reset": "2024-08-01T12:00:02.5Z",
            "retry-after": "3",
        },
        wall_now=T0,
    )
    assert info.requests == Budget(limit=50, remaining=49, reset_s=pytest.approx(1.0))
    assert info.tokens == Budget(limit=40000, remaining=39000, reset_s=pytest.approx(2.5))
    assert info.retry_after_s == 3.0


def test_header_names_are_case_insensitive():
    info = parse_rate_limit_headers(
        {"X-RateLimit-Limit-Requests": "10", "Retry-After": "2"}, wall_now=T0
    )
    assert info.requests.limit == 10
    assert info.retry_after_s == 2.0


def test_openai_family_wins_over_anthropic():
    info = parse_rate_limit_headers(
        {"x-ratelimit-limit-tokens": "100", "anthropic-ratelimit-tokens-limit": "999"},
        wall_now=T0,
    )
    assert info.tokens.limit == 100


def test_retry_after_ms_wins_over_retry_after():
    info = parse_rate_limit_headers({"retry-after-ms": "1500", "retry-after": "9"}, wall_now=T0)
    assert info.retry_after_s == pytest.approx(1.5)


def test_malformed_values_are_treated_as_absent():
    info = parse_rate_limit_headers(
        {
            "x-ratelimit-limit-requests": "lots",
            "x-ratelimit-remaining-requests": "-5",
            "x-ratelimit-reset-requests": "whenever",
            "x-ratelimit-limit-tokens": "nan",
            "retry-after-ms": "soon",
            "retry-after": "later",
        },
        wall_now=T0,
    )
    assert not info.requests
    assert not info.tokens
    assert info.retry_after_s is None


def test_no_headers():
    info = parse_rate_limit_headers({}, wall_now=T0)
    assert not info.requests and not info.tokens and info.retry_after_s is None


def test_wall_now_defaults_to_the_real_clock():
    info = parse_rate_limit_headers({"anthropic-ratelimit-tokens-reset": "2000-01-01T00:00:00Z"})
    assert info.tokens.reset_s == 0.0


def test_reset_instants_can_be_read_from_when_the_request_was_sent():
    headers = {"anthropic-ratelimit-requests-reset": "2024-08-01T12:00:02Z", "x-ratelimit-reset-tokens": "1s"}
    info = parse_rate_limit_headers(headers, wall_now=T0 + 1.5, reset_from=T0 + 0.5)
    assert info.requests.reset_s == pytest.approx(1.5)  # an instant: from the request's sending
    assert info.tokens.reset_s == pytest.approx(1.0)  # a duration: as the server said it
    assert parse_rate_limit_headers(headers, wall_now=T0 + 1.5).requests.reset_s == pytest.approx(0.5)
