"""The dispatcher's per-row logic with scripted providers: hedging, Retry-After pauses, breaker routing."""

from __future__ import annotations

import asyncio

import pytest

from llmap import errors as E
from llmap.control.route import Lane, pick_lane
from llmap.dispatch import Dispatcher, DispatchStats
from llmap.prompt.render import Renderer
from llmap.prompt.schema import OutputSchema
from llmap.providers.base import Completion
from llmap.spec import FieldSpec, LimitsSpec, ModelSpec, PromptSpec

ANSWER = '{"x": "ok"}'


class Provider:
    max_concurrency = 8

    def __init__(self, label, behave):
        self.label = label
        self.behave = behave
        self.calls = 0

    async def complete(self, request):
        self.calls += 1
        return await self.behave(self.calls)


def _dispatcher(providers, **limits):
    spec = LimitsSpec(**limits)
    lanes = [Lane(i, p, ModelSpec(provider="openai", name=p.label), spec) for i, p in enumerate(providers)]
    return Dispatcher(lanes, Renderer.from_spec(PromptSpec(user="{{ t }}")), OutputSchema({"x": FieldSpec(type="string")}),
                      spec, max_reask=0, fallback=None, stats=DispatchStats())


async def test_tail_hedge_beats_a_hung_first_copy():
    async def behave(n):
        if n == 1:
            await asyncio.sleep(30)  # a hang
        return Completion(ANSWER, 5, 3, 0.01)

    p = Provider("p", behave)
    d = _dispatcher([p])
    lane = d.lanes[0]
    for _ in range(30):
        lane.timeout.observe(0.01)  # p95 latency: 10 ms
    d.draining = lambda: True
    res = await asyncio.wait_for(d.solve("k", {"t": "x"}), timeout=5)
    assert res.status == "done" and p.calls == 2 and d.stats.hedged == 1


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


async def test_retry_after_pauses_the_lane_for_every_row(monkeypatch):
    monkeypatch.setattr("llmap.control.retry.RetryPolicy.backoff", lambda self, attempt: 0.0)

    async def behave(n):
        if n == 1:
            raise E.RateLimited("429", retry_after=0.3)
        return Completion(ANSWER, 5, 3, 0.0)

    p = Provider("p", behave)
    d = _dispatcher([p])
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
