"""The Ray executor: the driver keeps the ledger, Ray workers settle leased rows.

``llmap run JOB --executor ray`` (or ``Job.run(executor="ray")``) runs the
job's life as a local run does (lock, preflight, plan, export: see
:mod:`llmap.engine`) and the same worker pool (:func:`llmap.run.pool.run_pool`),
which pages pending rows out of the ledger, answers cache hits and in-run
duplicates itself, and commits results in batches. Only the step that sends
requests moves: :class:`RayExecutor` is the pool's
:class:`~llmap.run.pool.RemoteRows`.

* It starts N :class:`~llmap.run.ray.worker.RowWorker` actors (round robin over the
  cluster's nodes) and the job's
  budget actor (:mod:`llmap.run.ray.budget`): one RPM/TPM budget, AIMD limit
  and circuit breaker per model for the whole cluster.
* It groups the pool's packs into leases of about :data:`LEASE_ROWS` rows
  and keeps :data:`LEASES_PER_WORKER` leases at each worker, so a worker never
  waits for the driver.
* One loop per worker long-polls its results (:meth:`RowWorker.take`) and
  hands each row's result to the pool once (:class:`~llmap.run.ray.leases.LeaseBook`):
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
import os
import re
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from llmap import errors as E
from llmap.run.dispatch import Dispatcher
from llmap.run.ray.budget import budget_actor
from llmap.run.ray.leases import LeaseBook
from llmap.run.ray.worker import Batch, RowWorker
from llmap.run.rows import PendingRow
from llmap.run.stats import DispatchStats, Stop
from llmap.spec import JobSpec
from llmap.store.ledger import RowResult

__all__ = ["Launch", "RayExecutor", "check_executor", "connect", "require_ray"]

log = logging.getLogger(__name__)

#: Rows per lease.
LEASE_ROWS = 256
#: Leases each worker holds at once.
LEASES_PER_WORKER = 2
#: Seconds a worker may stay silent before its leases go to the others.
LEASE_TIMEOUT_S = 30.0
#: Seconds a take waits in the worker for results before it answers empty.
TAKE_WAIT_S = 0.25


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


def _secrets(spec: JobSpec) -> dict[str, str]:
    """The environment variables the job's models read (API keys, header values) that are set here:
    workers on other nodes get them through Ray's runtime environment."""
    names = set()
    for m in spec.models:
        if getattr(m, "api_key_env", None):
            names.add(m.api_key_env)
        for v in (getattr(m, "headers", None) or {}).values():
            names.update(re.findall(r"\$\{(\w+)\}", str(v)))
    return {n: os.environ[n] for n in sorted(names) if n in os.environ}


