"""RateLimiter: RPM + TPM buckets, settle, Retry-After pauses, header sync."""

from __future__ import annotations

import pytest

from llmap.control.limits import RateLimiter


def test_unlimited_admits_everything():
    limiter = RateLimiter(now=0.0)
    assert not limiter.limited
    for _ in range(1000):
        assert limiter.reserve(10_000, 0.0) == 0.0


def test_first_request_is_never_delayed_even_under_a_low_rpm():
    limiter = RateLimiter(rpm=30, now=0.0)  # 0.5 requests per second
    assert limiter.reserve(0, 0.0) == 0.0
    assert limiter.reserve(0, 0.0) == pytest.approx(2.0)


def test_rpm_paces_requests_at_the_exact_interval():
    limiter = RateLimiter(rpm=60, now=0.0)
    assert limiter.reserve(0, 0.0) == 0.0
    assert limiter.reserve(0, 0.0) == pytest.approx(1.0)
    assert limiter.reserve(0, 0.4) == pytest.approx(0.6)
    assert limiter.reserve(0, 1.0) == 0.0
    assert limiter.reserve(0, 1.0) == pytest.approx(1.0)


def test_tpm_has_no_first_second_burst():
    limiter = RateLimiter(tpm=6000, now=0.0)  # 100 tokens per second, starts with 100
    assert limiter.reserve(100, 0.0) == 0.0
    assert limiter.reserve(1000, 0.0) == pytest.approx(10.0)


def test_refused_reservation_takes_nothing():
    limiter = RateLimiter(tpm=6000, now=0.0)
    assert limiter.reserve(1000, 0.0) == pytest.approx(9.0)
    assert limiter.reserve(1000, 0.0) == pytest.approx(9.0)
    assert limiter.reserve(1000, 9.0) == 0.0
    assert limiter.tokens.available(9.0) == pytest.approx(0.0)


def test_wait_is_the_longer_of_both_buckets_and_neither_is_charged():
    limiter = RateLimiter(rpm=60, tpm=6000, now=0.0)
    assert limiter.reserve(500, 0.0) == pytest.approx(4.0)  # tokens: (500-100)/100
    assert limiter.requests.available(0.0) == pytest.approx(1.0)
    assert limiter.tokens.available(0.0) == pytest.approx(100.0)
    assert limiter.reserve(500, 4.0) == 0.0
    assert limiter.requests.available(4.0) == pytest.approx(0.0)  # the bucket holds 1 s' worth: 1 - 1
    assert limiter.tokens.available(4.0) == pytest.approx(0.0)


def test_oversized_request_waits_for_a_full_bucket_then_runs_into_debt():
    limiter = RateLimiter(tpm=600, now=0.0)  # 10 tokens/s, capacity 600
    assert limiter.reserve(1000, 0.0) == pytest.approx(59.0)
    assert limiter.reserve(1000, 59.0) == 0.0
    assert limiter.reserve(10, 59.0) == pytest.approx(41.0)


def test_settle_refunds_an_overestimate():
    limiter = RateLimiter(tpm=6000, now=0.0)
    assert limiter.reserve(100, 0.0) == 0.0
    limiter.settle(100, 40, 0.0)
    assert limiter.tokens.available(0.0) == pytest.approx(60.0)


def test_settle_owes_an_underestimate():
    limiter = RateLimiter(tpm=6000, now=0.0)
    assert limiter.reserve(100, 0.0) == 0.0
    limiter.settle(100, 350, 0.0)
    assert limiter.tokens.available(0.0) == pytest.approx(-250.0)
    assert limiter.reserve(100, 0.0) == pytest.approx(3.5)


def test_settle_without_token_budget_is_a_no_op():
    limiter = RateLimiter(rpm=60, now=0.0)
    limiter.settle(100, 5000, 0.0)
    assert limiter.tokens is None


def test_retry_after_pauses_every_reservation():
    limiter = RateLimiter(now=0.0)
    limiter.pause_until(5.0)
    assert limiter.reserve(0, 1.0) == pytest.approx(4.0)
    assert limiter.reserve(10, 4.5) == pytest.approx(0.5)
    assert limiter.reserve(0, 5.0) == 0.0


def test_pause_wait_combines_with_bucket_wait():
    limiter = RateLimiter(rpm=60, now=0.0)
    limiter.pause_until(0.5)
    assert limiter.reserve(0, 0.0) == pytest.approx(0.5)
    assert limiter.reserve(0, 0.5) == 0.0
    limiter.pause_until(0.7)
    assert limiter.reserve(0, 0.5) == pytest.approx(1.0)  # the bucket (1 s' worth, just emptied) needs longer
    limiter.pause_until(2.0)
    assert limiter.reserve(0, 0.5) == pytest.approx(1.5)  # now the pause does


def test_pause_only_extends():
    limiter = RateLimiter(now=0.0)
    limiter.pause_until(10.0)
    limiter.pause_until(3.0)
    assert limiter.reserve(0, 5.0) == pytest.approx(5.0)


