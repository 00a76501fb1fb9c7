"""Leases: pending rows handed to remote workers, each settled exactly once. Pure.

The Ray executor's driver hands pending rows to workers in *leases* (a few
hundred rows each). :class:`LeaseBook` keeps who holds which row:

* a lease is *alive* while its worker answers; every answer renews it;
* a lease whose worker died, or stayed silent past ``timeout_s``, is
  *returned*: its unsettled rows go back to be leased again (they never left
  the ledger's ``pending`` state);
* a result is accepted once per row and run (:meth:`LeaseBook.accept`): a late
  answer for a row already settled, from a lease returned after a timeout, is
  dropped. So each row is committed exactly once, even when it was sent twice.

Time is clock seconds, passed in (``now``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["Lease", "LeaseBook"]


@dataclass
class Lease:
    """Rows leased to one worker.

    Attributes:
        id: the lease's number (1, 2, ...).
        worker: the worker's name.
        keys: the leased rows' keys.
        deadline: clock seconds by which the worker must answer, else the lease is returned.
        open: keys not yet settled.
    """

    id: int
    worker: str
    keys: list[str]
    deadline: float
    open: set[str] = field(default_factory=set)


class LeaseBook:
    """Which worker holds which pending row, and which rows are settled.

    Args:
        timeout_s: seconds a worker may stay silent before its leases are returned.

    Raises:
        ValueError: ``timeout_s`` is not > 0.
    """

    def __init__(self, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._leases: dict[int, Lease] = {}
        self._settled: set[str] = set()
        self._next = 1
        #: results dropped because their row was settled already (late answers)
        self.dropped = 0

    def __len__(self) -> int:
        """Leases still open."""
        return len(self._leases)

    def grant(self, worker: str, keys: Iterable[str], now: float) -> Lease:
        """Lease ``keys`` to ``worker`` until ``now + timeout_s``."""
        keys = list(keys)
        lease = Lease(self._next, worker, keys, now + self.timeout_s, set(keys))
        self._next += 1
        self._leases[lease.id] = lease
        return lease

    def held_by(self, worker: str) -> list[Lease]:
        """The open leases of ``worker``."""
        return [lease for lease in self._leases.values() if lease.worker == worker]

    def heard(self, worker: str, now: float) -> None:
        """``worker`` answered: its open leases live another ``timeout_s``."""
        for lease in self.held_by(worker):
            lease.deadline = now + self.timeout_s

    def accept(self, lease_id: int, key: str) -> bool:
        """A result for ``key`` came from lease ``lease_id``: True when it is the row's first
        (commit it), False when the row was settled already (drop it)."""
        lease = self._leases.get(lease_id)
        if lease is not None:
            lease.open.discard(key)
            if not lease.open:
                del self._leases[lease_id]
        if key in self._settled:
            self.dropped += 1
            return False
        self._settled.add(key)
        return True

    def settled(self, key: str) -> bool:
        """True once a result for ``key`` was accepted."""
        return key in self._settled

    def give_back(self, lease: Lease) -> list[str]:
        """Close ``lease`` (its worker died, or stopped): its unsettled keys, to lease again."""
        self._leases.pop(lease.id, None)
        return [k for k in lease.keys if k in lease.open and k not in self._settled]

    def lost(self, worker: str) -> list[str]:
        """``worker`` is gone: close its leases; the keys to lease again."""
        keys: list[str] = []
        for lease in self.held_by(worker):
            keys += self.give_back(lease)
        return keys

    def expired(self, now: float) -> list[Lease]:
        """The open leases whose worker has been silent past their deadline."""
        return [lease for lease in self._leases.values() if lease.deadline <= now]
