"""``pack = "auto"``: how many rows to send per request, adapted to the item failure rate."""

from __future__ import annotations

import math
from collections import deque

__all__ = ["AutoPackSize"]


class AutoPackSize:
    """``pack = "auto"``: rows per request from a prompt-size target, adapted to failures.

    ``size(avg_row_tokens)`` is ``target_prompt_tokens // avg_row_tokens``,
    clamped to ``[minimum, ceiling]``. The ceiling (the allowed maximum,
    ``initial`` at first, else ``maximum``) adapts to the item failure rate
    reported through :meth:`observe`, over a sliding window of the last
    :attr:`WINDOW` items:

    - once the window holds :attr:`MIN_SAMPLE` items and more than
      :attr:`SHRINK_ABOVE` of them failed, the ceiling halves (not below
      ``minimum``): big packs confuse weak models, and every failed item costs
      a bisect retry;
    - once the window is full and fewer than :attr:`GROW_BELOW` failed, the
      ceiling grows by :attr:`GROWTH` (at least one row; up to ``maximum``).

    After each change the window restarts, since the old items were sent at
    the old size. Pure: it counts items, it reads no clock.

    Args:
        target_prompt_tokens: the prompt size to aim for, in tokens.
        minimum: the fewest rows per pack (>= 1).
        maximum: the most rows per pack (>= ``minimum``).
        initial: the starting ceiling; ``None`` starts at ``maximum``.

    Raises:
        ValueError: a bound out of range.
    """

    WINDOW = 500
    """Items in the sliding window."""
    MIN_SAMPLE = 100
    """Items needed before a shrink decision (10% of 100 is 10 failures)."""
    SHRINK_ABOVE = 0.10
    """Failure rate above which the ceiling halves."""
    GROW_BELOW = 0.02
    """Failure rate of a full window below which the ceiling grows."""
    GROWTH = 1.25
    """Factor by which the ceiling grows."""

    def __init__(
        self,
        target_prompt_tokens: int = 3000,
        *,
        minimum: int = 1,
        maximum: int = 50,
        initial: int | None = None,
    ) -> None:
        if target_prompt_tokens <= 0:
            raise ValueError("AutoPackSize: target_prompt_tokens must be > 0")
        if not 1 <= minimum <= maximum:
            raise ValueError("AutoPackSize: need 1 <= minimum <= maximum")
        start = maximum if initial is None else initial
        if not minimum <= start <= maximum:
            raise ValueError("AutoPackSize: initial must lie in [minimum, maximum]")
        self.target_prompt_tokens = target_prompt_tokens
        self.minimum = minimum
        self.maximum = maximum
        self._ceiling = start
        self._window: deque[tuple[int, int]] = deque()
        self._items = 0
        self._failed = 0

    @property
    def ceiling(self) -> int:
        """The current allowed maximum rows per pack."""
        return self._ceiling

    def size(self, avg_row_tokens: float) -> int:
        """Rows per pack for rows of ``avg_row_tokens`` prompt tokens each.

        Raises:
            ValueError: ``avg_row_tokens`` is not > 0.
        """
        if not avg_row_tokens > 0:
            raise ValueError("AutoPackSize.size: avg_row_tokens must be > 0")
        n = int(self.target_prompt_tokens // avg_row_tokens)
        return max(self.minimum, min(self._ceiling, n))

    def observe(self, items: int, failed: int) -> None:
        """Record one pack's result: ``items`` rows sent, ``failed`` of them with a problem.

        Raises:
            ValueError: ``items < 0`` or ``failed`` outside ``[0, items]``.
        """
        if items < 0 or not 0 <= failed <= items:
            raise ValueError("AutoPackSize.observe: need 0 <= failed <= items")
        if items == 0:
            return
        self._window.append((items, failed))
        self._items += items
        self._failed += failed
        while len(self._window) > 1 and self._items - self._window[0][0] >= self.WINDOW:
            old_items, old_failed = self._window.popleft()
            self._items -= old_items
            self._failed -= old_failed
        rate = self._failed / self._items
        if self._items >= self.MIN_SAMPLE and rate > self.SHRINK_ABOVE:
            self._set(max(self.minimum, self._ceiling // 2))
        elif self._items >= self.WINDOW and rate < self.GROW_BELOW:
            grown = max(self._ceiling + 1, math.ceil(self._ceiling * self.GROWTH))
            self._set(min(self.maximum, grown))

    def _set(self, ceiling: int) -> None:
        self._ceiling = ceiling
        self._window.clear()
        self._items = self._failed = 0
