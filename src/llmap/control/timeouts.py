"""Adaptive request timeouts: abandon a hung request soon after it is clearly late.

A fixed read timeout must be long enough for the slowest honest answer (120 s
by default), so a server that never answers would hold a row for two
minutes. :class:`AdaptiveTimeout` learns the latency distribution of the
answers a model actually gives and tightens the timeout to a multiple of its
99th percentile, never below a floor or above the configured ceiling.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["AdaptiveTimeout"]


class AdaptiveTimeout:
    """Timeout = clamp(multiple × p99 of recent latencies, floor_s, ceiling_s).

    Until ``min_samples`` answers have been seen the timeout is ``ceiling_s``
    (the job's ``[model] timeout_s``). A pure object: feed it latencies with
    :meth:`observe`, read :meth:`current`.

    Args:
        ceiling_s: the longest timeout, seconds (the configured read timeout).
        floor_s: the shortest timeout, seconds (default 2.0: below that,
            network jitter alone would abandon honest requests).
        multiple: factor over the p99 latency (default 3.0).
        min_samples: answers needed before adapting (default 20).
        window: how many recent latencies are kept (default 500).

    Raises:
        ValueError: a non-positive duration or multiple, or floor above ceiling.
    """

    def __init__(self, ceiling_s: float, *, floor_s: float = 2.0, multiple: float = 3.0,
                 min_samples: int = 20, window: int = 500) -> None:
        if not (ceiling_s > 0 and floor_s > 0 and multiple > 0):
            raise ValueError("ceiling_s, floor_s and multiple must be > 0")
        self.ceiling_s = float(ceiling_s)
        self.floor_s = min(float(floor_s), self.ceiling_s)
        self.multiple = float(multiple)
        self.min_samples = max(1, int(min_samples))
        self._window: deque[float] = deque(maxlen=max(self.min_samples, int(window)))
        self._cached: float | None = None
        self._fresh = 0  # observations since the timeout was last computed

    #: Observations between recomputations of the timeout: the p99 of a window of hundreds
    #: moves slowly, and sorting the window for every request would cost more than it tells.
    RECOMPUTE_EVERY = 32

    def observe(self, latency_s: float) -> None:
        """Record the latency of one answered request, seconds."""
        if latency_s >= 0 and math.isfinite(latency_s):
            self._window.append(latency_s)
            self._fresh += 1
            if self._fresh >= self.RECOMPUTE_EVERY or len(self._window) <= self.min_samples:
                self._cached = None

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0 to 1) of recent latencies, seconds; ``ceiling_s`` until ``min_samples``."""
        if len(self._window) < self.min_samples:
            return self.ceiling_s
        ordered = sorted(self._window)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    def current(self) -> float:
        """The timeout to apply now, seconds."""
        if len(self._window) < self.min_samples:
            return self.ceiling_s
        if self._cached is None:
            self._cached = min(self.ceiling_s, max(self.floor_s, self.multiple * self.quantile(0.99)))
            self._fresh = 0
        return self._cached
