"""Collecting: an ended batch's results become settled rows, and everything paid for is kept.

Every line of an ended batch (completed, expired, cancelled) is read,
answered or not:

- an answer is read by the real-time provider's own parser, billed
  (:meth:`~llmap.run.stats.DispatchStats.bill`) and judged by the same
  settle stage as a real-time answer (:class:`~llmap.run.settle.Settler`):
  a valid answer settles its rows (and the identical rows attached to its
  line), goes into the response cache, and goes on to the next model when it
  meets ``escalate_if``;
- a re-ask (an invalid or cut answer), a damaged pack item, a failed request
  (its error file line or ``errored`` result, mapped at
  :func:`~llmap.providers.batch.base.line_error`, judged by the settle stage
  too), and a request that never ran (expired, cancelled) go where
  :func:`~llmap.control.batching.route` says: real time, the next batch, or
  failed with the same error a real-time row would get;
- an expired or cancelled batch's finished requests are answers like any
  other: they were billed.

The batch's rows, its request log (each line one request, ``path =
"batch"``, priced at ``price_batch_factor``) and its ``collected`` state are
committed in one transaction: a crash in the middle collects it again,
never twice. A batch refused at validation (:meth:`Collector.refused`) ran no
request: its rows are free again, and the refusal teaches the size limit or
the enqueued-token gate.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmap import errors as E
from llmap.control.batching import Next, Outcome, Wait, route
from llmap.providers.base import Request
from llmap.providers.batch.base import BatchState, LineResult, line_error, too_large
from llmap.run.batch.context import BatchContext
from llmap.run.settle import (
    Decision,
    Done,
    Escalate,
    FailOver,
    Reask,
    Retry,
    Split,
    Tries,
    error_text,
)
from llmap.run.settle import Stop as StopRun
from llmap.store.batches import BatchRecord, Line
from llmap.store.cache import CacheEntry
from llmap.store.ledger import RowResult

__all__ = ["Collector"]


@dataclass
class _Route:
    """A row sent on after collection: to real time (``start``, ``extra``/``tries``, ``lead``, ``tried``)."""

    key: str
    data: str
    start: int = 0
    extra: tuple[dict[str, str], ...] = ()
    tries: Tries | None = None
    lead: str | None = None
    tried: list | None = None


class Collector:
    """Applies ended batches to the ledger (see the module docstring).

    Args:
        ctx: the run's batch context.
    """

    def __init__(self, ctx: BatchContext) -> None:
        self.ctx = ctx

    # -- a batch refused at validation ----------------------------------------
    def refused(self, rec: BatchRecord, state: BatchState) -> None:
        """A batch refused at validation (no request ran): learn from it; its rows are free again."""
        ctx = self.ctx
        text = state.error_text or state.status
        others = sum(r.tokens for r in ctx.book.held() if r.id != rec.id)
        send: list[_Route] = []
        if state.error_code == "token_limit_exceeded":
            verdict = ctx.gate.refused(others, rec.tokens, rec.requests)
            if verdict is Wait.WAIT:
                ctx.progress.message(f"llmap: batch {rec.id} was refused ({text}); its {rec.requests:,} requests go "
                                     "again once running batches end")
            elif verdict is Wait.SPLIT:
                ctx.size.refused(rec.requests, rec.bytes, why="requests")
                ctx.progress.message(f"llmap: batch {rec.id} was refused ({text}) with no other batch running; its "
                                     f"requests go again in batches of at most {ctx.size.max_requests:,}")
            else:
                send = self._all_rows(rec)
        elif too_large(text):
            if ctx.size.refused(rec.requests, rec.bytes, why=text):
                ctx.progress.message(f"llmap: batch {rec.id} was refused for its size ({text}); its requests go "
                                     f"again in batches of at most {ctx.size.max_requests:,}")
            else:
                send = self._all_rows(rec)
        else:  # refused for a reason a new batch would meet again: stop and say so
            ctx.stats.halt(f"batch {rec.id} ({rec.provider_id}) was refused at validation: {text}")
        ctx.commit([], [], [ctx.book.collected_sql(rec.id, state.status, state.counts, error=text, now=ctx.clock())])
        for r in send:  # one request alone is over the batch limit: real time may take it
            ctx.to_realtime(r.key, r.data)

    def _all_rows(self, rec: BatchRecord) -> list[_Route]:
        rows = self.ctx.book.row_data(rec.id)
        return [_Route(k, d) for k, (st, d) in rows.items() if st == "pending"]

    # -- an ended batch --------------------------------------------------------
    async def collect(self, rec: BatchRecord, state: BatchState, *, past_deadline: bool) -> None:
        """Download an ended batch's results and settle its rows (see the module docstring).

        Raises:
            ProviderError: the results could not be downloaded; the batch stays open and is collected later.
        """
        ctx = self.ctx
        results = await ctx.api.results(state)
        lines: dict[str, list[Line]] = {}
        for ln in ctx.book.lines(rec.id):
            lines.setdefault(ln.custom_id, []).append(ln)
        rows = ctx.book.row_data(rec.id)
        settled: list[tuple[RowResult, str]] = []
        send: list[_Route] = []
        user = rec.cancel == "user"
        seen = set()
        for res in results:
            group = lines.get(res.custom_id)
            if group is None or res.custom_id in seen:
                continue  # not a line of this batch (an Anthropic batch found by its time and size)
            seen.add(res.custom_id)
            await self._apply(res, group, rows, settled, send, user=user, past_deadline=past_deadline)
        gone = "cancelled" if "cancel" in state.status else "expired"
        for cid, group in lines.items():
            if cid not in seen:  # no line at all: it never ran
                await self._apply(LineResult(cid, unfinished=gone), group, rows, settled, send, user=user,
                                  past_deadline=past_deadline)
        done = sum(1 for r, _ in settled if r.status == "done")
        ctx.commit([r for r, _ in settled], [d for _, d in settled],
                   [ctx.book.collected_sql(rec.id, state.status, state.counts, now=ctx.clock())])
        ctx.progress.message(f"llmap: batch {rec.id} ({rec.provider_id}) {state.status}: {done:,} rows done"
                             + (f", {len(send):,} to real time" if send else ""))
        for r in send:
            ctx.to_realtime(r.key, r.data, start=r.start, extra=r.extra, tries=r.tries, lead=r.lead, tried=r.tried)

    async def _apply(self, res: LineResult, group: Sequence[Line], rows: dict[str, tuple[str, str]],
                     settled: list[tuple[RowResult, str]], send: list[_Route], *, user: bool,
                     past_deadline: bool) -> None:
        """One line's result onto its rows: billed and cached always, settling only rows still pending with the
        inputs they were submitted with."""
        ctx = self.ctx
        items = list(dict.fromkeys(ln.item for ln in group))
        label = ctx.api.label
        settler = ctx.dispatcher.settler
        pack = len(items) > 1
        on = {"group": group, "rows": rows, "settled": settled, "send": send, "user": user,
              "past_deadline": past_deadline}
        share_p = share_c = 0
        if res.body is None:
            exc = None if res.unfinished else line_error(res, model=label)
            outcome = res.unfinished or (str(res.status) if res.status else type(exc).__name__)
            ctx.stats.requests += 1
            ctx.stats.log(label, outcome, None, 0, 0, len(items), path="batch")
            if res.unfinished:
                for item in items:
                    self._fail(item, "unfinished", f"the batch request {res.unfinished} before it ran", **on)
                return
            decisions: dict[str, Decision] = dict.fromkeys(items, settler.error(exc, pack=pack))
        else:
            try:
                comp = ctx.api.completion(res.body, Request([], None, 0.0, 0, row_key=items[0],
                                                            logprobs=settler.logprobs))
            except E.MalformedResponse as exc:
                comp, decisions = None, dict.fromkeys(items, Retry(0.0, error_text(exc)))
            if comp is not None:
                ctx.stats.requests += 1
                ctx.stats.bill(ctx.lane, comp, len(items), path="batch")
                share_p, share_c = comp.prompt_tokens // len(items), comp.completion_tokens // len(items)
                if pack:
                    decisions = settler.pack(comp, ctx.lane, items, {i: _input(rows, i) for i in items})
                else:
                    decisions = {items[0]: await settler.answer(comp, ctx.lane, ctx.reasks.get(items[0], Tries()),
                                                                _input(rows, items[0]))}
        for item, decision in decisions.items():
            if isinstance(decision, StopRun):  # every row would meet it: stop; these stay pending
                ctx.stats.fatal = ctx.stats.fatal or decision.error  # type: ignore[assignment]
                ctx.stats.halt(decision.reason)
                return
            if isinstance(decision, Done | Escalate):
                self._done(item, decision.output, isinstance(decision, Escalate), share_p, share_c, group, rows,
                           settled, send, confidence=decision.confidence)
            elif isinstance(decision, Reask):
                self._fail(item, "reask", decision.error, reask=decision, **on)
            elif isinstance(decision, Split):  # a damaged pack item, or a pack too long: its rows go alone
                self._fail(item, "invalid", decision.error, alone=True, **on)
            elif isinstance(decision, Retry):
                self._fail(item, "transient", decision.error, **on)
            elif isinstance(decision, FailOver):
                self._fail(item, "terminal", decision.error, raw=decision.raw, **on)

    def _done(self, item: str, output: dict, escalates: bool, pt: int, ct: int, group: Sequence[Line],
              rows: dict[str, tuple[str, str]], settled: list[tuple[RowResult, str]], send: list[_Route], *,
              confidence: float | None = None) -> None:
        ctx = self.ctx
        label = ctx.api.label
        answers = ctx.dispatcher.answers
        members = [ln for ln in group if ln.item == item]
        ckey = members[0].ckey if members else None
        if answers is not None and ckey is not None:
            answers.resolve(ckey, CacheEntry(ckey, label, output, pt, ct, confidence=confidence))
        for ln in members:
            status, data = rows.get(ln.key, ("", ""))
            if status != "pending":
                continue
            if ln.key != ln.item and not ctx.dispatcher.settler.accepts_now(output, _input(rows, ln.key)):
                send.append(_Route(ln.key, data))  # an identical row whose own columns break a check: alone
                continue
            ctx.tries.pop(ln.key, None)
            ctx.followup.pop(ln.key, None)
            ctx.single.discard(ln.key)
            if escalates:  # a cascade: the next model gets the row, in real time
                send.append(_Route(ln.key, data, start=1, tried=[(label, "escalated", output, pt, ct)]))
                continue
            lead = ln.key == ln.item
            settled.append((RowResult(ln.key, "done", output=output, model=label, source="model" if lead else "cache",
                                      attempts=1 if lead else 0, prompt_tokens=pt if lead else 0,
                                      completion_tokens=ct if lead else 0,
                                      tried=[(label, "done" if lead else "cache", output, pt if lead else 0,
                                              ct if lead else 0)], confidence=confidence), data))

    def _fail(self, item: str, kind: str, why: str, group: Sequence[Line], rows: dict[str, tuple[str, str]],
              settled: list[tuple[RowResult, str]], send: list[_Route], *, user: bool, past_deadline: bool,
              reask: Reask | None = None, alone: bool = False, raw: str | None = None) -> None:
        """Rows of an item whose request did not settle them: real time, the next batch, or failed.

        ``kind`` is :class:`~llmap.control.batching.Outcome`'s; ``reask`` the settle stage's re-ask of
        the item's answer; ``alone``: the item was damaged in a pack (its rows go on alone, not re-asked).
        """
        ctx = self.ctx
        if user and kind != "terminal":
            return  # the user cancelled the batch: its rows wait for the next `llmap run`
        for ln in [ln for ln in group if ln.item == item]:
            status, data = rows.get(ln.key, ("", ""))
            if status != "pending":
                continue
            key = ln.key
            tries = ctx.tries.get(key, 0) + (kind == "transient")
            ctx.tries[key] = tries
            state = ctx.reasks.setdefault(key, Tries())
            lead = key == item and ln.ckey is not None
            if reask is not None and key == item:
                state.after(reask)
            nxt = route(Outcome(kind, tries, state.reasks), retry=ctx.spec.retry, max_reask=ctx.dispatcher.max_reask,
                        past_deadline=past_deadline)
            if nxt is Next.REALTIME:
                if reask is not None and key == item and not alone:  # the re-ask goes with it
                    send.append(_Route(key, data, extra=reask.extra, tries=Tries(state.reasks, state.cut),
                                       lead=ln.ckey if lead else None))
                else:
                    send.append(_Route(key, data))
            elif nxt is Next.BATCH:
                if alone:
                    ctx.single.add(key)
                if reask is not None and not alone and key == item:
                    ctx.followup[key] = list(reask.extra)
            elif len(ctx.dispatcher.lanes) > 1:  # failed on the batch model: the next model gets it (failover)
                send.append(_Route(key, data, start=1))
            else:
                settled.append((RowResult(key, "failed", error=why, model=ctx.api.label, attempts=1, raw=raw), data))


def _input(rows: dict[str, tuple[str, str]], key: str) -> dict[str, Any]:
    """A row's input columns from the batch's row data (``[output] checks`` read them); {} when not held."""
    data = rows.get(key, ("", ""))[1]
    return json.loads(data) if data else {}
