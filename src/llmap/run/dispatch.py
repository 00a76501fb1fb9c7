"""The dispatcher: rows in, one settled :class:`~llmap.store.ledger.RowResult` per row out.

For each row it renders the messages, then loops over attempts:

1. **Route** (:func:`~llmap.control.lanes.pick_lane`): the first model from
   the row's starting lane whose circuit breaker lets a call through.
2. **Admit**: the lane's concurrency gate (AIMD) and rate limiter (RPM/TPM
   reservations, Retry-After pauses) decide when the request may go.
3. **Send** under an adaptive timeout, so a hung request is abandoned.
4. **Bill**: usage corrects the token reservation and is billed
   (:meth:`~llmap.run.stats.DispatchStats.bill`), headers update budgets.
5. **Settle** (:class:`~llmap.run.settle.Settler`, the one judge of an
   answer or an error): done, re-ask (an invalid or cut answer), escalate (a
   cascade), retry after backoff (transient), fail over to the next model
   (refused, re-asks or retries spent, a 4xx), or stop the run (errors every
   row would hit: auth, quota).

Before a request is sent, the response cache and the identical requests in
flight in this run are asked (:mod:`llmap.store.answers`); a hit settles the
row with ``source = "cache"``. A valid answer that meets the model's
``escalate_if`` goes on to the next model (a cascade).

Rows whose retries are spent on every model fail with the last error, or get
an expired cache entry (``source = "stale"``), or ``[output] fallback`` when
the job gives one. The budget caps stop new requests; in-flight ones finish.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from llmap import errors as E
from llmap.control.cascade import EscalateIf
from llmap.control.lanes import Lane, pick_lane
from llmap.control.misconfig import MisconfigDetector, verdict_message
from llmap.control.retry import RetryPolicy
from llmap.prompt.parts import content_chars
from llmap.prompt.render import Renderer
from llmap.prompt.schema import OutputSchema
from llmap.providers.base import Completion, Refusal, Request
from llmap.run.hedge import HEDGE_LOST, hedged
from llmap.run.settle import Escalate, FailOver, Reask, Retry, Settler, Tries
from llmap.run.settle import Stop as StopRun
from llmap.run.stats import DispatchStats, Stop
from llmap.spec import LimitsSpec
from llmap.store.answers import AnswerCache
from llmap.store.cache import CacheEntry
from llmap.store.ledger import RowResult

__all__ = ["Dispatcher"]

#: Errors that mean the provider is down or broken: they count against its circuit breaker.
_OUTAGE = (E.Overloaded, E.RequestTimeout, E.ConnectionFailed, E.MalformedResponse)
#: Errors after which the provider did not process the request: its token reservation is refunded
#: (the request itself still counts against RPM, as providers count it).
_UNPROCESSED = (E.RateLimited, E.ConnectionFailed, E.TerminalError)
#: While a half-open breaker's probe is out, rows look again this often, seconds.
_VERDICT_POLL_S = 0.1


def _chars(messages: list[dict[str, Any]]) -> int:
    """Characters of a request's messages (the prompt-token estimate's input)."""
    return sum(content_chars(m.get("content")) for m in messages)
#: How often the watchdog tightens deadlines of requests in flight, seconds.
_WATCHDOG_S = 0.25


class Dispatcher:
    """Settles rows against the job's models.

    Args:
        lanes: one :class:`~llmap.control.lanes.Lane` per model, primary first.
        renderer: the compiled prompt.
        schema: the output contract.
        limits: the ``[limits]`` spec (retry budget, attempts, caps).
        max_reask: re-asks after an invalid answer, per model.
        fallback: static answer for rows no model could answer, or None.
        stats: counters to update.
        answers: the response cache and in-run dedup, or None to ask every time.
        escalate_if: per lane, its bound ``escalate_if`` (:mod:`llmap.control.cascade`), or None.
        clock: monotonic seconds (latency, deadlines, retry budgets); ``sleep``: awaitable delay
            (backoff); both injectable.
        retry: the retry policy; default one from ``limits`` (``max_attempts``, ``backoff_base_s``,
            ``backoff_cap_s``, ``retry_budget_s``).
        documents: the job's document columns (:class:`llmap.io.documents.Documents`), read on each row's path
            by :meth:`~llmap.run.rows.RowSteps.resolve`, or None.
        quality: the settle stage's ``checks`` and ``confidence`` (:class:`~llmap.run.settle.Settler`).

    Attributes:
        settler: the judge of every answer and error (:mod:`llmap.run.settle`).
    """

    def __init__(self, lanes: Sequence[Lane], renderer: Renderer, schema: OutputSchema, limits: LimitsSpec, *,
                 max_reask: int, fallback: dict[str, Any] | None, stats: DispatchStats,
                 answers: AnswerCache | None = None, escalate_if: Sequence[EscalateIf | None] = (),
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                 retry: RetryPolicy | None = None, documents: Any = None, **quality: Any) -> None:
        self.lanes = list(lanes)
        self.documents = documents
        self.answers = answers
        self.settler = Settler(schema, max_reask=max_reask, escalate_if=escalate_if, models=len(self.lanes), **quality)
        self.renderer = renderer
        self.schema = schema
        self.limits = limits
        self.max_reask = max_reask
        self.fallback = fallback
        self.stats = stats
        self.clock = clock
        self.sleep = sleep
        self.retry = retry or RetryPolicy(max_attempts=limits.max_attempts, base_s=limits.backoff_base_s,
                                          cap_s=limits.backoff_cap_s, budget_s=limits.retry_budget_s)
        self._in_tail: Callable[[], bool] = lambda: False
        self._no_usage: set[str] = set()  # lanes already warned that their server reports no usage
        #: One model refusing every request the same way is a configuration error, not an outage.
        self.misconfig = MisconfigDetector()

    # -- the run's tail -------------------------------------------------------
    def watch_tail(self, in_tail: Callable[[], bool]) -> None:
        """Tell the dispatcher how to know the run's tail: ``in_tail()`` is True once every row has been
        handed to a worker (the pool knows). In the tail, stragglers are hedged (``limits.hedge_tail``)."""
        self._in_tail = in_tail

    def in_tail(self) -> bool:
        """True in the run's tail (see :meth:`watch_tail`); no more rows will come."""
        return self._in_tail()

    # -- caps -----------------------------------------------------------------
    def check_caps(self) -> None:
        """Stop the run when a budget cap (``[limits] max_cost_usd`` or ``max_tokens``) is reached.

        Raises:
            Stop: a cap is reached (said once, through :meth:`DispatchStats.halt`) or the run is stopping.
        """
        st, lim = self.stats, self.limits
        if lim.max_cost_usd is not None and st.cost_usd >= lim.max_cost_usd:
            st.halt(f"budget cap reached: limits.max_cost_usd = {lim.max_cost_usd:g} USD "
                    f"(spent {st.cost_usd:.4f} USD)")
        elif lim.max_tokens is not None and st.prompt_tokens + st.completion_tokens >= lim.max_tokens:
            st.halt(f"budget cap reached: limits.max_tokens = {lim.max_tokens:,} "
                    f"(spent {st.prompt_tokens + st.completion_tokens:,} tokens)")
        if st.stop.is_set():
            raise Stop

    # -- one request ----------------------------------------------------------
    async def send(self, lane: Lane, req: Request, pack_size: int = 1) -> Completion:
        """Send one request on ``lane``: admit (concurrency, RPM/TPM), send under the adaptive timeout, settle.

        Every attempt settles its token reservation: an answer with its real
        usage (or an estimate when the server reports none), a 429, a refused
        connection or a 4xx with 0 tokens (the provider did not process it),
        and a timeout or 5xx keeps the reservation (it may have). An answer
        counts toward the run's tokens and cost here, once.

        Args:
            lane: the model to send to.
            req: the request.
            pack_size: rows the request carries (per-row output estimates).

        The tokens reserved (:meth:`~llmap.control.lanes.Lane.reservation`) are
        estimated once the request has its slot, so a request that waited for
        the lane's first answer reserves what that answer taught.

        Raises:
            ProviderError: the attempt failed (see :mod:`llmap.errors`).
            Stop: a budget cap is reached or the run is stopping; nothing was sent.
        """
        await lane.enter()
        try:
            if self.stats.stop.is_set():  # the run stopped while this row waited: it stays pending
                raise Stop
            if lane.disabled is not None:  # left out while this row waited: it fails over, nothing is sent
                raise E.ModelLeftOut(lane.disabled, model=lane.label, row_key=req.row_key)
            est_tokens, est_output = lane.reservation(_chars(req.messages), pack_size)
            permit = await lane.limiter.acquire(est_tokens, est_output=est_output)
            try:
                self.check_caps()
            except Stop:
                lane.limiter.settle(permit, 0)  # never sent
                raise
            self.stats.requests += 1
            start = self.clock()
            try:
                async with asyncio.timeout(lane.timeout.current()) as cm:  # the watchdog may tighten it
                    lane.deadlines[id(cm)] = (start, cm)
                    try:
                        comp = await lane.provider.complete(req)
                    finally:
                        lane.deadlines.pop(id(cm), None)
            except TimeoutError:  # the server may have processed it: the reservation stands
                exc = E.RequestTimeout(
                    f"no answer from {lane.label} within {self.clock() - start:.1f} s (adaptive timeout)",
                    model=lane.label, row_key=req.row_key)
                self.stats.log(lane.label, exc, self.clock() - start, 0, 0, pack_size)
                raise exc from None
            except E.ProviderError as exc:
                self._count_refusals(lane, exc.refusals, pack_size)
                if isinstance(exc, _UNPROCESSED):
                    lane.limiter.settle(permit, 0)
                self.stats.log(lane.label, exc, self.clock() - start, 0, 0, pack_size)
                if self.misconfig.failure(lane.index, exc):
                    self._misconfigured(lane, exc)
                raise
            except asyncio.CancelledError as exc:  # a hedged copy that lost, or the run stopping
                if exc.args and exc.args[0] == HEDGE_LOST:  # the provider processed it: bill its estimate
                    cost = lane.cost_usd(lane.prompt_tokens.estimate(_chars(req.messages)), int(est_output))
                    self.stats.cost_usd += cost
                    self.stats.hedge_cost_usd += cost
                    self.stats.log(lane.label, "hedged", self.clock() - start, 0, 0, pack_size, cost)
                else:
                    self.stats.log(lane.label, "cancelled", self.clock() - start, 0, 0, pack_size)
                raise
        finally:
            lane.leave()
        self._count_refusals(lane, comp.refusals, pack_size)
        if comp.usage_reported:
            lane.prompt_tokens.observe(_chars(req.messages), comp.prompt_tokens)
            lane.output_tokens.observe(math.ceil(comp.completion_tokens / pack_size))
            lane.counted.observe(min(comp.counted_prompt_tokens, comp.prompt_tokens), comp.prompt_tokens)
        else:  # keep TPM and the budget caps working on estimates
            comp = dataclasses.replace(
                comp, prompt_tokens=lane.prompt_tokens.estimate(_chars(req.messages)),
                completion_tokens=lane.prompt_tokens.estimate(comp.content))
            if lane.label not in self._no_usage:
                self._no_usage.add(lane.label)
                self.stats.warn(f"warning: {lane.label} reports no token usage; TPM limits, budget caps and costs use "
                                "estimates from text length for it")
        self.stats.bill(lane, comp, pack_size)
        # only the input the provider counts (Anthropic: not cache reads) against its input and token limits
        lane.limiter.settle(permit, comp.counted_prompt_tokens + comp.completion_tokens,
                            actual_output=comp.completion_tokens)
        if comp.headers:
            lane.limiter.update_from_headers(comp.headers, sent_at=permit.sent_at)
        lane.timeout.observe(comp.latency_s)
        lane.breaker.record_success()
        lane.on_success()
        if comp.stop_reason == "max_tokens":  # cut on every request: max_tokens is too small (configuration)
            cut = E.AnswerCut(f"answers stop at [model] max_tokens = {lane.model.max_tokens}", model=lane.label,
                              row_key=req.row_key)
            if self.misconfig.failure(lane.index, cut):
                self._misconfigured(lane, cut)
        else:
            self.misconfig.success(lane.index)
        return comp

    def _count_refusals(self, lane: Lane, refusals: Sequence[Refusal], pack_size: int) -> None:
        """Requests the server refused for their shape and the provider sent again: requests of the run."""
        for r in refusals:
            self.stats.requests += 1
            self.stats.log(lane.label, str(r.status), r.latency_s, 0, 0, pack_size)
            if r.note:
                self.stats.warn(f"{lane.label}: {r.note} (HTTP {r.status})")

    async def watchdog(self) -> None:
        """Tighten the deadline of every request in flight to its lane's current adaptive timeout."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_WATCHDOG_S)
            now, at = self.clock(), loop.time()
            for lane in self.lanes:
                limit = lane.timeout.current()
                for start, cm in list(lane.deadlines.values()):
                    when = cm.when()
                    due = at + (start + limit - now)  # the request's deadline now, in loop time
                    if when is not None and due < when:
                        cm.reschedule(max(at, due))

    # -- one row --------------------------------------------------------------
    async def solve(self, key: str, row: dict[str, Any]) -> RowResult:
        """Settle one row: ``done`` (with output), ``failed`` (with error) or ``fallback``.

        Raises:
            Stop: the run is stopping (fatal error, budget cap); the row stays pending.
        """
        return await self.solve_messages(key, self.renderer.messages(row), row=row)

    async def solve_messages(self, key: str, base_messages: list[dict[str, str]], *, start: int = 0,
                             lead: str | None = None, extra: Sequence[dict[str, str]] = (),
                             tries: Tries | None = None, tried: Sequence[tuple] = (),
                             row: dict | None = None) -> RowResult:
        """Settle one row from its rendered messages, trying models from lane ``start`` on.

        Args:
            key: the row's key.
            base_messages: the row's rendered chat messages.
            start: the first lane (model) the row may use.
            lead: the row's cache key on lane ``start``, when the caller has
                already looked it up and found nothing (the worker pool does,
                for a whole page at once): the row leads that request without
                a second lookup.
            extra: messages the first request appends (a re-ask decided elsewhere: a batch's
                invalid or cut answer, see :class:`~llmap.run.settle.Reask`).
            tries: what the row went through on lane ``start`` before (the re-asks already spent).
            tried: answers met before this call (a cascade from a pack or a batch): they lead the row's
                ``tried`` log, and when every model from ``start`` fails, the last escalated one settles it.
            row: the row's input columns, as the ledger keeps them (``[output] checks`` read them).

        Raises:
            Stop: the run is stopping (fatal error, budget cap); the row stays pending.
        """
        st = self.stats
        res = RowResult(key=key, status="failed", tried=list(tried))
        t0 = self.clock()
        last_error = "no model answered"
        attempts: dict[int, int] = {}  # lane index -> attempts there
        state: dict[int, Tries] = {start: tries} if tries is not None else {}  # lane index -> re-asks and cuts
        shared = self.renderer.shared_prefix(base_messages)
        messages: dict[int, list[dict[str, str]]] = {start: [*base_messages, *extra]} if extra else {}
        keys: dict[int, str] = {}  # lane index -> cache key of the row's base request there
        rate_limited = False  # a 429 on this row: never hedge it (a copy only adds load)
        leads: dict[int, str] = {}  # lane index -> the key this row leads there (others wait for it)
        answers = self.answers
        if lead is not None and answers is not None and answers.lead(lead):
            keys[start] = leads[start] = lead
        try:
            while start < len(self.lanes):
                if st.stop.is_set():
                    raise Stop
                lane, wait = pick_lane(self.lanes, start, self.clock())
                if lane is None:  # every remaining model's breaker is open, or its half-open probe is out
                    left = self.limits.retry_budget_s - (self.clock() - t0)
                    if left <= 0 or (wait > left and not math.isinf(wait)):
                        last_error = "every model is unavailable (circuit breakers open)"
                        break
                    # inf: a probe is out; its verdict (closed or open again) decides, so look again soon
                    await self.sleep(min(wait, _VERDICT_POLL_S if math.isinf(wait) else 1.0, left))
                    continue
                i = lane.index
                for j in [j for j in leads if j < i]:  # lanes this row has moved past
                    answers.resolve(leads.pop(j), None)
                tried_here = state.setdefault(i, Tries())
                if answers is not None and i not in leads and i not in messages:
                    ckey = keys.setdefault(i, answers.key(lane.model, base_messages, self.schema.json_schema))
                    lane.breaker.release()  # never hold a half-open probe slot while waiting for an answer
                    hit = await answers.claim(ckey)
                    if hit is None:
                        leads[i] = ckey
                        continue  # this row leads the request: route again (the slot was given back)
                    if not await self.settler.accepts(hit.output, row):  # breaks a check on this row's columns
                        messages[i] = base_messages  # ask the model (its answer is re-asked with the message)
                        continue
                    res.tried.append((hit.model, "cache", hit.output, 0, 0))
                    if await self.settler.escalates(i, hit.output):
                        start = i + 1
                        continue
                    res.status, res.output, res.model, res.source = "done", hit.output, hit.model, "cache"
                    res.error, res.confidence = None, hit.confidence
                    return res
                attempts[i] = attempts.get(i, 0) + 1
                res.attempts += 1
                if attempts[i] > 1:
                    st.retries += 1
                model = lane.model
                msgs = messages.get(i, base_messages)
                req = Request(msgs, self.schema.json_schema, model.temperature, model.max_tokens, row_key=key,
                              shared_prefix=shared, logprobs=self.settler.logprobs)
                # never on a provider that sizes its own concurrency (the embedded model): a copy on the same
                # CPUs only adds load, and its cancel holds a model process until it answers
                hedge = (self.limits.hedge_tail and not rate_limited and self.in_tail()
                         and lane.in_flight * 2 < lane.limit and not lane.own_concurrency)
                try:
                    if hedge:  # a copy only once the request is slower than the p95 latency
                        comp = await hedged(self.send, lane, req, lane.timeout.quantile(0.95), self.stats,
                                            self.limits.hedge_budget)
                    else:
                        comp = await self.send(lane, req)
                except E.ProviderError as exc:
                    exc.row_key, exc.attempt = key, attempts[i]
                    rate_limited = rate_limited or isinstance(exc, E.RateLimited)
                    self.record_failure(lane, exc)
                    decision = self.settler.error(exc, self.retry.decide(exc, attempts[i], self.clock() - t0))
                    if isinstance(decision, StopRun):
                        st.fatal = st.fatal or exc  # type: ignore[assignment]
                        st.halt(decision.reason)
                        raise Stop from exc
                    last_error = decision.error
                    if isinstance(decision, Retry):  # still the leader: rows with the same request keep waiting
                        delay = decision.delay_s
                        if hedge and not isinstance(exc, E.RateLimited):
                            # In the tail with spare capacity there is no load to shed: retry soon.
                            delay = min(delay, self.retry.backoff(1))
                        await self.sleep(delay)
                    else:
                        start = i + 1  # fail over to the next model
                    continue
                except BaseException:
                    lane.breaker.release()
                    raise
                res.latency_s += comp.latency_s
                res.prompt_tokens += comp.prompt_tokens
                res.completion_tokens += comp.completion_tokens
                decision = await self.settler.answer(comp, lane, tried_here, row)
                res.raw = getattr(decision, "raw", None) or res.raw  # the model's last answer (_raw, if it fails)
                if isinstance(decision, Reask):
                    res.tried.append((lane.label, decision.outcome, None, comp.prompt_tokens, comp.completion_tokens))
                    tried_here.after(decision)
                    messages[i] = [*msgs, *decision.extra]
                    continue
                if isinstance(decision, FailOver):
                    res.tried.append((lane.label, decision.outcome or "error", None, comp.prompt_tokens,
                                      comp.completion_tokens))
                    last_error = decision.error
                    start = i + 1  # a cascade: the next model gets the row
                    continue
                output = decision.output
                if i in leads:  # a validated answer to the row's request (re-asked or not) fans out
                    answers.resolve(leads.pop(i), CacheEntry(keys[i], lane.label, output, comp.prompt_tokens,
                                                             comp.completion_tokens, confidence=decision.confidence,
                                                             latency_s=comp.latency_s))
                if isinstance(decision, Escalate):
                    res.tried.append((lane.label, "escalated", output, comp.prompt_tokens, comp.completion_tokens))
                    start = i + 1
                    continue
                res.tried.append((lane.label, "done", output, comp.prompt_tokens, comp.completion_tokens))
                res.status, res.output, res.model, res.error, res.source = "done", output, lane.label, None, "model"
                res.confidence = decision.confidence
                return res
        finally:
            for k in leads.values():  # gave up, stopped or cancelled: one waiter takes over
                answers.resolve(k, None)
        return self.unanswered(res, last_error, [keys[i] for i in sorted(keys)], row=row)

    def unanswered(self, res: RowResult, error: str, keys: Sequence[str], *, row: dict | None = None) -> RowResult:
        """Settle a row no model answered: an answer met on the way, a stale cache entry, the fallback, or failed.

        Args:
            res: the row's result so far (``tried`` holds answers met on the way).
            error: the last error, kept in ``res.error``.
            keys: the row's cache keys on the models it tried (for stale-if-error).
            row: the row's input columns: a stale answer must meet the ``[output] checks`` on them.
        """
        res.error = error
        escalated = [(m, out) for m, outcome, out, _, _ in res.tried or [] if outcome in ("escalated", "cache") and out]
        if escalated:
            # Every later model failed: the last escalated answer is still an answer.
            res.status, res.model, res.output = "done", escalated[-1][0], escalated[-1][1]
            res.source, res.error, res.raw = "model", None, None
            return res
        if self.answers is not None and keys:
            stale = self.answers.stale(list(keys))
            if stale is not None and (self.settler.checks is None  # stale-if-error: an expired answer beats none
                                      or (row is not None and self.settler.accepts_now(stale.output, row))):
                res.status, res.output, res.model, res.source = "done", stale.output, stale.model, "stale"
                res.confidence, res.raw = stale.confidence, None
                return res
        if self.fallback is not None:
            res.status, res.output = "fallback", dict(self.fallback)
        return res

    def _misconfigured(self, lane: Lane, exc: E.ProviderError) -> None:
        """``lane`` refuses every request the same way: leave it out; stop the run when no model is left.

        Raises:
            Stop: no model is left; the run stops with one message (exit 1), the row stays pending.
        """
        if lane.disabled is None:
            lane.disabled = verdict_message(lane.label, exc, structured=getattr(lane.model, "structured", "auto"))
            if any(other.disabled is None for other in self.lanes):
                self.stats.warn(f"{lane.disabled}; leaving {lane.label} out for the rest of the run")
        if all(other.disabled is not None for other in self.lanes):
            if self.stats.stop_reason is None:  # said once, at the end of the run (not also as a warning now)
                self.stats.stop_reason = lane.disabled
            self.stats.stop.set()
            raise Stop from exc

    def record_failure(self, lane: Lane, exc: E.ProviderError) -> None:
        """Feed a failed attempt to the lane's policies.

        A 429 is ours to fix: it cuts the concurrency (AIMD) and a
        ``Retry-After`` pauses the whole lane. A 5xx, a 529 (Anthropic's
        ``overloaded_error``: the service is busy for every customer, not our
        quota), a timeout or a broken body counts toward the circuit breaker
        and is backed off by the retry policy, without shrinking the
        concurrency. A 4xx answer shows the server is up.
        """
        if isinstance(exc, E.RateLimited):
            self.stats.rate_limited += 1
            lane.on_congestion()
            if exc.retry_after:
                lane.limiter.pause_for(exc.retry_after)  # the whole lane waits, not only this row
            lane.breaker.release()
        elif isinstance(exc, _OUTAGE):
            lane.breaker.record_failure()
        else:  # a 4xx answer: the server is up
            lane.breaker.record_success()
