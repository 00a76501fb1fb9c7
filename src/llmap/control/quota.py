"""Per-group quotas: "3 districts per state" campaigns.

``[input] per_group = { column = "state", n = 3 }`` stops taking new rows
from a group once it has ``n`` done rows. Done rows from earlier runs count,
so a campaign spread over many runs ends when every group has ``n`` done or
has run out of rows. :class:`GroupQuota` is the pure decision; the pool asks
it for every pending row, pass after pass, until a pass takes nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Mapping
from enum import Enum

__all__ = ["GroupQuota", "QuotaDecision"]


class QuotaDecision(Enum):
    TAKE = "take"  # send the row now
    HOLD = "hold"  # the group may still need it: rows in flight could fail; ask again next pass
    SKIP = "skip"  # the group has n done rows: the row is skipped with the reason


class GroupQuota:
    """Counts done and in-flight rows per group against ``n``.

    Args:
        n: done rows wanted per group (>= 1).
        done: done rows per group so far (from the ledger: earlier runs count).

    Raises:
        ValueError: ``n`` < 1.
    """

    def __init__(self, n: int, done: Mapping[Hashable, int] | None = None) -> None:
        if n < 1:
            raise ValueError(f"per_group n must be >= 1, got {n}")
        self.n = n
        self.done: defaultdict[Hashable, int] = defaultdict(int, done or {})
        self.in_flight: defaultdict[Hashable, int] = defaultdict(int)

    def decide(self, group: Hashable) -> QuotaDecision:
        """Decide for one pending row of ``group``; TAKE also counts it in flight."""
        if self.done[group] >= self.n:
            return QuotaDecision.SKIP
        if self.done[group] + self.in_flight[group] >= self.n:
            return QuotaDecision.HOLD
        self.in_flight[group] += 1
        return QuotaDecision.TAKE

    def settle(self, group: Hashable, *, done: bool) -> None:
        """Record the outcome of a row taken with :meth:`decide`."""
        self.in_flight[group] -= 1
        if done:
            self.done[group] += 1

    def reason(self, group: Hashable, column: str) -> str:
        """The skip reason recorded for a row of a full group."""
        return f"per_group quota met: {column} = {group!r} has {self.done[group]} done rows (n = {self.n})"