OPENAI = {
    "x-ratelimit-limit-requests": "120",
    "x-ratelimit-remaining-requests": "119",
    "x-ratelimit-reset-requests": "500ms",
    "x-ratelimit-limit-tokens": "60000",
    "x-ratelimit-remaining-tokens": "59000",
    "x-ratelimit-reset-tokens": "1s",
}


def test_headers_create_budgets_when_the_job_set_none():
    limiter = RateLimiter(now=0.0)
    info = limiter.update_from_headers(OPENAI, 0.0, wall_now=0.0)
    assert limiter.limited
    assert info.requests.limit == 120
    assert limiter.requests.capacity == 120
    assert limiter.requests.refill_per_s == pytest.approx(2.0)
    assert limiter.tokens.capacity == 60000
    assert limiter.tokens.refill_per_s == pytest.approx(1000.0)
    # Learned budgets start small too: one second's worth, not the server's remaining.
    assert limiter.tokens.available(0.0) == pytest.approx(1000.0)
    assert limiter.requests.available(0.0) == pytest.approx(2.0)


def test_a_learned_budget_is_credited_the_wait_for_the_first_answer():
    """The first request went alone and its answer took 1.5 s: the learned bucket starts as if it
    had been refilling since the limiter was made (the server's remaining still caps it)."""
    limiter = RateLimiter(now=10.0)
    limiter.update_from_headers(OPENAI, 11.5, wall_now=0.0)
    assert limiter.requests.available(11.5) == pytest.approx(2.0 * 2.5)
    assert limiter.tokens.available(11.5) == pytest.approx(1000.0 * 2.5)
    late = RateLimiter(now=0.0)  # idle for minutes (a failover model): at most 5 s of credit
    late.update_from_headers(OPENAI, 600.0, wall_now=0.0)
    assert late.requests.available(600.0) == pytest.approx(2.0 * 6)
    low = RateLimiter(now=0.0)
    low.update_from_headers({**OPENAI, "x-ratelimit-remaining-requests": "3"}, 4.0, wall_now=0.0)
    assert low.requests.available(4.0) == pytest.approx(3.0)


def test_header_limit_lower_than_configured_wins():
    limiter = RateLimiter(rpm=1000, tpm=1_000_000, now=0.0)
    limiter.update_from_headers(OPENAI, 0.0, wall_now=0.0)
    assert limiter.requests.capacity == 120
    assert limiter.tokens.capacity == 60000
    assert limiter.tokens.refill_per_s == pytest.approx(1000.0)


def test_configured_limit_lower_than_header_wins():
    limiter = RateLimiter(rpm=60, tpm=6000, now=0.0)
    limiter.update_from_headers(OPENAI, 0.0, wall_now=0.0)
    assert limiter.requests.capacity == 60
    assert limiter.tokens.capacity == 6000


def test_header_remaining_lowers_level():
    limiter = RateLimiter(tpm=60000, now=0.0)
    limiter.tokens.refund(50_000)
    limiter.update_from_headers({"x-ratelimit-remaining-tokens": "700"}, 0.0)
    assert limiter.tokens.available(0.0) == pytest.approx(700.0)


def test_remaining_without_any_limit_is_ignored():
    limiter = RateLimiter(now=0.0)
    limiter.update_from_headers({"x-ratelimit-remaining-tokens": "0"}, 0.0)
    assert not limiter.limited


def test_header_sync_with_sent_at_accounts_for_latency():
    limiter = RateLimiter(tpm=60000, now=0.0)  # 1000 tokens/s, 1000 at once
    assert limiter.tokens.available(10.0) == pytest.approx(1000.0)
    # 200 left when the request was admitted half a second ago: the server has refilled 500 since.
    limiter.update_from_headers({"x-ratelimit-remaining-tokens": "200"}, 10.0, sent_at=9.5)
    assert limiter.tokens.available(10.0) == pytest.approx(700.0)


def test_anthropic_headers_create_budgets():
    limiter = RateLimiter(now=0.0)
    limiter.update_from_headers(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": "2024-08-01T12:00:01Z",
            "anthropic-ratelimit-tokens-limit": "40000",
            "anthropic-ratelimit-tokens-remaining": "39000",
        },
        0.0,
        wall_now=0.0,
    )
    assert limiter.requests.capacity == 50
    assert limiter.tokens.capacity == 40000
    assert limiter.reserve(10, 0.0) == pytest.approx(60 / 50)


def test_retry_after_header_pauses():
    limiter = RateLimiter(now=0.0)
    limiter.update_from_headers({"Retry-After": "7"}, 3.0)
    assert limiter.paused_until == pytest.approx(10.0)
    assert limiter.reserve(0, 9.0) == pytest.approx(1.0)


def test_retry_after_ms_header_pauses():
    limiter = RateLimiter(now=0.0)
    limiter.update_from_headers({"retry-after-ms": "250", "retry-after": "1"}, 1.0)
    assert limiter.paused_until == pytest.approx(1.25)


@pytest.mark.parametrize("kwargs", [{"rpm": 0}, {"tpm": -1}, {"window_s": 0}])
def test_invalid_limits(kwargs):
    with pytest.raises(ValueError):
        RateLimiter(now=0.0, **kwargs)
