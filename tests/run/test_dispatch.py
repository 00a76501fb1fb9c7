"""The dispatcher's per-row logic with scripted providers: hedging, Retry-After pauses, breaker routing."""

from __future__ import annotations

import asyncio

import pytest

from _support import loop_turns
from llmap import errors as E
from llmap.control.lanes import Lane, pick_lane
from llmap.prompt.render import Renderer
from llmap.prompt.schema import OutputSchema
from llmap.providers.base import Completion
from llmap.run.dispatch import Dispatcher
from llmap.run.stats import DispatchStats
from llmap.spec import FieldSpec, LimitsSpec, ModelSpec, PromptSpec

ANSWER = '{"x": "ok"}'
#: ``[limits]`` settings for tests whose rows retry: every backoff at most 10 ms.
FAST_BACKOFF = {"backoff_base_s": 0.01, "backoff_cap_s": 0.01}


class Provider:
    max_concurrency = 8

    def __init__(self, label, behave):
        self.label = label
        self.behave = behave
        self.calls = 0

    async def complete(self, request):
        self.calls += 1
        return await self.behave(self.calls)


def _prompt() -> tuple[Renderer, OutputSchema]:
    """The prompt every test here sends: ``{{ t }}``, answered by ``{"x": <string>}``."""
    return Renderer.from_spec(PromptSpec(user="{{ t }}")), OutputSchema({"x": FieldSpec(type="string")})


def _dispatcher(providers, **limits):
    spec = LimitsSpec(**limits)
    lanes = [Lane(i, p, ModelSpec(provider="openai", name=p.label), spec) for i, p in enumerate(providers)]
    return Dispatcher(lanes, *_prompt(), spec, max_reask=0, fallback=None, stats=DispatchStats())


async def test_tail_hedge_beats_a_hung_first_copy():
    async def behave(n):
        if n == 1:
            await asyncio.sleep(30)  # a hang
        return Completion(ANSWER, 5, 3, 0.01)

    p = Provider("p", behave)
    d = _dispatcher([p], hedge_budget=1.0)  # one row: the default 2% budget would allow no copy
    lane = d.lanes[0]
    for _ in range(30):
        lane.timeout.observe(0.01)  # p95 latency: 10 ms
    lane.probing = False  # answers have come back before (the tail of a run)
    d.watch_tail(lambda: True)
    res = await asyncio.wait_for(d.solve("k", {"t": "x"}), timeout=5)
    assert res.status == "done" and p.calls == 2 and d.stats.hedged == 1


async def test_no_hedge_on_a_provider_that_sizes_its_own_concurrency():
    async def behave(n):
        if n == 1:
            await asyncio.sleep(0.2)  # 20 times the p95, then it answers (as the embedded model would)
        return Completion(ANSWER, 5, 3, 0.01)

    p = Provider("local", behave)
    p.own_concurrency = True
    d = _dispatcher([p], hedge_budget=1.0)
    lane = d.lanes[0]
    for _ in range(30):
        lane.timeout.observe(0.01)
    d.watch_tail(lambda: True)
    assert lane.limit == 8 and not lane.probing  # filled at once: room for a copy, were it allowed
    res = await asyncio.wait_for(d.solve("k", {"t": "x"}), timeout=5)
    assert res.status == "done" and p.calls == 1 and d.stats.hedged == 0


def _tail_lane(d: Dispatcher, p95_s: float = 0.01) -> Lane:
    lane = d.lanes[0]
    for _ in range(30):
        lane.timeout.observe(p95_s)
    lane.probing = False
    d.watch_tail(lambda: True)
    return lane


async def test_the_copy_that_loses_is_billed_its_estimated_cost():
    async def behave(n):
        if n == 1:
            await asyncio.sleep(30)  # a hang: the copy wins, the first is cancelled
        return Completion(ANSWER, 5, 3, 0.01)

    p = Provider("p", behave)
    spec = LimitsSpec(hedge_budget=1.0)
    lane = Lane(0, p, ModelSpec(provider="openai", name="p", price_in=1.0, price_out=2.0), spec)
    d = Dispatcher([lane], *_prompt(), spec, max_reask=0, fallback=None, stats=DispatchStats())
    _tail_lane(d)
    res = await asyncio.wait_for(d.solve("k", {"t": "x"}), timeout=5)
    assert res.status == "done" and d.stats.hedged == 1
    outcomes = [e[2] for e in d.stats.request_log]
    assert outcomes.count("hedged") == 1 and outcomes.count("200") == 1
    billed = d.stats.cost_usd - lane.cost_usd(5, 3)
    assert d.stats.hedge_cost_usd > 0 and billed == pytest.approx(d.stats.hedge_cost_usd)


