"""A circuit breaker for one (provider, model): stop sending while it is down.

States (:class:`BreakerState`)::

    CLOSED ──failure rate >= threshold over window_s (with >= min_calls calls)──▶ OPEN
           ──or consecutive_failures failures in a row───────────────────────────▶ OPEN
    OPEN ──cooldown elapsed (checked lazily, on the next call)──▶ HALF_OPEN
    HALF_OPEN ──a probe succeeds──▶ CLOSED  (cooldown back to cooldown_s)
    HALF_OPEN ──a probe fails─────▶ OPEN    (cooldown *= cooldown_growth, <= cooldown_max_s)

The breaker does not classify errors: **the caller decides what counts as a
failure**. Record a failure only for outage-type outcomes — a
:class:`~llmap.errors.TransientError` such as a timeout, a refused connection,
a 5xx or an overload. A 400 or a validation failure of one row's answer says
nothing about the provider's health: the server answered, so record a success
(or nothing). A 429 is better handled by the rate limiter than by the breaker.

Time is clock seconds (``time.monotonic`` by default); every method takes an
optional ``now`` so tests can drive it without a clock.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from enum import Enum

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(Enum):
    """The state of a :class:`CircuitBreaker`."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Count recent failures of one (provider, model) and refuse calls while it is down.

    Args:
        window_s: length of the sliding window for the failure rate, seconds.
        min_calls: calls needed in the window before the rate can open the breaker.
        failure_threshold: failure rate in (0, 1] that opens it (reached or passed).
        consecutive_failures: failures in a row that open it regardless of the rate.
        cooldown_s: seconds it stays open the first time before a probe.
        cooldown_max_s: the longest cooldown, seconds.
        cooldown_growth: factor applied to the cooldown each time a probe fails (>= 1).
        half_open_probes: calls let through while half-open.
        clock: returns the current time in seconds (default ``time.monotonic``);
            used when a method's ``now`` is None.
        on_change: called as ``on_change(old, new)`` on each state change, for reports.

    Raises:
        ValueError: a parameter is out of range.
    """

    def __init__(
        self,
        *,
        window_s: float = 30.0,
        min_calls: int = 20,
        failure_threshold: float = 0.5,
        consecutive_failures: int = 10,
        cooldown_s: float = 2.0,
        cooldown_max_s: float = 60.0,
        cooldown_growth: float = 2.0,
        half_open_probes: int = 1,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        if min_calls < 1 or consecutive_failures < 1 or half_open_probes < 1:
            raise ValueError("min_calls, consecutive_failures and half_open_probes must be >= 1")
        if not 0.0 < failure_threshold <= 1.0:
            raise ValueError(f"failure_threshold must be in (0, 1], got {failure_threshold}")
        if not 0.0 <= cooldown_s <= cooldown_max_s:
            raise ValueError(
                f"need 0 <= cooldown_s <= cooldown_max_s, got {cooldown_s}, {cooldown_max_s}"
            )
        if not cooldown_growth >= 1.0:
            raise ValueError(f"cooldown_growth must be >= 1, got {cooldown_growth}")
        self.window_s = window_s
        self.min_calls = min_calls
        self.failure_threshold = failure_threshold
        self.consecutive_failures = consecutive_failures
        self.base_cooldown_s = cooldown_s
        self.cooldown_max_s = cooldown_max_s
        self.cooldown_growth = cooldown_growth
        self.half_open_probes = half_open_probes
        self.clock = clock
        self.on_change = on_change

        self._state = BreakerState.CLOSED
        #: Clock time the breaker last opened, or None if it never has.
        self.opened_at: float | None = None
        #: The cooldown, seconds, that applies to the current (or next) opening.
        self.cooldown_s = cooldown_s
        self._calls: deque[tuple[float, bool]] = deque()  # (time, failed)
        self._failures_in_window = 0
        self._streak = 0
        self._probes = 0

    def __repr__(self) -> str:
        return f"CircuitBreaker(state={self._state.value}, cooldown_s={self.cooldown_s})"

    # -- state ---------------------------------------------------------------

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    def _set(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if old is not new and self.on_change is not None:
            self.on_change(old, new)

    def _refresh(self, now: float) -> None:
        if self._state is BreakerState.OPEN and now >= self._probe_at():
            self._probes = 0
            self._set(BreakerState.HALF_OPEN)

    def _probe_at(self) -> float:
        assert self.opened_at is not None
        return self.opened_at + self.cooldown_s

    def state_at(self, now: float | None = None) -> BreakerState:
        """Return the state at ``now`` (moving OPEN to HALF_OPEN once the cooldown is over)."""
        self._refresh(self._now(now))
        return self._state

    @property
    def state(self) -> BreakerState:
        """The state now, by the breaker's clock."""
        return self.state_at()

    def peek(self, now: float | None = None) -> BreakerState:
        """Return the state a call at ``now`` would see, without moving the breaker.

        Unlike :meth:`state_at` it changes nothing: an OPEN breaker whose cooldown
        is over reads HALF_OPEN, but stays OPEN and ``on_change`` is not called. For
        readers on another thread (a metrics scrape) that must not touch the run.
        """
        state = self._state
        if state is BreakerState.OPEN and self._now(now) >= self._probe_at():
            return BreakerState.HALF_OPEN
        return state

    def _open(self, now: float) -> None:
        self.opened_at = now
        self._calls.clear()
        self._failures_in_window = 0
        self._streak = 0
        self._probes = 0
        self._set(BreakerState.OPEN)

    def _close(self) -> None:
        self.cooldown_s = self.base_cooldown_s
        self._calls.clear()
        self._failures_in_window = 0
        self._streak = 0
        self._probes = 0
        self._set(BreakerState.CLOSED)

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        while self._calls and self._calls[0][0] <= horizon:
            _, failed = self._calls.popleft()
            self._failures_in_window -= failed

    def failure_rate(self, now: float | None = None) -> float | None:
        """Return the failure rate over the window, or None when it holds no calls."""
        self._prune(self._now(now))
        return self._failures_in_window / len(self._calls) if self._calls else None

    # -- calls ---------------------------------------------------------------

    def allow(self, now: float | None = None) -> bool:
        """Return True if a call may be made now.

        While half-open this reserves one of ``half_open_probes`` probe slots:
        report the probe's outcome with :meth:`record_success` /
        :meth:`record_failure`, or give the slot back with :meth:`release` if
        the call is not made or its outcome does not count.
        """
        now = self._now(now)
        self._refresh(now)
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.HALF_OPEN and self._probes < self.half_open_probes:
            self._probes += 1
            return True
        return False

    def release(self, now: float | None = None) -> None:
        """Give back a probe slot taken by :meth:`allow` whose outcome will not be recorded."""
        self._refresh(self._now(now))
        if self._state is BreakerState.HALF_OPEN and self._probes > 0:
            self._probes -= 1

    def record_success(self, now: float | None = None) -> None:
        """Record a call that reached a healthy provider.

        Closed: counted in the window and ends the failure streak. Half-open
        with a probe out: closes the breaker and resets the cooldown. Open, or
        half-open with no probe out (a late answer to a call made before the
        breaker opened): ignored.
        """
        now = self._now(now)
        self._refresh(now)
        if self._state is BreakerState.CLOSED:
            self._prune(now)
            self._calls.append((now, False))
            self._streak = 0
        elif self._state is BreakerState.HALF_OPEN and self._probes > 0:
            self._close()

    def record_failure(self, now: float | None = None) -> None:
        """Record an outage-type failure (the caller decides which errors count).

        Closed: counted; opens the breaker when the streak reaches
        ``consecutive_failures`` or the window's failure rate reaches
        ``failure_threshold`` with at least ``min_calls`` calls. Half-open with
        a probe out: reopens with the cooldown multiplied by
        ``cooldown_growth`` (at most ``cooldown_max_s``). Otherwise ignored.
        """
        now = self._now(now)
        self._refresh(now)
        if self._state is BreakerState.CLOSED:
            self._prune(now)
            self._calls.append((now, True))
            self._failures_in_window += 1
            self._streak += 1
            calls = len(self._calls)
            tripped_rate = (
                calls >= self.min_calls
                and self._failures_in_window >= self.failure_threshold * calls
            )
            if tripped_rate or self._streak >= self.consecutive_failures:
                self._open(now)
        elif self._state is BreakerState.HALF_OPEN and self._probes > 0:
            self.cooldown_s = min(self.cooldown_max_s, self.cooldown_s * self.cooldown_growth)
            self._open(now)

    def time_until_probe(self, now: float | None = None) -> float:
        """Return seconds until :meth:`allow` would let a call through.

        0.0 when closed or when a half-open probe slot is free; the rest of
        the cooldown when open; ``math.inf`` when half-open with every probe
        slot taken (wait for a probe's outcome, not for time).
        """
        now = self._now(now)
        self._refresh(now)
        if self._state is BreakerState.CLOSED:
            return 0.0
        if self._state is BreakerState.OPEN:
            return max(0.0, self._probe_at() - now)
        return 0.0 if self._probes < self.half_open_probes else math.inf
