"""The Ray executor: the driver keeps the leases and the ledger, Ray workers do every per-row step.

``llmap run JOB --executor ray`` (or ``Job.run(executor="ray")``) runs the
job's life as a local run does (lock, preflight, plan, export: see
:mod:`llmap.engine`). Dispatch runs :class:`~llmap.run.remote.RemotePool`: the
driver pages pending rows out of the ledger, holds in-run duplicates back by
input hash, and commits the results; :class:`RayExecutor` is its
:class:`~llmap.run.remote.RemoteRows`.

* :class:`~llmap.run.ray.launch.Launch` starts the workers, the budget actor and the response
  cache actor while the driver checks and plans. Dispatch begins as soon as one worker is set up;
  the others join as they come.
* It cuts the rows it is handed into leases of :data:`LEASE_ROWS` raw rows (key and data JSON)
  and keeps :data:`LEASES_PER_WORKER` leases at each worker (:mod:`llmap.run.ray.worker` does
  every per-row step), so a worker never waits for the driver.
* One loop per worker long-polls its results (:meth:`RowWorker.take`), encoded for the ledger,
  and hands each row's result to the pool once (:class:`~llmap.run.ray.leases.LeaseBook`):
  a late answer for a row already settled is dropped.
* A worker that dies, or stays silent for ``lease_timeout_s``, loses its
  leases: their rows go to the other workers. When every worker is gone the
  run stops; the rows not settled stay ``pending`` in the ledger for a rerun.

Ray is imported only here, when a Ray run starts; ``import llmap`` never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from llmap import errors as E
from llmap.run.dispatch import Dispatcher
from llmap.run.ray.leases import LeaseBook
from llmap.run.ray.worker import Batch
from llmap.run.remote import Settle
from llmap.run.rows import PendingRow
from llmap.run.stats import DispatchStats, Stop
from llmap.store.ledger import Encoded

__all__ = ["RayExecutor", "check_executor", "connect", "drop_worker", "require_ray"]

log = logging.getLogger(__name__)

#: Rows per lease.
LEASE_ROWS = 256
#: Leases each worker holds at once.
LEASES_PER_WORKER = 2
#: Seconds a worker may stay silent before its leases go to the others.
LEASE_TIMEOUT_S = 30.0
#: Seconds a take waits in the worker for results before it answers empty.
TAKE_WAIT_S = 0.25
#: Seconds a worker holds results for the next take: TAKE_LINGER_S per worker (the driver's takes, about
#: 0.5 ms of CPU each, stay under 1 / TAKE_LINGER_S a second in all), at most TAKE_LINGER_MAX_S (the
#: longest an answer waits before the driver can commit it).
TAKE_LINGER_S, TAKE_LINGER_MAX_S = 0.05, 0.25


def require_ray() -> Any:
    """The ``ray`` module.

    Raises:
        SpecError: Ray is not installed; the message says how to install it.
    """
    try:
        import ray
    except ImportError:
        raise E.SpecError("--executor ray needs Ray, which is not installed; pip install 'llmap[ray]'") from None
    return ray


def check_executor(executor: str, workers: int | None, *, batch: bool = False) -> None:
    """Check ``executor`` and ``workers`` before anything is sent.

    Raises:
        SpecError: an unknown executor, ``workers`` < 1 or without Ray, Ray with ``[model] batch``,
            or Ray missing.
    """
    if executor not in ("local", "ray"):
        raise E.SpecError(f"unknown executor {executor!r}; use 'local' or 'ray'")
    if workers is not None and executor != "ray":
        raise E.SpecError("--workers applies to --executor ray only; add --executor ray or drop --workers")
    if workers is not None and workers < 1:
        raise E.SpecError(f"--workers must be at least 1, got {workers}")
    if executor == "ray" and batch:
        raise E.SpecError("[model] batch sends through the provider's batch API from this process; "
                          "drop --executor ray, or set batch = false to send in real time from Ray workers")
    if executor == "ray":
        require_ray()


def connect(address: str | None = "auto") -> None:
    """Connect to Ray: ``auto`` (default) joins a running cluster, else starts a local one;
    any other address must answer. Nothing happens when this process is connected already.

    Raises:
        SpecError: Ray is missing, or ``address`` cannot be reached.
    """
    ray = require_ray()
    if ray.is_initialized():
        return
    quiet = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    if address in (None, "", "auto"):
        try:
            ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError):
            ray.init(**quiet)
        return
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise E.SpecError(f"cannot reach the Ray cluster at {address!r} ({exc}); start it with "
                          "`ray start --head` or fix --ray-address") from None


def drop_worker(name: str, handle: Any, exc: BaseException) -> None:
    """A worker that did not start: said in the log, ended."""
    import ray

    log.warning("llmap: Ray worker %s did not start (%s); the others go on", name, exc)
    with contextlib.suppress(Exception):
        ray.kill(handle)


class RayExecutor:
    """The pool's :class:`~llmap.run.remote.RemoteRows` on a Ray cluster (see the module docstring).

    Made by :meth:`~llmap.run.ray.launch.Launch.executor`; close it with :meth:`aclose`.

    Args:
        workers: worker name -> actor handle, for the workers set up.
        budget: the budget actor's handle.
        dispatcher: the driver's dispatcher (its answer cache counts the workers' hits; its caps
            rule is checked on the usage merged from the workers).
        stats: the run's counters (the workers' usage is merged here).
        joining: worker name -> (handle, setup future) of the workers still starting: each joins
            the run once set up.
        cache: the run's response cache actor, ended by :meth:`aclose` after the workers, or None.
        lease_rows: rows per lease (default :data:`LEASE_ROWS`).
        lease_timeout_s: seconds a worker may stay silent (default :data:`LEASE_TIMEOUT_S`).
        clock: monotonic seconds.

    Attributes:
        workers: worker name -> actor handle, for the workers set up and still alive.
        joining: worker name -> (handle, setup future), for the workers still starting.
        book: the :class:`~llmap.run.ray.leases.LeaseBook`.
    """

    def __init__(self, workers: dict[str, Any], budget: Any, dispatcher: Dispatcher, stats: DispatchStats, *,
                 joining: dict[str, tuple[Any, asyncio.Future]] | None = None, cache: Any | None = None,
                 lease_rows: int | None = None, lease_timeout_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.workers = dict(workers)
        self.budget, self.cache = budget, cache
        self.dispatcher, self.stats = dispatcher, stats
        self.lease_rows = lease_rows or LEASE_ROWS
        self.book = LeaseBook(lease_timeout_s or LEASE_TIMEOUT_S)
        self.clock = clock
        self.queue_items = 2  # lists of rows (a page's leaders each); the leases hold the rest
        self.joining = dict(joining or {})
        self._ready: deque[list[PendingRow]] = deque()  # leases to hand out
        self._exhausted = False
        self._changed = asyncio.Event()
        self._rows: dict[str, PendingRow] = {}  # key -> the pool's row, while leased
        self._said: set[str] = set()
        self._stopped = False
        self._tasks: dict[str, asyncio.Task] = {}

    @property
    def size(self) -> int:
        """Workers alive or still starting."""
        return len(self.workers) + len(self.joining)

    async def aclose(self) -> None:
        """Close every worker (the cache is written, unused budget is handed back) and end them."""
        import ray

        closing = [h.close.remote() for h in self.workers.values()]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), 10)
        for _, fut in self.joining.values():  # still starting: nothing to close, ended at once
            fut.cancel()
        starting = [h for h, _ in self.joining.values()]
        self.joining.clear()
        for h in [*starting, *self.workers.values(), *([self.cache] if self.cache is not None else [])]:
            with contextlib.suppress(Exception):
                ray.kill(h)  # the cache actor last: the workers wrote their last answers to it as they closed
        self.workers.clear()
        self.cache = None

    # -- the pool's RemoteRows -------------------------------------------------------------
    async def run(self, todo: asyncio.Queue, settle: Settle) -> None:
        """Lease the pool's rows to the workers until ``todo`` ends and every row is settled."""
        self._settle = settle
        feed = asyncio.create_task(self._feed(todo), name="llmap-ray-feed")
        for name in list(self.workers):
            self._start(name)
        joins = [asyncio.create_task(self._join(name, h, fut), name=f"llmap-ray-join-{name}")
                 for name, (h, fut) in self.joining.items()]
        try:
            while True:
                drives = list(self._tasks.values())
                if feed.done() and all(t.done() for t in drives) and (
                        self._finished() or self.stats.stop.is_set() or not self.joining):
                    for t in [feed, *drives]:
                        t.result()  # raises a loop's error
                    break
                done, _ = await asyncio.wait([t for t in [feed, *drives, *joins] if not t.done()],
                                             return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if not t.cancelled() and t.exception() is not None:
                        raise t.exception()
        finally:
            for t in [feed, *joins, *self._tasks.values()]:
                t.cancel()
            await asyncio.gather(feed, *joins, *self._tasks.values(), return_exceptions=True)

    def _start(self, name: str) -> None:
        self._tasks[name] = asyncio.create_task(self._drive(name), name=f"llmap-ray-{name}")

    async def _join(self, name: str, handle: Any, setup: asyncio.Future) -> None:
        """A worker still starting joins the run once set up (unless every row is settled by then)."""
        try:
            await setup
        except Exception as exc:
            self.joining.pop(name, None)
            drop_worker(name, handle, exc)
            if not self.workers and not self.joining:
                self.stats.halt("every Ray worker is gone (the last could not start); finished rows are kept, "
                                "run the same command again to continue")
            self._wake()
            return
        self.joining.pop(name, None)
        self.workers[name] = handle
        if self._finished() or self.stats.stop.is_set():
            return  # closed with the others by aclose
        self._start(name)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _feed(self, todo: asyncio.Queue) -> None:
        """Cut the pool's lists of rows into leases of about ``lease_rows`` rows."""
        buf: list[PendingRow] = []
        n = self.lease_rows
        while True:
            items = await todo.get() if not buf else _nowait(todo)
            if items is not _EMPTY and items is not None:
                if self.stats.stop.is_set():
                    continue  # keep draining so the producer never blocks; the rows stay pending
                buf += items
            while len(buf) >= n or (buf and items is _EMPTY) or (buf and items is None):
                lease, buf = buf[:n], buf[n:]
                self._ready.append(lease)
                self._wake()
                while len(self._ready) >= max(1, len(self.workers)) and not self.stats.stop.is_set():
                    await self._changed.wait()  # back-pressure: the queue holds the rest
            if items is None:
                break
        self._exhausted = True
        self._wake()

    def _finished(self) -> bool:
        return self._exhausted and not self._ready and len(self.book) == 0

    async def _drive(self, name: str) -> None:
        """Keep one worker supplied with leases, and hand its results to the pool."""
        import ray

        handle = self.workers[name]
        tail_said = False
        while True:
            leases = []  # granted now: they travel with the next take (one Ray call for both)
            held = len(self.book.held_by(name))
            while held + len(leases) < LEASES_PER_WORKER and not self.stats.stop.is_set() and self._ready:
                rows = self._ready.popleft()
                lease = self.book.grant(name, [r.key for r in rows], self.clock())
                self._rows.update((r.key, r) for r in rows)
                leases.append((lease.id, lease.keys, [r.data for r in rows]))
            if leases:
                self._wake()
            tail = self._exhausted and not self._ready and not tail_said
            if not self.book.held_by(name):
                if self._finished() or self.stats.stop.is_set():
                    return
                changed = self._changed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 1.0)
                continue
            tail_said = tail_said or tail
            try:
                linger = min(TAKE_LINGER_MAX_S, TAKE_LINGER_S * max(1, len(self.workers)))
                batch: Batch = await asyncio.wait_for(handle.take.remote(TAKE_WAIT_S, linger, leases, tail),
                                                      self.book.timeout_s)
            except (TimeoutError, ray.exceptions.RayError) as exc:
                self._lost(name, exc)
                return
            self.book.heard(name, self.clock())
            self._apply(batch)
            if self.stats.stop.is_set() and not self._stopped:
                self._stopped = True
                for h in self.workers.values():
                    h.stop.remote()
            if self.stats.stop.is_set() and batch.busy == 0:
                for lease in self.book.held_by(name):
                    self.book.give_back(lease)  # the rest stays pending in the ledger
                self._wake()
                return

    def _apply(self, batch: Batch) -> None:
        """Merge a worker's batch: results to the pool (first answer per row only), usage to the stats."""
        st = self.stats
        st.merge(batch.stats)
        for w in batch.warnings:
            if w not in self._said:
                self._said.add(w)
                st.warn(w)
        if batch.hits and self.dispatcher.answers is not None:
            self.dispatcher.answers.hits += batch.hits
        pop = self._rows.pop
        for lease_id, enc, alike in batch.results:
            keys = [rec[-1] for rec in enc.rows]
            keep = self.book.accept_many(lease_id, keys)
            if len(keep) < len(keys):  # late answers for rows settled already: dropped
                kept = set(keep)
                enc = Encoded([rec for rec in enc.rows if rec[-1] in kept], [a for a in enc.attempts if a[0] in kept])
            if keep:
                self._settle(enc, list(map(pop, keep)), alike)
        if batch.halt is not None:
            st.halt(batch.halt)
        with contextlib.suppress(Stop):  # the dispatcher's own cap rule, on the usage merged from the workers
            self.dispatcher.check_caps()
        self._wake()

    def _lost(self, name: str, exc: BaseException) -> None:
        """A worker died or went silent: its leases go back to the others."""
        import ray

        handle = self.workers.pop(name)
        with contextlib.suppress(Exception):
            ray.kill(handle)
        keys = self.book.lost(name)
        rows = [self._rows[k] for k in keys]
        for i in reversed(range(0, len(rows), self.lease_rows)):
            self._ready.appendleft(rows[i:i + self.lease_rows])
        why = "stopped answering" if isinstance(exc, TimeoutError) else "died"
        if not self.workers and not self.joining:
            self.stats.halt(f"every Ray worker is gone (the last {why}); finished rows are kept, "
                            "run the same command again to continue")
        else:
            self.stats.warn(f"Ray worker {name} {why}; its {len(keys)} leased rows go to the "
                            f"{len(self.workers) + len(self.joining)} other workers")
        self._wake()


_EMPTY = object()


def _nowait(todo: asyncio.Queue) -> Any:
    try:
        return todo.get_nowait()
    except asyncio.QueueEmpty:
        return _EMPTY
