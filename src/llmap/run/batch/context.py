"""What the batch path's steps share: the run's objects, the policies learned so far, and two ways to settle rows.

:class:`BatchContext` is handed to the submitter (:mod:`llmap.run.batch.submit`)
and the collector (:mod:`llmap.run.batch.collect`). It commits settled rows
to the ledger (:meth:`BatchContext.commit`, durable before they count, as
the worker pool does) and sends rows down the real-time path
(:meth:`BatchContext.to_realtime`: the steps the worker pool runs,
:class:`~llmap.run.rows.RowSteps`, over the
:class:`~llmap.run.dispatch.Dispatcher`, with the model's limits, retries,
failover and cascade).

Per-row retry state (batch tries, re-asks) lives in memory for the run: a
crash loses only the count, never a row.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from llmap.control.batching import EnqueueGate, SizeLimit
from llmap.control.lanes import Lane
from llmap.observe.progress import Progress, Tally
from llmap.providers.batch.base import BatchAPI
from llmap.run.dispatch import Dispatcher
from llmap.run.rows import PendingRow, RowSteps
from llmap.run.settle import Tries
from llmap.run.stats import DispatchStats
from llmap.spec import BatchSpec
from llmap.store.batches import BatchBook
from llmap.store.ledger import Ledger, RowResult

__all__ = ["BatchContext"]

#: Rows at most in real time at once (each waits for its lane's concurrency gate anyway).
MAX_REALTIME = 1024


@dataclass
class BatchContext:
    """The batch path's shared state for one run.

    Attributes:
        ledger, book: the job's ledger and its batch tables.
        run_id: the run (and plan) being settled.
        job: the job's name (tagged on OpenAI batches).
        spec: ``[batch]``.
        api: the first model's batch API.
        dispatcher: the real-time path (lanes, cache, schema, renderer).
        stats, tally, progress: the run's counters and reporter.
        pack: rows per line (``[prompt] pack``; ``"auto"`` starts at its first size).
        on_settled: the engine's hook on settled rows (alerts, logs).
        clock: POSIX seconds (deadlines); injectable.
        size, gate: what the provider refused so far (:mod:`llmap.control.batching`).
        tries: per row, batch requests that failed transiently.
        reasks: per row, what its answers went through on the batch model (re-asks, a cut).
        followup: per row, the re-ask its next batch request carries.
        single: rows whose next batch request goes alone (they were damaged in a pack).
        user_cancelled: ``llmap batch cancel`` cancelled a batch of the job: submit nothing more.
        only: which pending rows this path settles (a condition over ``rows``), or None for every one
            (a guaranteed cascade's phase: :mod:`llmap.run.guaranteed`).
    """

    ledger: Ledger
    book: BatchBook
    run_id: int
    job: str
    spec: BatchSpec
    api: BatchAPI
    dispatcher: Dispatcher
    stats: DispatchStats
    tally: Tally
    progress: Progress
    pack: int = 1
    on_settled: Callable[[list[RowResult], list[str]], None] | None = None
    clock: Callable[[], float] = time.time
    size: SizeLimit = field(default_factory=lambda: SizeLimit(1, 1))
    gate: EnqueueGate = field(default_factory=EnqueueGate)
    tries: dict[str, int] = field(default_factory=dict)
    reasks: dict[str, Tries] = field(default_factory=dict)
    followup: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    single: set[str] = field(default_factory=set)
    user_cancelled: bool = False
    only: str | None = None
    _tasks: set[asyncio.Task] = field(default_factory=set)
    _slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_REALTIME))
    _buffer: list[tuple[RowResult, str]] = field(default_factory=list)
    _realtime: set[str] = field(default_factory=set)
    _steps: RowSteps | None = None
    _commit_due: bool = False

    @property
    def lane(self) -> Lane:
        """The batch model's lane (the first)."""
        return self.dispatcher.lanes[0]

    @property
    def steps(self) -> RowSteps:
        """The steps the worker pool runs (render and key, solve), over this run's dispatcher."""
        if self._steps is None:
            self._steps = RowSteps(self.dispatcher)
        return self._steps

    def busy(self, key: str) -> bool:
        """True while the row is in real time in this run (no batch takes it)."""
        return key in self._realtime

    # -- settling -------------------------------------------------------------
    def commit(self, results: Sequence[RowResult], datas: Sequence[str],
               also: Sequence[tuple[str, tuple]] = ()) -> None:
        """Commit settled rows, the request log and ``also`` in one transaction; then count them."""
        results, datas = list(results), list(datas)
        if self.on_settled is not None and results:
            self.on_settled(results, datas)
        answers = self.dispatcher.answers
        if answers is not None:
            answers.flush()
        self.ledger.record(results, run_id=self.run_id, requests=self.stats.take_request_log(), also=also)
        t, st = self.tally, self.stats
        for r in results:
            setattr(t, r.status, getattr(t, r.status) + 1)
        t.requests, t.prompt_tokens, t.completion_tokens = st.requests, st.prompt_tokens, st.completion_tokens
        t.cache_read_tokens, t.cost_usd, t.rate_limited = st.cache_read_tokens, st.cost_usd, st.rate_limited
        t.cache_hits = answers.hits if answers is not None else 0
        self.progress.advance(t)

    def flush(self) -> None:
        """Commit the rows real time has settled since the last flush (they stay out of batches until then)."""
        if self._buffer or self.stats.request_log:
            done, self._buffer = self._buffer, []
            self.commit([r for r, _ in done], [d for _, d in done])
            self._realtime.difference_update(r.key for r, _ in done)

    def to_realtime(self, key: str, data: str, *, start: int = 0, extra: Sequence[dict[str, str]] = (),
                    tries: Tries | None = None, lead: str | None = None, tried: list | None = None) -> None:
        """Settle a row through the real-time path in the background (committed by :meth:`flush`).

        Args:
            key, data: the row and its data (JSON).
            start: the first lane: 0 for a retry, 1 to fail over or cascade past the batch model.
            extra, tries: a re-ask of a batch answer and what the row went through on the batch
                model (see :meth:`Dispatcher.solve_messages`).
            lead: the row's cache key on lane ``start``, when nothing holds it (its answer is cached under it).
            tried: answers met before (a cascade keeps the batch model's answer when every later model fails).
        """
        if key in self._realtime:
            return
        self._realtime.add(key)
        task = asyncio.get_running_loop().create_task(self._solve(key, data, start, extra, tries, lead, tried))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _solve(self, key: str, data: str, start: int, extra: Sequence[dict[str, str]], tries: Tries | None,
                     lead: str | None, tried: list | None) -> None:
        res: RowResult | None = None
        try:
            async with self._slots:
                ready, failed = self.steps.prepare([PendingRow(key, data)], look_ahead=False)
                if failed:
                    res = failed[0][0]
                elif ready:
                    res = await self.steps.solve_row(ready[0], start=start, lead=lead, extra=extra, tries=tries,
                                                     tried=tried)
        finally:
            if res is None:
                self._realtime.discard(key)  # unsettled (the run stops): free again
            else:
                self._buffer.append((res, data))  # held out of batches until flush() commits it
                if not self._commit_due:  # committed at the end of this loop turn: an answer received is kept
                    self._commit_due = True
                    asyncio.get_running_loop().call_soon(self._commit)

    def _commit(self) -> None:
        self._commit_due = False
        self.flush()

    @property
    def in_realtime(self) -> int:
        """Rows in real time now (settled but not yet committed ones included)."""
        return len(self._realtime)

    async def drain(self) -> None:
        """Wait for every row in real time, then commit them."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self.flush()

    async def abandon(self) -> None:
        """Cancel the rows in real time (Ctrl-C); what they settled so far is committed."""
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self.flush()
