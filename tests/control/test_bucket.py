"""TokenBucket: a pure function of its state and ``now``."""

from __future__ import annotations

import math

import pytest

from llmap.control.bucket import TokenBucket


def test_starts_with_one_seconds_worth_not_full():
    bucket = TokenBucket(600, 10, now=0.0)  # 600 per minute
    assert bucket.available(0.0) == 10.0


def test_initial_level_is_capped_at_capacity():
    assert TokenBucket(5, 10, now=0.0).available(0.0) == 5.0
    assert TokenBucket(5, 1, level=50, now=0.0).available(0.0) == 5.0


def test_explicit_level():
    assert TokenBucket(600, 10, level=0, now=0.0).available(0.0) == 0.0


def test_refills_continuously_up_to_capacity():
    bucket = TokenBucket(600, 10, level=0, now=100.0)
    assert bucket.available(100.5) == pytest.approx(5.0)
    assert bucket.available(130.0) == pytest.approx(300.0)
    assert bucket.available(1000.0) == 600.0


def test_available_does_not_change_state():
    bucket = TokenBucket(600, 10, level=0, now=0.0)
    bucket.available(30.0)
    assert bucket.available(1.0) == pytest.approx(10.0)


def test_clock_going_backwards_does_not_drain():
    bucket = TokenBucket(600, 10, level=20, now=5.0)
    assert bucket.available(4.0) == 20.0


def test_time_until_is_exact():
    bucket = TokenBucket(600, 10, level=10, now=0.0)
    assert bucket.time_until(10, 0.0) == 0.0
    assert bucket.time_until(30, 0.0) == pytest.approx(2.0)
    assert bucket.time_until(30, 1.5) == pytest.approx(0.5)
    assert bucket.time_until(30, 2.0) == 0.0


def test_time_until_tolerates_float_round_off():
    bucket = TokenBucket(100, 0.1, level=0, now=0.0)
    wait = bucket.time_until(0.3, 0.0)
    assert bucket.time_until(0.3, 0.0 + wait) == 0.0


def test_amount_over_capacity_is_admitted_when_full_then_leaves_debt():
    bucket = TokenBucket(100, 10, level=0, now=0.0)
    assert bucket.time_until(500, 0.0) == pytest.approx(10.0)
    bucket.take(500, 10.0)
    assert bucket.available(10.0) == pytest.approx(-400.0)
    assert bucket.time_until(1, 10.0) == pytest.approx(40.1)


def test_take_may_go_into_debt():
    bucket = TokenBucket(600, 10, level=10, now=0.0)
    bucket.take(25, 0.0)
    assert bucket.available(0.0) == pytest.approx(-15.0)
    assert bucket.available(1.5) == pytest.approx(0.0)


def test_take_refills_before_taking():
    bucket = TokenBucket(600, 10, level=0, now=0.0)
    bucket.take(5, 2.0)
    assert bucket.available(2.0) == pytest.approx(15.0)


def test_time_until_is_infinite_without_refill():
    bucket = TokenBucket(10, 0, level=1, now=0.0)
    assert bucket.time_until(2, 0.0) == math.inf
    assert bucket.time_until(1, 0.0) == 0.0


def test_refund_is_capped_at_capacity():
    bucket = TokenBucket(100, 1, level=90, now=0.0)
    bucket.refund(5)
    assert bucket.available(0.0) == 95.0
    bucket.refund(50)
    assert bucket.available(0.0) == 100.0


def test_refund_with_now_refills_first():
    bucket = TokenBucket(100, 1, level=0, now=0.0)
    bucket.refund(10, 5.0)
    assert bucket.available(5.0) == 15.0


def test_owe_leaves_debt():
    bucket = TokenBucket(100, 1, level=3, now=0.0)
    bucket.owe(10)
    assert bucket.available(0.0) == -7.0


@pytest.mark.parametrize("method", ["refund", "owe"])
def test_negative_adjustments_are_rejected(method):
    bucket = TokenBucket(100, 1, now=0.0)
    with pytest.raises(ValueError):
        getattr(bucket, method)(-1)


def test_set_limit_clips_level_and_scales_rate():
    bucket = TokenBucket(600, 10, level=300, now=0.0)
    bucket.set_limit(120, 0.0)
    assert bucket.capacity == 120
    assert bucket.refill_per_s == pytest.approx(2.0)
    assert bucket.available(0.0) == 120.0


def test_set_limit_does_not_raise_level():
    bucket = TokenBucket(600, 10, level=50, now=0.0)
    bucket.set_limit(6000, 0.0, refill_per_s=100)
    assert bucket.available(0.0) == 50.0
    assert bucket.available(1.0) == 150.0


def test_set_remaining_lowers_level():
    bucket = TokenBucket(600, 10, level=300, now=0.0)
    bucket.set_remaining(40, 1.0, 0.0)
    assert bucket.available(0.0) == 40.0
    assert bucket.server_reset_at == 1.0


def test_stale_header_cannot_inflate_level():
    bucket = TokenBucket(600, 10, level=20, now=0.0)
    bucket.set_remaining(590, 0.5, 0.0)
    assert bucket.available(0.0) == 20.0


