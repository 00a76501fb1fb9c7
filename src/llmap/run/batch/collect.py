"""Collecting: an ended batch's results become settled rows, and everything paid for is kept.

Every line of an ended batch (completed, expired, cancelled) is read,
answered or not:

- an answer is read by the real-time provider's own parser and validated
  like a real-time one (:meth:`OutputSchema.validate
  <llmap.prompt.schema.OutputSchema.validate>`, or :func:`~llmap.prompt.pack.parse_pack`
  for a pack); a valid answer settles its rows (and the identical rows
  attached to its line), goes into the response cache, and goes on to the
  next model when it meets ``escalate_if``;
- an invalid answer, a failed request (its error file line or ``errored``
  result, mapped at :func:`~llmap.providers.batch.base.line_error`), and a
  request that never ran (expired, cancelled) go where
  :func:`~llmap.control.batching.route` says: real time, the next batch, or
  failed with the provider's message (a 4xx);
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

from collections.abc import Sequence
from dataclasses import dataclass

from llmap import errors as E
from llmap.control.batching import Next, Outcome, Wait, route
from llmap.prompt.pack import parse_pack
from llmap.prompt.schema import cut_message, reask_message
from llmap.providers.base import Completion, Request
from llmap.providers.batch.base import BatchState, LineResult, line_error, too_large
from llmap.run.batch.context import BatchContext
from llmap.store.batches import BatchRecord, Line
from llmap.store.cache import CacheEntry
from llmap.store.ledger import RowResult

__all__ = ["Collector"]


@dataclass
class _Route:
    """A row sent on after collection: to real time (``start``, ``reask``, ``lead``, ``tried``)."""

    key: str
    data: str
    start: int = 0
    reask: list[dict[str, str]] | None = None
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
            self._apply(res, group, rows, settled, send, user=user, past_deadline=past_deadline)
        gone = "cancelled" if "cancel" in state.status else "expired"
        for cid, group in lines.items():
            if cid not in seen:  # no line at all: it never ran
                self._apply(LineResult(cid, unfinished=gone), group, rows, settled, send, user=user,
                            past_deadline=past_deadline)
        done = sum(1 for r, _ in settled if r.status == "done")
        ctx.commit([r for r, _ in settled], [d for _, d in settled],
                   [ctx.book.collected_sql(rec.id, state.status, state.counts, now=ctx.clock())])
        ctx.progress.message(f"llmap: batch {rec.id} ({rec.provider_id}) {state.status}: {done:,} rows done"
                             + (f", {len(send):,} to real time" if send else ""))
        for r in send:
            ctx.to_realtime(r.key, r.data, start=r.start, reask=r.reask, lead=r.lead, tried=r.tried)

    def _apply(self, res: LineResult, group: Sequence[Line], rows: dict[str, tuple[str, str]],
               settled: list[tuple[RowResult, str]], send: list[_Route], *, user: bool, past_deadline: bool) -> None:
        """One line's result onto its rows: billed and cached always, settling only rows still pending with the
        inputs they were submitted with."""
        ctx = self.ctx
        items = list(dict.fromkeys(ln.item for ln in group))
        label = ctx.api.label
        if res.body is None:
            exc = None if res.unfinished else line_error(res, model=label)
            outcome = res.unfinished or (str(res.status) if res.status else type(exc).__name__)
            ctx.stats.requests += 1
            ctx.stats.log(label, outcome, None, 0, 0, len(items), path="batch")
            if isinstance(exc, E.FatalProviderError):  # every row would meet it: stop; these stay pending
                ctx.stats.fatal = ctx.stats.fatal or exc
                ctx.stats.halt(f"{exc}")
                return
            if res.unfinished:
                kind, why = "unfinished", f"the batch request {res.unfinished} before it ran"
            elif isinstance(exc, E.ContextTooLong) and len(items) > 1:
                kind, why = "invalid", f"{type(exc).__name__}: {exc}"  # the pack is too long: its rows go alone
            else:
                kind, why = ("terminal" if isinstance(exc, E.TerminalError) else "transient"), f"{type(exc).__name__}: {exc}"
            for item in items:
                self._fail(item, kind, why, group, rows, settled, send, user=user, past_deadline=past_deadline,
                           alone=len(items) > 1)
            return
        req = Request([], None, 0.0, 0, row_key=items[0])
        try:
            comp = ctx.api.completion(res.body, req)
        except E.MalformedResponse as exc:
            for item in items:
                self._fail(item, "transient", f"MalformedResponse: {exc}", group, rows, settled, send, user=user,
                           past_deadline=past_deadline)
            return
        self._bill(comp, len(items))
        if comp.stop_reason == "refusal":
            for item in items:
                self._fail(item, "terminal", f"Refusal: {label} declined to answer (stop_reason refusal)", group,
                           rows, settled, send, user=user, past_deadline=past_deadline)
            return
        schema = ctx.dispatcher.schema
        reask: list[dict[str, str]] | None = None
        if len(items) == 1:
            try:
                if comp.stop_reason == "max_tokens":
                    raise E.AnswerInvalid(f"cut at max_tokens = {ctx.lane.model.max_tokens}")
                answers = {items[0]: schema.validate(comp.content)}
                problems: dict[str, str] = {}
            except E.AnswerInvalid as exc:
                answers = {}
                problems = {items[0]: f"AnswerInvalid: {exc.detail}"}
                reask = [cut_message(ctx.lane.model.max_tokens)] if comp.stop_reason == "max_tokens" else \
                    [{"role": "assistant", "content": comp.content}, reask_message(exc.detail, schema.json_schema)]
        else:
            parsed = parse_pack(comp.content, items, schema.validate)
            answers, problems = parsed.answers, {k: f"AnswerInvalid: {v}" for k, v in parsed.problems.items()}
        share_p, share_c = comp.prompt_tokens // len(items), comp.completion_tokens // len(items)
        outputs = list(answers.values())
        verdicts = ctx.dispatcher.escalates_many(ctx.lane, outputs) if outputs else []
        for (item, output), up in zip(answers.items(), verdicts, strict=True):
            self._done(item, output, up, share_p, share_c, group, rows, settled, send)
        for item, why in problems.items():
            self._fail(item, "invalid", why, group, rows, settled, send, user=user, past_deadline=past_deadline,
                       reask=reask, alone=len(items) > 1)

    def _bill(self, comp: Completion, pack_size: int) -> None:
        """Count one answered line: its tokens, and its cost at ``price_batch_factor``."""
        ctx, st = self.ctx, self.ctx.stats
        lane = ctx.lane
        cost = lane.cost_usd(comp.prompt_tokens, comp.completion_tokens, comp.cache_read_tokens,
                             comp.cache_write_tokens) * lane.model.price_batch_factor
        st.requests += 1
        st.prompt_tokens += comp.prompt_tokens
        st.completion_tokens += comp.completion_tokens
        st.cost_usd += cost
        st.log(lane.label, None, None, comp.prompt_tokens, comp.completion_tokens, pack_size, cost,
               cache_read=comp.cache_read_tokens, cache_write=comp.cache_write_tokens, path="batch")

    def _done(self, item: str, output: dict, escalates: bool, pt: int, ct: int, group: Sequence[Line],
              rows: dict[str, tuple[str, str]], settled: list[tuple[RowResult, str]], send: list[_Route]) -> None:
        ctx = self.ctx
        label = ctx.api.label
        answers = ctx.dispatcher.answers
        members = [ln for ln in group if ln.item == item]
        ckey = members[0].ckey if members else None
        if answers is not None and ckey is not None:
            answers.resolve(ckey, CacheEntry(ckey, label, output, pt, ct))
        for ln in members:
            status, data = rows.get(ln.key, ("", ""))
            if status != "pending":
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
                                              ct if lead else 0)]), data))

    def _fail(self, item: str, kind: str, why: str, group: Sequence[Line], rows: dict[str, tuple[str, str]],
              settled: list[tuple[RowResult, str]], send: list[_Route], *, user: bool, past_deadline: bool,
              reask: list[dict[str, str]] | None = None, alone: bool = False) -> None:
        """Rows of an item whose request did not settle them: real time, the next batch, or failed."""
        ctx = self.ctx
        if user and kind != "terminal":
            return  # the user cancelled the batch: its rows wait for the next `llmap run`
        for ln in [ln for ln in group if ln.item == item]:
            status, data = rows.get(ln.key, ("", ""))
            if status != "pending":
                continue
            key = ln.key
            tries = ctx.tries.get(key, 0) + (kind == "transient")
            reasks = ctx.reasks.get(key, 0) + (kind == "invalid")
            ctx.tries[key], ctx.reasks[key] = tries, reasks
            nxt = route(Outcome(kind, tries, reasks), retry=ctx.spec.retry,
                        max_reask=ctx.dispatcher.max_reask, past_deadline=past_deadline)
            lead = key == item and ln.ckey is not None
            if nxt is Next.REALTIME:
                send.append(_Route(key, data, reask=reask if lead and not alone else None,
                                   lead=ln.ckey if lead and reask and not alone else None))
            elif nxt is Next.BATCH:
                if alone:
                    ctx.single.add(key)
                if reask and not alone and key == item:
                    ctx.followup[key] = reask
            elif len(ctx.dispatcher.lanes) > 1:  # failed on the batch model: the next model gets it (failover)
                send.append(_Route(key, data, start=1))
            else:
                extra = f" (after {reasks - 1} re-asks)" if kind == "invalid" else ""
                settled.append((RowResult(key, "failed", error=f"{why}{extra}", model=ctx.api.label, attempts=1),
                                data))
