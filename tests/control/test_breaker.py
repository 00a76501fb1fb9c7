"""CircuitBreaker state transitions, driven by explicit times or a fake clock."""

from __future__ import annotations

import math

import pytest

from llmap.control.breaker import BreakerState, CircuitBreaker

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def breaker(**kwargs) -> CircuitBreaker:
    kwargs.setdefault("clock", lambda: pytest.fail("the clock must not be read"))
    return CircuitBreaker(**kwargs)


def test_starts_closed_and_allows():
    b = breaker()
    assert b.state_at(0.0) is CLOSED
    assert b.allow(0.0)
    assert b.opened_at is None
    assert b.time_until_probe(0.0) == 0.0


def test_opens_after_consecutive_failures():
    b = breaker(consecutive_failures=10, min_calls=1000)
    for i in range(9):
        b.record_failure(float(i))
    assert b.state_at(9.0) is CLOSED
    b.record_failure(9.0)
    assert b.state_at(9.0) is OPEN
    assert b.opened_at == 9.0
    assert not b.allow(9.0)


def test_a_success_resets_the_streak():
    b = breaker(consecutive_failures=3, min_calls=1000)
    b.record_failure(0.0)
    b.record_failure(0.0)
    b.record_success(0.0)
    b.record_failure(0.0)
    b.record_failure(0.0)
    assert b.state_at(0.0) is CLOSED
    b.record_failure(0.0)
    assert b.state_at(0.0) is OPEN


def test_failure_rate_needs_min_calls():
    b = breaker(min_calls=20, failure_threshold=0.5, consecutive_failures=1000)
    for _ in range(9):
        b.record_success(0.0)
        b.record_failure(0.0)
    b.record_failure(0.0)  # 19 calls, 10 failures: 53% but too few calls
    assert b.state_at(0.0) is CLOSED
    assert b.failure_rate(0.0) == pytest.approx(10 / 19)
    b.record_success(0.0)  # 20 calls, 50%: a success never opens it
    assert b.state_at(0.0) is CLOSED
    b.record_failure(0.0)  # 21 calls, 11 failures
    assert b.state_at(0.0) is OPEN


def test_failure_rate_exactly_at_threshold_opens():
    b = breaker(min_calls=4, failure_threshold=0.5, consecutive_failures=1000)
    b.record_success(0.0)
    b.record_success(0.0)
    b.record_failure(0.0)
    assert b.state_at(0.0) is CLOSED
    b.record_failure(0.0)
    assert b.state_at(0.0) is OPEN


def test_failure_rate_below_threshold_stays_closed():
    b = breaker(min_calls=10, failure_threshold=0.5, consecutive_failures=1000)
    for _ in range(100):
        b.record_success(0.0)
        b.record_success(0.0)
        b.record_failure(0.0)
    assert b.state_at(0.0) is CLOSED


def test_old_calls_leave_the_window():
    b = breaker(window_s=30.0, min_calls=4, failure_threshold=0.5, consecutive_failures=1000)
    b.record_failure(0.0)
    b.record_failure(0.0)
    b.record_failure(0.0)
    b.record_success(1.0)  # 3 of 4 failed, but only a failure can open it
    assert b.state_at(1.0) is CLOSED
    assert b.failure_rate(29.0) == pytest.approx(0.75)
    assert b.failure_rate(30.0) == 0.0  # the t=0 failures are gone
    b.record_success(30.5)
    b.record_success(30.5)
    b.record_failure(30.5)
    assert b.state_at(30.5) is CLOSED  # 1 of 4 in the window, not 4 of 7
    assert b.failure_rate(61.0) is None


def test_open_refuses_until_cooldown_then_half_open():
    b = breaker(consecutive_failures=1, cooldown_s=2.0)
    b.record_failure(10.0)
    assert not b.allow(11.9)
    assert b.time_until_probe(11.0) == pytest.approx(1.0)
    assert b.state_at(12.0) is HALF_OPEN
    assert b.time_until_probe(12.0) == 0.0


def test_half_open_lets_one_probe_through():
    b = breaker(consecutive_failures=1, cooldown_s=2.0)
    b.record_failure(0.0)
    assert b.allow(2.0)
    assert not b.allow(2.0)
    assert b.time_until_probe(2.0) == math.inf


def test_half_open_probe_count_is_configurable():
    b = breaker(consecutive_failures=1, half_open_probes=3)
    b.record_failure(0.0)
    assert [b.allow(5.0) for _ in range(4)] == [True, True, True, False]


