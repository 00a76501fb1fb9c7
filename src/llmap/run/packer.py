"""Packs: several rows in one request, with per-row recovery by bisecting.

``[prompt] pack = N`` sends N rows per request as a JSON array of items; the
answer is matched to rows by ``id``, never by position (see
:mod:`llmap.prompt.pack`). Only item-level failures are bisected: rows whose
item is missing, duplicated, unknown or invalid, and every row of a pack the
model's context cannot hold, are retried in packs of N/2, then N/4, ... down
to single rows, which take the dispatcher's ordinary per-row path (re-asks,
retries, failover). Errors that have nothing to do with the pack (a 404, spent
retries, an outage) send its rows down their usual path at once: fail over to
the next model, or fail with the error.

Retried rows are *regrouped*: the affected rows of many packs that failed at
the same level wait briefly (:data:`REGROUP_WAIT_S`) to fill one pack of
that level's size, so that 5% bad items cost about 5% more requests, not one
request per damaged pack.
"""

from __future__ import annotations

import asyncio
from typing import Any

from llmap import errors as E
from llmap.control.lanes import pick_lane
from llmap.control.packsize import AutoPackSize
from llmap.prompt.pack import pack_messages, pack_schema
from llmap.providers.base import Request
from llmap.run.dispatch import Dispatcher
from llmap.run.settle import Escalate, Retry, Split
from llmap.run.settle import Stop as StopRun
from llmap.run.stats import Stop
from llmap.store.cache import CacheEntry
from llmap.store.ledger import RowResult

__all__ = ["Packer"]

#: Seconds a retried row waits for others to fill its smaller pack.
REGROUP_WAIT_S = 0.2

#: One row of a pack: key, row (column -> value), rendered single-row messages, and the cache key
#: of that single-row request on the primary model (None when there is no cache).
Item = tuple[str, dict[str, Any], list[dict[str, str]], str | None]


