"""Rate-limit buckets, moved by a fake clock, and their headers."""

from __future__ import annotations

import pytest

from llmap.sim.limits import (
    MessagesLimiter,
    RateLimiter,
    TokenBucket,
    format_duration,
    format_rfc3339,
    ratelimit_headers,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_bucket_starts_full_and_refills_continuously():
    clock = FakeClock()
    bucket = TokenBucket(60, 1.0, clock)
    assert bucket.level() == 60
    bucket.take(60)
    assert bucket.level() == 0
    assert bucket.wait_for(1) == pytest.approx(1.0)
    clock.advance(0.5)
    assert bucket.level() == pytest.approx(0.5)
    assert bucket.wait_for(1) == pytest.approx(0.5)
    clock.advance(1000)
    assert bucket.level() == 60  # capped at capacity
    assert bucket.time_to_full() == 0


def test_bucket_rejects_bad_sizes():
    with pytest.raises(ValueError):
        TokenBucket(0, 1)


def test_rpm_limit_refuses_then_admits_after_retry_after():
    clock = FakeClock()
    limiter = RateLimiter(rpm=2, clock=clock)
    assert limiter.admit(10).allowed
    assert limiter.admit(10).allowed
    refused = limiter.admit(10)
    assert not refused.allowed
    assert refused.limited_by == "requests"
    assert refused.retry_after == pytest.approx(30.0)  # 1 request at 2/60 per second
    assert refused.requests.remaining == 0
    clock.advance(29.9)
    assert not limiter.admit(10).allowed
    clock.advance(0.1)
    assert limiter.admit(10).allowed


def test_tpm_limit_charges_tokens_and_refusal_charges_nothing():
    clock = FakeClock()
    limiter = RateLimiter(rpm=100, tpm=600, clock=clock)
    assert limiter.admit(500).allowed
    refused = limiter.admit(200)
    assert (refused.allowed, refused.limited_by) == (False, "tokens")
    assert refused.retry_after == pytest.approx(10.0)  # 100 missing at 10 tokens/s
    assert refused.requests.remaining == 99  # the refused request was not charged
    assert limiter.admit(100).allowed


def test_request_larger_than_tpm_is_too_large():
    limiter = RateLimiter(tpm=100, clock=FakeClock())
    refused = limiter.admit(101)
    assert (refused.allowed, refused.too_large, refused.limited_by) == (False, True, "tokens")


def test_reset_refills():
    limiter = RateLimiter(rpm=1, clock=FakeClock())
    assert limiter.admit(1).allowed
    assert not limiter.admit(1).allowed
    limiter.reset()
    assert limiter.admit(1).allowed


def test_unlimited_limiter_is_inactive_and_admits():
    limiter = RateLimiter()
    assert not limiter.active
    assert limiter.admit(10**9).allowed


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.012, "12ms"),
        (0.9994, "999ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (17.28, "17.28s"),
        (59.999, "59.999s"),
        (360, "6m0s"),
        (90.5, "1m30.5s"),
        (3723, "1h2m3s"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_rfc3339_rounds_up_to_whole_seconds():
    assert format_rfc3339(0) == "1970-01-01T00:00:00Z"
    assert format_rfc3339(1714564800.2) == "2024-05-01T12:00:01Z"


def test_openai_headers_on_refusal():
    clock = FakeClock()
    limiter = RateLimiter(rpm=1, tpm=1000, clock=clock)
    limiter.admit(100)
    headers = ratelimit_headers(limiter.admit(100), "openai")
    assert headers["x-ratelimit-limit-requests"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "1m0s"
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert headers["x-ratelimit-remaining-tokens"] == "900"
    assert headers["x-ratelimit-reset-tokens"] == "6s"
    assert headers["retry-after"] == "60"
    assert headers["retry-after-ms"] == "60000"


def test_openai_headers_when_admitted_have_no_retry_after():
    headers = ratelimit_headers(RateLimiter(rpm=10, clock=FakeClock()).admit(1), "openai")
    assert headers == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "6s",
    }


def test_anthropic_headers():
    clock = FakeClock()
    limiter = RateLimiter(rpm=2, tpm=600, clock=clock)
    limiter.admit(300)
    limiter.admit(100)
    headers = ratelimit_headers(limiter.admit(1), "anthropic", wall_now=1714564800.0)
    assert headers["anthropic-ratelimit-requests-limit"] == "2"
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert headers["anthropic-ratelimit-requests-reset"] == "2024-05-01T12:01:00Z"
    assert headers["anthropic-ratelimit-tokens-limit"] == "600"
    assert headers["anthropic-ratelimit-tokens-remaining"] == "200"
    assert headers["anthropic-ratelimit-tokens-reset"] == "2024-05-01T12:00:40Z"
    assert headers["retry-after"] == "30"
    assert not any(k.startswith("x-ratelimit") for k in headers)


# -- burst_s: a per-minute limit enforced over one second ------------------------------------------
def test_a_one_second_bucket_holds_a_seconds_worth_while_headers_state_the_minute():
    clock = FakeClock()
    limiter = RateLimiter(rpm=3000, clock=clock, burst_s=1.0)
    admitted = [limiter.admit(0) for _ in range(51)]
    assert [a.allowed for a in admitted].count(True) == 50
    assert admitted[-1].retry_after == pytest.approx(0.02)
    headers = ratelimit_headers(admitted[0], "openai")
    assert headers["x-ratelimit-limit-requests"] == "3000"
    assert headers["x-ratelimit-remaining-requests"] == "49"
    assert headers["x-ratelimit-reset-requests"] == "20ms"  # full again in one request's refill
    clock.advance(10.0)
    assert limiter.requests.level() == 50  # idle: still one second's worth


def test_a_one_second_bucket_of_a_low_limit_still_holds_one_request():
    limiter = RateLimiter(rpm=30, clock=FakeClock(), burst_s=1.0)
    assert limiter.admit(0).allowed
    assert not limiter.admit(0).allowed


def test_messages_limiter_counts_output_as_produced_and_rounds_token_figures():
    """Anthropic's reference: OTPM counts the output tokens generated, max_tokens does not count, and
    token ``remaining`` figures are rounded to the nearest thousand."""
    clock = FakeClock()
    limiter = MessagesLimiter(rpm=3000, itpm=1_000_000, otpm=60_000, clock=clock, burst_s=1.0)
    first = limiter.admit(1200)
    assert first.allowed
    assert first.output_tokens.remaining == 1000  # nothing reserved for max_tokens
    limiter.settle(700)  # the answer had 700 output tokens
    second = limiter.admit(100)
    assert second.output_tokens.remaining == 300
    headers = MessagesLimiter.headers(second, wall_now=1714564800.0)
    assert headers["anthropic-ratelimit-requests-limit"] == "3000"
    assert headers["anthropic-ratelimit-requests-remaining"] == "48"
    assert headers["anthropic-ratelimit-input-tokens-limit"] == "1000000"
    assert headers["anthropic-ratelimit-input-tokens-remaining"] == "15000"  # 16,666 - 1,300 = 15,366
    assert headers["anthropic-ratelimit-output-tokens-remaining"] == "0"  # 300
    assert headers["anthropic-ratelimit-tokens-remaining"] == "16000"  # 15,366 + 300 = 15,666
    limiter.settle(400)  # the bucket is empty: no request is admitted until it refills
    refused = limiter.admit(10)
    assert not refused.allowed and refused.limited_by == "output tokens"