def test_probe_success_closes_and_resets_cooldown():
    b = breaker(consecutive_failures=1, cooldown_s=2.0)
    b.record_failure(0.0)
    assert b.allow(2.0)
    b.record_failure(2.1)  # probe fails: cooldown 4
    assert b.cooldown_s == 4.0
    assert b.allow(6.2)
    b.record_success(6.5)
    assert b.state_at(6.5) is CLOSED
    assert b.cooldown_s == 2.0
    assert b.allow(6.5)


def test_probe_failure_grows_cooldown_up_to_max():
    b = breaker(consecutive_failures=1, cooldown_s=2.0, cooldown_growth=2.0, cooldown_max_s=20.0)
    now = 0.0
    b.record_failure(now)
    cooldowns = []
    for _ in range(6):
        now += b.cooldown_s
        assert not b.allow(now - 0.01)
        assert b.allow(now)
        b.record_failure(now)
        assert b.state_at(now) is OPEN
        assert b.opened_at == now
        cooldowns.append(b.cooldown_s)
    assert cooldowns == [4.0, 8.0, 16.0, 20.0, 20.0, 20.0]


def test_closing_starts_a_fresh_window():
    b = breaker(min_calls=4, failure_threshold=0.5, consecutive_failures=1000)
    for _ in range(4):
        b.record_failure(0.0)
    assert b.state_at(0.0) is OPEN
    assert b.allow(2.0)
    b.record_success(2.0)
    assert b.state_at(2.0) is CLOSED
    b.record_success(2.0)
    b.record_failure(2.0)  # 1 of 2 calls: too few calls to judge
    assert b.state_at(2.0) is CLOSED
    assert b.failure_rate(2.0) == pytest.approx(0.5)


def test_results_while_open_are_ignored():
    b = breaker(consecutive_failures=1, cooldown_s=2.0)
    b.record_failure(0.0)
    b.record_success(1.0)  # a late answer to a call made before it opened
    assert b.state_at(1.0) is OPEN
    b.record_failure(1.5)
    assert b.opened_at == 0.0
    assert b.cooldown_s == 2.0


def test_half_open_without_a_probe_ignores_late_results():
    b = breaker(consecutive_failures=1, cooldown_s=2.0)
    b.record_failure(0.0)
    b.record_failure(3.0)  # half-open, but no probe was let through
    assert b.state_at(3.0) is HALF_OPEN
    b.record_success(3.0)
    assert b.state_at(3.0) is HALF_OPEN


def test_release_gives_back_a_probe_slot():
    b = breaker(consecutive_failures=1)
    b.record_failure(0.0)
    assert b.allow(5.0)
    assert not b.allow(5.0)
    b.release(5.0)
    assert b.allow(5.0)


def test_uses_the_injected_clock():
    now = [0.0]
    b = CircuitBreaker(consecutive_failures=1, cooldown_s=2.0, clock=lambda: now[0])
    b.record_failure()
    assert b.state is OPEN
    assert not b.allow()
    now[0] = 2.0
    assert b.state is HALF_OPEN
    assert b.allow()
    b.record_success()
    assert b.state is CLOSED


def test_on_change_reports_transitions():
    changes = []
    b = breaker(consecutive_failures=1, on_change=lambda old, new: changes.append((old, new)))
    b.record_failure(0.0)
    b.allow(2.0)
    b.record_failure(2.0)
    b.allow(6.0)
    b.record_success(6.0)
    assert changes == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, CLOSED),
    ]


def test_peek_reads_the_state_without_moving_it():
    changes = []
    b = breaker(consecutive_failures=1, cooldown_s=2.0, on_change=lambda old, new: changes.append((old, new)))
    assert b.peek(0.0) is CLOSED
    b.record_failure(0.0)
    assert b.peek(1.9) is OPEN
    assert b.peek(2.0) is HALF_OPEN  # what the next call would see ...
    assert changes == [(CLOSED, OPEN)]  # ... yet nothing moved: no transition, no on_change
    assert b.time_until_probe(1.0) == 1.0  # still open by its own state
    assert b.state_at(2.0) is HALF_OPEN and changes[-1] == (OPEN, HALF_OPEN)  # state_at does move it
    assert b.allow(2.0) and b.peek(2.0) is HALF_OPEN


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window_s": 0},
        {"min_calls": 0},
        {"consecutive_failures": 0},
        {"half_open_probes": 0},
        {"failure_threshold": 0},
        {"failure_threshold": 1.5},
        {"cooldown_s": -1},
        {"cooldown_s": 100, "cooldown_max_s": 60},
        {"cooldown_growth": 0.5},
    ],
)
def test_invalid_parameters(kwargs):
    with pytest.raises(ValueError):
        CircuitBreaker(**kwargs)
