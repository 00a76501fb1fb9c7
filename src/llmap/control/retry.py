"""Retry decisions.

:class:`RetryPolicy` is a pure function of (error, attempt, elapsed time) and
a seeded random source: it says whether to try a failed request again and
after how long. Which errors are transient is decided where HTTP answers are
mapped to exceptions: :func:`llmap.providers.base.classify_status`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from llmap.errors import (
    FatalProviderError,
    RequestTimeout,
    TerminalError,
    TransientError,
)

__all__ = ["RetryDecision", "RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """What to do after a failed attempt.

    Attributes:
        retry: True to send the request again after ``delay_s``.
        delay_s: seconds to wait before the next attempt (0 when not retrying).
        reason: a short human-readable reason, for logs and the ledger.
        stop_run: True when the error would hit every row (a
            :class:`~llmap.errors.FatalProviderError`): stop the whole run.
    """

    retry: bool
    delay_s: float
    reason: str
    stop_run: bool = False


class RetryPolicy:
    """Exponential backoff with full jitter, bounded by attempts and by time.

    After failed attempt ``n`` (1-based) the delay is drawn uniformly from
    ``[0, min(cap_s, base_s * 2 ** (n - 1))]`` ("full jitter": spreads the
    retries of many rows that failed together). A
    :class:`~llmap.errors.RateLimited` error that carries ``retry_after`` waits
    ``max(retry_after, jittered delay)``: the server's figure is a floor we
    must respect, and the jitter above it keeps rows that were told the same
    figure from all returning at the same instant. ``cap_s`` bounds only our
    own backoff, never the server's Retry-After.

    A :class:`~llmap.errors.RequestTimeout` always draws the first attempt's
    delay: the request already waited out its timeout.

    Only :class:`~llmap.errors.TransientError` is retried. A request is given
    up when ``max_attempts`` attempts have been made, or when waiting
    ``delay_s`` would pass the row's time budget ``budget_s`` (counted from
    the row's first attempt; the job's ``limits.retry_budget_s``, default 300).

    Args:
        max_attempts: the most attempts per request, including the first (>= 1).
        base_s: the backoff ceiling after the first failure, seconds.
        cap_s: the largest backoff ceiling, seconds.
        budget_s: the per-row time budget for all attempts and waits, seconds.
        rng: the random source for jitter (seed it in tests); default ``random.Random()``.

    Raises:
        ValueError: max_attempts < 1 or a negative duration.
    """

    def __init__(
        self,
        max_attempts: int = 6,
        base_s: float = 0.5,
        cap_s: float = 30.0,
        budget_s: float = 300.0,
        rng: random.Random | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        for name, value in (("base_s", base_s), ("cap_s", cap_s), ("budget_s", budget_s)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.max_attempts = max_attempts
        self.base_s = base_s
        self.cap_s = cap_s
        self.budget_s = budget_s
        self.rng = rng if rng is not None else random.Random()

    def ceiling(self, attempt: int) -> float:
        """Return the backoff ceiling in seconds after failed attempt ``attempt`` (1-based)."""
        exponent = max(0, attempt - 1)
        if exponent > 1000:  # 2**1000 overflows float arithmetic below; the cap wins anyway
            return self.cap_s
        return min(self.cap_s, self.base_s * 2.0**exponent)

    def backoff(self, attempt: int) -> float:
        """Draw a full-jitter delay in seconds after failed attempt ``attempt``."""
        return self.rng.uniform(0.0, self.ceiling(attempt))

    def decide(self, error: BaseException, attempt: int, elapsed_s: float) -> RetryDecision:
        """Decide whether to retry after ``error``.

        Args:
            error: what the failed attempt raised (normally a ProviderError).
            attempt: the number of the attempt that failed, 1-based.
            elapsed_s: seconds since the row's first attempt started.

        Returns:
            The decision. Terminal errors and anything that is not a
            :class:`~llmap.errors.ProviderError` are not retried;
            :class:`~llmap.errors.FatalProviderError` also sets ``stop_run``.
        """
        name = type(error).__name__
        if isinstance(error, FatalProviderError):
            return RetryDecision(False, 0.0, f"fatal: {name}", stop_run=True)
        if isinstance(error, TerminalError):
            return RetryDecision(False, 0.0, f"terminal: {name}")
        if not isinstance(error, TransientError):
            return RetryDecision(False, 0.0, f"not retryable: {name}")
        if attempt >= self.max_attempts:
            return RetryDecision(False, 0.0, f"{name}: gave up after {attempt} attempts")
        # A timed-out request has already waited longer than any early backoff: retry it
        # after the first-attempt backoff instead of letting its delay grow.
        delay = self.backoff(1 if isinstance(error, RequestTimeout) else attempt)
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None and retry_after > delay:
            delay = float(retry_after)
        if elapsed_s + delay > self.budget_s:
            return RetryDecision(
                False,
                0.0,
                f"{name}: retry budget of {self.budget_s:g}s exhausted "
                f"({elapsed_s:.1f}s elapsed, next wait {delay:.1f}s)",
            )
        how = "Retry-After" if retry_after is not None and delay == retry_after else "backoff"
        return RetryDecision(True, delay, f"{name}: retry {attempt + 1} after {delay:.2f}s ({how})")
