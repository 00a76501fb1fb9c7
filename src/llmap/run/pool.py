"""The worker pool: pending rows out of the ledger, settled rows back into it.

A producer pages ``pending`` rows out of the ledger (in input order, or
``order_by``), renders them, and looks the whole page up in the response
cache at once (one query per page). Cache hits settle at once. A row whose
request is identical to one already being answered in this run waits for
that answer instead of being sent (if that row fails, exactly one waiting
row takes over). The rest go into a bounded queue, one row or one pack at a
time, and workers settle them through the :class:`~llmap.run.dispatch.Dispatcher`
(or the :class:`~llmap.run.packer.Packer`). Results are committed in batches
(every 256 rows or 0.25 s) and only then counted.

A row whose own values break it (a template error on a NULL, a bug) fails
alone with the error; the worker and the run go on. The pool's helper tasks
(the commit ticker, the timeout watchdog) are supervised: if one dies, the
run stops with its error.

With ``per_group`` quotas the producer works in passes: each pass takes
rows while a group lacks done rows, waits for them, and the next pass
replaces the rows that failed, until a pass takes nothing.

Memory stays flat: the queue, the commit buffer and the packs are bounded,
and rows waiting for an identical row keep only their key and data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from llmap.control.misconfig import mask_numbers
from llmap.control.quota import GroupQuota, QuotaDecision
from llmap.errors import DiskFull, RenderError
from llmap.observe.progress import Progress, Tally
from llmap.run.dispatch import Dispatcher
from llmap.run.packer import Packer
from llmap.run.stats import DispatchStats, Stop
from llmap.store.ledger import Ledger, RowResult

__all__ = ["RemoteRows", "run_pool", "solve_items"]

#: Rows committed to the ledger per transaction (results are also flushed every ``FLUSH_S``).
COMMIT_ROWS = 256
FLUSH_S = 0.25
#: Pending rows read from the ledger (and looked up in the response cache) per query.
PAGE_ROWS = 512
#: Rows that may wait for an identical row before the producer pauses (memory bound).
MAX_WAITING = 100_000
#: The first rows all failing to render with one identical error (no NULL involved) stop the run.
TEMPLATE_ERRORS_TO_STOP = 3


@dataclass(slots=True)
class _Row:
    """A pending row on its way: key, ledger data (JSON text), quota group, and once prepared
    the row's values, rendered messages and its request's cache key on the primary model."""

    key: str
    data: str
    group: Any = None
    row: dict[str, Any] | None = None
    messages: list[dict[str, str]] | None = None
    ckey: str | None = None
    #: a cached answer that escalates (a cascade): sent alone, through the dispatcher's own lookup
    single: bool = False


class RemoteRows(Protocol):
    """Settles the rows the pool hands out somewhere else (the Ray executor's workers,
    :mod:`llmap.run.ray.executor`) instead of in local workers. ``run`` reads packs of rows from
    ``todo`` until ``None`` and calls ``settle(results, rows)`` once per row; ``queue_items``
    bounds ``todo``."""

    queue_items: int

    async def run(self, todo: asyncio.Queue, settle: Callable[[list[RowResult], list[Any]], None]) -> None: ...


async def solve_items(dispatcher: Dispatcher, packer: Packer | None, items: list[_Row]) -> list[RowResult]:
    """Settle one pack of rows (or one row) through ``packer`` or ``dispatcher``; results in order.

    Raises:
        Stop: the run is stopping; the rows stay pending.
    """
    if packer is not None and not items[0].single:
        return await packer.solve([(r.key, r.row, r.messages, r.ckey) for r in items])
    row = items[0]
    lead = None if row.single else row.ckey
    return [await dispatcher.solve_messages(row.key, row.messages, lead=lead)]


async def run_pool(ledger: Ledger, run_id: int, dispatcher: Dispatcher, stats: DispatchStats, tally: Tally,
                   progress: Progress, *, quota: tuple[str, int] | None = None,
                   packer: Packer | None = None,
                   on_settled: Callable[[list[RowResult], list[str]], None] | None = None,
                   remote: RemoteRows | None = None) -> None:
    """Settle every pending row of plan ``run_id``.

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
        remote: settle rows there instead of in local workers (the Ray executor); cache hits,
            in-run duplicates, quotas and commits stay here.

    Raises:
        asyncio.CancelledError: on Ctrl-C / SIGTERM, after committing every finished row.
        Exception: a helper task (commit ticker, timeout watchdog) or the
            producer died; the run stops with that error after committing.
        DiskFull: a commit found the disk full; dispatch stopped, committed rows are kept.
    """
    n_workers = 1 if remote is not None else min(1024, 2 * max(lane.max_in_flight for lane in dispatcher.lanes))
    todo: asyncio.Queue[list[_Row] | None] = asyncio.Queue(
        maxsize=remote.queue_items if remote is not None else n_workers * 2)
    buffer: list[RowResult] = []
    outstanding = 0  # rows taken and not yet settled (quota passes wait for 0)
    settled = asyncio.Event()
    answers = dispatcher.answers
    primary = dispatcher.lanes[0]
    schema = dispatcher.schema.json_schema
    waiting: dict[str, list[_Row]] = {}  # cache key -> rows waiting for the row that leads that request
    n_waiting = 0
    promoted: deque[_Row] = deque()  # rows that lead again after their request's leader failed
    struck: set[str] = set()  # requests whose first leader failed: a second failure fails every waiting row
    wake = asyncio.Event()  # a row was promoted, or waiting rows settled
    group_quota: GroupQuota | None = None
    if quota is not None:
        column, n = quota
        done = {}
        for g, status, count in ledger.grouped_counts(run_id, column):
            if status == "done":
                done[g] = count
        group_quota = GroupQuota(n, done)

    disk_full: list[DiskFull] = []  # a write found the disk full: stop dispatch, raise it when the pool is down

    def halt_on_disk_full(exc: DiskFull) -> None:
        if not disk_full:
            disk_full.append(exc)
            stats.stop.set()  # said once, by whoever catches the DiskFull raised at the end

    def flush(*, last: bool = False) -> None:
        if answers is not None:
            try:
                answers.flush(wait=last)
            except DiskFull as exc:  # the cache's disk is full: still commit to the ledger, which may have room
                halt_on_disk_full(exc)
        log = stats.take_request_log()
        if not buffer and not log:
            return
        ledger.record(buffer, run_id=run_id, requests=log)  # durable before it counts
        for r in buffer:
            setattr(tally, r.status, getattr(tally, r.status) + 1)
        buffer.clear()
        tally.requests = stats.requests
        tally.prompt_tokens, tally.completion_tokens = stats.prompt_tokens, stats.completion_tokens
        tally.cache_read_tokens = stats.cache_read_tokens
        tally.cost_usd, tally.rate_limited = stats.cost_usd, stats.rate_limited
        tally.cache_hits = answers.hits if answers is not None else 0
        tally.in_flight = sum(lane.in_flight for lane in dispatcher.lanes)
        tally.concurrency = sum(lane.limit for lane in dispatcher.lanes)
        progress.advance(tally)

    flush = _halt_on_disk_full(flush, halt_on_disk_full)

    def settle(results: list[RowResult], rows: list[_Row]) -> None:
        nonlocal outstanding, n_waiting
        results, rows = list(results), list(rows)
        for r, row in zip(list(results), list(rows), strict=True):
            followers = waiting.pop(row.ckey, None) if row.ckey is not None else None
            if not followers:
                continue
            n_waiting -= len(followers)
            wake.set()
            if r.status == "done":  # the answer fans out to every identical row
                if answers is not None:
                    answers.hits += len(followers)
                for f in followers:
                    results.append(RowResult(f.key, "done", output=r.output, model=r.model, source="cache",
                                             tried=[(r.model or "", "cache", r.output, 0, 0)]))
                    rows.append(f)
            elif row.ckey not in struck:  # exactly one waiting row takes over; the others wait for it
                struck.add(row.ckey)
                waiting[row.ckey] = followers[1:]
                n_waiting += len(followers) - 1
                promoted.append(followers[0])
            else:  # the same request failed for two rows: the rest fail with it, unsent (a rerun retries them)
                for f in followers:
                    results.append(RowResult(f.key, "failed", error=f"an identical row's request failed twice: "
                                                                     f"{r.error}"))
                    rows.append(f)
        if on_settled is not None:
            on_settled(results, [row.data for row in rows])
        buffer.extend(results)
        if group_quota is not None:
            for r, row in zip(results, rows, strict=True):
                group_quota.settle(row.group, done=r.status == "done")
        outstanding -= len(results)
        if outstanding == 0:
            settled.set()
        if len(buffer) >= COMMIT_ROWS:
            flush()

    rendered = [False]  # a row has rendered: template errors are the rows' own from now on
    render_errors: list[str] = []

    def template_failed(exc: RenderError) -> None:
        """The same template error on the first rows, with no NULL to blame, is the template's: stop."""
        if rendered[0] or exc.null_columns:
            return
        render_errors.append(mask_numbers(str(exc)))
        if len(render_errors) >= TEMPLATE_ERRORS_TO_STOP and len(set(render_errors)) == 1:
            stats.halt(f"the prompt template fails the same way on every row ({exc}); fix [prompt] and run again")

    def prepare(rows: list[_Row]) -> list[_Row]:
        """Render rows and key their requests; a row its template fails on is settled as failed."""
        nonlocal outstanding
        ready = []
        for row in rows:
            if stats.stop.is_set():
                break  # the run is stopping: the rest stay pending
            row.row = json.loads(row.data)
            try:
                row.messages = dispatcher.renderer.messages(row.row)
            except RenderError as exc:
                outstanding += 1
                settle([RowResult(row.key, "failed", error=str(exc))], [row])
                template_failed(exc)
                continue
            rendered[0] = True
            if answers is not None:
                row.ckey = answers.key(primary.model, row.messages, schema)
            ready.append(row)
        if answers is not None:
            answers.prefetch([row.ckey for row in ready])
        return ready

    handed_out = asyncio.Event()
    dispatcher.watch_tail(lambda: handed_out.is_set() and todo.qsize() <= n_workers)

    pack: list[_Row] = []  # rows gathered into the next request

    async def take(row: _Row) -> None:
        """Settle ``row`` from memory, make it wait for an identical row, or hand it to the workers."""
        nonlocal outstanding, n_waiting
        outstanding += 1
        settled.clear()
        if row.ckey is not None:
            if row.ckey in waiting:  # an identical request is being answered: wait for it
                answers.pass_over(row.ckey)
                waiting[row.ckey].append(_Row(row.key, row.data, row.group, ckey=row.ckey))
                n_waiting += 1
                return
            hit = answers.peek(row.ckey)
            if hit is not None:
                if not await dispatcher.escalates(primary, hit.output):
                    settle([RowResult(row.key, "done", output=hit.output, model=hit.model, source="cache",
                                      tried=[(hit.model, "cache", hit.output, 0, 0)])], [row])
                    return
                row.single = True  # a cascade: the dispatcher takes the cached answer on to the next model
            waiting[row.ckey] = []  # this row leads its request; identical rows will wait for its result
        await hand_out(row)

    async def hand_out(row: _Row) -> None:
        if row.single:
            await end_pack()
            await todo.put([row])
            return
        pack.append(row)
        if len(pack) >= (packer.size() if packer is not None else 1):
            await end_pack()

    async def end_pack() -> None:
        nonlocal pack
        if pack:
            items, pack = pack, []
            await todo.put(items)

    async def drain_promoted() -> None:
        while promoted:
            row = promoted.popleft()
            for ready in prepare([row]):
                await hand_out(ready)

    async def one_pass() -> int:
        """Take every pending row the quota allows; returns how many were taken."""
        taken, after = 0, -1
        while not stats.stop.is_set():
            page = ledger.pending(run_id, after_seq=after, limit=PAGE_ROWS)
            if not page:
                break
            after = page[-1][0]
            rows = []
            for _, key, data in page:
                if group_quota is None:
                    rows.append(_Row(key, data))
                    continue
                g = json.loads(data).get(quota[0])
                decision = group_quota.decide(g)
                if decision is QuotaDecision.TAKE:
                    rows.append(_Row(key, data, g))
                elif decision is QuotaDecision.SKIP:
                    buffer.append(RowResult(key=key, status="skipped", error=group_quota.reason(g, quota[0])))
            taken += len(rows)
            for row in prepare(rows):
                await take(row)
                if n_waiting > MAX_WAITING:
                    await end_pack()
                    while n_waiting > MAX_WAITING and not stats.stop.is_set():
                        wake.clear()
                        await _first_of(wake, stats.stop)
                        await drain_promoted()
            await drain_promoted()
        await end_pack()
        return taken

    async def producer() -> None:
        if group_quota is None:
            await one_pass()
        else:
            while await one_pass() and not stats.stop.is_set():
                await _first_of(settled, stats.stop)  # the next pass replaces rows that failed
                flush()
        while not stats.stop.is_set():  # rows still waiting for an identical row's answer
            await drain_promoted()
            await end_pack()
            if not promoted and not n_waiting:
                break
            wake.clear()
            if not promoted:
                await _first_of(wake, stats.stop)
        handed_out.set()
        for _ in range(n_workers):
            await todo.put(None)

    async def worker() -> None:
        while (items := await todo.get()) is not None:
            if stats.stop.is_set():
                continue  # keep draining so the producer never blocks; the rows stay pending
            try:
                results = await solve_items(dispatcher, packer, items)
            except Stop:
                continue
            except DiskFull as exc:  # a cache write on the row's path: stop as after a failed commit
                halt_on_disk_full(exc)
                continue
            except Exception as exc:  # one row's bad value or a bug: those rows fail, the worker lives
                results = [RowResult(r.key, "failed", error=f"{type(exc).__name__}: {exc}") for r in items]
            settle(results, items)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            flush()

    prod = asyncio.create_task(producer(), name="llmap-producer")
    if remote is not None:
        workers = [asyncio.create_task(remote.run(todo, settle), name="llmap-remote-rows")]
    else:
        workers = [asyncio.create_task(worker(), name="llmap-worker") for _ in range(n_workers)]
    helpers = [asyncio.create_task(ticker(), name="llmap-commit-ticker"),
               asyncio.create_task(dispatcher.watchdog(), name="llmap-timeout-watchdog")]
    tasks = [prod, *workers, *helpers]
    undo_sigterm = install_sigterm(asyncio.current_task())
    try:
        await _supervise(tasks, until_done=[prod, *workers])
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if packer is not None:
            await packer.aclose()
        if answers is not None:
            answers.abandon()
        undo_sigterm()
        flush(last=True)
    if disk_full:
        raise disk_full[0]


def _halt_on_disk_full(flush: Callable[..., None], halt: Callable[[DiskFull], None]) -> Callable[..., None]:
    """``flush``, but a full disk halts dispatch (no new requests) instead of killing the caller.

    Later flushes still try: the ledger and the response cache may be on
    different disks, so the answers of the requests still in flight reach
    whichever has room, and a rerun finds them there instead of paying again.
    Rows whose results could not be committed stay ``pending`` in the ledger.
    """

    def guarded(**kwargs: Any) -> None:
        try:
            flush(**kwargs)
        except DiskFull as exc:
            halt(exc)

    return guarded


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


async def _first_of(*events: asyncio.Event) -> None:
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