class Launch:
    """Ray workers starting: made at the start of a run, so the workers start while the driver
    checks and plans the job; :meth:`executor` waits for them.

    Args:
        spec: the job.
        workers: how many (default: one per CPU of the cluster).
        address: the Ray cluster (see :func:`connect`).

    Raises:
        SpecError: Ray is missing or unreachable (at once: connecting blocks).
    """

    def __init__(self, spec: JobSpec, *, workers: int | None, address: str | None = "auto") -> None:
        connect(address)
        import ray

        n = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.budget = budget_actor(spec, workers=n)
        token = uuid.uuid4().hex[:8]
        env = _secrets(spec)
        options: dict[str, Any] = {"namespace": "llmap", "num_cpus": 0, "max_concurrency": 10_000}
        if env:
            options["runtime_env"] = {"env_vars": env}
        remote = ray.remote(RowWorker)
        self.handles: dict[str, Any] = {}
        nodes = _nodes()
        for i in range(n):
            name = f"llmap-worker-{spec.name}-{token}-{i}"
            self.handles[name] = remote.options(name=name, scheduling_strategy=_place(nodes, i), **options).remote(
                spec, name, self.budget)
        self._setup = asyncio.ensure_future(asyncio.gather(*(h.setup.remote() for h in self.handles.values()),
                                                           return_exceptions=True))

    async def executor(self, dispatcher: Dispatcher, stats: DispatchStats, **kw: Any) -> RayExecutor:
        """Wait until every worker is set up; the executor over them.

        A worker that could not be placed or started (its node went away) is dropped; the
        others go on.

        Raises:
            SpecError: a worker cannot build the job's providers (a missing API key variable there).
            ray.exceptions.RayError: no worker started; the first worker's error.
        """
        import ray

        try:
            results = await self._setup
        except BaseException:
            await self.abandon()
            raise
        errors = {name: r for name, r in zip(self.handles, results, strict=True) if isinstance(r, BaseException)}
        for exc in errors.values():
            cause = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) else None
            if isinstance(cause, E.LlmapError):  # the job, not the cluster: every worker would fail alike
                await self.abandon()
                raise E.SpecError(f"a Ray worker could not start the job: {cause}") from None
        if len(errors) == len(self.handles):
            await self.abandon()
            raise next(iter(errors.values()))
        for name in errors:
            log.warning("llmap: Ray worker %s did not start (%s); the others go on", name, errors[name])
            with contextlib.suppress(Exception):
                ray.kill(self.handles.pop(name))
        handles, self.handles = self.handles, {}
        return RayExecutor(handles, self.budget, dispatcher, stats, **kw)

    async def abandon(self) -> None:
        """End the workers (the run stopped before it needed them)."""
        import ray

        self._setup.cancel()
        await asyncio.gather(self._setup, return_exceptions=True)
        for h in self.handles.values():
            with contextlib.suppress(Exception):
                ray.kill(h)
        self.handles = {}