async def test_hedged_copies_stay_within_the_budget():
    async def behave(n):
        await asyncio.sleep(0.05)  # every request slower than the p95 of 10 ms
        return Completion(ANSWER, 5, 3, 0.05)

    p = Provider("p", behave)
    p.max_concurrency = 64
    d = _dispatcher([p], concurrency=64, hedge_budget=0.1)  # spare capacity: every row could get a copy
    _tail_lane(d)
    results = await asyncio.gather(*(d.solve(f"k{i}", {"t": f"x{i}"}) for i in range(20)))
    assert all(r.status == "done" for r in results)
    assert 1 <= d.stats.hedged <= 0.1 * d.stats.requests


async def test_no_copy_before_the_p95_latency_even_for_a_retry():
    async def behave(n):
        if n == 1:
            raise E.Overloaded("HTTP 503", status=503)
        await asyncio.sleep(0.02)  # the retry answers before the p95 latency (0.5 s)
        return Completion(ANSWER, 5, 3, 0.02)

    p = Provider("p", behave)
    d = _dispatcher([p], hedge_budget=1.0, backoff_base_s=0)
    _tail_lane(d, p95_s=0.5)
    res = await asyncio.wait_for(d.solve("k", {"t": "x"}), timeout=5)
    assert res.status == "done" and p.calls == 2 and d.stats.hedged == 0


async def test_no_copy_for_a_row_that_got_a_429():
    async def behave(n):
        if n == 1:
            raise E.RateLimited("HTTP 429", status=429)
        await asyncio.sleep(0.1)  # slower than the p95 of 10 ms: a copy would be due, but the row saw a 429
        return Completion(ANSWER, 5, 3, 0.1)

    p = Provider("p", behave)
    d = _dispatcher([p], hedge_budget=1.0, backoff_base_s=0)
    _tail_lane(d)
    res = await asyncio.wait_for(d.solve("k", {"t": "x"}), timeout=5)
    assert res.status == "done" and p.calls == 2 and d.stats.hedged == 0


async def test_the_default_budget_sends_no_copy_for_a_single_request():
    async def behave(n):
        if n == 1:
            await asyncio.sleep(0.2)
        return Completion(ANSWER, 5, 3, 0.01)

    p = Provider("p", behave)
    d = _dispatcher([p])
    _tail_lane(d)
    res = await asyncio.wait_for(d.solve("k", {"t": "x"}), timeout=5)
    assert res.status == "done" and p.calls == 1 and d.stats.hedged == 0  # 2% of 1 request is no copy


async def test_no_hedge_outside_the_tail():
    async def behave(n):
        await asyncio.sleep(0.05)
        return Completion(ANSWER, 5, 3, 0.05)

    p = Provider("p", behave)
    d = _dispatcher([p])
    for _ in range(30):
        d.lanes[0].timeout.observe(0.001)
    res = await d.solve("k", {"t": "x"})
    assert res.status == "done" and p.calls == 1 and d.stats.hedged == 0


async def test_retry_after_pauses_the_lane_for_every_row():

    async def behave(n):
        if n == 1:
            raise E.RateLimited("429", retry_after=0.3)
        return Completion(ANSWER, 5, 3, 0.0)

    p = Provider("p", behave)
    d = _dispatcher([p], backoff_base_s=0)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    first = await d.solve("a", {"t": "x"})
    second = await d.solve("b", {"t": "y"})  # a different row waits out the same pause
    assert first.status == second.status == "done"
    assert loop.time() - t0 >= 0.3 and d.stats.rate_limited == 1
    assert d.lanes[0].limiter.rate.paused_until > 0


