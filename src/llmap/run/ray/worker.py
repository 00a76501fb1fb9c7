"""One Ray worker: llmap's own dispatcher over rows leased by the driver.

A :class:`RowWorker` is a Ray async actor (made by :mod:`llmap.run.ray.executor`). It
builds the job's providers, lanes and :class:`~llmap.run.dispatch.Dispatcher`
(and :class:`~llmap.run.packer.Packer`) exactly as a local run does, plugs
each lane into the cluster-wide budget (:mod:`llmap.run.ray.budget`), and
settles the rows of each lease with the steps every executor shares
(:meth:`~llmap.run.rows.RowSteps.solve`): send, validate, re-ask, pack,
cascade. Results wait in an outbox until the driver takes them
(:meth:`RowWorker.take`), with the answers to write to the response cache and
the run's counters since the last take. The worker writes nothing: the
driver commits to the ledger and the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llmap.control.lanes import Lane
from llmap.providers.factory import make_provider
from llmap.run.dispatch import Dispatcher
from llmap.run.packer import Packer
from llmap.run.ray.budget import BudgetLink
from llmap.run.rows import RowSteps
from llmap.run.stats import DispatchStats, StatsDelta
from llmap.spec import JobSpec
from llmap.store.answers import AnswerCache
from llmap.store.cache import CacheEntry
from llmap.store.ledger import RowResult

__all__ = ["Batch", "RowWorker"]


@dataclass
class Batch:
    """What a worker hands the driver on each take.

    Attributes:
        results: ``(lease id, results)`` of the packs settled since the last take.
        entries: validated answers to write to the response cache.
        stats: the run's counters since the last take (:meth:`DispatchStats.take_delta`).
        warnings: warnings said since the last take.
        halt: why the worker stopped sending (an error every row would hit), or None.
        busy: rows still being settled by this worker.
    """

    results: list[tuple[int, list[RowResult]]] = field(default_factory=list)
    entries: list[CacheEntry] = field(default_factory=list)
    stats: StatsDelta = field(default_factory=StatsDelta)
    warnings: list[str] = field(default_factory=list)
    halt: str | None = None
    busy: int = 0


class _Outbox:
    """The worker's response cache: no lookups (the driver answered those), writes kept for the driver.

    It has the part of :class:`~llmap.store.cache.ResponseCache`'s surface that
    :class:`~llmap.store.answers.AnswerCache` uses.
    """

    def __init__(self) -> None:
        self.entries: list[CacheEntry] = []

    def get_many(self, keys: Sequence[str], *, count_hits: bool = True) -> dict[str, CacheEntry]:
        return {}

    def get_stale_many(self, keys: Sequence[str]) -> dict[str, CacheEntry]:
        return {}

    def put_many(self, entries: Sequence[CacheEntry], *, wait: bool = False) -> int:
        self.entries.extend(entries)
        return len(entries)

    def record_hits(self, keys: Sequence[str], *, wait: bool = False) -> None:
        return None


class RowWorker:
    """A Ray worker settling leased rows (see the module docstring).

    Args:
        spec: the job.
        name: this worker's name (its actor name).
        budget: the budget actor's handle, or None for no shared budget.
    """

    def __init__(self, spec: JobSpec, name: str, budget: Any | None) -> None:
        self.spec, self.name, self.budget = spec, name, budget
        self._out: list[tuple[int, list[RowResult]]] = []
        self._ready = asyncio.Event()
        self._busy = 0
        self._tasks: set[asyncio.Task] = set()
        self._warnings: list[str] = []
        self._halt: str | None = None
        self._tail = False

    async def setup(self) -> str:
        """Build the providers, lanes and dispatcher; join the budget. Returns the Ray node's id.

        Raises:
            SpecError: the spec does not compile here, or a provider cannot be built (a missing
                API key variable on this node).
        """
        from llmap.plan import bind_checks, build_source, compile_spec

        spec = self.spec
        self.compiled = compile_spec(spec)
        if spec.output.checks:  # bound against the input's columns: its header is read here
            bind_checks(spec, self.compiled, build_source(spec))
        self.providers = [make_provider(m, concurrency=spec.limits.concurrency) for m in spec.models]
        self.stats = stats = DispatchStats()
        stats.on_warn = self._warnings.append
        stats.on_halt = self._halted
        self.lanes = [Lane(i, p, m, spec.limits) for i, (p, m) in enumerate(zip(self.providers, spec.models,
                                                                                   strict=True))]
        self.links: list[BudgetLink] = []
        if self.budget is not None:
            for lane in self.lanes:
                link = BudgetLink(self.name, lane.index, sync=self.budget.sync.remote,
                                  watch=self.budget.watch.remote, cap=lane.max_in_flight)
                link.in_flight = lambda lane=lane: lane.in_flight
                await link.start()
                lane.plug(link, link.aimd, link.breaker)
                self.links.append(link)
        self.outbox = _Outbox()
        self.dispatcher = Dispatcher(self.lanes, self.compiled.renderer, self.compiled.schema, spec.limits,
                                     max_reask=spec.output.max_reask, fallback=spec.output.fallback, stats=stats,
                                     answers=AnswerCache(self.outbox), escalate_if=self.compiled.escalate_if,
                                     **self.compiled.quality)
        self.dispatcher.watch_tail(lambda: self._tail)
        self.packer = Packer(self.dispatcher, spec.prompt.pack) if spec.prompt.pack != 1 else None
        self.steps = RowSteps(self.dispatcher, self.packer)
        self._watchdog = asyncio.create_task(self.dispatcher.watchdog(), name="llmap-timeout-watchdog")
        import ray

        return ray.get_runtime_context().get_node_id()

    async def node(self) -> str:
        """The Ray node this worker runs on (its id)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def _halted(self, reason: str) -> None:
        self._halt = reason
        self._ready.set()

    # -- the driver's calls -----------------------------------------------------------
    async def submit(self, lease_id: int, packs: list[list[Any]]) -> None:
        """Start settling a lease's packs (each a list of the pool's rows); returns at once."""
        for items in packs:
            self._busy += len(items)
            task = asyncio.create_task(self._solve(lease_id, items))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _solve(self, lease_id: int, items: list[Any]) -> None:
        try:
            results = await self.steps.solve(items) or []  # None: the run is stopping, the rows stay pending
        finally:
            self._busy -= len(items)
        self._out.append((lease_id, results))
        self._ready.set()

    async def take(self, wait_s: float = 0.25) -> Batch:
        """What was settled since the last take; waits up to ``wait_s`` seconds for something."""
        if not self._out and self._halt is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), wait_s)
        self._ready.clear()
        out, self._out = self._out, []
        entries = self.take_entries()
        warnings, self._warnings = self._warnings, []
        return Batch(out, entries, self.stats.take_delta(), warnings, self._halt, self._busy)

    def take_entries(self) -> list[CacheEntry]:
        """The answers validated since the last call, to write to the response cache (the driver does)."""
        self.dispatcher.answers.flush()  # validated answers move into the outbox
        entries, self.outbox.entries = self.outbox.entries, []
        return entries

    async def tail(self) -> None:
        """Every row has been leased: stragglers may be hedged (``[limits] hedge_tail``)."""
        self._tail = True

    async def stop(self) -> None:
        """Send nothing more; rows in flight finish, rows waiting stay pending."""
        self.stats.stop.set()

    async def close(self) -> None:
        """Stop, hand back unused budget, close the providers."""
        self.stats.stop.set()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._watchdog.cancel()
        for link in self.links:
            await link.aclose()
        for p in self.providers:
            with contextlib.suppress(Exception):
                await p.aclose()
        self.compiled.close()
