"""BudgetService (the Ray actor's body) and BudgetLink (a worker's side), in one process with a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from llmap.control.cluster import LaneLimits
from llmap.run.ray.budget import BudgetLink, BudgetService


async def _turns(n: int = 30) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def links(fake_time, n: int, **limits):
    service = BudgetService([LaneLimits(limits.get("rpm"), limits.get("tpm"), 64, 16)], workers=n,
                            clock=fake_time.clock, sleep=fake_time.sleep)
    made = [BudgetLink(f"w{i}", 0, sync=service.sync, watch=service.watch, clock=fake_time.clock,
                       sleep=fake_time.sleep) for i in range(n)]
    return service, made


async def test_two_workers_share_one_rpm_budget(fake_time):
    service, (a, b) = links(fake_time, 2, rpm=60)  # 1 request per second, for both together
    for link in (a, b):
        await link.start()
    sent = []
    for _ in range(5):
        for link in (a, b):
            sent.append((await link.acquire(10)).sent_at)
    for link in (a, b):
        await link.aclose()
    assert sent == sorted(sent)
    assert sent[-1] == pytest.approx(9.0, abs=0.05)  # 10 requests at 1/s (two own limiters: 4.5 s)


async def test_retry_after_on_one_worker_pauses_the_other(fake_time):
    service, (a, b) = links(fake_time, 2, rpm=6000)
    for link in (a, b):
        await link.start()
    await b.acquire(10)  # b holds a grant now
    a.pause_for(30.0)
    await _turns()  # a's pump reports the pause; b's watch hears of it
    permit = await b.acquire(10)
    for link in (a, b):
        await link.aclose()
    assert permit.sent_at >= 30.0


async def test_settlement_and_unused_grants_reach_the_budget(fake_time):
    service, (a,) = links(fake_time, 1, tpm=6000)  # 100 tokens/s; the first grant finds 100
    await a.start()
    fake_time.advance(1.0)
    permit = await a.acquire(100)
    a.settle(permit, 40)
    await a.aclose()  # sends the settlement (60 tokens refunded) and hands back the grant's rest
    level = service.budget.rate(0).tokens.available(fake_time.now)
    assert level == pytest.approx(100 - 40)


async def test_a_worker_that_is_granted_nothing_waits_in_the_actor_not_in_a_loop(fake_time):
    service, (a,) = links(fake_time, 1, rpm=60)
    await a.start()
    await a.acquire()
    calls = []
    real_sync = a._sync

    async def counting(report):
        calls.append(report.want)
        return await real_sync(report)

    a._sync = counting
    permit = await a.acquire()
    await a.aclose()
    assert permit.sent_at == pytest.approx(1.0)
    assert calls[0] >= 1 and len([c for c in calls if c]) == 1  # one round trip, answered when admitted


async def test_a_grant_that_had_to_wait_carries_the_output_estimate(fake_time):
    # The dispatcher reserves est_output (the OTPM part) with every request; a grant made after a
    # wait in the actor must carry it too, or the link can never use the grant (a hang at any rpm).
    service, (a,) = links(fake_time, 1, rpm=60)
    await a.start()
    real_sync, calls = a._sync, []

    async def bounded(report):
        calls.append(report.want)
        assert len(calls) < 50, "the link keeps asking for grants it cannot use"
        return await real_sync(report)

    a._sync = bounded
    first = await a.acquire(50, est_output=20)
    second = await a.acquire(50, est_output=20)  # waits in the actor for 1 s
    await a.aclose()
    assert first.output == 20 and second.output == 20
    assert second.sent_at == pytest.approx(1.0)