def test_set_remaining_as_of_refills_the_servers_figure_to_now():
    bucket = TokenBucket(600, 10, level=300, now=0.0)
    # The figure describes the server 4 s ago: it has refilled 40 since.
    bucket.set_remaining(100, None, 10.0, as_of=6.0)
    assert bucket.available(10.0) == pytest.approx(140.0)


def test_set_remaining_as_of_never_raises_level():
    bucket = TokenBucket(600, 10, level=50, now=0.0)
    bucket.set_remaining(100, None, 0.0, as_of=-30.0)
    assert bucket.available(0.0) == 50.0


@pytest.mark.parametrize(("capacity", "rate"), [(0, 1), (-5, 1), (10, -1)])
def test_invalid_parameters(capacity, rate):
    with pytest.raises(ValueError):
        TokenBucket(capacity, rate, now=0.0)


def test_invalid_set_limit():
    bucket = TokenBucket(10, 1, now=0.0)
    with pytest.raises(ValueError):
        bucket.set_limit(0, 0.0)
    with pytest.raises(ValueError):
        bucket.set_limit(10, 0.0, refill_per_s=-1)


# -- the burst: what the server shows it holds --------------------------------------------------
def test_the_burst_caps_the_level_not_the_rate():
    bucket = TokenBucket(3000, 50, level=50, now=0.0, burst=50)
    assert bucket.available(10.0) == 50.0  # 10 s idle: still one second's worth
    bucket.take(50, 10.0)
    assert bucket.available(10.5) == pytest.approx(25.0)


def test_a_request_larger_than_the_burst_waits_for_all_of_it():
    bucket = TokenBucket(6000, 100, level=100, now=0.0, burst=100)
    assert bucket.time_until(250, 0.0) == pytest.approx(1.5)
    bucket.take(250, 1.5)
    assert bucket.available(1.5) == pytest.approx(0.0)


def test_remaining_shows_a_larger_burst():
    """A server whose bucket holds the whole minute says remaining 2999 of 3000: the burst is that."""
    bucket = TokenBucket(3000, 50, level=50, now=0.0, burst=50)
    bucket.set_remaining(2999, 0.02, 1.0, as_of=0.5, cost=1)
    assert bucket.burst == 3000.0
    assert bucket.available(1.0) == pytest.approx(100.0)  # its refill since t = 0; a figure never raises it
    assert bucket.available(60.0) == pytest.approx(3000.0)


def test_the_reset_time_shows_a_smaller_burst():
    """Remaining 24 and full again in 20 ms at 50/s: the server holds 25, not the second's 50 assumed."""
    bucket = TokenBucket(3000, 50, level=50, now=0.0, burst=50)
    bucket.set_remaining(24, 0.02, 0.0, cost=1)
    assert bucket.burst == pytest.approx(25.0)
    assert bucket.available(5.0) == pytest.approx(25.0)


def test_a_rounded_up_reset_never_lowers_the_burst_below_what_was_shown():
    bucket = TokenBucket(3000, 50, level=50, now=0.0, burst=50)
    bucket.set_remaining(49, 1.0, 0.0, cost=1)  # Anthropic's reset is a whole second: 49 + 50 >= 50
    bucket.set_remaining(30, 0.0, 1.0, cost=1)  # a reset read late (0): the server still showed 50
    assert bucket.burst == 50.0


def test_remaining_counts_what_was_admitted_since_the_figure():
    bucket = TokenBucket(3000, 50, level=50, now=0.0, burst=50)
    for k in range(10):
        bucket.take(1, 0.01 * (k + 1))
    # as of 0.05 the server had 20 left; 5 of ours were admitted after that
    bucket.set_remaining(20, None, 0.1, as_of=0.05, cost=1)
    assert bucket.available(0.1) == pytest.approx(20 + 0.05 * 50 - 5)
    assert bucket.taken_since(0.05) == 5
    assert bucket.taken_since(-1.0) == 10


def test_takes_are_remembered_only_for_the_horizon():
    from llmap.control.bucket import TAKEN_HORIZON_S

    bucket = TokenBucket(3000, 50, now=0.0)
    bucket.take(1, 0.0)
    bucket.take(1, TAKEN_HORIZON_S + 1.0)
    assert bucket.taken_since(-1.0) == 1


def test_the_first_take_of_a_burst_from_a_full_bucket_starts_the_refill_late():
    bucket = TokenBucket(3000, 50, level=50, now=0.0, burst=50, slack_s=0.1)
    bucket.take(1, 0.0)  # full: the server refills only once this burst has arrived
    bucket.take(49, 0.0)
    assert bucket.time_until(1, 0.0) == pytest.approx(0.12)
    small = TokenBucket(60, 1, level=1, now=0.0, burst=1, slack_s=0.1)  # holds one request: no slack
    small.take(1, 0.0)
    assert small.time_until(1, 0.0) == pytest.approx(1.0)


def test_set_limit_scales_the_burst():
    bucket = TokenBucket(3000, 50, level=50, now=0.0, burst=50)
    bucket.set_limit(1500, 0.0)
    assert bucket.burst == pytest.approx(25.0)


def test_invalid_burst_and_slack():
    with pytest.raises(ValueError):
        TokenBucket(10, 1, now=0.0, burst=0)
    with pytest.raises(ValueError):
        TokenBucket(10, 1, now=0.0, slack_s=-1)
