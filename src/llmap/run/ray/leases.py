"""Leases: pending rows handed to remote workers, each settled exactly once. Pure.

The Ray executor's driver hands pending rows to workers in *leases* (a few
hundred rows each). :class:`LeaseBook` keeps who holds which row:

* a lease is *alive* while its worker answers; every answer renews it;
* a lease whose worker died, or stayed silent past ``timeout_s``, is
  *returned*: its unsettled rows go back to be leased again (they never left
  the ledger's ``pending`` state);
* a result is accepted only from the lease that holds its row open
  (:meth:`LeaseBook.accept`): once per row, since a row is open in at most one
  lease at a time (a returned lease's rows are leased again, and an answer that
  comes late from the returned lease is dropped). So each row is committed
  exactly once, even when it was sent twice, and the book keeps only the open
  leases: its memory does not grow with the run.

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
    """Which worker holds which pending row, until it is settled.

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
        self._next = 1
        #: results dropped: their row was settled already, or leased again (late answers)
        self.dropped = 0

    def __len__(self) -> int:
        """Leases still open."""
        return len(self._leases)

    def grant(self, worker: str, keys: Iterable[str], now: float) -> Lease:
        """Lease ``keys`` to ``worker`` until ``now + timeout_s``; the caller leases a row to one lease at
        a time (a row of a returned lease again only after :meth:`give_back` or :meth:`lost`)."""
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
        """A result for ``key`` came from lease ``lease_id``: True when the lease holds the row still
        open (commit it), False otherwise (drop it: the row was settled already, or the lease was
        returned and its rows leased again, so the new lease answers them)."""
        return bool(self.accept_many(lease_id, [key]))

    def accept_many(self, lease_id: int, keys: Iterable[str]) -> list[str]:
        """Results for ``keys`` came from lease ``lease_id``: the keys to commit (see :meth:`accept`),
        in order; the others are dropped."""
        lease = self._leases.get(lease_id)
        keys = list(keys)
        if lease is None:
            self.dropped += len(keys)
            return []
        open_ = lease.open
        keep = [k for k in keys if k in open_]
        open_.difference_update(keep)
        if not open_:
            del self._leases[lease_id]
        self.dropped += len(keys) - len(keep)
        return keep

    def give_back(self, lease: Lease) -> list[str]:
        """Close ``lease`` (its worker died, or stopped): its unsettled keys, to lease again."""
        self._leases.pop(lease.id, None)
        return [k for k in lease.keys if k in lease.open]

    def lost(self, worker: str) -> list[str]:
        """``worker`` is gone: close its leases; the keys to lease again."""
        keys: list[str] = []
        for lease in self.held_by(worker):
            keys += self.give_back(lease)
        return keys

    def expired(self, now: float) -> list[Lease]:
        """The open leases whose worker has been silent past their deadline."""
        return [lease for lease in self._leases.values() if lease.deadline <= now]