class Packer:
    """Settles packs of rows through a :class:`~llmap.run.dispatch.Dispatcher`.

    The worker pool hands it packs of rows that are not cache hits and whose
    requests are unique in the run (identical rows wait for the first, see
    :mod:`llmap.run.pool`), so N unique rows cost ``ceil(N / pack)`` requests.

    Args:
        dispatcher: sends requests and settles single rows.
        pack: ``[prompt] pack``: rows per request, or ``"auto"``.
    """

    def __init__(self, dispatcher: Dispatcher, pack: int | str) -> None:
        self.d = dispatcher
        self.pack = pack if isinstance(pack, int) else 1
        self.auto = AutoPackSize() if pack == "auto" else None
        self._row_chars = 400.0  # EWMA of a row's user-message length, for pack = "auto"
        self._waiting: dict[int, list[tuple[Item, asyncio.Future[RowResult]]]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()  # regrouped packs in flight (kept so they are not collected)

    def size(self) -> int:
        """Rows per request now: ``pack``, or the adaptive size for ``"auto"``."""
        if self.auto is None:
            return self.pack
        row_tokens = max(1, round(self._row_chars / self.d.lanes[0].prompt_tokens.chars_per_token))
        return self.auto.size(row_tokens)

    async def solve(self, items: list[Item]) -> list[RowResult]:
        """Settle ``items`` (one pack) on the primary model; results in the order of ``items``.

        Raises:
            Stop: the run is stopping; unsettled rows stay pending.
        """
        for _, _, base, _ in items:
            self._row_chars = 0.9 * self._row_chars + 0.1 * len(base[-1]["content"])
        results: dict[str, RowResult] = {}
        await self._round(items, results, size=len(items))
        return [results[it[0]] for it in items]

    async def aclose(self) -> None:
        """Cancel regroup timers and regrouped packs still in flight (the run is ending)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for waiting in self._waiting.values():
            for _, fut in waiting:
                if not fut.done():
                    fut.set_exception(Stop())
        self._waiting.clear()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- one pack ---------------------------------------------------------------
    async def _round(self, items: list[Item], results: dict[str, RowResult], *, size: int) -> None:
        """Send ``items`` as one pack; regroup the rows that come back damaged at half the size."""
        if not items:
            return
        if len(items) == 1:
            key, row, base, ckey = items[0]
            results[key] = await self.d.solve_messages(key, base, lead=ckey, row=row)
            return
        d = self.d
        lane, _ = pick_lane(d.lanes, 0, d.clock())
        if lane is None or lane.index != 0:  # the primary is down: rows take the per-row path (failover)
            if lane is not None:
                lane.breaker.release()
            await self._singly(items, results)
            return
        by_key = {it[0]: it for it in items}
        messages = pack_messages(d.renderer, [(key, row) for key, row, _, _ in items])
        model = lane.model
        req = Request(messages, pack_schema(d.schema.json_schema), model.temperature,
                      model.max_tokens * len(items), row_key=items[0][0],
                      shared_prefix=d.renderer.shared_prefix(messages), logprobs=d.settler.logprobs)
        t0 = d.clock()
        attempt = 0
        while True:
            if d.stats.stop.is_set():
                lane.breaker.release()
                raise Stop
            attempt += 1
            try:
                comp = await d.send(lane, req, pack_size=len(items))
                break
            except E.ProviderError as exc:
                exc.attempt = attempt
                d.record_failure(lane, exc)
                decision = d.settler.error(exc, d.retry.decide(exc, attempt, d.clock() - t0), pack=True)
                if isinstance(decision, StopRun):
                    d.stats.fatal = d.stats.fatal or exc  # type: ignore[assignment]
                    d.stats.halt(decision.reason)
                    raise Stop from exc
                if isinstance(decision, Split):  # the pack is too long: the same rows in smaller packs
                    await self._regroup(items, results, size=max(1, size // 2))
                    return
                if not isinstance(decision, Retry):  # nothing to do with the pack: the rows' usual path
                    await self._give_up(items, results, decision.error, attempt)
                    return
                await d.sleep(decision.delay_s)
                lane, _ = pick_lane(d.lanes, 0, d.clock())
                if lane is None or lane.index != 0:
                    if lane is not None:
                        lane.breaker.release()
                    await self._singly(items, results)
                    return
            except BaseException:
                lane.breaker.release()
                raise
        decisions = d.settler.pack(comp, lane, list(by_key), {k: it[1] for k, it in by_key.items()})
        damaged = [k for k, dec in decisions.items() if isinstance(dec, Split)]
        if self.auto is not None:
            self.auto.observe(len(by_key), len(damaged))
        n = len(by_key)
        share_p, share_c = comp.prompt_tokens // n, comp.completion_tokens // n
        escalate = []
        for key, decision in decisions.items():
            if isinstance(decision, Split):
                continue
            output = decision.output
            _, row, base, ckey = by_key[key]
            if d.answers is not None and ckey is not None:
                d.answers.resolve(ckey, CacheEntry(ckey, lane.label, output, share_p, share_c,
                                                   confidence=decision.confidence, latency_s=comp.latency_s))
            if isinstance(decision, Escalate):
                escalate.append((key, base, [(lane.label, "escalated", output, share_p, share_c)], row))
                continue
            results[key] = RowResult(key, "done", output=output, model=lane.label, source="model", attempts=attempt,
                                     prompt_tokens=share_p, completion_tokens=share_c,
                                     tried=[(lane.label, "done", output, share_p, share_c)], latency_s=comp.latency_s,
                                     confidence=decision.confidence)
        work = [self.escalates(key, base, tried, results, row=row) for key, base, tried, row in escalate]
        if damaged:
            work.append(self._regroup([by_key[k] for k in damaged], results, size=max(1, size // 2)))
        await asyncio.gather(*work)

    async def _give_up(self, items: list[Item], results: dict[str, RowResult], error: str, attempts: int) -> None:
        """The pack failed on the primary for a reason no smaller pack fixes: each row fails over, or fails."""
        d = self.d
        if len(d.lanes) > 1:
            await asyncio.gather(*(self._one(key, base, results, start=1, row=row) for key, row, base, _ in items))
            return
        for key, row, _, ckey in items:
            results[key] = d.unanswered(RowResult(key, "failed", attempts=attempts, tried=[]), error,
                                        [ckey] if ckey is not None else [], row=row)

    async def _one(self, key: str, base: list[dict[str, str]], results: dict[str, RowResult], *, start: int,
                   row: dict[str, Any] | None = None) -> None:
        results[key] = await self.d.solve_messages(key, base, start=start, row=row)

    async def escalates(self, key: str, base: list[dict[str, str]], tried: list, results: dict, *,
                        row: dict[str, Any] | None = None) -> None:
        """Cascade one row to the models after the primary (it keeps the primary's answer if they all fail)."""
        results[key] = await self.d.solve_messages(key, base, start=1, tried=tried, row=row)

    async def _singly(self, items: list[Item], results: dict[str, RowResult]) -> None:
        await asyncio.gather(*(self._round([it], results, size=1) for it in items))

    # -- regrouping ---------------------------------------------------------------
    async def _regroup(self, items: list[Item], results: dict[str, RowResult], *, size: int) -> None:
        """Retry ``items`` in packs of ``size``, sharing packs with other packs' damaged rows."""
        if size <= 1:
            await self._singly(items, results)
            return
        loop = asyncio.get_running_loop()
        futures = []
        for it in items:
            fut: asyncio.Future[RowResult] = loop.create_future()
            self._waiting.setdefault(size, []).append((it, fut))
            futures.append(fut)
        self._fill(size)
        if self._waiting.get(size) and size not in self._timers:
            wait = 0.0 if self.d.in_tail() else REGROUP_WAIT_S  # in the tail no row will come to fill it
            self._timers[size] = loop.call_later(wait, self._flush_level, size)
        for it, res in zip(items, await asyncio.gather(*futures), strict=True):
            results[it[0]] = res

    def _fill(self, size: int) -> None:
        """Launch full packs of ``size`` from the waiting rows."""
        waiting = self._waiting.get(size, [])
        while len(waiting) >= size:
            batch, waiting[:] = waiting[:size], waiting[size:]
            self._launch(batch, size)

    def _flush_level(self, size: int) -> None:
        """The wait is over: send what is waiting at this level, full or not."""
        self._timers.pop(size, None)
        batch, self._waiting[size] = self._waiting.get(size, []), []
        if batch:
            self._launch(batch, size)

    def _launch(self, batch: list[tuple[Item, asyncio.Future[RowResult]]], size: int) -> None:
        task = asyncio.get_running_loop().create_task(self._send_batch(batch, size))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_batch(self, batch: list[tuple[Item, asyncio.Future[RowResult]]], size: int) -> None:
        results: dict[str, RowResult] = {}
        try:
            await self._round([it for it, _ in batch], results, size=size)
        except BaseException as exc:  # Stop, cancellation or a bug: hand it to every waiting caller
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(Stop() if isinstance(exc, asyncio.CancelledError) else exc)
            return
        for it, fut in batch:
            if not fut.done():
                fut.set_result(results[it[0]])