class RayExecutor:
    """The pool's :class:`~llmap.run.pool.RemoteRows` on a Ray cluster (see the module docstring).

    Made with :meth:`start`; close it with :meth:`aclose`.

    Attributes:
        workers: worker name -> actor handle, for the workers still alive.
        book: the :class:`~llmap.run.ray.leases.LeaseBook`.
    """

    def __init__(self, workers: dict[str, Any], budget: Any, dispatcher: Dispatcher, stats: DispatchStats, *,
                 lease_rows: int | None = None, lease_timeout_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.workers = workers
        self.budget = budget
        self.dispatcher, self.stats = dispatcher, stats
        self.lease_rows = lease_rows or LEASE_ROWS
        self.book = LeaseBook(lease_timeout_s or LEASE_TIMEOUT_S)
        self.clock = clock
        self.queue_items = max(64, len(workers) * LEASES_PER_WORKER * self.lease_rows)
        self._ready: deque[list[list[Any]]] = deque()  # leases to hand out: lists of packs
        self._exhausted = False
        self._changed = asyncio.Event()
        self._rows: dict[str, Any] = {}  # key -> the pool's row, while leased
        self._said: set[str] = set()
        self._stopped = False

    @classmethod
    async def start(cls, spec: JobSpec, dispatcher: Dispatcher, stats: DispatchStats, *, workers: int | None,
                    address: str | None = "auto", **kw: Any) -> RayExecutor:
        """Connect to Ray, start the budget actor and ``workers`` workers (see :class:`Launch`).

        Raises:
            SpecError: Ray is missing or unreachable, or a worker cannot build the job's providers.
        """
        return await Launch(spec, workers=workers, address=address).executor(dispatcher, stats, **kw)

    async def aclose(self) -> None:
        """Close every worker (unused budget is handed back) and end them."""
        import ray

        closing = [h.close.remote() for h in self.workers.values()]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), 10)
        for h in self.workers.values():
            with contextlib.suppress(Exception):
                ray.kill(h)
        self.workers.clear()

    # -- the pool's RemoteRows -------------------------------------------------------------
    async def run(self, todo: asyncio.Queue, settle: Callable[[list[RowResult], list[Any]], None]) -> None:
        """Lease the pool's packs to the workers until ``todo`` ends and every row is settled."""
        self._settle = settle
        tasks = [asyncio.create_task(self._feed(todo), name="llmap-ray-feed")]
        tasks += [asyncio.create_task(self._drive(name), name=f"llmap-ray-{name}") for name in list(self.workers)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _feed(self, todo: asyncio.Queue) -> None:
        """Group the pool's packs into leases of about ``lease_rows`` rows."""
        lease: list[list[Any]] = []
        rows = 0
        while True:
            items = await todo.get() if not lease else _nowait(todo)
            if items is _EMPTY or items is None or rows >= self.lease_rows:
                if lease:
                    self._ready.append(lease)
                    self._wake()
                lease, rows = [], 0
                while len(self._ready) >= len(self.workers) and not self.stats.stop.is_set() and self.workers:
                    await self._changed.wait()  # back-pressure: the queue holds the rest
            if items is None:
                break
            if items is not _EMPTY:
                if self.stats.stop.is_set():
                    continue  # keep draining so the producer never blocks; the rows stay pending
                lease.append(items)
                rows += len(items)
        self._exhausted = True
        self._wake()

    def _next(self) -> list[list[Any]] | None:
        return self._ready.popleft() if self._ready else None

    def _finished(self) -> bool:
        return self._exhausted and not self._ready and len(self.book) == 0

    async def _drive(self, name: str) -> None:
        """Keep one worker supplied with leases, and hand its results to the pool."""
        import ray

        handle = self.workers[name]
        tail_said = False
        while True:
            while len(self.book.held_by(name)) < LEASES_PER_WORKER and not self.stats.stop.is_set():
                packs = self._next()
                if packs is None:
                    break
                lease = self.book.grant(name, [r.key for items in packs for r in items], self.clock())
                for items in packs:
                    for r in items:
                        self._rows[r.key] = r
                handle.submit.remote(lease.id, [[_slim(r) for r in items] for items in packs])
                self._wake()
            if self._exhausted and not self._ready and not tail_said:
                handle.tail.remote()
                tail_said = True
            if not self.book.held_by(name):
                if self._finished() or self.stats.stop.is_set():
                    return
                changed = self._changed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 1.0)
                continue
            try:
                batch: Batch = await asyncio.wait_for(handle.take.remote(TAKE_WAIT_S),
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
        answers = self.dispatcher.answers
        if answers is not None:
            for entry in batch.entries:
                answers.resolve(entry.key, entry)
        for lease_id, results in batch.results:
            keep = [r for r in results if self.book.accept(lease_id, r.key)]
            if keep:
                self._settle(keep, [self._rows.pop(r.key) for r in keep])
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
        if keys:
            packs = [[self._rows[k]] for k in keys]  # re-leased row by row (a pack is re-formed by the worker)
            for i in range(0, len(packs), self.lease_rows):
                self._ready.appendleft(packs[i:i + self.lease_rows])
        why = "stopped answering" if isinstance(exc, TimeoutError) else "died"
        if not self.workers:
            self.stats.halt(f"every Ray worker is gone (the last {why}); finished rows are kept, "
                            "run the same command again to continue")
        else:
            self.stats.warn(f"Ray worker {name} {why}; its {len(keys)} leased rows go to the "
                            f"{len(self.workers)} other workers")
        self._wake()


_EMPTY = object()


def _nodes() -> list[str]:
    """The ids of the cluster's live nodes that have CPUs, in a stable order."""
    import ray

    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)


def _place(nodes: list[str], i: int) -> Any:
    """Worker ``i``'s placement: round robin over ``nodes``. Ray's SPREAD and soft node affinity are
    best effort and put several zero-CPU workers on one node at times; a hard affinity to a node
    that went away fails that worker's start, and :meth:`Launch.executor` goes on without it."""
    if not nodes:
        return "SPREAD"
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=False)


def _nowait(todo: asyncio.Queue) -> Any:
    try:
        return todo.get_nowait()
    except asyncio.QueueEmpty:
        return _EMPTY


def _slim(row: PendingRow) -> PendingRow:
    """The pool's row as a worker needs it (no ledger data: the rendered messages and values suffice)."""
    return PendingRow(row.key, "", None, row.row, row.messages, row.ckey, row.single)
