"""The seams behind ``Lane.plug``: every limiter, AIMD gate and breaker a lane may hold has the surface the
dispatcher uses (the Protocols in ``control/lanes.py``), local and cluster-wide alike."""

from __future__ import annotations

import asyncio
import inspect
from typing import Protocol

import pytest

from llmap.control.breaker import BreakerState, CircuitBreaker
from llmap.control.cluster import Report, View
from llmap.control.concurrency import AIMDConcurrency
from llmap.control.lanes import INITIAL_CONCURRENCY, Lane, LaneAIMD, LaneBreaker, LaneLimiter
from llmap.control.limits import Limiter, RateLimiter
from llmap.run.ray.budget import BudgetLink
from llmap.spec import LimitsSpec, ModelSpec


def _members(protocol: type) -> dict[str, object]:
    own = {}
    for klass in reversed(protocol.__mro__):
        if klass in (Protocol, object) or not issubclass(klass, Protocol):
            continue
        own.update({k: v for k, v in vars(klass).items() if not k.startswith("_")})
    return own


def mismatches(obj: object, protocol: type) -> list[str]:
    """How ``obj`` differs from ``protocol``: a member missing, a method where the protocol reads a value (a
    property, which a plain attribute also satisfies) or the other way, or a method whose parameters (names,
    kinds, defaults) differ."""
    out = []
    for name, want in _members(protocol).items():
        have = inspect.getattr_static(type(obj), name, None)
        if isinstance(want, property):
            if not hasattr(obj, name):
                out.append(f"{name}: missing")
            elif inspect.isfunction(have):
                out.append(f"{name}: a method, the protocol reads a value")
        elif not inspect.isfunction(have):
            out.append(f"{name}: {'missing' if have is None else 'not a method'}")
        else:
            params = [(p.name, p.kind, p.default) for p in inspect.signature(want).parameters.values()]
            got = [(p.name, p.kind, p.default) for p in inspect.signature(have).parameters.values()]
            if params != got:
                out.append(f"{name}: parameters {[p[0] for p in got]} differ from {[p[0] for p in params]}")
    return out


async def _never(*args: object) -> View:
    await asyncio.Event().wait()
    raise AssertionError


def _link() -> BudgetLink:
    return BudgetLink("w0", 0, sync=_never, watch=_never)


@pytest.mark.parametrize(("make", "protocol"), [
    (lambda: Limiter(RateLimiter(60, None, now=0.0)), LaneLimiter), (_link, LaneLimiter),
    (AIMDConcurrency, LaneAIMD), (lambda: _link().aimd, LaneAIMD),
    (CircuitBreaker, LaneBreaker), (lambda: _link().breaker, LaneBreaker),
])
def test_what_a_lane_may_hold_has_the_protocols_surface(make, protocol):
    obj = make()
    assert _members(protocol)
    assert mismatches(obj, protocol) == []
    assert isinstance(obj, protocol)


def test_the_surface_check_sees_a_difference():
    class Gate:
        limit = 1  # a plain attribute satisfies a read-only property

        def maximum(self) -> int:
            return 1

        def on_success(self, weight: int = 1) -> bool:
            return True

    assert mismatches(Gate(), LaneAIMD) == [
        "maximum: a method, the protocol reads a value",
        "on_success: parameters ['self', 'weight'] differ from ['self']", "on_congestion: missing"]


async def test_a_budget_links_views_are_the_lanes_seams_and_report_through_it():
    sent: list[Report] = []
    got = asyncio.Event()

    async def sync(report: Report) -> View:
        sent.append(report)
        got.set()
        return View(version=len(sent), breaker=BreakerState.CLOSED.value)

    async def watch(lane: int, worker: str, version: int) -> View:
        await asyncio.Event().wait()  # never changes
        raise AssertionError

    link = BudgetLink("w0", 0, sync=sync, watch=watch, cap=8)
    limiter = Limiter(RateLimiter(60, None, now=0.0))
    assert isinstance(link, LaneLimiter) and isinstance(limiter, LaneLimiter)
    assert isinstance(link.aimd, LaneAIMD) and isinstance(link.breaker, LaneBreaker)
    await link.start()
    try:
        got.clear()
        link.breaker.record_success()  # counted, sent with the next report
        link.aimd.on_success()
        link.aimd.on_congestion(3)  # sent at once
        await asyncio.wait_for(got.wait(), 5)
        last = sent[-1]
        assert (last.breaker_successes, last.successes, last.congestions) == (1, 1, 1)
        got.clear()
        link.breaker.record_failure()  # sent at once
        await asyncio.wait_for(got.wait(), 5)
        assert (sent[-1].breaker_failures, sent[-1].breaker_successes) == (1, 0)
    finally:
        await link.aclose()


class _Provider:
    label, max_concurrency = "openai:m", 8


