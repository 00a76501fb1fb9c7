"""Adaptive concurrency: how many requests to keep in flight when no rate limit is known.

When neither the job nor the provider's headers give an RPM/TPM budget, the
dispatcher discovers the provider's capacity the way TCP discovers a link's:
additive increase while requests succeed, multiplicative decrease on
congestion (429, 503, 529).
"""

from __future__ import annotations

__all__ = ["AIMDConcurrency"]


class AIMDConcurrency:
    """Additive-increase / multiplicative-decrease limit on requests in flight.

    Used when neither the job nor the provider states a rate limit: the
    dispatcher keeps at most :attr:`limit` requests in flight and reports each
    outcome. Until the first congestion signal it is in *slow start* (as in
    TCP): every success adds 1, so the limit doubles each round trip. After
    that the limit grows by 1 once per round trip — after ``limit``
    successes since the last change — and halves (never below ``minimum``) on
    congestion (a 429 or an overload). Congestion signals from requests that
    were already in flight when the limit was cut are ignored: after a
    decrease, the next ``in_flight`` outcomes (default: the old limit) cannot
    cut it again, so one burst of 429s halves the limit once, not ten times.

    Args:
        initial: the starting limit.
        minimum: the lowest limit (>= 1).
        maximum: the highest limit.
        slow_start: grow by 1 per success until the first congestion (default True).

    Raises:
        ValueError: unless 1 <= minimum <= initial <= maximum.
    """

    def __init__(self, initial: int = 8, minimum: int = 1, maximum: int = 256, *, slow_start: bool = True) -> None:
        if not 1 <= minimum <= initial <= maximum:
            raise ValueError(
                f"need 1 <= minimum <= initial <= maximum, got {minimum}, {initial}, {maximum}"
            )
        self.minimum = minimum
        self.maximum = maximum
        self._limit = initial
        self._successes = 0
        self._holdoff = 0
        self.slow_start = slow_start

    @property
    def limit(self) -> int:
        """The current number of requests allowed in flight."""
        return self._limit

    def on_success(self) -> bool:
        """Record a successful request; return True when the limit grew."""
        if self._holdoff > 0:
            self._holdoff -= 1
        self._successes += 1
        if self.slow_start and self._limit < self.maximum:
            self._limit += 1
            self._successes = 0
            return True
        if self._successes >= self._limit and self._limit < self.maximum:
            self._limit += 1
            self._successes = 0
            return True
        return False

    def on_congestion(self, in_flight: int | None = None) -> bool:
        """Record a 429 or overload; return True when the limit was cut.

        Args:
            in_flight: requests in flight now, whose outcomes will not cut the
                limit again; defaults to the limit before the cut.
        """
        if self._holdoff > 0:
            self._holdoff -= 1
            return False
        old = self._limit
        self.slow_start = False
        self._limit = max(self.minimum, old // 2)
        self._successes = 0
        self._holdoff = old if in_flight is None else max(0, in_flight)
        return self._limit != old