def test_pick_lane_skips_an_open_breaker_and_reports_the_wait():
    class P:
        label, max_concurrency = "p", 4

    spec = LimitsSpec()
    now = 1000.0
    lanes = [Lane(i, P(), ModelSpec(provider="openai", name=f"m{i}"), spec, clock=lambda: now) for i in range(2)]
    for _ in range(10):
        lanes[0].breaker.record_failure(now)
    lane, wait = pick_lane(lanes, 0, now)
    assert lane is lanes[1] and wait == 0.0
    for _ in range(10):
        lanes[1].breaker.record_failure(now)
    lane, wait = pick_lane(lanes, 0, now)
    assert lane is None and wait == pytest.approx(2.0)
    lane, _ = pick_lane(lanes, 0, now + 2.0)  # cooldown over: the primary gets the probe
    assert lane is lanes[0]


# -- review defects (issue 9): each test failed on the code before the fix --------------------------

def _answers(d, cache=None):
    from llmap.store.answers import AnswerCache

    d.answers = AnswerCache(cache)
    return d.answers


async def test_rows_wait_for_a_half_open_probe_instead_of_failing():
    """One model, 10 x 503, then healthy: every row waits for the probe's verdict; none fails."""

    async def behave(n):
        if n <= 10:
            raise E.Overloaded("HTTP 503: overloaded", status=503)
        await asyncio.sleep(0.05)  # the probe takes a while: others must wait for its verdict
        return Completion(ANSWER, 5, 3, 0.05)

    p = Provider("p", behave)
    d = _dispatcher([p], retry_budget_s=30, **FAST_BACKOFF)
    d.lanes[0].breaker.base_cooldown_s = d.lanes[0].breaker.cooldown_s = 0.2
    results = await asyncio.wait_for(asyncio.gather(*(d.solve(f"k{i}", {"t": f"x{i}"}) for i in range(30))), 20)
    assert [r.status for r in results] == ["done"] * 30, {r.error for r in results}
    assert p.calls == 40


async def test_the_request_timeout_is_a_delay_not_an_absolute_time():
    """A hung request is cut at [model] timeout_s even when no watchdog runs."""
    async def behave(n):
        await asyncio.sleep(60)

    p = Provider("p", behave)
    spec = LimitsSpec(max_attempts=1)
    lane = Lane(0, p, ModelSpec(provider="openai", name="p", timeout_s=0.2), spec)
    d = Dispatcher([lane], *_prompt(), spec, max_reask=0, fallback=None, stats=DispatchStats())
    res = await asyncio.wait_for(d.solve("k", {"t": "x"}), timeout=5)
    assert res.status == "failed" and "RequestTimeout" in res.error


async def test_a_failed_dedup_leader_hands_over_to_exactly_one_waiter():
    """50 identical rows whose first call gets a 503: 2 requests, not 51."""

    async def behave(n):
        await asyncio.sleep(0.01)
        if n == 1:
            raise E.Overloaded("HTTP 503", status=503)
        return Completion(ANSWER, 5, 3, 0.01)

    p = Provider("p", behave)
    d = _dispatcher([p], **FAST_BACKOFF)
    _answers(d)
    results = await asyncio.gather(*(d.solve(f"k{i}", {"t": "same"}) for i in range(50)))
    assert all(r.status == "done" for r in results)
    assert p.calls == 2
    assert sum(r.source == "cache" for r in results) == 49


async def test_after_a_leader_gives_up_one_waiter_takes_over_and_the_rest_keep_waiting():
    calls = []

    async def behave(n):
        calls.append(n)
        await asyncio.sleep(0.01)
        if n == 1:
            raise E.BadRequest("HTTP 400: flaky", status=400)  # terminal: the leader's row fails
        return Completion(ANSWER, 5, 3, 0.01)

    p = Provider("p", behave)
    d = _dispatcher([p], backoff_base_s=0)
    _answers(d)
    results = await asyncio.gather(*(d.solve(f"k{i}", {"t": "same"}) for i in range(10)))
    assert sorted(r.status for r in results) == ["done"] * 9 + ["failed"]
    assert p.calls == 2


async def test_missing_usage_keeps_the_token_estimate(monkeypatch):
    """A server that omits usage: TPM and the caps see estimated tokens, and the user is told once."""
    async def behave(n):
        return Completion('{"x": "' + "y" * 400 + '"}', 0, 0, 0.0, usage_reported=False)

    p = Provider("p", behave)
    d = _dispatcher([p], tpm=1_000_000, max_tokens=300)
    warnings = []
    d.stats.on_warn = warnings.append
    from llmap.run.stats import Stop

    results = [await d.solve(f"k{i}", {"t": "z" * 400}) for i in range(2)]
    assert d.stats.prompt_tokens > 0 and d.stats.completion_tokens >= 100
    assert len(warnings) == 1 and "reports no token usage" in warnings[0]
    with pytest.raises(Stop):  # the token cap fires on estimates: the third row is never sent
        await d.solve("k2", {"t": "z" * 400})
    assert [r.status for r in results] == ["done", "done"] and p.calls == 2
    bucket = d.lanes[0].limiter.rate.tokens
    assert bucket.capacity - bucket.available(d.lanes[0].limiter.clock()) > 0  # the reservation was kept