async def test_a_lane_paces_and_breaks_on_the_injected_clock_and_sleep(fake_time):
    lane = Lane(0, _Provider(), ModelSpec(provider="openai", name="m"), LimitsSpec(rpm=60),
                clock=fake_time.clock, sleep=fake_time.sleep)
    permits = [await lane.limiter.acquire(10) for _ in range(3)]  # one request a second, on the fake clock
    assert [p.sent_at for p in permits] == pytest.approx([0.0, 1.0, 2.0])
    assert sum(fake_time.sleeps) == pytest.approx(2.0)
    for _ in range(10):
        lane.breaker.record_failure()  # the breaker reads the same clock
    assert lane.breaker.peek() is BreakerState.OPEN
    fake_time.advance(lane.breaker.time_until_probe())
    assert lane.breaker.allow()


class _SizedProvider:
    def __init__(self, max_concurrency: int, *, own: bool = False) -> None:
        self.label = "p:x"
        self.max_concurrency = max_concurrency
        if own:
            self.own_concurrency = True


def _sized_lane(provider, **limits) -> Lane:
    return Lane(0, provider, ModelSpec(provider="openai", name="x"), LimitsSpec(**limits), clock=lambda: 0.0)


def test_an_http_lane_is_capped_by_limits_concurrency_and_probes_first():
    lane = _sized_lane(_SizedProvider(256), concurrency=4)
    assert (lane.max_in_flight, lane.aimd.limit, lane.probing, lane.limit) == (4, 4, True, 1)
    lane = _sized_lane(_SizedProvider(256))
    assert lane.aimd.limit == INITIAL_CONCURRENCY and lane.probing


def test_a_provider_that_sizes_its_own_concurrency_is_filled_at_once():
    # the embedded model: [limits] concurrency = 2 means 2 processes, each decoding 16 rows together
    lane = _sized_lane(_SizedProvider(32, own=True), concurrency=2)
    assert (lane.max_in_flight, lane.aimd.limit, lane.probing, lane.limit) == (32, 32, False, 32)
    lane = _sized_lane(_SizedProvider(32, own=True))
    assert lane.limit == 32


def test_a_cluster_budget_plugged_into_an_own_concurrency_lane_keeps_its_own_gate():
    # on Ray each worker runs its own model processes: the cluster's AIMD share (1 of [limits] concurrency = 2
    # across 2 workers) would cut 32 rows decoded together down to one
    lane = _sized_lane(_SizedProvider(32, own=True), concurrency=2)
    link = _link()
    lane.plug(link, link.aimd, link.breaker)
    assert lane.limiter is link and lane.breaker is link.breaker
    assert lane.aimd is not link.aimd and lane.limit == 32 and not lane.probing
    http = _sized_lane(_SizedProvider(256), concurrency=2)
    http.plug(link, link.aimd, link.breaker)
    assert http.aimd is link.aimd  # an HTTP lane shares the cluster's gate


class _Discovering:
    """A provider still learning the server's request shape; ``grace``: how soon a refusal would show."""

    def __init__(self, grace: float | None) -> None:
        self.label, self.max_concurrency, self.discovering = "openai:m", 8, True
        if grace is not None:
            self.discovery_grace_s = grace


def _grace_lane(grace: float | None, **limits) -> tuple[Lane, list[float], asyncio.Event]:
    slept: list[float] = []
    over = asyncio.Event()

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await over.wait()

    lane = Lane(0, _Discovering(grace), ModelSpec(provider="openai", name="m"),
                LimitsSpec(concurrency=8, **limits), clock=lambda: 0.0, sleep=sleep)
    return lane, slept, over


async def _turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_with_known_limits_the_probe_holds_the_others_only_for_the_providers_grace():
    # a refused request shape comes back on arrival: waiting for a whole answer would leave the bucket idle
    lane, slept, over = _grace_lane(0.25, rpm=3000)
    await lane.enter()  # the probe
    others = [asyncio.ensure_future(lane.enter()) for _ in range(3)]
    await _turns()
    assert slept == [0.25] and not any(o.done() for o in others) and lane.probing
    over.set()  # the grace is over, no refusal came
    await asyncio.wait_for(asyncio.gather(*others), 1)
    assert not lane.probing and lane.in_flight == 4


async def test_with_unknown_limits_or_no_grace_the_others_wait_for_the_answer():
    for grace, limits in ((0.25, {}), (None, {"rpm": 3000})):  # headers to learn; a provider that must see the answer
        lane, slept, over = _grace_lane(grace, **limits)
        await lane.enter()
        other = asyncio.ensure_future(lane.enter())
        over.set()
        await _turns()
        assert slept == [] and not other.done()
        lane.on_success()
        await asyncio.wait_for(other, 1)
        assert not lane.probing


async def test_a_probe_that_fails_within_its_grace_passes_the_probe_on_with_a_grace_of_its_own():
    lane, slept, over = _grace_lane(0.25, rpm=3000)
    await lane.enter()
    other = asyncio.ensure_future(lane.enter())
    await _turns()
    lane.leave()  # refused in every shape: no answer
    await asyncio.wait_for(other, 1)  # the next request probes, alone
    assert lane.probing and lane.in_flight == 1
    await _turns()
    assert slept == [0.25, 0.25]  # a new grace, not what was left of the first one
    third = asyncio.ensure_future(lane.enter())
    await _turns()
    assert not third.done()
    over.set()
    await asyncio.wait_for(third, 1)
    assert not lane.probing
