"""Anthropic's limits: separate input- and output-token buckets (ITPM, OTPM), RFC 3339 resets,
cache reads that do not count, all as functions of an injected clock."""

from __future__ import annotations

import asyncio

import pytest

from llmap.control.headers import parse_rate_limit_headers
from llmap.control.limits import Limiter, RateLimiter
from llmap.control.tokens import CountedShare

WALL = 1_722_513_600.0  # 2024-08-01T12:00:00Z

#: The headers a real /v1/messages answer carries (values as Anthropic's docs and a recorded answer show them).
ANTHROPIC = {
    "anthropic-ratelimit-requests-limit": "1000",
    "anthropic-ratelimit-requests-remaining": "999",
    "anthropic-ratelimit-requests-reset": "2024-08-01T12:00:01Z",
    "anthropic-ratelimit-input-tokens-limit": "80000",
    "anthropic-ratelimit-input-tokens-remaining": "80000",
    "anthropic-ratelimit-input-tokens-reset": "2024-08-01T12:00:00Z",
    "anthropic-ratelimit-output-tokens-limit": "16000",
    "anthropic-ratelimit-output-tokens-remaining": "15000",
    "anthropic-ratelimit-output-tokens-reset": "2024-08-01T12:00:04Z",
    "anthropic-ratelimit-tokens-limit": "96000",
    "anthropic-ratelimit-tokens-remaining": "95000",
    "anthropic-ratelimit-tokens-reset": "2024-08-01T12:00:00Z",
}


def test_headers_give_separate_input_and_output_budgets_with_rfc3339_resets():
    info = parse_rate_limit_headers(ANTHROPIC, wall_now=WALL)
    assert (info.input_tokens.limit, info.input_tokens.remaining, info.input_tokens.reset_s) == (80000, 80000, 0.0)
    assert (info.output_tokens.limit, info.output_tokens.remaining) == (16000, 15000)
    assert info.output_tokens.reset_s == pytest.approx(4.0)
    assert info.requests.reset_s == pytest.approx(1.0)
    assert not info.input_tokens.__class__()  # an absent budget is empty
    assert not parse_rate_limit_headers({"x-ratelimit-limit-tokens": "5"}).input_tokens


def test_separate_budgets_are_learned_and_the_combined_one_is_not():
    rate = RateLimiter(now=0.0)
    rate.update_from_headers(ANTHROPIC, 0.0, wall_now=WALL)
    assert rate.limited
    assert rate.requests.capacity == 1000
    assert rate.input_tokens.capacity == 80000 and rate.output_tokens.capacity == 16000
    assert rate.tokens is None  # "most restrictive now" is not a budget to pace by


def test_a_configured_tpm_still_applies_beside_learned_split_budgets():
    rate = RateLimiter(tpm=6000, now=0.0)
    rate.update_from_headers(ANTHROPIC, 0.0, wall_now=WALL)
    assert rate.tokens.capacity == 6000 and rate.input_tokens.capacity == 80000


def test_input_and_output_buckets_each_take_their_part():
    rate = RateLimiter(itpm=6000, otpm=600, now=0.0)  # 100 input / 10 output tokens per second
    assert rate.reserve(110, 0.0, est_output=10) == 0.0  # 100 in, 10 out: exactly one second's worth each
    assert rate.input_tokens.available(0.0) == pytest.approx(0.0)
    assert rate.output_tokens.available(0.0) == pytest.approx(0.0)
    # output binds: 20 output tokens need 2 s although the input (10) would fit in 0.1 s
    assert rate.reserve(30, 0.0, est_output=20) == pytest.approx(2.0)
    assert rate.reserve(30, 2.0, est_output=20) == 0.0


def test_settle_refunds_each_bucket_by_its_own_difference():
    rate = RateLimiter(itpm=60000, otpm=6000, now=0.0)  # 1000 in / 100 out per second, start with that much
    assert rate.reserve(1100, 0.0, est_output=100) == 0.0
    # the answer: 40 input tokens counted (the rest were cache reads), 30 output tokens
    rate.settle(1100, 70, 0.0, reserved_output=100, actual_output=30)
    assert rate.input_tokens.available(0.0) == pytest.approx(960.0)
    assert rate.output_tokens.available(0.0) == pytest.approx(70.0)


def test_settle_to_zero_refunds_both_parts():
    rate = RateLimiter(itpm=60000, otpm=6000, now=0.0)
    rate.reserve(1100, 0.0, est_output=100)
    rate.settle(1100, 0, 0.0, reserved_output=100)  # a 429: the server processed nothing
    assert rate.input_tokens.available(0.0) == pytest.approx(1000.0)
    assert rate.output_tokens.available(0.0) == pytest.approx(100.0)


def test_remaining_lowers_only_its_own_bucket():
    rate = RateLimiter(itpm=80000, otpm=16000, now=0.0)
    rate.update_from_headers(ANTHROPIC | {"anthropic-ratelimit-output-tokens-remaining": "0"}, 0.0, wall_now=WALL)
    assert rate.output_tokens.available(0.0) == pytest.approx(0.0)
    assert rate.input_tokens.available(0.0) > 0
    assert rate.time_until(200, 0.0, est_output=100) == pytest.approx(100 / (16000 / 60))


def test_retry_after_pauses_every_bucket():
    rate = RateLimiter(itpm=80000, otpm=16000, now=0.0)
    rate.update_from_headers({"retry-after": "7"}, 0.0, wall_now=WALL)
    assert rate.reserve(1, 0.0) == pytest.approx(7.0)
    assert rate.reserve(1, 7.0) == 0.0


@pytest.mark.parametrize("bad", [{"itpm": 0}, {"otpm": -1}])
def test_split_limits_must_be_positive(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RateLimiter(now=0.0, **bad)


def test_async_limiter_carries_the_output_part_through_its_permit(fake_time):
    lim = Limiter(RateLimiter(itpm=6000, otpm=600, now=0.0), clock=fake_time.clock, sleep=fake_time.sleep)

    async def go():
        first = await lim.acquire(110, est_output=10)
        second = await lim.acquire(30, est_output=20)  # waits for the output bucket
        lim.settle(first, 50, actual_output=5)
        return first, second

    first, second = asyncio.run(go())
    assert first.output == 10 and second.output == 20
    assert fake_time.now == pytest.approx(2.0)


def test_counted_share_learns_what_share_of_the_prompt_counts():
    share = CountedShare(window=3)
    assert share.share == 1.0  # nothing seen: reserve the whole prompt
    share.observe(2000, 2000)  # the first request writes the cache: everything counts
    share.observe(50, 2000)
    share.observe(50, 2000)
    assert share.share == pytest.approx(2100 / 6000)
    share.observe(50, 2000)  # the window forgets the write
    assert share.share == pytest.approx(0.05)  # 150 / 6000 = 0.025, held at the floor
    share.observe(0, 0)  # no prompt: no information
    assert share.share == pytest.approx(0.05)


def test_counted_share_refuses_impossible_counts():
    with pytest.raises(ValueError):
        CountedShare().observe(10, 5)
    with pytest.raises(ValueError):
        CountedShare(floor=0)
