"""One rate-limit budget: a continuously refilled token bucket whose burst is what the server shows.

A provider states its limits per minute (``limit: 3000`` requests), but it may
enforce them over shorter intervals: Anthropic's reference says "a rate of 60
requests per minute (RPM) might be enforced as 1 request per second" and that
its buckets are "continuously replenished up to your maximum limit"
(https://platform.claude.com/docs/en/api/rate-limits). So the per-minute
``limit`` sets only the refill rate. How much may go at once (the *burst*) is
what the server has shown it holds: its ``remaining`` figures, and its reset
time ("the time when the rate limit will be fully replenished"; OpenAI: "the
time until the rate limit resets to its initial state",
https://platform.openai.com/docs/guides/rate-limits), which gives the most it
holds: ``remaining + reset * rate``. Until a server has said anything, the
burst is one second's worth.

Pure: every method takes ``now`` (clock seconds) and nothing reads a clock.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["ARRIVAL_SLACK_S", "TAKEN_HORIZON_S", "TokenBucket"]

#: How far a request's arrival at the server may lag its admission here, seconds. A full server
#: bucket refills nothing until the first request of a burst arrives; if that one is late and later
#: ones are not, they reach the server closer together than they were admitted. The first request of
#: a process is the late one (new connections, code run for the first time): on this 2-core machine
#: at a load average of 8-10, a slack of 0.1 s still let 2 of 1,500 requests be refused right at the
#: start; 0.25 s let none. So a take from a full bucket starts its refill this much later (at 3,000
#: RPM, 12 requests' worth, once per burst).
ARRIVAL_SLACK_S = 0.25

#: How long the bucket remembers what it admitted, seconds: a header describing the server
#: longer ago than this is synced without counting what was admitted since (it is that stale).
TAKEN_HORIZON_S = 120.0

# Slack for float round-off: a bucket this close to the amount admits it, so a
# waiter that slept exactly time_until() is not sent back to sleep for 1e-16 s.
_EPS = 1e-9


class TokenBucket:
    """A token bucket with continuous refill, allowed to go into debt.

    The level grows by ``refill_per_s`` per second up to ``burst``. Taking
    more than the level is allowed and leaves a negative level (debt) that the
    refill pays back before anything else is admitted; this is how a request
    larger than the whole burst, or a reservation that turned out too small,
    is accounted for.

    The bucket does **not** start full: by default it starts with one second's
    worth of refill (``min(burst, refill_per_s)``) and earns the rest at the
    steady rate, because a full bucket at start-up would send a whole burst the
    server may not hold.

    ``capacity`` is the budget per window as the provider states it (the
    ``limit``); ``burst`` is the most the level may hold. A server's figures
    (:meth:`set_remaining`) move ``burst`` to what the server holds: up to the
    most it has shown (``remaining``), down to what its reset time implies.

    Args:
        capacity: the budget per window (e.g. requests per minute), > 0.
        refill_per_s: units added per second, >= 0 (capacity / 60 for a per-minute budget).
        level: the starting level; defaults to one second's worth, as above.
        now: the current clock time in seconds.
        burst: the most the level holds before any server figure, in (0, capacity];
            defaults to ``capacity`` (:class:`~llmap.control.limits.RateLimiter`
            passes one second's worth).
        slack_s: a take of at most half the burst from a full bucket starts
            the refill this many seconds later
            (:class:`~llmap.control.limits.RateLimiter` passes :data:`ARRIVAL_SLACK_S`).

    Raises:
        ValueError: capacity <= 0, refill_per_s < 0, burst <= 0 or slack_s < 0.
    """

    def __init__(
        self, capacity: float, refill_per_s: float, *, level: float | None = None, now: float,
        burst: float | None = None, slack_s: float = 0.0,
    ) -> None:
        if not capacity > 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        if not refill_per_s >= 0:
            raise ValueError(f"refill_per_s must be >= 0, got {refill_per_s}")
        if burst is not None and not burst > 0:
            raise ValueError(f"burst must be > 0, got {burst}")
        if not slack_s >= 0:
            raise ValueError(f"slack_s must be >= 0, got {slack_s}")
        self.slack_s = float(slack_s)
        self.capacity = float(capacity)
        self.refill_per_s = float(refill_per_s)
        #: The burst assumed before any server figure.
        self.default_burst = min(self.capacity, float(burst if burst is not None else capacity))
        #: The most the server has shown it holds (``remaining`` plus what that request took), or 0.
        self.shown = 0.0
        #: The least ``remaining + reset * rate`` seen: what the server holds when full, at most; inf if unknown.
        self.full_at_most = math.inf
        self._set_burst()
        if level is None:
            level = refill_per_s
        self._level = min(float(level), self.capacity)
        self._updated = now
        #: (clock time, units) of every take in the last TAKEN_HORIZON_S seconds, oldest first.
        self._taken: deque[tuple[float, float]] = deque()
        #: Clock time at which the server last said its budget is full again (diagnostic).
        self.server_reset_at: float | None = None

    def __repr__(self) -> str:
        return (
            f"TokenBucket(capacity={self.capacity}, refill_per_s={self.refill_per_s}, burst={self.burst}, "
            f"level={self._level}, updated={self._updated})"
        )

    def _level_at(self, now: float, top: float) -> float:
        elapsed = now - self._updated
        if elapsed <= 0:
            return min(top, self._level)
        return min(top, self._level + elapsed * self.refill_per_s)

    def _top(self, amount: float) -> float:
        """The most the level may reach for a request of ``amount``: the burst, or the request itself
        (up to the capacity) when it is larger, so that it waits until the bucket holds all of it."""
        return max(self.burst, min(amount, self.capacity))

    def available(self, now: float) -> float:
        """Return the level at ``now`` (negative while in debt; at most the burst). Does not change state."""
        return self._level_at(now, self.burst)

    def _advance(self, now: float) -> None:
        self._level = self.available(now)
        self._updated = max(self._updated, now)

    def time_until(self, amount: float, now: float) -> float:
        """Return seconds from ``now`` until ``amount`` can be taken (0 if it can now).

        A request larger than the burst waits until the bucket holds all of it
        (the level may then pass the burst for it); one larger than the
        capacity is admitted when the bucket holds the capacity, and leaves it
        in debt, else it would never be admitted. Returns ``math.inf`` when the
        bucket is short and does not refill.
        """
        need = min(amount, self.capacity) - self._level_at(now, self._top(amount))
        if need <= _EPS * max(1.0, self.burst):
            return 0.0
        if self.refill_per_s <= 0:
            return math.inf
        return need / self.refill_per_s + max(0.0, self._updated - now)  # refill may start later (slack_s)

    def take(self, amount: float, now: float) -> None:
        """Take ``amount`` at ``now`` whether or not it is available (the level may go negative).

        The take is remembered for :data:`TAKEN_HORIZON_S` seconds (see :meth:`taken_since`).
        """
        level = self._level_at(now, self._top(amount))
        # The first take of a burst from a full bucket (not a bucket that only ever holds about one
        # request, where every take is from full): the server's refill restarts when it arrives.
        bursts = level >= self.burst - _EPS * max(1.0, self.burst) and 2 * amount <= self.burst
        self._level = level - amount
        self._updated = max(self._updated, now + (self.slack_s if bursts else 0.0))
        taken = self._taken
        taken.append((now, amount))
        while taken and taken[0][0] < now - TAKEN_HORIZON_S:
            taken.popleft()

    def taken_since(self, since: float) -> float:
        """Units taken after clock time ``since`` (within the last :data:`TAKEN_HORIZON_S` seconds)."""
        total = 0.0
        for when, amount in reversed(self._taken):
            if when <= since:
                break
            total += amount
        return total

    def refund(self, amount: float, now: float | None = None) -> None:
        """Give back ``amount`` (a reservation that was too large); the level stays <= burst.

        Raises:
            ValueError: amount is negative.
        """
        if amount < 0:
            raise ValueError(f"refund amount must be >= 0, got {amount}")
        if now is not None:
            self._advance(now)
        self._level = min(self.burst, self._level + amount)

    def owe(self, amount: float, now: float | None = None) -> None:
        """Charge ``amount`` more (a reservation that was too small); may leave debt.

        Raises:
            ValueError: amount is negative.
        """
        if amount < 0:
            raise ValueError(f"owed amount must be >= 0, got {amount}")
        if now is not None:
            self._advance(now)
        self._level -= amount

    def set_limit(self, capacity: float, now: float, *, refill_per_s: float | None = None) -> None:
        """Change the capacity at ``now``; the level is clipped to it, never raised.

        The burst and what the server has shown are scaled with the refill
        rate (they are seconds' worth of it).

        Args:
            capacity: the new capacity, > 0.
            now: the current clock time in seconds.
            refill_per_s: the new refill rate; by default it is scaled with the
                capacity, so the time to fill an empty bucket stays the same.

        Raises:
            ValueError: capacity <= 0 or refill_per_s < 0.
        """
        if not capacity > 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        if refill_per_s is not None and not refill_per_s >= 0:
            raise ValueError(f"refill_per_s must be >= 0, got {refill_per_s}")
        self._advance(now)
        if refill_per_s is None:
            refill_per_s = self.refill_per_s * capacity / self.capacity
        scale = refill_per_s / self.refill_per_s if self.refill_per_s > 0 else capacity / self.capacity
        self.capacity = float(capacity)
        self.refill_per_s = float(refill_per_s)
        self.default_burst = min(self.capacity, self.default_burst * scale)
        self.shown *= scale
        self.full_at_most *= scale
        self._set_burst()
        self._level = min(self._level, self.burst)

    def _set_burst(self) -> None:
        self.burst = min(self.capacity, max(self.shown, min(self.default_burst, self.full_at_most)))

    def set_remaining(
        self,
        remaining: float,
        reset_s: float | None,
        now: float,
        *,
        as_of: float | None = None,
        cost: float = 0.0,
    ) -> None:
        """Sync with the server's ``remaining`` and reset time: learn the burst, never raise the level.

        The figure describes the server at ``as_of`` (when the request was
        admitted). The burst becomes what the server holds: at least the most
        it has shown (``remaining + cost``), at most ``remaining + reset_s *
        rate`` (full at the reset time), one second's worth when neither says
        otherwise. The server's level now is at most ``remaining`` refilled
        from ``as_of`` to now, less what this bucket admitted after ``as_of``
        (requests the figure does not count yet), and at most the burst. The
        level only goes *down* to that:
        a stale figure, or one that does not count other clients of the same
        key, must not inflate it.

        Args:
            remaining: what the server says is left (same unit as capacity), after this request.
            reset_s: seconds from ``as_of`` until the server's budget is full, or None.
            now: the current clock time in seconds.
            as_of: clock time the figure describes, e.g. when the request was
                sent; defaults to ``now`` (the most conservative reading).
            cost: what the request that carried the figure took from it (1 for
                requests; 0 when unknown): the server held ``remaining + cost``.
        """
        since = now if as_of is None or as_of > now else as_of
        self.shown = max(self.shown, remaining + max(0.0, cost))
        if reset_s is not None:
            self.full_at_most = min(self.full_at_most, remaining + max(0.0, reset_s) * self.refill_per_s)
            self.server_reset_at = since + reset_s
        self._set_burst()
        self._advance(now)
        # The server's level now: what it had, refilled since, less what was admitted since, and never over
        # its burst. (Its refill may have stopped at full in between, so "full at reset" bounds only the burst.)
        server_now = min(self.burst, remaining + (now - since) * self.refill_per_s - self.taken_since(since))
        self._level = min(self._level, server_now)
