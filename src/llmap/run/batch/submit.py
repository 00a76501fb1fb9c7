"""Submitting: the free pending rows become batches, each recorded in the ledger before it is created.

One pass pages the pending rows no batch holds (:meth:`BatchBook.free_pending
<llmap.store.batches.BatchBook.free_pending>`), renders them and looks them up
in the response cache a page at a time, as the worker pool does:

- a cached answer settles the row (a cached answer that escalates goes to
  real time, which cascades it);
- a row whose request is identical to an item of a held batch, or of the
  batch being built, joins that item's line: it is never submitted;
- the rest become lines: one row per line, or one pack of ``[prompt] pack``
  rows (a row being re-asked, or damaged in a pack before, goes alone).

Lines fill a batch up to the size limits (:class:`~llmap.control.batching.SizeLimit`).
Then, in this order: the batch's *intent* is committed (tag, file hash, lines),
the batch is created at the provider, and its id is committed. A crash
between the last two is found again on the next start (:mod:`llmap.run.batch.runner`).
A batch the provider refuses for its size is dropped and its rows go again
in batches half as big; a batch that would pass the queue's enqueued-token
bound waits (:class:`~llmap.control.batching.EnqueueGate`).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from llmap import errors as E
from llmap.prompt.pack import pack_messages, pack_schema
from llmap.providers.base import Request
from llmap.run.batch.context import BatchContext
from llmap.run.rows import PendingRow
from llmap.store.batches import Line
from llmap.store.ledger import RowResult

__all__ = ["Submitter"]

#: Pending rows read (and looked up in the cache) per query.
PAGE_ROWS = 512
#: Passes one :meth:`Submitter.submit` makes at most (each after a batch refused for its size).
MAX_PASSES = 32


@dataclass
class _Batch:
    """A batch being built: its tag, its lines, and the rows each line answers."""

    tag: str
    lines: list[dict[str, Any]] = field(default_factory=list)
    texts: list[bytes] = field(default_factory=list)
    book: list[Line] = field(default_factory=list)  # custom id -> item -> row key
    items: dict[str, tuple[str, str]] = field(default_factory=dict)  # cache key -> (custom id, item)
    waiting: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)  # cache key -> identical rows
    # (key, input hash) whose item is not in a line yet
    datas: dict[str, str] = field(default_factory=dict)
    size: int = 0
    tokens: int = 0
    worst_usd: float = 0.0

    @property
    def n(self) -> int:
        return len(self.lines)


class Submitter:
    """Turns free pending rows into batches (see the module docstring).

    Args:
        ctx: the run's batch context.
    """

    def __init__(self, ctx: BatchContext) -> None:
        self.ctx = ctx
        self.open_tokens = 0.0
        self.pending: list[PendingRow] = []  # rows waiting to fill a pack
        self._worst: dict[int, float] = {}  # batch -> its cost at max_tokens (the budget cap's reservation)

    async def submit(self) -> int:
        """Submit every free pending row that may go now; returns the batches created."""
        created = 0
        for _ in range(MAX_PASSES):
            if self.ctx.stats.stop.is_set() or self.ctx.user_cancelled:
                break
            n, again = await self._pass()
            created += n
            if not again:
                break
        return created

    async def _pass(self) -> tuple[int, bool]:
        """One pass over the free rows: ``(batches created, whether rows came free again to go at once)``."""
        ctx = self.ctx
        book = ctx.book
        held = book.held()
        self.open_tokens = float(sum(r.tokens for r in held))
        held_items = book.held_items()
        settled: list[tuple[RowResult, str]] = []
        attach: dict[int, list[Line]] = {}
        batch = self._new()
        created, after = 0, -1
        answers = ctx.dispatcher.answers
        while not ctx.stats.stop.is_set():
            page = book.free_pending(ctx.run_id, after_seq=after, limit=PAGE_ROWS, only=ctx.only)
            if not page:
                break
            after = page[-1][0]
            rows, failed = ctx.steps.prepare([PendingRow(key, data, input_hash=input_hash)
                                              for _, key, data, input_hash in page if not ctx.busy(key)])
            settled.extend((res, row.data) for res, row in failed)
            if len(settled) >= PAGE_ROWS:  # rows the cache answered: committed as they come (memory stays flat)
                ctx.commit([r for r, _ in settled], [d for _, d in settled])
                settled.clear()
            for row in rows:
                if row.ckey is not None and answers is not None and (
                        row.key in ctx.followup or row.ckey in held_items or row.ckey in batch.items):
                    answers.pass_over(row.ckey)  # answered by a batch, not looked up (peek takes the others)
                if row.ckey is not None and row.key not in ctx.followup:
                    if row.ckey in held_items:  # an identical request is in a held batch: wait for its answer
                        b, cid, item = held_items[row.ckey]
                        attach.setdefault(b, []).append(Line(cid, item, row.key, row.ckey, row.input_hash))
                        continue
                    if row.ckey in batch.items:  # ... or in the batch being built
                        cid, item = batch.items[row.ckey]
                        if cid:
                            batch.book.append(Line(cid, item, row.key, row.ckey, row.input_hash))
                        else:  # its item waits in a pack not yet full
                            batch.waiting.setdefault(row.ckey, []).append((row.key, row.input_hash))
                        batch.datas[row.key] = row.data
                        continue
                    hit = answers.peek(row.ckey) if answers is not None else None
                    if hit is not None:
                        res = await ctx.steps.from_cache(row, hit)
                        if res is None:  # it escalates: its own lookup in real time finds the answer and cascades
                            ctx.to_realtime(row.key, row.data)
                        else:
                            settled.append((res, row.data))
                        continue
                outcome = await self._add(batch, row)
                if outcome is None:
                    continue
                created += outcome == "ok"
                held_items = book.held_items()
                if outcome != "ok":
                    self._finish(settled, attach)
                    return created, outcome == "again"
                batch = self._new()
        outcome = await self._close(batch)
        created += outcome == "ok"
        self._finish(settled, attach)
        return created, outcome == "again"

    def _finish(self, settled: list[tuple[RowResult, str]], attach: dict[int, list[Line]]) -> None:
        ctx = self.ctx
        for b, lines in attach.items():
            ctx.book.attach(b, lines)
        if settled:
            ctx.commit([r for r, _ in settled], [d for _, d in settled])

    def _new(self) -> _Batch:
        self.pending = []
        return _Batch(tag=f"lm{secrets.token_hex(5)}")

    # -- lines ----------------------------------------------------------------
    async def _add(self, batch: _Batch, row: PendingRow) -> str | None:
        """Add a row; when its batch is full, create it and return the outcome (else None)."""
        ctx = self.ctx
        alone = ctx.pack <= 1 or row.key in ctx.followup or row.key in ctx.single
        if alone:
            self._line(batch, [row])
        else:
            self.pending.append(row)
            if row.ckey is not None:
                batch.items[row.ckey] = ("", row.key)  # its custom id comes when the pack is full
            if len(self.pending) >= ctx.pack:
                self._line(batch, self.pending)
                self.pending = []
        if batch.n >= ctx.size.max_requests or batch.size >= ctx.size.max_bytes:
            return await self._create(batch)
        return None

    def _line(self, batch: _Batch, rows: list[PendingRow]) -> None:
        ctx = self.ctx
        d = ctx.dispatcher
        model = ctx.lane.model
        cid = f"{batch.tag}-{batch.n}"
        if len(rows) == 1:
            row = rows[0]
            messages = [*row.messages, *ctx.followup.get(row.key, [])]
            req = Request(messages, d.schema.json_schema, model.temperature, model.max_tokens, row_key=row.key,
                          shared_prefix=d.renderer.shared_prefix(row.messages), logprobs=d.settler.logprobs)
        else:
            messages = pack_messages(d.renderer, [(r.key, json.loads(r.data)) for r in rows])
            req = Request(messages, pack_schema(d.schema.json_schema), model.temperature,
                          model.max_tokens * len(rows), row_key=rows[0].key,
                          shared_prefix=d.renderer.shared_prefix(messages), logprobs=d.settler.logprobs)
        line = ctx.api.line(cid, req)
        text = json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode()
        batch.lines.append(line)
        batch.texts.append(text)
        batch.size += len(text) + 1
        chars = sum(len(m["content"]) if isinstance(m.get("content"), str) else len(str(m.get("content")))
                    for m in messages)
        prompt = ctx.lane.prompt_tokens.estimate(chars)
        batch.tokens += int(prompt)
        batch.worst_usd += ctx.lane.cost_usd(int(prompt), model.max_tokens * len(rows)) * model.price_batch_factor
        for r in rows:
            batch.book.append(Line(cid, r.key, r.key, r.ckey, r.input_hash))
            batch.datas[r.key] = r.data
            if r.ckey is not None:
                batch.items[r.ckey] = (cid, r.key)
                for key, h in batch.waiting.pop(r.ckey, []):  # identical rows that joined it before its line existed
                    batch.book.append(Line(cid, r.key, key, r.ckey, h))

    async def _close(self, batch: _Batch) -> str:
        if self.pending:
            self._line(batch, self.pending)
            self.pending = []
        return await self._create(batch) if batch.n else "none"

    # -- creating -------------------------------------------------------------
    async def _create(self, batch: _Batch) -> str:
        """Record the intent, create the batch, record its id.

        Returns:
            ``"ok"``, ``"again"`` (refused for its size: its rows go again now, in smaller batches),
            ``"wait"`` (the queue is full: it goes later) or ``"stop"``.
        """
        ctx = self.ctx
        if self.pending:
            self._line(batch, self.pending)
            self.pending = []
        if not ctx.gate.allows(self.open_tokens, batch.tokens):
            return "wait"
        cap = ctx.dispatcher.limits.max_cost_usd
        if cap is not None and ctx.stats.cost_usd + self._open_worst() + batch.worst_usd > cap:
            ctx.stats.halt(f"budget cap: a batch of {batch.n:,} requests could cost up to ${batch.worst_usd:,.4f} "
                           f"(at max_tokens), over [limits] max_cost_usd = {cap:g} with what is spent and queued")
            return "stop"
        file_hash = hashlib.sha256(b"\n".join(batch.texts)).hexdigest()
        bid = ctx.book.intent(run=ctx.run_id, model=ctx.api.label, provider=ctx.api.kind, tag=batch.tag,
                              file_hash=file_hash, requests=batch.n, size=batch.size, tokens=batch.tokens,
                              lines=batch.book, now=ctx.clock())
        self._worst[bid] = batch.worst_usd
        rows = len({ln.key for ln in batch.book})
        try:
            state = await ctx.api.create(batch.tag, batch.lines, job=ctx.job)
        except E.BatchTooLarge as exc:
            ctx.book.dropped(bid, str(exc), now=ctx.clock())
            if ctx.size.refused(batch.n, batch.size, why=str(exc)):
                ctx.progress.message(f"llmap: {exc}; sending its {rows:,} rows again in batches of at most "
                                     f"{ctx.size.max_requests:,} requests")
            else:  # one request alone is over the batch API's limit: real time may take it
                ctx.progress.message(f"llmap: {exc}; its request goes in real time")
                for ln in batch.book:
                    ctx.to_realtime(ln.key, batch.datas.get(ln.key) or self._data(ln.key))
            return "again"
        except E.TerminalError as exc:  # the request shape, the key, the quota: every batch would be refused
            ctx.book.dropped(bid, str(exc), now=ctx.clock())
            ctx.stats.fatal = ctx.stats.fatal or (exc if isinstance(exc, E.FatalProviderError) else None)
            ctx.stats.halt(f"the batch API refused a batch: {exc}")
            return "stop"
        except E.ProviderError as exc:  # no answer, or 5xx: whether it was created is unknown until it is found
            ctx.progress.message(f"llmap: creating batch {bid} failed ({exc}); llmap looks for it before sending "
                                 "its rows again")
            return "stop"
        ctx.book.opened(bid, state.provider_id, state.status, now=ctx.clock())
        self.open_tokens += batch.tokens
        ctx.progress.message(f"llmap: submitted batch {bid} ({state.provider_id}): {batch.n:,} requests for "
                             f"{rows:,} rows")
        return "ok"

    def _open_worst(self) -> float:
        """What the held batches may still cost at most: their own reservation, or for a batch an earlier run
        created, its prompt tokens and every request answering ``max_tokens`` per row."""
        lane, model = self.ctx.lane, self.ctx.lane.model
        total = 0.0
        for rec in self.ctx.book.held():
            worst = self._worst.get(rec.id)
            if worst is None:
                out = rec.requests * self.ctx.pack * model.max_tokens
                worst = lane.cost_usd(rec.tokens, out) * model.price_batch_factor
            total += worst
        return total

    def _data(self, key: str) -> str:
        row = self.ctx.ledger.connection.execute("SELECT data FROM rows WHERE key = ?", (key,)).fetchone()
        return row[0] if row else "{}"
