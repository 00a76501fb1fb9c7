"""Politeness policies as functions of their state: URLs, addresses, robots.txt, per-host pace and the gate."""

from __future__ import annotations

import asyncio

import pytest

from _support import FakeTime, loop_turns
from llmap.control.politeness import HostGate, HostPace, RobotsRules, address_refusal, url_refusal


@pytest.mark.parametrize("url, refused", [
    ("https://example.org/a.pdf", None),
    ("HTTP://Example.org:8080/x?y=1", None),
    ("file:///etc/passwd", "only http and https URLs are fetched, not file"),
    ("ftp://example.org/a.pdf", "only http and https URLs are fetched, not ftp"),
    ("http:///nohost", "the URL has no host"),
    ("http://example.org:port/", "not a valid URL"),
])
def test_only_http_and_https_urls_with_a_host(url: str, refused: str | None) -> None:
    why = url_refusal(url)
    assert (why is None) if refused is None else (why is not None and why.startswith(refused))


@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("192.168.0.7", "private"),
    ("172.16.5.4", "private"), ("169.254.169.254", "link-local"), ("fe80::1%eth0", "link-local"),
    ("::ffff:127.0.0.1", "loopback"), ("100.64.0.1", "not a public address"), ("fd00::1", "private"),
])
def test_non_public_addresses_are_refused_unless_allowed(address: str, kind: str) -> None:
    why = address_refusal(address, allow_private=False)
    assert why is not None and kind in why and "allow_private" in why
    assert address_refusal(address, allow_private=True) is None


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:4700::6810:85e5", "8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert address_refusal(address, allow_private=False) is None


@pytest.mark.parametrize("address", ["0.0.0.0", "224.0.0.1", "::"])
def test_multicast_and_unspecified_are_refused_even_when_private_is_allowed(address: str) -> None:
    assert address_refusal(address, allow_private=True) is not None


def test_address_refusal_needs_an_ip() -> None:
    with pytest.raises(ValueError):
        address_refusal("example.org", allow_private=False)


ROBOTS = """
User-agent: *
Disallow: /private/
Crawl-delay: 3

User-agent: llmap
Disallow: /no-llmap/
Crawl-delay: 7
"""


def test_robots_rules_follow_the_agent_group() -> None:
    rules = RobotsRules.from_answer(200, ROBOTS)
    assert rules.allows("https://x.org/private/a.pdf", "llmap")  # llmap's own group replaces the * group
    assert not rules.allows("https://x.org/no-llmap/a.pdf", "llmap")
    assert not rules.allows("https://x.org/private/a.pdf", "otherbot")
    assert rules.crawl_delay("llmap") == 7.0 and rules.crawl_delay("otherbot") == 3.0


def test_robots_4xx_means_no_rules_and_5xx_or_no_answer_means_not_now() -> None:
    assert RobotsRules.from_answer(404).allows("https://x.org/anything", "llmap")
    assert RobotsRules.from_answer(403).allows("https://x.org/anything", "llmap")
    down = RobotsRules.from_answer(503)
    assert not down.allows("https://x.org/anything", "llmap") and "503" in down.unreachable
    gone = RobotsRules.from_answer(None, why="connection refused")
    assert not gone.allows("https://x.org/a", "llmap") and gone.unreachable == "connection refused"


def test_host_pace_spaces_starts_per_host() -> None:
    pace = HostPace(rpm=30, concurrency=5)  # one start every 2 s
    assert pace.delay("a", 100.0) == 0
    pace.start("a", 100.0)
    assert pace.delay("a", 100.5) == pytest.approx(1.5)
    assert pace.delay("b", 100.5) == 0  # another host has its own pace
    pace.finish("a")
    assert pace.delay("a", 102.0) == 0


def test_host_pace_bounds_requests_in_flight() -> None:
    pace = HostPace(rpm=6000, concurrency=2)
    pace.start("a", 0.0)
    pace.start("a", 1.0)
    assert pace.delay("a", 5.0) is None  # two in flight: wait for one to end
    pace.finish("a")
    assert pace.delay("a", 5.0) == 0


def test_crawl_delay_and_retry_after_slow_a_host_down() -> None:
    pace = HostPace(rpm=600, concurrency=4)  # 0.1 s apart
    pace.slow_down("a", 5.0)
    pace.start("a", 0.0)
    assert pace.delay("a", 1.0) == pytest.approx(4.0)
    pace.slow_down("a", 1.0)  # a smaller delay never speeds it up again
    pace.pause("a", 30.0)
    assert pace.delay("a", 10.0) == pytest.approx(20.0)
    pace.pause("a", 12.0)  # an earlier pause does not shorten it
    assert pace.delay("a", 10.0) == pytest.approx(20.0)


def test_host_pace_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        HostPace(rpm=0, concurrency=1)
    with pytest.raises(ValueError):
        HostPace(rpm=10, concurrency=0)


async def test_gate_paces_requests_on_a_fake_clock(fake_time: FakeTime) -> None:
    gate = HostGate(HostPace(rpm=60, concurrency=10), clock=fake_time.clock, sleep=fake_time.sleep)
    starts: list[float] = []

    async def request() -> None:
        async with gate.slot("x.org"):
            starts.append(fake_time.now)

    await asyncio.gather(*(request() for _ in range(4)))
    assert starts == pytest.approx([0.0, 1.0, 2.0, 3.0])


async def test_gate_waits_for_a_slot_to_free(fake_time: FakeTime) -> None:
    gate = HostGate(HostPace(rpm=60000, concurrency=1), clock=fake_time.clock, sleep=fake_time.sleep)
    release = asyncio.Event()
    order: list[str] = []

    async def first() -> None:
        async with gate.slot("x.org"):
            order.append("first in")
            await release.wait()
        order.append("first out")

    async def second() -> None:
        async with gate.slot("x.org"):
            order.append("second in")

    tasks = [asyncio.create_task(first()), asyncio.create_task(second())]
    await loop_turns()
    assert order == ["first in"]  # the second waits while the first holds the host's only slot
    release.set()
    await asyncio.gather(*tasks)
    assert order == ["first in", "first out", "second in"]
