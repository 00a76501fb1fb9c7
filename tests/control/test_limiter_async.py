"""Limiter: the async wrapper, driven by a fake clock and a sleep that advances it."""

from __future__ import annotations

import asyncio

import pytest

from llmap.control.limits import Limiter, RateLimiter


async def test_first_acquire_does_not_sleep(fake_time):
    limiter = Limiter(rpm=60, clock=fake_time.clock, sleep=fake_time.sleep)
    permit = await limiter.acquire()
    assert fake_time.sleeps == []
    assert permit.waited_s == 0.0
    assert permit.sent_at == 0.0


async def test_acquire_sleeps_exactly_the_wait(fake_time):
    limiter = Limiter(rpm=60, clock=fake_time.clock, sleep=fake_time.sleep)
    await limiter.acquire()
    fake_time.advance(0.25)
    permit = await limiter.acquire()
    assert fake_time.sleeps == [pytest.approx(0.75)]
    assert fake_time.now == pytest.approx(1.0)
    assert permit.waited_s == pytest.approx(0.75)


async def test_tokens_pace_acquires(fake_time):
    limiter = Limiter(tpm=6000, clock=fake_time.clock, sleep=fake_time.sleep)  # 100/s
    permits = [await limiter.acquire(200) for _ in range(3)]
    assert [p.sent_at for p in permits] == pytest.approx([1.0, 3.0, 5.0])
    assert all(p.tokens == 200 for p in permits)


async def test_waiters_are_served_in_arrival_order(fake_time):
    limiter = Limiter(rpm=60, clock=fake_time.clock, sleep=fake_time.sleep)
    order: list[int] = []

    async def worker(i: int) -> float:
        permit = await limiter.acquire()
        order.append(i)
        return permit.sent_at

    sent = await asyncio.gather(*(worker(i) for i in range(5)))
    assert order == [0, 1, 2, 3, 4]
    assert sent == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0])


async def test_large_request_is_not_starved_by_small_ones(fake_time):
    limiter = Limiter(tpm=6000, clock=fake_time.clock, sleep=fake_time.sleep)  # 100/s
    await limiter.acquire(100)  # empties the starting level
    order: list[str] = []

    async def worker(name: str, tokens: float) -> None:
        await limiter.acquire(tokens)
        order.append(name)

    await asyncio.gather(worker("big", 1000), worker("small-1", 10), worker("small-2", 10))
    assert order == ["big", "small-1", "small-2"]


async def test_pause_for_blocks_every_acquire(fake_time):
    limiter = Limiter(clock=fake_time.clock, sleep=fake_time.sleep)  # unlimited
    limiter.pause_for(5.0)
    first = await limiter.acquire()
    second = await limiter.acquire()
    assert first.sent_at == pytest.approx(5.0)
    assert second.sent_at == pytest.approx(5.0)
    assert fake_time.sleeps == [pytest.approx(5.0)]


async def test_retry_after_arriving_mid_wait_is_honoured(fake_time):
    limiter = Limiter(rpm=60, clock=fake_time.clock, sleep=fake_time.sleep)
    await limiter.acquire()

    async def sleep_then_429(seconds: float) -> None:
        await fake_time.sleep(seconds)
        if len(fake_time.sleeps) == 1:  # a 429 with Retry-After: 3 arrives meanwhile
            limiter.update_from_headers({"retry-after": "3"})

    limiter.sleep = sleep_then_429
    permit = await limiter.acquire()
    assert permit.sent_at == pytest.approx(4.0)
    assert fake_time.sleeps == [pytest.approx(1.0), pytest.approx(3.0)]


async def test_settle_through_the_permit(fake_time):
    rate = RateLimiter(tpm=6000, now=0.0)
    limiter = Limiter(rate, clock=fake_time.clock, sleep=fake_time.sleep)
    permit = await limiter.acquire(100)
    limiter.settle(permit, 30)
    assert rate.tokens.available(fake_time.now) == pytest.approx(70.0)
    limiter.settle(permit, 300)
    assert rate.tokens.available(fake_time.now) == pytest.approx(-130.0)


async def test_headers_learned_mid_run_start_limiting(fake_time):
    limiter = Limiter(clock=fake_time.clock, sleep=fake_time.sleep)
    await limiter.acquire()
    limiter.update_from_headers(
        {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0"}
    )
    permit = await limiter.acquire()
    assert permit.waited_s == pytest.approx(1.0)


async def test_cancelled_waiter_reserves_nothing_and_frees_the_queue(fake_time):
    rate = RateLimiter(tpm=6000, now=0.0)
    hold = asyncio.Event()

    async def blocking_sleep(seconds: float) -> None:
        await hold.wait()

    limiter = Limiter(rate, clock=fake_time.clock, sleep=blocking_sleep)
    task = asyncio.create_task(limiter.acquire(1000))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rate.tokens.available(0.0) == pytest.approx(100.0)
    limiter.sleep = fake_time.sleep
    permit = await limiter.acquire(50)
    assert permit.waited_s == 0.0


async def test_default_clock_and_sleep_are_real():
    limiter = Limiter()
    assert limiter.sleep is asyncio.sleep
    permit = await limiter.acquire(10)
    assert permit.waited_s >= 0.0
