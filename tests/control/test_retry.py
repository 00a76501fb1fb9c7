"""RetryPolicy decisions: what is retried, how long to wait, when to give up."""

from __future__ import annotations

import random

import pytest

from llmap.control.retry import RetryPolicy
from llmap.errors import (
    AuthError,
    BadRequest,
    ConnectionFailed,
    ContextTooLong,
    MalformedResponse,
    Overloaded,
    QuotaExhausted,
    RateLimited,
    RequestTimeout,
)


class FixedRng:
    """Stands in for random.Random: uniform(a, b) returns a + fraction * (b - a)."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return a + self.fraction * (b - a)


TRANSIENT = [
    RateLimited("429"),
    Overloaded("503"),
    RequestTimeout("timeout"),
    ConnectionFailed("reset"),
    MalformedResponse("not json"),
]


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: type(e).__name__)
def test_transient_errors_are_retried(error):
    decision = RetryPolicy(rng=FixedRng(1.0)).decide(error, attempt=1, elapsed_s=0.0)
    assert decision.retry
    assert decision.delay_s == pytest.approx(0.5)
    assert not decision.stop_run
    assert type(error).__name__ in decision.reason


@pytest.mark.parametrize(
    "error", [BadRequest("400"), ContextTooLong("too long")], ids=lambda e: type(e).__name__
)
def test_terminal_errors_are_not_retried(error):
    decision = RetryPolicy().decide(error, attempt=1, elapsed_s=0.0)
    assert not decision.retry
    assert not decision.stop_run
    assert decision.delay_s == 0.0
    assert "terminal" in decision.reason


@pytest.mark.parametrize(
    "error", [AuthError("401"), QuotaExhausted("quota")], ids=lambda e: type(e).__name__
)
def test_fatal_errors_stop_the_run(error):
    decision = RetryPolicy().decide(error, attempt=1, elapsed_s=0.0)
    assert not decision.retry
    assert decision.stop_run
    assert "fatal" in decision.reason


def test_other_exceptions_are_not_retried():
    decision = RetryPolicy().decide(ValueError("bug"), attempt=1, elapsed_s=0.0)
    assert not decision.retry
    assert not decision.stop_run


def test_ceiling_doubles_then_caps():
    policy = RetryPolicy(base_s=0.5, cap_s=30.0)
    assert [policy.ceiling(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert policy.ceiling(5000) == 30.0


def test_delay_is_the_jittered_ceiling():
    rng = FixedRng(0.25)
    policy = RetryPolicy(max_attempts=10, base_s=1.0, cap_s=6.0, rng=rng)
    delays = [policy.decide(Overloaded("x"), n, 0.0).delay_s for n in range(1, 6)]
    assert delays == pytest.approx([0.25, 0.5, 1.0, 1.5, 1.5])
    assert rng.calls == [(0.0, 1.0), (0.0, 2.0), (0.0, 4.0), (0.0, 6.0), (0.0, 6.0)]


def test_full_jitter_spans_zero_to_ceiling_and_is_seeded():
    policy = RetryPolicy(max_attempts=100, base_s=1.0, cap_s=8.0, rng=random.Random(7))
    delays = [policy.decide(Overloaded("x"), 4, 0.0).delay_s for _ in range(2000)]
    assert all(0.0 <= d <= 8.0 for d in delays)
    assert min(delays) < 0.1  # full jitter: not "ceiling/2 + jitter"
    assert max(delays) > 7.9
    again = RetryPolicy(max_attempts=100, base_s=1.0, cap_s=8.0, rng=random.Random(7))
    assert [again.decide(Overloaded("x"), 4, 0.0).delay_s for _ in range(2000)] == delays


def test_gives_up_after_max_attempts():
    policy = RetryPolicy(max_attempts=3, rng=FixedRng(0.0))
    assert policy.decide(Overloaded("x"), attempt=2, elapsed_s=0.0).retry
    decision = policy.decide(Overloaded("x"), attempt=3, elapsed_s=0.0)
    assert not decision.retry
    assert "3 attempts" in decision.reason


def test_single_attempt_policy_never_retries():
    assert not RetryPolicy(max_attempts=1).decide(Overloaded("x"), 1, 0.0).retry


def test_gives_up_when_the_wait_would_pass_the_budget():
    policy = RetryPolicy(base_s=4.0, budget_s=300.0, rng=FixedRng(0.5))  # delay 2.0
    assert policy.decide(Overloaded("x"), 1, elapsed_s=298.0).retry
    decision = policy.decide(Overloaded("x"), 1, elapsed_s=298.5)
    assert not decision.retry
    assert "budget" in decision.reason


def test_retry_after_is_a_floor():
    policy = RetryPolicy(rng=FixedRng(1.0))  # backoff after attempt 1 would be 0.5
    decision = policy.decide(RateLimited("429", retry_after=10.0), 1, 0.0)
    assert decision.retry
    assert decision.delay_s == 10.0
    assert "Retry-After" in decision.reason


def test_retry_after_is_not_capped():
    policy = RetryPolicy(cap_s=30.0, rng=FixedRng(1.0))
    assert policy.decide(RateLimited("429", retry_after=45.0), 1, 0.0).delay_s == 45.0


def test_backoff_wins_over_a_shorter_retry_after():
    policy = RetryPolicy(base_s=8.0, rng=FixedRng(0.5))  # backoff 4.0
    decision = policy.decide(RateLimited("429", retry_after=1.0), 1, 0.0)
    assert decision.delay_s == 4.0
    assert "backoff" in decision.reason


def test_retry_after_past_the_budget_gives_up():
    policy = RetryPolicy(budget_s=60.0, rng=FixedRng(0.0))
    assert not policy.decide(RateLimited("429", retry_after=61.0), 1, 0.0).retry


@pytest.mark.parametrize(
    "kwargs", [{"max_attempts": 0}, {"base_s": -1}, {"cap_s": -1}, {"budget_s": -0.5}]
)
def test_invalid_parameters(kwargs):
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_timeout_retries_after_the_first_attempt_backoff():
    import random

    from llmap.errors import Overloaded, RequestTimeout

    policy = RetryPolicy(base_s=0.5, cap_s=30.0, rng=random.Random(1))
    delays = [policy.decide(RequestTimeout("late"), 5, 0.0).delay_s for _ in range(200)]
    assert max(delays) <= 0.5
    overloaded = [policy.decide(Overloaded("503"), 5, 0.0).delay_s for _ in range(200)]
    assert max(overloaded) > 0.5  # other transient errors keep growing
