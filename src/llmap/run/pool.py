"""The worker pool: pending rows out of the ledger, settled rows back into it.

A producer pages ``pending`` rows out of the ledger (in input order, or
``order_by``), renders them, and looks the whole page up in the response
cache at once (one query per page). Cache hits settle at once. A row whose
request is identical to one already being answered in this run waits for
that answer instead of being sent (if that row fails, exactly one waiting
row takes over). The rest go into a bounded queue, one row or one pack at a
time, and workers settle them through the :class:`~llmap.run.dispatch.Dispatcher`
(or the :class:`~llmap.run.packer.Packer`). An answer received is an answer
kept: settled rows are committed to the ledger at the end of the event-loop
turn in which they settled (one small SQLite WAL transaction, no fsync), so a
SIGKILL can lose only the requests still in flight and the answers of that
one turn; a row counts only once committed. The response cache (which other
jobs and reruns read) and the progress reporter follow every 0.25 s.

A row whose own values break it (a template error on a NULL, a bug) fails
alone with the error; the worker and the run go on. The pool's helper tasks
(the commit ticker, the timeout watchdog) are supervised: if one dies, the
run stops with its error.

With ``per_group`` quotas the producer works in passes: each pass takes
rows while a group lacks done rows, waits for them, and the next pass
replaces the rows that failed, until a pass takes nothing.

Memory stays flat: the queue, the commit buffer and the packs are bounded,
and rows waiting for an identical row keep only their key and data.

:class:`~llmap.run.remote.RemotePool` is this loop with the requests settled elsewhere (the Ray
executor's workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
from collections import deque
from collections.abc import Callable, Sequence

from llmap.control.quota import GroupQuota, QuotaDecision
from llmap.errors import DiskFull
from llmap.observe.progress import Progress, Tally
from llmap.run.dispatch import Dispatcher
from llmap.run.packer import Packer
from llmap.run.rows import PendingRow, RowSteps
from llmap.run.stats import DispatchStats
from llmap.store.ledger import Ledger, RowResult

__all__ = ["Pool", "first_of", "install_sigterm", "run_pool"]

#: Rows committed to the ledger at once at most (results are committed at the end of the loop turn they
#: settle in, and the request log and progress every ``FLUSH_S`` seconds).
COMMIT_ROWS = 256
FLUSH_S = 0.25
#: Pending rows read from the ledger (and looked up in the response cache) per query.
PAGE_ROWS = 512
#: Rows that may wait for an identical row before the producer pauses (memory bound).
MAX_WAITING = 100_000


class Pool:
    """The run loop over one plan's pending rows (see the module docstring).

    Its named steps: :meth:`prepare_page` (ledger rows to prepared rows, quotas applied),
    :meth:`take` (settle from memory, wait for an identical row, or pack and hand out),
    :meth:`settle` (results in, identical rows fanned out, counted), :meth:`flush` (commit).
    The rendering, keying, cache answers and the contained solve are
    :class:`~llmap.run.rows.RowSteps`, shared with the batch path and the Ray executors.

    Args:
        ledger: the job's ledger (rows planned, results recorded here).
        run_id: the plan to work on.
        dispatcher: settles one row (or one pack).
        stats: run counters; ``stats.stop`` ends dispatch early.
        tally: progress totals, advanced after each commit.
        progress: the progress reporter.
        quota: ``(column, n)`` from ``[input] per_group``, or None.
        packer: settles packs of rows (``[prompt] pack``), or None for one row per request.
        on_settled: called with each batch of settled rows and their input data
            (JSON), before they are committed (alerts, structured logs).
    """

    def __init__(self, ledger: Ledger, run_id: int, dispatcher: Dispatcher, stats: DispatchStats, tally: Tally,
                 progress: Progress, *, quota: tuple[str, int] | None = None, packer: Packer | None = None,
                 on_settled: Callable[[list[RowResult], list[str]], None] | None = None) -> None:
        self.ledger, self.run_id = ledger, run_id
        self.d, self.stats, self.tally, self.progress = dispatcher, stats, tally, progress
        self.packer, self.on_settled = packer, on_settled
        self.steps = RowSteps(dispatcher, packer)
        self.answers = dispatcher.answers
        self.n_workers = min(1024, 2 * max(lane.max_in_flight for lane in dispatcher.lanes))
        self.todo: asyncio.Queue[list[PendingRow] | None] = asyncio.Queue(maxsize=self.n_workers * 2)
        self.buffer: list[RowResult] = []
        self.outstanding = 0  # rows taken and not yet settled (quota passes wait for 0)
        self.settled = asyncio.Event()
        self.waiting: dict[str, list[PendingRow]] = {}  # cache key -> rows waiting for the row leading it
        self.n_waiting = 0
        self.promoted: deque[PendingRow] = deque()  # rows that lead again after their request's leader failed
        self.struck: set[str] = set()  # requests whose first leader failed: a second failure fails the rest
        self.wake = asyncio.Event()  # a row was promoted, or waiting rows settled
        self.pack: list[PendingRow] = []  # rows gathered into the next request
        self.handed_out = asyncio.Event()
        self.disk_full: list[DiskFull] = []  # a write found the disk full: stop dispatch, raise it at the end
        self._commit_due = False  # a commit is scheduled for the end of this loop turn
        self._unreported = False  # rows committed since the progress reporter last heard
        self._taken = 0  # rows the current quota pass took
        self.quota_column: str | None = None
        self.group_quota: GroupQuota | None = None
        if quota is not None:
            self.quota_column, n = quota
            done = {g: count for g, status, count in ledger.grouped_counts(run_id, self.quota_column)
                    if status == "done"}
            self.group_quota = GroupQuota(n, done)

    # -- running ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Settle every pending row of the plan.

        Raises:
            asyncio.CancelledError: on Ctrl-C / SIGTERM, after committing every finished row.
            Exception: a helper task (commit ticker, timeout watchdog) or the
                producer died; the run stops with that error after committing.
            DiskFull: a commit found the disk full; dispatch stopped, committed rows are kept.
        """
        self.d.watch_tail(lambda: self.handed_out.is_set() and self.todo.qsize() <= self.n_workers)
        prod = asyncio.create_task(self.producer(), name="llmap-producer")
        workers = self.start_workers()
        helpers = [asyncio.create_task(self.ticker(), name="llmap-commit-ticker"),
                   asyncio.create_task(self.d.watchdog(), name="llmap-timeout-watchdog")]
        tasks = [prod, *workers, *helpers]
        undo_sigterm = install_sigterm(asyncio.current_task())
        try:
            await _supervise(tasks, until_done=[prod, *workers])
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.packer is not None:
                await self.packer.aclose()
            if self.answers is not None:
                self.answers.abandon()
            undo_sigterm()
            self.flush(last=True)
        if self.disk_full:
            raise self.disk_full[0]

    def start_workers(self) -> list[asyncio.Task]:
        """The tasks that settle what the producer hands out: :attr:`n_workers` local workers."""
        return [asyncio.create_task(self.worker(), name="llmap-worker") for _ in range(self.n_workers)]

    def halt_on_disk_full(self, exc: DiskFull) -> None:
        """A write found the disk full: no new requests; the error is raised when the pool is down."""
        if not self.disk_full:
            self.disk_full.append(exc)
            self.stats.stop.set()  # said once, by whoever catches the DiskFull raised at the end

    # -- flush -------------------------------------------------------------------------------
    def flush(self, *, last: bool = False, advance: bool = True) -> None:
        """Commit the settled rows and the request log, then count them (durable before it counts);
        with ``advance``, tell the progress reporter.

        A full disk halts dispatch (no new requests) instead of raising here. Later flushes still
        try: the ledger and the response cache may be on different disks, so the answers of the
        requests still in flight reach whichever has room, and a rerun finds them there instead of
        paying again. Rows whose results could not be committed stay ``pending``.
        """
        try:
            self._flush(last, advance)
        except DiskFull as exc:
            self.halt_on_disk_full(exc)

    def commit_soon(self) -> None:
        """Commit the settled rows at the end of this event-loop turn: every answer that settles in the turn
        shares one transaction (SQLite WAL with ``synchronous = NORMAL``: durable against a process kill, no
        fsync). Measured: +0.3% CPU per row against commits every 256 rows or 0.25 s (bench/b18_durability.py)."""
        if not self._commit_due:
            self._commit_due = True
            asyncio.get_running_loop().call_soon(self._commit)

    def _commit(self) -> None:
        self._commit_due = False
        self.flush(advance=False)

    def _flush(self, last: bool, advance: bool) -> None:
        answers, stats, tally = self.answers, self.stats, self.tally
        if answers is not None and advance:  # the ledger holds every settled row: the cache may wait for the tick
            try:
                answers.flush(wait=last)
            except DiskFull as exc:  # the cache's disk is full: still commit to the ledger, which may have room
                self.halt_on_disk_full(exc)
        if self.commit(stats.take_request_log()):
            self._unreported = True
        if not (advance and self._unreported):
            return
        self._unreported = False
        tally.requests = stats.requests
        tally.prompt_tokens, tally.completion_tokens = stats.prompt_tokens, stats.completion_tokens
        tally.cache_read_tokens = stats.cache_read_tokens
        tally.cost_usd, tally.rate_limited = stats.cost_usd, stats.rate_limited
        tally.cache_hits = answers.hits if answers is not None else 0
        tally.in_flight = sum(lane.in_flight for lane in self.d.lanes)
        tally.concurrency = sum(lane.limit for lane in self.d.lanes)
        self.progress.advance(tally)

    def commit(self, log: list[tuple]) -> bool:
        """Commit the settled rows and the request entries ``log``, then count the rows (durable before it
        counts). Returns whether anything was committed."""
        if not (self.buffer or log):
            return False
        self.ledger.record(self.buffer, run_id=self.run_id, requests=log)  # durable before it counts
        tally = self.tally
        for r in self.buffer:
            setattr(tally, r.status, getattr(tally, r.status) + 1)
        self.buffer.clear()
        return True

    # -- settle ------------------------------------------------------------------------------
    def settle(self, results: Sequence[RowResult], rows: Sequence[PendingRow]) -> None:
        """Take settled rows in: fan a leader's answer out to the identical rows waiting for it
        (or promote one of them when it failed), then buffer them for the next commit."""
        results, rows = list(results), list(rows)
        for r, row in zip(list(results), list(rows), strict=True):
            followers = self.waiting.pop(row.ckey, None) if row.ckey is not None else None
            if not followers:
                continue
            self.n_waiting -= len(followers)
            self.wake.set()
            if r.status == "done":  # the answer fans out to every identical row
                if self.answers is not None:
                    self.answers.hits += len(followers)
                for f in followers:
                    if not self.d.settler.accepts_now(r.output, json.loads(f.data)):  # a check on its own columns
                        f.single = True  # it asks the model itself, and is re-asked with the check's message
                        self.promoted.append(f)
                        continue
                    results.append(RowResult(f.key, "done", output=r.output, model=r.model, source="cache",
                                             tried=[(r.model or "", "cache", r.output, 0, 0)],
                                             confidence=r.confidence))
                    rows.append(f)
            elif row.ckey not in self.struck:  # exactly one waiting row takes over; the others wait for it
                self.struck.add(row.ckey)
                self.waiting[row.ckey] = followers[1:]
                self.n_waiting += len(followers) - 1
                self.promoted.append(followers[0])
            else:  # the same request failed for two rows: the rest fail with it, unsent (a rerun retries them)
                for f in followers:
                    results.append(RowResult(f.key, "failed",
                                             error=f"an identical row's request failed twice: {r.error}"))
                    rows.append(f)
        for r, row in zip(results, rows, strict=True):
            if row.resolved_hash is not None:  # its documents' content, learned on its path (a URL fetched)
                r.input_hash = row.resolved_hash
        if self.on_settled is not None:
            self.on_settled(results, [row.data for row in rows])
        self.buffer.extend(results)
        if self.group_quota is not None:
            for r, row in zip(results, rows, strict=True):
                self.group_quota.settle(row.group, done=r.status == "done")
        self.outstanding -= len(results)
        if self.outstanding == 0:
            self.settled.set()
        if len(self.buffer) >= COMMIT_ROWS:
            self.flush(advance=False)
        elif self.buffer:
            self.commit_soon()

    # -- prepare a page ------------------------------------------------------------------------
    async def prepare_page(self, page: Sequence[tuple[int, str, str]]) -> list[PendingRow]:
        """Ledger rows ``(seq, key, data)`` into prepared rows: quotas applied (a group already full is
        skipped with the reason), documents read, rendered and keyed; a row whose document cannot be read
        or whose template fails is settled failed."""
        rows = []
        for _, key, data in page:
            if self.group_quota is None:
                rows.append(PendingRow(key, data))
                continue
            g = json.loads(data).get(self.quota_column)
            decision = self.group_quota.decide(g)
            if decision is QuotaDecision.TAKE:
                rows.append(PendingRow(key, data, g))
            elif decision is QuotaDecision.SKIP:
                self.buffer.append(RowResult(key=key, status="skipped",
                                             error=self.group_quota.reason(g, self.quota_column)))
        resolved, failed = await self.steps.resolve(rows)
        ready, unrendered = self.steps.prepare(resolved)
        for res, row in failed + unrendered:
            self.outstanding += 1
            self.settle([res], [row])
        self._taken += len(rows)
        return ready

    # -- take ----------------------------------------------------------------------------------
    async def take(self, row: PendingRow) -> None:
        """Settle ``row`` from memory, make it wait for an identical row, or hand it to the workers."""
        self.outstanding += 1
        self.settled.clear()
        answers = self.answers
        if row.ckey is not None:
            if row.ckey in self.waiting:  # an identical request is being answered: wait for it
                answers.pass_over(row.ckey)
                self.waiting[row.ckey].append(PendingRow(row.key, row.data, row.group, ckey=row.ckey,
                                                         resolved_hash=row.resolved_hash))
                self.n_waiting += 1
                return
            hit = answers.peek(row.ckey)
            if hit is not None and (res := await self.steps.from_cache(row, hit)) is not None:
                self.settle([res], [row])
                return
            self.waiting[row.ckey] = []  # this row leads its request; identical rows will wait for its result
        await self.hand_out(row)

    async def hand_out(self, row: PendingRow) -> None:
        """Add ``row`` to the pack being gathered (a cascading row goes alone); a full pack goes out."""
        if row.single:
            await self.end_pack()
            await self.todo.put([row])
            return
        self.pack.append(row)
        if len(self.pack) >= (self.packer.size() if self.packer is not None else 1):
            await self.end_pack()

    async def end_pack(self) -> None:
        """Hand out the pack gathered so far."""
        if self.pack:
            items, self.pack = self.pack, []
            await self.todo.put(items)

    async def drain_promoted(self) -> None:
        """Hand out the rows promoted to lead again."""
        while self.promoted:
            row = self.promoted.popleft()
            for ready in self.steps.prepare([row])[0]:
                await self.hand_out(ready)

    # -- the producer, the workers, the ticker ------------------------------------------------------
    async def one_pass(self) -> int:
        """Take every pending row the quota allows; returns how many were taken."""
        self._taken, after = 0, -1
        stop = self.stats.stop
        while not stop.is_set():
            page = self.ledger.pending(self.run_id, after_seq=after, limit=self.steps.page_rows(PAGE_ROWS))
            if not page:
                break
            after = page[-1][0]
            for row in await self.prepare_page(page):
                await self.take(row)
                if self.n_waiting > MAX_WAITING:
                    await self.end_pack()
                    while self.n_waiting > MAX_WAITING and not stop.is_set():
                        self.wake.clear()
                        await first_of(self.wake, stop)
                        await self.drain_promoted()
            await self.drain_promoted()
        await self.end_pack()
        return self._taken

    async def producer(self) -> None:
        """Page the pending rows out (in quota passes), wait for the rows waiting on identical ones,
        then tell the workers there is no more."""
        stop = self.stats.stop
        if self.group_quota is None:
            await self.one_pass()
        else:
            while await self.one_pass() and not stop.is_set():
                await first_of(self.settled, stop)  # the next pass replaces rows that failed
                self.flush()
        while not stop.is_set():  # rows still waiting for an identical row's answer
            await self.drain_promoted()
            await self.end_pack()
            if not self.promoted and not self.n_waiting:
                break
            self.wake.clear()
            if not self.promoted:
                await first_of(self.wake, stop)
        self.handed_out.set()
        for _ in range(self.n_workers):
            await self.todo.put(None)

    async def worker(self) -> None:
        """Settle packs from the queue until it ends."""
        while (items := await self.todo.get()) is not None:
            if self.stats.stop.is_set():
                continue  # keep draining so the producer never blocks; the rows stay pending
            try:
                results = await self.steps.solve(items)
            except DiskFull as exc:  # a cache write on the row's path: stop as after a failed commit
                self.halt_on_disk_full(exc)
                continue
            if results is not None:
                self.settle(results, items)

    async def ticker(self) -> None:
        """Commit every :data:`FLUSH_S` seconds."""
        while True:
            await asyncio.sleep(FLUSH_S)
            self.flush()