async def test_a_pack_feeds_the_per_row_output_estimate():
    async def behave(n):
        return Completion(ANSWER, 50, 300, 0.0)

    p = Provider("p", behave)
    d = _dispatcher([p])
    from llmap.providers.base import Request

    await d.send(d.lanes[0], Request([{"role": "user", "content": "x"}], None, 0, 100), pack_size=10)
    assert d.lanes[0].output_tokens.estimate() == 30


async def test_every_failed_attempt_settles_its_reservation():
    """A 429 and a refused connection cost the request, not the tokens reserved for it."""
    async def behave(n):
        if n % 2:
            raise E.RateLimited("HTTP 429", status=429)
        raise E.ConnectionFailed("refused")

    p = Provider("p", behave)
    d = _dispatcher([p], tpm=60_000, max_attempts=1)
    lane = d.lanes[0]
    from llmap.providers.base import Request

    req = Request([{"role": "user", "content": "x"}], None, 0, 100)
    for _ in range(2):
        with pytest.raises(E.ProviderError):
            await d.send(lane, req)
    bucket = lane.limiter.rate.tokens
    assert bucket.available(lane.limiter.clock()) >= 999  # one second's worth, nothing owed


async def test_unknown_limits_send_one_request_first():
    in_flight = peak = 0
    probe_sent, answer_probe = asyncio.Event(), asyncio.Event()

    async def behave(n):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        if n == 1:
            probe_sent.set()
            await answer_probe.wait()
        await asyncio.sleep(0.02)  # the answers' latency
        in_flight -= 1
        return Completion(ANSWER, 5, 3, 0.02)

    p = Provider("p", behave)
    d = _dispatcher([p], concurrency=8)
    lane = d.lanes[0]
    first = [asyncio.create_task(d.solve(f"k{i}", {"t": f"x{i}"})) for i in range(8)]
    await asyncio.wait_for(probe_sent.wait(), 5)
    await loop_turns()  # every other row has had its chance to send
    assert lane.in_flight == 1 and p.calls == 1  # the probe alone
    answer_probe.set()
    await asyncio.gather(*first)
    assert not lane.probing and peak < 8  # no headers: slow start, not the full wave


def test_a_529_counts_toward_the_breaker_but_does_not_shrink_concurrency():
    d = _dispatcher([Provider("p", None)])
    lane = d.lanes[0]
    before = lane.aimd.limit
    for _ in range(10):  # ten 529s in a row: the breaker's streak opens it
        d.record_failure(lane, E.Overloaded("HTTP 529: Overloaded", model="p", status=529))
    assert lane.aimd.limit == before  # overloaded for every customer: not our quota
    assert lane.breaker.state.value != "closed"
    d.record_failure(lane, E.RateLimited("HTTP 429", model="p", status=429, retry_after=2.0))
    assert lane.aimd.limit < before and d.stats.rate_limited == 1  # a 429 is ours: cut, and pause the lane
    assert lane.limiter.rate.paused_until > lane.limiter.clock()


# -- stop reasons (Anthropic's stop_reason: max_tokens, refusal) ------------------------------------

def _scripted(*answers):
    """A provider answering each call from ``answers`` (a Completion, or a stop reason for an empty one)."""
    async def behave(n):
        a = answers[min(n, len(answers)) - 1]
        return a if isinstance(a, Completion) else Completion("", 5, 256, 0.01, stop_reason=a)
    return behave


async def test_an_answer_cut_at_max_tokens_is_re_asked_once_with_a_note():
    p = Provider("p", _scripted("max_tokens", Completion(ANSWER, 5, 3, 0.01)))
    seen = []
    inner = p.complete

    async def complete(request):
        seen.append(request.messages)
        return await inner(request)

    p.complete = complete
    d = _dispatcher([p])
    res = await d.solve("k", {"t": "x"})
    assert res.status == "done" and p.calls == 2
    assert "cut off at the limit of 256 tokens" in seen[1][-1]["content"] and seen[1][:-1] == seen[0]
    assert [t[1] for t in res.tried] == ["max_tokens", "done"]


