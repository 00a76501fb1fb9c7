"""Alerts: stop a run that is failing, before it burns the budget.

``[alerts] max_failure_rate = 0.2`` watches the last ``window`` settled rows
(default 50): once at least ``window`` rows have settled and more than that
share failed, dispatch stops with a message naming the rate and the fix. A
broken prompt or a wrong model name then costs ``window`` rows, not the run.
"""

from __future__ import annotations

from collections import deque

__all__ = ["FailureRateAlert"]


class FailureRateAlert:
    """Failure rate over a sliding window of settled rows. Pure.

    Args:
        max_failure_rate: the share of failed rows (0 to 1) above which the alert fires.
        window: how many of the latest settled rows count (>= 1).

    Raises:
        ValueError: a rate outside [0, 1] or a window below 1.
    """

    def __init__(self, max_failure_rate: float, window: int = 50) -> None:
        if not 0.0 <= max_failure_rate <= 1.0:
            raise ValueError(f"max_failure_rate must be within 0 to 1, got {max_failure_rate}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.max_failure_rate = max_failure_rate
        self._rows: deque[bool] = deque(maxlen=window)
        self._failed = 0

    @property
    def rate(self) -> float | None:
        """The failure rate over the window, or None while it is not full."""
        if len(self._rows) < (self._rows.maxlen or 0):
            return None
        return self._failed / len(self._rows)

    def observe(self, failed: bool) -> bool:
        """Record one settled row; returns True when the alert fires (window full, rate above the max)."""
        if len(self._rows) == self._rows.maxlen:
            self._failed -= self._rows[0]
        self._rows.append(failed)
        self._failed += failed
        rate = self.rate
        return rate is not None and rate > self.max_failure_rate

    def message(self) -> str:
        """The stop reason, naming the rate and the fix."""
        return (f"{self._failed} of the last {len(self._rows)} rows failed ({self.rate:.0%}), above "
                f"[alerts] max_failure_rate = {self.max_failure_rate:g}; look at the errors with "
                "`llmap status` or the output's _error column, fix the prompt or model, and run again")
