"""The batch path: pending rows settled through a provider's batch API (``[model] batch = true``).

One of the three ways to settle pending rows (with the worker pool,
:mod:`llmap.run.pool`, and the Ray executor). It shares the ledger, the
response cache, the real-time :class:`~llmap.run.dispatch.Dispatcher` (for
the rows that finish in real time) and the provider's request building. The
loop, every ``[batch] poll_s`` seconds:

1. **Reconcile** intents whose creation was never recorded (a crash between
   the create request and its answer): the provider's list says whether the
   batch exists (OpenAI: its ``metadata`` tag; Anthropic: its creation time
   and request count). Found, it is adopted; not found, its rows are free
   again, once the intent is :data:`RECONCILE_GRACE_S` old (a create request
   that failed may still be made by the provider in the meantime).
2. **Poll** the open batches; **collect** the ended ones
   (:mod:`llmap.run.batch.collect`), learn from the refused ones, and cancel
   those past ``[batch] deadline`` (their finished requests are collected,
   the rest go to real time once the cancel has taken effect: never both).
3. **Submit** the free pending rows (:mod:`llmap.run.batch.submit`).

It ends when no batch is held, no row is in real time and no row is left
to submit. With ``detach`` it makes one round and returns: the batches keep
running, and the next ``llmap run`` picks them up. On Ctrl-C or a crash the
batches keep running too; nothing is submitted twice, because a held
batch's rows are never taken by another batch or by real time.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from llmap import errors as E
from llmap.control.batching import SizeLimit
from llmap.observe.progress import Progress, Tally
from llmap.providers.base import Provider
from llmap.providers.batch.base import BatchAPI
from llmap.run.batch.collect import Collector
from llmap.run.batch.context import BatchContext
from llmap.run.batch.submit import Submitter
from llmap.run.dispatch import Dispatcher
from llmap.run.pool import install_sigterm
from llmap.run.stats import DispatchStats
from llmap.spec import BatchSpec
from llmap.store.batches import BatchBook, BatchRecord
from llmap.store.ledger import Ledger, RowResult

__all__ = ["RECONCILE_GRACE_S", "batch_api", "cancel_batches", "run_batches", "still_running"]

#: Seconds after its intent before a batch not found at the provider is taken as never created (a create
#: request that failed, or that a crash cut, may still be made by the provider in the meantime).
RECONCILE_GRACE_S = 60.0
#: Seconds between commits of rows settled in real time.
FLUSH_S = 0.25


def batch_api(provider: Provider) -> BatchAPI:
    """The batch API of a real-time provider (``openai`` or ``anthropic``).

    Raises:
        SpecError: the provider has no batch API.
    """
    from llmap.providers.anthropic import AnthropicProvider
    from llmap.providers.openai import OpenAIProvider

    if isinstance(provider, OpenAIProvider):
        from llmap.providers.batch.openai import OpenAIBatches

        return OpenAIBatches(provider)
    if isinstance(provider, AnthropicProvider):
        from llmap.providers.batch.anthropic import AnthropicBatches

        return AnthropicBatches(provider)
    raise E.SpecError(f"{provider.label} has no batch API; batch = true needs provider = 'openai' or 'anthropic'")


async def run_batches(*, ledger: Ledger, run_id: int, job: str, spec: BatchSpec, provider: Provider,
                      dispatcher: Dispatcher, stats: DispatchStats, tally: Tally, progress: Progress, pack: int,
                      on_settled: Callable[[list[RowResult], list[str]], None] | None = None, detach: bool = False,
                      only: str | None = None, clock: Callable[[], float] = time.time,
                      sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
    """Settle every pending row of plan ``run_id`` through the first model's batch API (see the module docstring).

    Args:
        ledger: the job's ledger.
        run_id: the plan to settle.
        job: the job's name (OpenAI batch metadata).
        spec: ``[batch]``.
        provider: the first model's real-time provider.
        dispatcher: the real-time path (retries, deadline tail, cascade, failover).
        stats, tally, progress: the run's counters and reporter.
        pack: rows per batch request (``[prompt] pack``).
        on_settled: the engine's hook on settled rows.
        detach: submit, collect what has ended, and return without waiting for the rest.
        only: settle only the pending rows meeting this condition over ``rows`` (a guaranteed cascade's phase);
            None: every pending row.
        clock: POSIX seconds (deadlines); ``sleep``: awaitable delay (both injectable).

    Raises:
        asyncio.CancelledError: Ctrl-C / SIGTERM; the batches keep running, committed rows are kept.
        DiskFull: a commit found the disk full.
    """
    api = batch_api(provider)
    size = SizeLimit(min(spec.max_requests, api.max_requests), min(spec.max_bytes_n, api.max_bytes))
    # a guaranteed cascade's phase (``only``) sees its own model's batches: the other phase's are not its to collect
    book = BatchBook(ledger, model=api.label if only is not None else None)
    ctx = BatchContext(ledger, book, run_id, job, spec, api, dispatcher, stats, tally, progress,
                       pack=max(1, pack), on_settled=on_settled, clock=clock, size=size, only=only)
    undo_sigterm = install_sigterm(asyncio.current_task())  # SIGTERM stops like Ctrl-C: batches keep running
    try:
        await _Loop(ctx, sleep).run(detach)
    finally:
        undo_sigterm()


class _Loop:
    def __init__(self, ctx: BatchContext, sleep: Callable[[float], Awaitable[object]]) -> None:
        self.ctx = ctx
        self.sleep = sleep
        self.submitter = Submitter(ctx)
        self.collector = Collector(ctx)
        self.warned: set[int] = set()
        self.cancelled_before = {r.id for r in ctx.book.held() if r.cancel == "user"}
        self.shown = ""

    async def run(self, detach: bool) -> None:
        ctx = self.ctx
        ticker = asyncio.get_running_loop().create_task(self._tick())
        try:
            while not ctx.stats.stop.is_set():
                await self._poll()
                created = 0
                if not ctx.stats.stop.is_set() and not ctx.user_cancelled:
                    before = {r.id for r in ctx.book.held()}
                    await self.submitter.submit()
                    created = len({r.id for r in ctx.book.held()} - before)
                self._show()
                if detach:
                    break
                if not ctx.book.held():
                    if ctx.in_realtime:  # only real time is left: wait for it, then look again
                        await ctx.drain()
                        continue
                    free = ctx.book.free_pending(ctx.run_id, after_seq=-1, limit=1, only=ctx.only)
                    if not free or ctx.user_cancelled or not created:
                        break
                await self._wait(ctx.spec.poll_s)
            await ctx.drain()
        except asyncio.CancelledError:
            await ctx.abandon()
            raise
        finally:
            ticker.cancel()
            ctx.flush()
        if ctx.user_cancelled:
            ctx.stats.halt("the job's batches were cancelled with `llmap batch cancel`: their unfinished rows stay "
                           "pending")

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            self.ctx.flush()

    async def _wait(self, seconds: float) -> None:
        """Sleep ``seconds``, waking early when the run stops."""
        stop = self.ctx.stats.stop
        waiter = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([waiter, asyncio.ensure_future(self.sleep(seconds))],
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()

    # -- one round ------------------------------------------------------------
    async def _poll(self) -> None:
        ctx = self.ctx
        now = ctx.clock()
        deadline = ctx.spec.deadline_s
        for rec in ctx.book.held():
            if ctx.stats.stop.is_set():
                return
            if rec.cancel == "user" and rec.id not in self.cancelled_before:
                ctx.user_cancelled = True
            try:
                if rec.state == "intent":
                    await self._reconcile(rec, now)
                    continue
                state = await ctx.api.get(rec.provider_id or "")
                ctx.book.seen(rec.id, state.status, state.counts, now=now)
                if state.failed:
                    self.collector.refused(rec, state)
                elif not state.open:
                    past = rec.cancel == "deadline" or now - rec.created_at > deadline
                    await self.collector.collect(rec, state, past_deadline=past)
                elif now - rec.created_at > deadline and rec.cancel is None:
                    await ctx.api.cancel(rec.provider_id or "")
                    ctx.book.cancelling(rec.id, "deadline")
                    ctx.progress.message(f"llmap: batch {rec.id} ({rec.provider_id}) passed [batch] deadline = "
                                         f"{ctx.spec.deadline}; cancelling it: what it finished is kept, the rest "
                                         "goes to real time once the cancel is done")
            except E.FatalProviderError as exc:
                ctx.stats.fatal = ctx.stats.fatal or exc
                ctx.stats.halt(f"{exc}")
            except E.BadRequest as exc:  # 404: the provider no longer knows it (deleted): its rows are free again
                if exc.status != 404 or rec.state == "intent":
                    ctx.stats.halt(f"batch {rec.id} ({rec.provider_id}): {exc}")
                    continue
                ctx.book.dropped(rec.id, str(exc), now=now)
                ctx.progress.message(f"llmap: batch {rec.id} ({rec.provider_id}) is gone at the provider ({exc}); "
                                     "its unanswered rows go in a new batch")
            except E.ProviderError as exc:  # the batch is still there: poll it again next round
                if rec.id not in self.warned:
                    self.warned.add(rec.id)
                    ctx.progress.message(f"llmap: batch {rec.id}: {exc}; trying again in {ctx.spec.poll_s:g} s")

    async def _reconcile(self, rec: BatchRecord, now: float) -> None:
        """An intent without a provider id: adopt the batch made for it, or free its rows."""
        ctx = self.ctx
        found = await ctx.api.find(rec.tag, created_at=rec.created_at, requests=rec.requests,
                                   known=ctx.book.known_ids())
        if found.state is not None:
            ctx.book.opened(rec.id, found.state.provider_id, found.state.status, now=now)
            ctx.progress.message(f"llmap: batch {rec.id} was created before the last run stopped: found it as "
                                 f"{found.state.provider_id} ({found.state.status}); its rows are not sent again")
        elif not found.maybe and now - rec.created_at >= RECONCILE_GRACE_S:
            ctx.book.dropped(rec.id, "never created (not found at the provider)", now=now)
            ctx.progress.message(f"llmap: batch {rec.id} was never created at the provider; its rows go in a new "
                                 "batch")

    def _show(self) -> None:
        """Batches by state and rows done / submitted / total, on the bar and, when it changes, as a line."""
        ctx = self.ctx
        held = ctx.book.held()
        states = Counter(r.status or r.state for r in held)
        t = ctx.tally
        text = (", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none open") + \
            f"; {ctx.book.held_rows():,} rows submitted"
        if ctx.in_realtime:
            text += f", {ctx.in_realtime:,} in real time"
        n, parts = len(held), sorted(states.items())
        if len(parts) == 1:  # on the bar: "2 batches in_progress", or "3 batches: 1 validating, 2 in_progress"
            t.batches = f"{n} batch{'es' if n != 1 else ''} {parts[0][0]}"
        else:
            t.batches = f"{n} batches: " + ", ".join(f"{k} {s}" for s, k in parts) if n else ""
        ctx.progress.advance(t)
        if text != self.shown:
            self.shown = text
            ctx.progress.message(f"llmap: batches: {text}; {t.done:,} done of {t.total:,} rows")


async def cancel_batches(ledger: Ledger, provider: Provider) -> list[tuple[int, str, str]]:
    """Ask the provider to cancel every open batch of a job (``llmap batch cancel``).

    Returns:
        ``(local id, provider id, status)`` per batch asked; a batch that had already ended says so (the next
        run collects it).

    Raises:
        ProviderError: the provider could not be asked (no answer, a 5xx, the key): the message names the batch.
    """
    api = batch_api(provider)
    book = BatchBook(ledger)
    out = []
    for rec in book.held():
        if rec.provider_id is None:
            continue
        try:
            status = (await api.cancel(rec.provider_id)).status
        except E.FatalProviderError:
            raise
        except E.BadRequest as exc:  # ended already (OpenAI: 400 "Cannot cancel a batch with status completed")
            out.append((rec.id, rec.provider_id, f"not cancelled: {exc}"))
            continue
        book.cancelling(rec.id, "user")
        out.append((rec.id, rec.provider_id, status))
    return out


def still_running(ledger: Ledger) -> str:
    """An interrupted run's word on its batches (``"; 2 batches keep running ..."``): they keep running at the
    provider, and the next run collects them; ``""`` when none is held."""
    held = BatchBook(ledger).held()
    if not held:
        return ""
    return (f"; {len(held)} batch{'es' if len(held) != 1 else ''} keep running at the provider (recorded in the "
            "ledger): the next `llmap run` collects them and sends none of their rows again, "
            "`llmap batch cancel` stops them")
