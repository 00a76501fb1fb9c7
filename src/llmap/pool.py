"""The worker pool: pending rows out of the ledger, settled rows back into it.

A producer pages ``pending`` rows out of the ledger (in input order, or
``order_by``) into a bounded queue; workers settle them through the
:class:`~llmap.dispatch.Dispatcher`, one row or one pack at a time; results
are committed in batches (every 256 rows or 0.25 s) and only then counted.
With ``per_group`` quotas the producer works in passes: each pass takes
rows while a group lacks done rows, waits for them, and the next pass
replaces the rows that failed, until a pass takes nothing.

Memory stays flat: the queue, the commit buffer and the packs are bounded.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from llmap.control.quota import GroupQuota, QuotaDecision
from llmap.dispatch import Dispatcher, DispatchStats, Stop, install_sigterm
from llmap.errors import DiskFull
from llmap.packer import Packer
from llmap.report import Progress, Tally
from llmap.store.ledger import Ledger, RowResult

__all__ = ["run_pool"]

#: Rows committed to the ledger per transaction (results are also flushed every ``FLUSH_S``).
COMMIT_ROWS = 256
FLUSH_S = 0.25
#: Pending rows read from the ledger per query.
PAGE_ROWS = 512


async def run_pool(ledger: Ledger, run_id: int, dispatcher: Dispatcher, stats: DispatchStats, tally: Tally,
                   progress: Progress, *, quota: tuple[str, int] | None = None,
                   packer: Packer | None = None,
                   on_settled: Callable[[list[RowResult], list[str]], None] | None = None) -> None:
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

    Raises:
        asyncio.CancelledError: on Ctrl-C / SIGTERM, after committing every finished row.
        DiskFull: a commit found the disk full; dispatch stopped, committed rows are kept.
    """
    n_workers = min(1024, 2 * max(lane.max_in_flight for lane in dispatcher.lanes))
    todo: asyncio.Queue = asyncio.Queue(maxsize=n_workers * 2)  # packs: lists of (key, data JSON, group)
    buffer: list[RowResult] = []
    outstanding = 0  # rows handed out and not yet settled (quota passes wait for 0)
    settled = asyncio.Event()
    group_quota: GroupQuota | None = None
    if quota is not None:
        column, n = quota
        done = {}
        for g, status, count in ledger.grouped_counts(run_id, column):
            if status == "done":
                done[g] = count
        group_quota = GroupQuota(n, done)

    def flush() -> None:
        if dispatcher.answers is not None:
            dispatcher.answers.flush()
        if not buffer and not stats.request_log:
            return
        log, stats.request_log = stats.request_log, []
        ledger.record(buffer, run_id=run_id, requests=log)  # durable before it counts
        for r in buffer:
            setattr(tally, r.status, getattr(tally, r.status) + 1)
        buffer.clear()
        tally.requests = stats.requests
        tally.prompt_tokens, tally.completion_tokens = stats.prompt_tokens, stats.completion_tokens
        tally.cost_usd, tally.rate_limited = stats.cost_usd, stats.rate_limited
        tally.cache_hits = dispatcher.answers.hits if dispatcher.answers is not None else 0
        tally.in_flight = sum(lane.in_flight for lane in dispatcher.lanes)
        tally.concurrency = sum(lane.aimd.limit for lane in dispatcher.lanes)
        progress.advance(tally)

    disk_full: list[DiskFull] = []  # a commit found the disk full: stop dispatch, raise it when the pool is down
    flush = _halt_on_disk_full(flush, stats, disk_full)

    def settle(results: list[RowResult], groups: list[Any] | None, datas: list[str]) -> None:
        nonlocal outstanding
        if on_settled is not None:
            on_settled(results, datas)
        buffer.extend(results)
        if group_quota is not None and groups is not None:
            for r, g in zip(results, groups, strict=True):
                group_quota.settle(g, done=r.status == "done")
        outstanding -= len(results)
        if outstanding == 0:
            settled.set()
        if len(buffer) >= COMMIT_ROWS:
            flush()

    handed_out = asyncio.Event()
    dispatcher.draining = lambda: handed_out.is_set() and todo.qsize() <= n_workers

    pack: list[tuple[str, str, Any]] = []  # rows gathered into the next request

    async def hand_out(key: str, data: str, group: Any = None) -> None:
        nonlocal outstanding, pack
        outstanding += 1
        settled.clear()
        pack.append((key, data, group))
        if len(pack) >= (packer.size() if packer is not None else 1):
            await end_pack()

    async def end_pack() -> None:
        nonlocal pack
        if pack:
            items, pack = pack, []
            await todo.put(items)

    async def one_pass() -> int:
        """Hand out every pending row the quota allows; returns how many were handed out."""
        taken, after = 0, -1
        while not stats.stop.is_set():
            page = ledger.pending(run_id, after_seq=after, limit=PAGE_ROWS)
            if not page:
                break
            for seq, key, data in page:
                after = seq
                if group_quota is None:
                    await hand_out(key, data)
                    taken += 1
                    continue
                g = json.loads(data).get(quota[0])
                decision = group_quota.decide(g)
                if decision is QuotaDecision.TAKE:
                    await hand_out(key, data, g)
                    taken += 1
                elif decision is QuotaDecision.SKIP:
                    buffer.append(RowResult(key=key, status="skipped", error=group_quota.reason(g, quota[0])))
        await end_pack()
        return taken

    async def producer() -> None:
        if group_quota is None:
            await one_pass()
        else:
            while await one_pass() and not stats.stop.is_set():
                await _first_of(settled, stats.stop)  # the next pass replaces rows that failed
                flush()
        handed_out.set()
        for _ in range(n_workers):
            await todo.put(None)

    async def worker() -> None:
        while (items := await todo.get()) is not None:
            if stats.stop.is_set():
                continue  # keep draining so the producer never blocks; the rows stay pending
            try:
                if len(items) == 1:
                    key, data, _ = items[0]
                    results = [await dispatcher.solve(key, json.loads(data))]
                else:
                    assert packer is not None
                    results = await packer.solve([(k, json.loads(d)) for k, d, _ in items])
            except Stop:
                continue
            except DiskFull as exc:  # a cache write on the row's path: stop like a failed commit
                if not disk_full:
                    disk_full.append(exc)
                    stats.stop.set()
                continue
            settle(results, [g for _, _, g in items], [d for _, d, _ in items])

    async def ticker() -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            flush()

    prod = asyncio.create_task(producer())
    workers = [asyncio.create_task(worker()) for _ in range(n_workers)]
    helpers = [asyncio.create_task(ticker()), asyncio.create_task(dispatcher.watchdog())]
    undo_sigterm = install_sigterm(asyncio.current_task())
    try:
        results = await asyncio.gather(prod, *workers, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
    except asyncio.CancelledError:
        for t in (prod, *workers):
            t.cancel()
        await asyncio.gather(prod, *workers, return_exceptions=True)
        raise
    finally:
        for t in helpers:
            t.cancel()
        undo_sigterm()
        flush()
    if disk_full:
        raise disk_full[0]


def _halt_on_disk_full(flush: Callable[[], None], stats: DispatchStats,
                       failures: list[DiskFull]) -> Callable[[], None]:
    """``flush``, but a full disk halts dispatch (no new requests) instead of killing the caller.

    The first :class:`~llmap.errors.DiskFull` is kept in ``failures``. Later
    flushes still try: the ledger and the response cache may be on different
    disks, so the answers of the requests still in flight reach whichever has
    room, and a rerun finds them there instead of paying again. Rows whose
    results could not be committed stay ``pending`` in the ledger.
    """

    def guarded() -> None:
        try:
            flush()
        except DiskFull as exc:
            if not failures:
                failures.append(exc)
                stats.stop.set()  # said once, by whoever catches the DiskFull raised at the end

    return guarded


async def _first_of(*events: asyncio.Event) -> None:
    """Wait until any of ``events`` is set."""
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
