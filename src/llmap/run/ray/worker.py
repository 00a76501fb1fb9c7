"""One Ray worker: every per-row step of a run, over rows leased by the driver.

A :class:`RowWorker` is a Ray async actor (made by :mod:`llmap.run.ray.launch`). It
builds the job's providers, lanes and :class:`~llmap.run.dispatch.Dispatcher`
(and :class:`~llmap.run.packer.Packer`) exactly as a local run does, plugs
each lane into the cluster-wide budget (:mod:`llmap.run.ray.budget`), and
settles each lease's raw rows (key and data JSON) with the steps every
executor shares (:class:`~llmap.run.rows.RowSteps`):

1. render and key each row (:meth:`~llmap.run.rows.RowSteps.prepare`);
2. look the lease's keys up in the response cache, one call to the cache actor
   (:class:`~llmap.run.ray.data.CacheService`), and answer the hits
   (:meth:`~llmap.run.rows.RowSteps.answer`: a hit that meets ``escalate_if`` goes on as a cascade);
3. pack the misses (``Packer.size()`` rows per request) and solve them: send,
   validate, re-ask, cascade; identical requests within the worker are sent once;
4. write the answers it validated, and its hits, to the cache actor (every
   :data:`CACHE_WRITE_S` seconds and when it closes);
5. encode each result for the ledger (:class:`~llmap.store.ledger.Encoded`) and keep it in an
   outbox until the driver takes it (:meth:`RowWorker.take`), with the run's counters since the
   last take. The driver commits them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llmap.control.lanes import Lane
from llmap.providers.factory import make_provider
from llmap.run.dispatch import Dispatcher
from llmap.run.packer import Packer
from llmap.run.ray.budget import BudgetLink
from llmap.run.rows import PendingRow, RowSteps
from llmap.run.stats import DispatchStats, StatsDelta
from llmap.spec import JobSpec
from llmap.store.answers import AnswerCache
from llmap.store.cache import CacheEntry
from llmap.store.ledger import Encoded, RowResult

__all__ = ["CACHE_WRITE_S", "TAKE_LINGER_S", "Batch", "RowWorker"]

log = logging.getLogger(__name__)

#: Seconds between the worker's writes to the response cache actor.
CACHE_WRITE_S = 0.25
#: A take answers once a lease is wholly settled (the driver then leases more), or this many seconds
#: after the first result it holds (default; the driver passes its own), so each take carries many
#: rows: a Ray call costs the driver about 0.5 ms of CPU, a row about 10 µs (B15). An answer waits here
#: at most this long before the driver can commit it.
TAKE_LINGER_S = 0.05


@dataclass
class Batch:
    """What a worker hands the driver on each take.

    Attributes:
        results: ``(lease id, encoded results, alike)`` per lease with rows settled since the last
            take; ``alike``: the keys that failed on their input values (a template error).
        stats: the run's counters since the last take (:meth:`DispatchStats.take_delta`).
        hits: rows answered without a request since the last take (the response cache, or an
            identical request in this worker).
        warnings: warnings said since the last take.
        halt: why the worker stopped sending (an error every row would hit), or None.
        busy: rows still being settled by this worker.
    """

    results: list[tuple[int, Encoded, list[str]]] = field(default_factory=list)
    stats: StatsDelta = field(default_factory=StatsDelta)
    hits: int = 0
    warnings: list[str] = field(default_factory=list)
    halt: str | None = None
    busy: int = 0


class _Outbox:
    """The worker's response cache as :class:`~llmap.store.answers.AnswerCache` sees it (the part of
    :class:`~llmap.store.cache.ResponseCache`'s surface it uses): the stored answers of rows that go on
    as a cascade (their lookup was done per lease), and the writes and hits kept for the cache actor."""

    def __init__(self) -> None:
        self.entries: list[CacheEntry] = []
        self.hit_keys: list[str] = []
        self.found: dict[str, CacheEntry] = {}

    def get_many(self, keys: Sequence[str], *, count_hits: bool = True) -> dict[str, CacheEntry]:
        return {k: self.found[k] for k in keys if k in self.found}

    def get_stale_many(self, keys: Sequence[str]) -> dict[str, CacheEntry]:
        return {}

    def put_many(self, entries: Sequence[CacheEntry], *, wait: bool = False) -> int:
        self.entries.extend(entries)
        return len(entries)

    def record_hits(self, keys: Sequence[str], *, wait: bool = False) -> None:
        self.hit_keys.extend(keys)


class RowWorker:
    """A Ray worker settling leased rows (see the module docstring).

    Args:
        spec: the job.
        name: this worker's name (its actor name).
        budget: the budget actor's handle, or None for no shared budget.
        cache: the response cache actor's handle (:class:`~llmap.run.ray.data.CacheService`), or
            None (``[cache] enabled = false``: identical requests are still sent once per worker).
    """

    def __init__(self, spec: JobSpec, name: str, budget: Any | None, cache: Any | None = None) -> None:
        self.spec, self.name, self.budget, self.cache = spec, name, budget, cache
        self._out: dict[int, tuple[Encoded, list[str]]] = {}
        self._n_out = 0
        self._first_out = 0.0
        self._open: dict[int, int] = {}  # lease id -> rows not settled yet
        self._closed = False  # a lease was wholly settled since the last take
        self._ready = asyncio.Event()
        self._busy = 0
        self._hits = 0
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
        self._writer = asyncio.create_task(self._write_loop(), name="llmap-cache-writer")
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
    async def submit(self, lease_id: int, keys: list[str], datas: list[str]) -> None:
        """Start settling a lease's rows (their keys, and their data as JSON text); returns at once.

        Two lists of strings, not a list of pairs: Ray serialises lists of strings without a Python
        call per row on the driver. The driver sends its leases with :meth:`take` instead (one call)."""
        self._start(lease_id, keys, datas)

    def _start(self, lease_id: int, keys: list[str], datas: list[str]) -> None:
        self._busy += len(keys)
        self._open[lease_id] = len(keys)
        task = asyncio.create_task(self._lease(lease_id, list(zip(keys, datas, strict=True))))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lease(self, lease_id: int, rows: list[tuple[str, str]]) -> None:
        """Render, look up, answer, pack and solve one lease's rows (see the module docstring)."""
        held = len(rows)  # rows of this lease counted in _busy here
        try:
            ready, failed = self.prepare([PendingRow(key, data) for key, data in rows])
            if failed:
                self._put(lease_id, [res for res, _ in failed], alike=True)
            answered, todo = await self.answer(ready)
            if answered:
                self._put(lease_id, answered)
            packs = self.packs(todo)
            in_packs = sum(len(p) for p in packs)
            self._busy -= held - in_packs  # settled, or cut off by the run stopping (they stay pending)
            held = 0
            await asyncio.gather(*(self._solve(lease_id, items) for items in packs))
        finally:
            self._busy -= held

    def prepare(self, rows: list[PendingRow]) -> tuple[list[PendingRow], list[tuple[RowResult, PendingRow]]]:
        """Render and key ``rows`` (:meth:`RowSteps.prepare`); a template error fails its row alone."""
        return self.steps.prepare(rows, look_ahead=False, keyed=True)

    async def answer(self, ready: list[PendingRow]) -> tuple[list[RowResult], list[PendingRow]]:
        """Look ``ready``'s keys up in the cache actor (one call) and settle the hits; returns
        ``(answered, todo)``. A hit that escalates stays findable here for its cascade."""
        if self.cache is None or not ready:
            return [], ready
        try:
            found = await self.cache.get_many.remote(list({r.ckey for r in ready}))
        except Exception as exc:  # the cache actor is gone: the run goes on, sending what it would have found
            log.warning("llmap: response cache lookup failed (%s); sending the rows", exc)
            self.stats.warn(f"the response cache could not be read ({type(exc).__name__}); rows are sent without "
                            "looking it up")
            return [], ready
        pairs, todo = await self.steps.answer(ready, found)
        for r in todo:
            if r.single:  # a stored answer that escalates: the dispatcher's claim finds it and cascades
                self.outbox.found[r.ckey] = found[r.ckey]
        self._hits += len(pairs)
        self.outbox.hit_keys += [r.ckey for _, r in pairs]
        return [res for res, _ in pairs], todo

    def packs(self, todo: list[PendingRow]) -> list[list[PendingRow]]:
        """``todo`` in requests: ``Packer.size()`` rows each (one without ``[prompt] pack``); a row that goes
        on as a cascade goes alone."""
        size = self.packer.size() if self.packer is not None else 1
        if size == 1:
            return [[r] for r in todo]
        packs: list[list[PendingRow]] = []
        pack: list[PendingRow] = []
        for r in todo:
            if r.single:
                packs.append([r])
                continue
            pack.append(r)
            if len(pack) >= size:
                packs.append(pack)
                pack = []
        if pack:
            packs.append(pack)
        return packs

    async def solve(self, items: list[PendingRow]) -> list[RowResult] | None:
        """Settle one request's rows (:meth:`RowSteps.solve`); None when the run is stopping."""
        try:
            return await self.steps.solve(items)
        finally:
            if items[0].single:
                self.outbox.found.pop(items[0].ckey, None)

    async def _solve(self, lease_id: int, items: list[PendingRow]) -> None:
        try:
            results = await self.solve(items)  # None: the run is stopping, the rows stay pending
        finally:
            self._busy -= len(items)
        if results:
            self._put(lease_id, results)

    def _put(self, lease_id: int, results: list[RowResult], *, alike: bool = False) -> None:
        """Encode settled rows into the outbox for the driver's next take."""
        enc = Encoded.of(results)
        held = self._out.get(lease_id)
        if held is None:
            self._out[lease_id] = (enc, [r.key for r in results] if alike else [])
        else:
            held[0].extend(enc)
            if alike:
                held[1].extend(r.key for r in results)
        if not self._n_out:
            self._first_out = time.monotonic()
        self._n_out += len(results)
        left = self._open.get(lease_id, 0) - len(results)
        if left > 0:
            self._open[lease_id] = left
        else:
            self._open.pop(lease_id, None)
            self._closed = True
        self._ready.set()

    async def take(self, wait_s: float = 0.25, linger_s: float = TAKE_LINGER_S,
                   leases: Sequence[tuple[int, list[str], list[str]]] = (), tail: bool = False) -> Batch:
        """Start ``leases`` (as :meth:`submit` does each); then hand over what was settled since the last take.

        Waits up to ``wait_s`` seconds for a first result, then until a lease is wholly settled or
        ``linger_s`` seconds have passed since the first result (the run stopping, or nothing left in
        flight, answers at once). ``tail``: every row has been leased (as :meth:`tail`).
        """
        for lease_id, keys, datas in leases:
            self._start(lease_id, keys, datas)
        if tail:
            self._tail = True
        deadline = time.monotonic() + wait_s
        while self._halt is None:
            now = time.monotonic()
            if self._n_out:
                if self._closed or self._busy == 0 or self.stats.stop.is_set():
                    break
                wait = min(self._first_out + linger_s, deadline) - now
            else:
                wait = deadline - now
            if wait <= 0:
                break
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), wait)
        out, self._out, self._n_out, self._closed = self._out, {}, 0, False
        warnings, self._warnings = self._warnings, []
        hits = self._hits + self.dispatcher.answers.hits
        self._hits = self.dispatcher.answers.hits = 0
        return Batch([(lease, enc, alike) for lease, (enc, alike) in out.items()], self.stats.take_delta(), hits,
                     warnings, self._halt, self._busy)

    # -- the response cache ------------------------------------------------------------
    def take_entries(self) -> tuple[list[CacheEntry], list[str]]:
        """The answers validated and the stored answers served since the last call, to write to the
        response cache."""
        self.dispatcher.answers.flush()  # validated answers move into the outbox
        ob = self.outbox
        entries, ob.entries = ob.entries, []
        hits, ob.hit_keys = ob.hit_keys, []
        return entries, hits

    async def write_cache(self) -> None:
        """Write the answers validated (and the hits served) since the last write to the cache actor.

        A write that fails is said once as a warning and dropped: the ledger keeps every answer; only a
        later run's cache hits are lost.
        """
        entries, hits = self.take_entries()
        if self.cache is None or not (entries or hits):
            return
        try:
            await self.cache.write.remote(entries, hits)
        except Exception as exc:  # said once per kind of error (the driver says each warning once)
            log.warning("llmap: response cache write failed (%s)", exc)
            self.stats.warn(f"the response cache could not be written ({type(exc).__name__}); the ledger keeps "
                            "every answer, a later run pays again for the answers not cached")

    async def _write_loop(self) -> None:
        while True:
            await asyncio.sleep(CACHE_WRITE_S)
            await self.write_cache()

    async def tail(self) -> None:
        """Every row has been leased: stragglers may be hedged (``[limits] hedge_tail``)."""
        self._tail = True

    async def stop(self) -> None:
        """Send nothing more; rows in flight finish, rows waiting stay pending."""
        self.stats.stop.set()

    async def close(self) -> None:
        """Stop, write the cache, hand back unused budget, close the providers."""
        self.stats.stop.set()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._watchdog.cancel()
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        await self.write_cache()
        for link in self.links:
            await link.aclose()
        for p in self.providers:
            with contextlib.suppress(Exception):
                await p.aclose()
        self.compiled.close()
