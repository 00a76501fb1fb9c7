"""The pool's remote mode: pending rows settled elsewhere (the Ray executor's workers), committed here.

:class:`RemotePool` is the worker pool (:class:`~llmap.run.pool.Pool`) with the requests, and every
per-row step before them, moved to a :class:`RemoteRows` (the Ray executor,
:mod:`llmap.run.ray.executor`). The process that runs it (the driver) keeps only what must be in
one place, and does it without rendering a prompt or hashing a request:

* **In-run duplicates, by input hash.** Rows of one plan with one ``input_hash`` (the template's
  inputs and the request fingerprint, :func:`~llmap.store.fingerprint.input_hash`) render one
  request. A row whose input hash is being answered waits for that answer and is never sent; the
  answer fans out to it (``source = "cache"``), and when that row fails, exactly one waiting row
  takes over (as in the local pool). The done answers of the last :data:`MEMORY_ANSWERS` input
  hashes answer later identical rows at once (not when a model has ``escalate_if``: a stored answer
  that escalates goes on as a cascade, which the workers do).
* **Quotas** (``[input] per_group``), in passes, as locally.
* **Commits.** The remote side hands back each row's result once, already encoded for the ledger
  (:class:`~llmap.store.ledger.Encoded`), so a commit here is mostly one ``executemany``; it is
  committed at the end of the event-loop turn it arrives in, and counted once committed.

Rows go out raw (key and data JSON, leaders only); the remote side renders and keys them, answers
cache hits, packs, sends, validates, writes the response cache, and encodes the results.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

from llmap.control.quota import QuotaDecision
from llmap.observe.progress import Progress, Tally
from llmap.run.dispatch import Dispatcher
from llmap.run.packer import Packer
from llmap.run.pool import MAX_WAITING, PAGE_ROWS, Pool, first_of
from llmap.run.rows import PendingRow
from llmap.run.stats import DispatchStats
from llmap.store.ledger import Encoded, Ledger, RowResult

__all__ = ["MEMORY_ANSWERS", "RemotePool", "RemoteRows", "Settle", "run_remote_pool"]

#: Done answers kept in memory by input hash, for identical rows paged after their leader settled.
MEMORY_ANSWERS = 20_000
#: Settled rows held at most before a commit (commits otherwise happen at the end of each loop turn).
COMMIT_ROWS = 4096

#: ``settle(encoded, rows, alike)``: see :class:`RemoteRows`.
Settle = Callable[[Encoded, Sequence[PendingRow], Collection[str]], None]


class RemoteRows(Protocol):
    """Settles the rows a :class:`RemotePool` hands out, somewhere else (the Ray executor's workers).

    ``run`` reads lists of raw rows (:class:`~llmap.run.rows.PendingRow` with ``key`` and ``data``;
    one row per request to make, in-run duplicates held back) from ``todo`` until ``None``, and
    calls ``settle(encoded, rows, alike)`` exactly once per row: ``encoded`` holds the rows'
    results in the order of ``rows``; ``alike`` the keys among them that failed on their own input
    values (a template error), so rows with the same inputs fail alike, unsent. Rows the run stops
    before are never settled: they stay pending. ``queue_items`` bounds ``todo`` (lists of up to
    :data:`~llmap.run.pool.PAGE_ROWS` rows).
    """

    queue_items: int

    async def run(self, todo: asyncio.Queue, settle: Settle) -> None: ...


class RemotePool(Pool):
    """The run loop with a :class:`RemoteRows` settling the rows (see the module docstring).

    Args:
        ledger, run_id, dispatcher, stats, tally, progress, quota, packer, on_settled: as for
            :class:`~llmap.run.pool.Pool` (the dispatcher sends nothing here: its answer cache
            counts the rows answered without a request, its lanes are the models' labels).
        remote: settles the rows.
    """

    def __init__(self, ledger: Ledger, run_id: int, dispatcher: Dispatcher, stats: DispatchStats, tally: Tally,
                 progress: Progress, *, remote: RemoteRows, quota: tuple[str, int] | None = None,
                 packer: Packer | None = None,
                 on_settled: Callable[[list[RowResult], list[str]], None] | None = None) -> None:
        super().__init__(ledger, run_id, dispatcher, stats, tally, progress, quota=quota, packer=packer,
                         on_settled=on_settled)
        self.remote = remote
        self.n_workers = 1
        self.todo = asyncio.Queue(maxsize=remote.queue_items)
        self.encoded = Encoded()  # settled rows, encoded by the remote side, until committed
        escalates = any(e is not None for e in getattr(dispatcher.settler, "escalate_if", ()))
        #: input hash -> (output JSON, model) of rows the primary model answered, oldest first (the answers
        #: the local pool keeps in memory by cache key); None with escalate_if
        self.answered: OrderedDict[str, tuple[str, str | None, float | None]] | None = (
            None if escalates else OrderedDict())
        self.primary = dispatcher.lanes[0].label

    def start_workers(self) -> list[asyncio.Task]:
        """One task: the :class:`RemoteRows` (it settles everything the producer hands out)."""
        return [asyncio.create_task(self.remote.run(self.todo, self.settle_encoded), name="llmap-remote-rows")]

    # -- taking rows -----------------------------------------------------------------------------
    def prepare_page(self, page: Sequence[tuple]) -> list[PendingRow]:
        """Ledger rows ``(seq, key, data, input hash)`` into raw rows, quotas applied (a group already
        full is skipped with the reason). Nothing is rendered here."""
        quota = self.group_quota
        if quota is None:
            return [PendingRow(key, data, None, None, None, None, False, h) for _, key, data, h in page]
        rows = []
        for _, key, data, h in page:
            g = json.loads(data).get(self.quota_column)
            decision = quota.decide(g)
            if decision is QuotaDecision.TAKE:
                rows.append(PendingRow(key, data, g, input_hash=h))
            elif decision is QuotaDecision.SKIP:
                self.buffer.append(RowResult(key=key, status="skipped", error=quota.reason(g, self.quota_column)))
        return rows

    async def one_pass(self) -> int:
        """Take every pending row the quota allows, a page at a time; returns how many were taken."""
        taken, after = 0, -1
        stop = self.stats.stop
        while not stop.is_set():
            page = self.ledger.pending(self.run_id, after_seq=after, limit=PAGE_ROWS, hashes=True)
            if not page:
                break
            after = page[-1][0]
            rows = self.prepare_page(page)
            taken += len(rows)
            await self.take_page(rows)
            while self.n_waiting > MAX_WAITING and not stop.is_set():
                self.wake.clear()
                await first_of(self.wake, stop)
                await self.drain_promoted()
            await self.drain_promoted()
        return taken

    async def take_page(self, rows: Sequence[PendingRow]) -> None:
        """Answer rows from memory, make them wait for an identical row, or hand them out (one list)."""
        if not rows:
            return
        self.outstanding += len(rows)
        self.settled.clear()
        waiting, answered = self.waiting, self.answered
        lead: list[PendingRow] = []
        known: list[tuple[PendingRow, tuple[str, str | None]]] = []
        for row in rows:
            h = row.input_hash
            followers = waiting.get(h)
            if followers is not None:  # an identical row is being answered: wait for it
                followers.append(row)
                self.n_waiting += 1
            elif answered is not None and (memo := answered.get(h)) is not None:
                known.append((row, memo))
            else:
                waiting[h] = []  # this row leads; identical rows will wait for its result
                lead.append(row)
        if known:
            enc = Encoded()
            for row, (out, model, confidence) in known:
                _answer_alike(enc, row.key, out, model, time.time(), confidence)
            self._count_hits(len(known))
            self._admit(enc, [row for row, _ in known])
        if lead:
            await self.todo.put(lead)

    async def drain_promoted(self) -> None:
        """Hand out the rows promoted to lead again."""
        if self.promoted:
            rows = list(self.promoted)
            self.promoted.clear()
            await self.todo.put(rows)

    # -- settling --------------------------------------------------------------------------------
    def settle_encoded(self, enc: Encoded, rows: Sequence[PendingRow], alike: Collection[str] = ()) -> None:
        """Take the remote side's results in: fan each leader's answer out to the identical rows waiting
        for it (or promote one of them when it failed), then hold them for the next commit."""
        rows = list(rows)
        recs = enc.rows
        waiting, answered = self.waiting, self.answered
        now = time.time()
        for i in range(len(recs)):  # the rows handed in; identical rows are appended after them
            rec, row = recs[i], rows[i]
            h = row.input_hash
            status = rec[0]
            if status == "done" and answered is not None and rec[7] == self.primary and rec[8] != "stale":
                answered[h] = (rec[1], rec[7], rec[10])
                if len(answered) > MEMORY_ANSWERS:
                    answered.popitem(last=False)
            followers = waiting.pop(h, None)
            if not followers:
                continue
            self.n_waiting -= len(followers)
            self.wake.set()
            if status == "done":  # the answer fans out to every identical row
                for f in followers:
                    _answer_alike(enc, f.key, rec[1], rec[7], now, rec[10])
                    rows.append(f)
                self._count_hits(len(followers))
            elif rec[-1] in alike:  # its inputs fail the template: so do theirs, unsent
                for f in followers:
                    enc.rows.append(("failed", None, rec[2], 0, 0, 0, 0.0, None, None, now, None, None, None, f.key))
                    rows.append(f)
            elif h not in self.struck:  # exactly one waiting row takes over; the others wait for it
                self.struck.add(h)
                waiting[h] = followers[1:]
                self.n_waiting += len(followers) - 1
                self.promoted.append(followers[0])
            else:  # the same request failed for two rows: the rest fail with it, unsent (a rerun retries them)
                error = f"an identical row's request failed twice: {rec[2]}"
                for f in followers:
                    enc.rows.append(("failed", None, error, 0, 0, 0, 0.0, None, None, now, None, None, None, f.key))
                    rows.append(f)
        self._admit(enc, rows)

    def _count_hits(self, n: int) -> None:
        if self.answers is not None:
            self.answers.hits += n

    def _admit(self, enc: Encoded, rows: list[PendingRow]) -> None:
        """Settled rows in: hooks, quotas, held for the next commit."""
        if self.on_settled is not None:
            self.on_settled(enc.decode(), [row.data for row in rows])
        if self.group_quota is not None:
            for rec, row in zip(enc.rows, rows, strict=True):
                self.group_quota.settle(row.group, done=rec[0] == "done")
        self.encoded.extend(enc)
        self.outstanding -= len(enc.rows)
        if self.outstanding == 0:
            self.settled.set()
        if len(self.encoded) >= COMMIT_ROWS:
            self.flush(advance=False)
        else:
            self.commit_soon()

    def commit(self, log: list[tuple]) -> bool:
        """Commit the settled rows (encoded) and the request entries ``log``, then count the rows."""
        enc = self.encoded
        if self.buffer:  # rows settled here (a group already full)
            enc.extend(Encoded.of(self.buffer))
            self.buffer.clear()
        if not (enc.rows or log):
            return False
        self.ledger.record(enc, run_id=self.run_id, requests=log)  # durable before it counts
        tally = self.tally
        for status, n in Counter(rec[0] for rec in enc.rows).items():
            setattr(tally, status, getattr(tally, status) + n)
        enc.clear()
        return True


def _answer_alike(enc: Encoded, key: str, out: str, model: str | None, now: float,
                  confidence: float | None = None) -> None:
    """Row ``key`` settled by an identical row's answer (output JSON ``out``, its ``confidence``), as the local
    pool settles it."""
    enc.rows.append(("done", out, None, 0, 0, 0, 0.0, model, "cache", now, confidence, None, None, key))
    enc.attempts.append((key, model or "", "cache", out, 0, 0, now))


async def run_remote_pool(ledger: Ledger, run_id: int, dispatcher: Dispatcher, stats: DispatchStats, tally: Tally,
                          progress: Progress, *, remote: RemoteRows, quota: tuple[str, int] | None = None,
                          packer: Packer | None = None,
                          on_settled: Callable[[list[RowResult], list[str]], None] | None = None) -> None:
    """Settle every pending row of plan ``run_id`` through ``remote``: ``await RemotePool(...).run()``."""
    await RemotePool(ledger, run_id, dispatcher, stats, tally, progress, remote=remote, quota=quota, packer=packer,
                     on_settled=on_settled).run()