async def run_pool(ledger: Ledger, run_id: int, dispatcher: Dispatcher, stats: DispatchStats, tally: Tally,
                   progress: Progress, *, quota: tuple[str, int] | None = None,
                   packer: Packer | None = None,
                   on_settled: Callable[[list[RowResult], list[str]], None] | None = None) -> None:
    """Settle every pending row of plan ``run_id``: ``await Pool(...).run()`` (see :class:`Pool`)."""
    await Pool(ledger, run_id, dispatcher, stats, tally, progress, quota=quota, packer=packer,
               on_settled=on_settled).run()


async def _supervise(tasks: list[asyncio.Task], *, until_done: list[asyncio.Task]) -> None:
    """Wait until every task of ``until_done`` has ended; raise the first error of any task.

    A task outside ``until_done`` (a helper) that ends at all, with or
    without an error, is a failure: helpers run for the whole run.
    """
    pending = set(tasks)
    remaining = set(until_done)
    while remaining:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t.cancelled():
                raise asyncio.CancelledError
            if t.exception() is not None:
                raise t.exception()
            if t not in remaining:
                raise RuntimeError(f"llmap internal error: {t.get_name()} stopped during the run")
            remaining.discard(t)


async def first_of(*events: asyncio.Event) -> None:
    """Wait until any of ``events`` is set."""
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def install_sigterm(task: asyncio.Task | None) -> Callable[[], None]:
    """Make SIGTERM cancel ``task`` like Ctrl-C does (main thread only). Returns an undo function."""
    if task is None or threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    except (NotImplementedError, RuntimeError):
        return lambda: None

    def undo() -> None:
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGTERM)

    return undo
