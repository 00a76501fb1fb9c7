"""Politeness toward the web servers documents come from: pure policies, plus the one async gate over them.

- :func:`url_refusal`: only ``http`` and ``https`` URLs with a host are fetched.
- :func:`address_refusal`: loopback, private, link-local (cloud metadata at
  169.254.169.254), multicast, reserved and unspecified addresses are refused
  unless ``[fetch] allow_private`` (IPv4-mapped IPv6 addresses are judged as IPv4).
- :class:`RobotsRules`: robots.txt as RFC 9309 reads it: a 2xx body is parsed,
  a 4xx means no rules (everything allowed), a 5xx or no answer means
  everything is disallowed for now (the fetch is retried later).
- :class:`HostPace`: per host, at most ``concurrency`` requests in flight and
  starts spaced ``60 / rpm`` seconds apart, slowed further by a robots.txt
  ``Crawl-delay`` and paused by a ``Retry-After``. Pure: the caller passes the time.
- :class:`HostGate`: the async gate over a :class:`HostPace`, with an injected
  clock and sleep (tests move time instead of waiting).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
import urllib.robotparser
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["HostGate", "HostPace", "RobotsRules", "address_refusal", "url_refusal"]


def url_refusal(url: str) -> str | None:
    """Why ``url`` is not fetched (one phrase), or None when its scheme and host are fine."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if parts.scheme.lower() not in ("http", "https"):
        return f"only http and https URLs are fetched, not {parts.scheme or 'a URL without a scheme'}"
    if not host:
        return "the URL has no host"
    return None


def address_refusal(address: str, *, allow_private: bool) -> str | None:
    """Why a connection to IP ``address`` is refused (one phrase), or None.

    Args:
        address: an IPv4 or IPv6 address (a ``%zone`` suffix is ignored).
        allow_private: ``[fetch] allow_private``: then only multicast and unspecified addresses are refused.

    Raises:
        ValueError: ``address`` is not an IP address.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_multicast:
        return f"{ip} is a multicast address"
    if ip.is_unspecified:
        return f"{ip} is the unspecified address"
    if allow_private:
        return None
    if ip.is_loopback:
        what = "a loopback address"
    elif ip.is_link_local:
        what = "a link-local address (cloud metadata lives there)"
    elif ip.is_private:
        what = "a private address"
    elif ip.is_reserved or not ip.is_global:
        what = "not a public address"
    else:
        return None
    return f"{ip} is {what}; set [fetch] allow_private = true to fetch from it"


class RobotsRules:
    """One origin's robots.txt rules (RFC 9309), parsed by :mod:`urllib.robotparser`.

    Build it with :meth:`from_answer`; ask :meth:`allows` and :meth:`crawl_delay`.
    """

    def __init__(self, parser: urllib.robotparser.RobotFileParser | None, *, allow_all: bool = False,
                 unreachable: str | None = None) -> None:
        self._parser = parser
        self._allow_all = allow_all
        #: why robots.txt could not be read (a 5xx or no answer), or None
        self.unreachable = unreachable

    @classmethod
    def from_answer(cls, status: int | None, text: str = "", *, why: str = "") -> RobotsRules:
        """Rules from robots.txt's answer.

        Args:
            status: the HTTP status, or None when no answer came (``why`` says what happened).
            text: the body (2xx only).
            why: what went wrong when ``status`` is None.
        """
        if status is None or status >= 500:
            return cls(None, unreachable=why or f"robots.txt answered HTTP {status}")
        if not 200 <= status < 300:
            return cls(None, allow_all=True)  # 4xx: "unavailable", no rules
        parser = urllib.robotparser.RobotFileParser()
        parser.parse(text.splitlines())
        return cls(parser)

    def allows(self, url: str, agent: str) -> bool:
        """Whether ``agent`` may fetch ``url`` (False while robots.txt is unreachable)."""
        if self.unreachable is not None:
            return False
        if self._allow_all or self._parser is None:
            return True
        return self._parser.can_fetch(agent, url)

    def crawl_delay(self, agent: str) -> float | None:
        """The ``Crawl-delay`` for ``agent`` in seconds, or None."""
        if self._parser is None:
            return None
        delay = self._parser.crawl_delay(agent)
        return float(delay) if delay is not None else None


@dataclass
class _Host:
    in_flight: int = 0
    next_start: float = float("-inf")
    interval_s: float = 0.0
    paused_until: float = float("-inf")


@dataclass
class HostPace:
    """Per-host request spacing and concurrency (pure: every method takes the time from the caller).

    Args:
        rpm: requests per minute to one host; starts are spaced ``60 / rpm`` seconds apart.
        concurrency: requests in flight to one host at once.

    Raises:
        ValueError: ``rpm`` or ``concurrency`` is not positive.
    """

    rpm: float
    concurrency: int
    _hosts: dict[str, _Host] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.rpm > 0 or self.concurrency < 1:
            raise ValueError(f"rpm and concurrency must be positive, got {self.rpm!r} and {self.concurrency!r}")

    def _host(self, host: str) -> _Host:
        h = self._hosts.get(host)
        if h is None:
            h = self._hosts[host] = _Host(interval_s=60.0 / self.rpm)
        return h

    def delay(self, host: str, now: float) -> float | None:
        """Seconds until a request to ``host`` may start (0: now), or None while ``concurrency`` are in flight."""
        h = self._host(host)
        if h.in_flight >= self.concurrency:
            return None
        return max(0.0, h.next_start - now, h.paused_until - now)

    def start(self, host: str, now: float) -> None:
        """A request to ``host`` starts at ``now``: the next may start one interval later."""
        h = self._host(host)
        h.in_flight += 1
        h.next_start = max(h.next_start, now) + h.interval_s

    def finish(self, host: str) -> None:
        """A request to ``host`` ended."""
        h = self._host(host)
        h.in_flight = max(0, h.in_flight - 1)

    def slow_down(self, host: str, interval_s: float) -> None:
        """Space ``host``'s starts at least ``interval_s`` seconds apart (robots.txt's ``Crawl-delay``)."""
        h = self._host(host)
        h.interval_s = max(h.interval_s, interval_s)

    def pause(self, host: str, until: float) -> None:
        """Start nothing on ``host`` before ``until`` (the server's ``Retry-After``)."""
        h = self._host(host)
        h.paused_until = max(h.paused_until, until)


class HostGate:
    """Waits for a :class:`HostPace` slot: ``async with gate.slot(host): ...``.

    Args:
        pace: the policy.
        clock: monotonic seconds (default :func:`time.monotonic`).
        sleep: the async sleep (default :func:`asyncio.sleep`); tests pass one that moves a fake clock.
    """

    def __init__(self, pace: HostPace, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        self.pace = pace
        self.clock = clock
        self.sleep = sleep
        self._freed: dict[str, asyncio.Event] = {}

    @contextlib.asynccontextmanager
    async def slot(self, host: str) -> AsyncIterator[None]:
        """Hold one of ``host``'s request slots for the body of the ``async with``."""
        while True:
            d = self.pace.delay(host, self.clock())
            if d is None:  # at the host's concurrency: wait for a request to end
                event = self._freed.setdefault(host, asyncio.Event())
                event.clear()
                await event.wait()
            elif d > 0:
                await self.sleep(d)
            else:
                break
        self.pace.start(host, self.clock())
        try:
            yield
        finally:
            self.pace.finish(host)
            event = self._freed.get(host)
            if event is not None:
                event.set()