async def test_a_second_cut_fails_the_row_saying_raise_max_tokens_and_fails_over():
    cut = Provider("cut", _scripted("max_tokens"))
    ok = Provider("ok", _scripted(Completion(ANSWER, 5, 3, 0.01)))
    d = _dispatcher([cut, ok])
    res = await d.solve("k", {"t": "x"})
    assert cut.calls == 2 and res.status == "done" and res.model == "ok"
    alone = _dispatcher([Provider("cut", _scripted("max_tokens"))])
    res = await alone.solve("k", {"t": "x"})
    assert res.status == "failed" and "AnswerCut" in res.error and "raise [model] max_tokens" in res.error


async def test_cuts_on_a_models_first_requests_are_a_configuration_error():
    from llmap.run.stats import Stop

    d = _dispatcher([Provider("cut", _scripted("max_tokens"))])
    with pytest.raises(Stop):
        for key in ("a", "b"):
            await d.solve(key, {"t": key})
    assert "raise [model] max_tokens" in d.stats.stop_reason and "answers stop at" in d.stats.stop_reason


async def test_a_refusal_fails_the_row_and_says_so_and_the_next_model_may_answer():
    d = _dispatcher([Provider("p", _scripted("refusal"))])
    res = await d.solve("k", {"t": "x"})
    assert res.status == "failed" and res.error == "Refusal: p declined to answer (stop_reason refusal)"
    assert d.lanes[0].provider.calls == 1  # not retried, not re-asked
    d = _dispatcher([Provider("p", _scripted("refusal")), Provider("q", _scripted(Completion(ANSWER, 5, 3, 0.01)))])
    res = await d.solve("k", {"t": "x"})
    assert res.status == "done" and res.model == "q"


async def test_a_request_that_waited_for_the_first_answer_reserves_what_it_taught():
    """The reservation is made once the request has its slot: rows queued behind the lane's first request
    (a discovering provider sends one first) reserve the output the first answer showed, not max_tokens."""
    gate = asyncio.Event()

    async def behave(n):
        if n == 1:
            await gate.wait()
        return Completion(ANSWER, 5, 7, 0.01)

    p = Provider("p", behave)
    p.discovering = True
    d = _dispatcher([p], otpm=60_000)
    lane = d.lanes[0]
    reserved = []
    acquire = lane.limiter.acquire

    async def spy(est_tokens, *, est_output=0.0):
        reserved.append(est_output)
        return await acquire(est_tokens, est_output=est_output)

    lane.limiter.acquire = spy
    rows = [asyncio.create_task(d.solve(k, {"t": k})) for k in ("a", "b", "c")]
    await loop_turns()  # b and c queue behind a, which waits for the gate
    assert p.calls == 1 and reserved == [256]
    gate.set()
    assert all(r.status == "done" for r in await asyncio.gather(*rows))
    assert reserved == [256, 7, 7]  # max_tokens' default before any answer, then what the answer used


async def test_backoff_comes_from_the_limits_spec():
    """``[limits] backoff_base_s`` / ``backoff_cap_s`` set the retry waits (full jitter under each ceiling)."""
    async def behave(n):
        if n <= 4:
            raise E.Overloaded("HTTP 503", status=503)
        return Completion(ANSWER, 5, 3, 0.0)

    waits: list[float] = []

    async def sleep(seconds):
        waits.append(seconds)

    spec = LimitsSpec(backoff_base_s=0.25, backoff_cap_s=0.5)
    lane = Lane(0, Provider("p", behave), ModelSpec(provider="openai", name="p"), spec)
    d = Dispatcher([lane], *_prompt(), spec, max_reask=0, fallback=None, stats=DispatchStats(), sleep=sleep)
    assert (d.retry.base_s, d.retry.cap_s) == (0.25, 0.5)
    d.retry.rng.uniform = lambda low, high: high  # the ceiling itself: 0.25, then 0.5 (capped)
    res = await d.solve("k", {"t": "x"})
    assert res.status == "done" and waits == [0.25, 0.5, 0.5, 0.5]
    assert _dispatcher([Provider("q", behave)]).retry.base_s == 0.5  # the default
