"""Fetching document URLs over HTTP, politely, with a cache of bodies by URL and validator.

:meth:`Fetcher.fetch` turns one ``http(s)://`` URL into its body:

1. **Stored and fresh**: a body fetched less than ``[fetch] max_age`` ago
   (:class:`~llmap.store.documents.DocumentStore`), or already fetched or
   confirmed by this fetcher (one run asks about a URL once), is used without
   asking the server: a rerun fetches nothing.
2. **Safe**: only ``http``/``https``; every host is resolved through a
   resolver that drops loopback, private, link-local and other non-public
   addresses unless ``[fetch] allow_private`` (an IP literal is checked the
   same way), so neither a redirect nor DNS can lead to one. Redirects are
   followed by hand, at most ``max_redirects``, each hop checked like the URL.
3. **Polite**: robots.txt is read once per origin per run (RFC 9309:
   a 4xx means no rules, a 5xx or no answer disallows for now) and obeyed
   for ``user_agent``; requests to one host are spaced and bounded
   (:class:`~llmap.control.politeness.HostPace`, ``Crawl-delay`` honoured).
4. **Revalidated**: a stored body past ``max_age`` is asked for again with
   ``If-None-Match`` / ``If-Modified-Since``; a ``304`` keeps it.
5. **Capped**: a ``Content-Length`` over ``max_mb``, or a body that grows past
   it while streaming, is refused.
6. **Retried like a model's request**: answers are classed with the model's
   error classes at this one boundary (429 :class:`~llmap.errors.RateLimited`
   with ``Retry-After``, 5xx :class:`~llmap.errors.Overloaded`, timeouts
   :class:`~llmap.errors.RequestTimeout`, refused connections
   :class:`~llmap.errors.ConnectionFailed`; any other 4xx
   :class:`~llmap.errors.BadRequest`, which only the row's own document hits:
   a 401 or 403 here stops nothing else) and
   :class:`~llmap.control.retry.RetryPolicy` decides, within ``max_attempts``.
   A ``Retry-After`` pauses the whole host.

What reaches the caller is one :class:`~llmap.errors.DocumentError` naming the
URL and the cause.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from llmap import errors as E
from llmap.control.headers import parse_retry_after
from llmap.control.politeness import HostGate, HostPace, RobotsRules, address_refusal, url_refusal
from llmap.control.retry import RetryPolicy
from llmap.spec.documents import FetchSpec
from llmap.store.diskfull import human_bytes
from llmap.store.documents import DocumentStore, FetchedEntry

__all__ = ["FetchStats", "Fetched", "Fetcher", "PolicyResolver"]

#: The most of robots.txt read (RFC 9309 asks crawlers to parse at least 500 KiB).
ROBOTS_MAX_BYTES = 512_000
_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True, slots=True)
class Fetched:
    """One URL's body.

    Attributes:
        url: the URL asked for.
        final_url: where its redirects ended.
        body: the bytes.
        sha256: their SHA-256 (hex).
        content_type: the ``Content-Type``, or None.
        network: whether a request went out for it in this call (a fetch or a revalidation).
    """

    url: str
    final_url: str
    body: bytes
    sha256: str
    content_type: str | None
    network: bool


@dataclass
class FetchStats:
    """What a :class:`Fetcher` did: ``requests`` (every HTTP request, robots.txt and redirect hops
    included), ``fetched`` (bodies downloaded), ``not_modified`` (304s), ``from_store`` (URLs answered
    without the network), ``robots`` (robots.txt requests), ``retries``."""

    requests: int = 0
    fetched: int = 0
    not_modified: int = 0
    from_store: int = 0
    robots: int = 0
    retries: int = 0


class AddressRefused(OSError):
    """A host resolved only to addresses ``[fetch] allow_private`` keeps out."""


class PolicyResolver(AbstractResolver):
    """aiohttp's resolver, keeping only the addresses :func:`~llmap.control.politeness.address_refusal` allows.

    Args:
        allow_private: ``[fetch] allow_private``.
        inner: the resolver asked first (default aiohttp's threaded ``getaddrinfo``).
    """

    def __init__(self, *, allow_private: bool, inner: AbstractResolver | None = None) -> None:
        self.allow_private = allow_private
        self._inner = inner

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        """Resolve ``host``; raises :class:`AddressRefused` when every address is refused."""
        if self._inner is None:
            self._inner = aiohttp.ThreadedResolver()
        found = await self._inner.resolve(host, port, family)
        kept = [r for r in found if address_refusal(r["host"], allow_private=self.allow_private) is None]
        if not kept:
            why = address_refusal(found[0]["host"], allow_private=self.allow_private) if found else "no address"
            raise AddressRefused(f"{host}: {why}")
        return kept

    async def close(self) -> None:
        """Close the inner resolver."""
        if self._inner is not None:
            await self._inner.close()


def _retry_after(headers: dict[str, str], wall_now: float) -> float | None:
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    try:
        return parse_retry_after(value, wall_now=wall_now)
    except ValueError:
        return None


def _status_error(status: int, reason: str, retry_after: float | None) -> E.ProviderError:
    """An HTTP error answer, classed like a model's (see the module docstring)."""
    text = f"HTTP {status} {reason}".rstrip()
    if status == 408:
        return E.RequestTimeout(text, status=status)
    if status == 429:
        return E.RateLimited(text, retry_after=retry_after, status=status)
    if 500 <= status < 600 and status not in (501, 505):
        err = E.Overloaded(text, status=status)
        err.retry_after = retry_after  # type: ignore[attr-defined]  # RetryPolicy reads it when present
        return err
    return E.BadRequest(text, status=status)


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps (causes, contexts, aiohttp's ``os_error``), each once."""
    out: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is seen for seen in out):
            continue
        out.append(e)
        todo += [e.__cause__, e.__context__, getattr(e, "os_error", None)]
    return out


def _transport_error(exc: BaseException) -> E.ProviderError:
    """A transport failure, classed like a model's."""
    refused = next((c for c in _causes(exc) if isinstance(c, AddressRefused)), None)
    if refused is not None:
        return E.BadRequest(str(refused))
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return E.RequestTimeout("timed out")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return E.BadRequest(f"host not found ({exc.os_error.strerror or exc.os_error})")
    return E.ConnectionFailed(f"connection failed ({type(exc).__name__}: {exc})")


class Fetcher:
    """Fetches document URLs (see the module docstring). Create it inside the running event loop.

    Args:
        spec: ``[fetch]``.
        store: where bodies and validators are kept.
        clock: monotonic seconds, for spacing and retries (default :func:`time.monotonic`).
        wall: POSIX seconds, for ``max_age`` (default :func:`time.time`).
        sleep: the async sleep (default :func:`asyncio.sleep`).
        resolver: the DNS resolver under the address policy (tests inject one).
        rng: the random source of the retry jitter.

    Attributes:
        stats: what it did (:class:`FetchStats`).
        resolver: the :class:`PolicyResolver` every connection resolves its host through.
    """

    def __init__(self, spec: FetchSpec, store: DocumentStore, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                 resolver: AbstractResolver | None = None, rng: random.Random | None = None) -> None:
        self.spec = spec
        self.store = store
        self.clock, self.wall, self.sleep = clock, wall, sleep
        self.stats = FetchStats()
        self.gate = HostGate(HostPace(spec.per_host_rpm, spec.per_host_concurrency), clock=clock, sleep=sleep)
        self.retry = RetryPolicy(max_attempts=spec.max_attempts, base_s=1.0, cap_s=30.0,
                                 budget_s=max(60.0, spec.max_attempts * (spec.timeout_s + 30.0)), rng=rng)
        self.resolver = PolicyResolver(allow_private=spec.allow_private, inner=resolver)
        self._session: aiohttp.ClientSession | None = None
        self._robots: dict[str, asyncio.Task[RobotsRules]] = {}
        self._inflight: dict[str, asyncio.Task[Fetched]] = {}
        self._checked: set[str] = set()  # URLs fetched or confirmed by this fetcher: fresh for its life

    # -- what the store holds ---------------------------------------------------------------
    def fresh(self, url: str) -> FetchedEntry | None:
        """The stored entry for ``url`` when it is younger than ``max_age``, or was fetched or confirmed by this
        fetcher (one run asks a server about a URL once), else None."""
        entry = self.store.fetched(url)
        if entry is not None and (url in self._checked or self.wall() - entry.checked_at < self.spec.max_age_s):
            return entry
        return None

    # -- fetching -----------------------------------------------------------------------------
    async def fetch(self, url: str) -> Fetched:
        """The body of ``url``: stored and fresh, revalidated, or fetched.

        Raises:
            DocumentError: the URL is refused (scheme, address, robots.txt, size) or answered an error;
                ``transient`` when retries were spent on a 429, 5xx, timeout or connection failure.
        """
        why = url_refusal(url)
        if why is not None:
            raise E.DocumentError(f"{url}: {why}", source=url)
        entry = self.fresh(url)
        if entry is not None:
            body = self.store.body(entry.sha256)
            if body is not None:
                self.stats.from_store += 1
                return Fetched(url, entry.final_url, body, entry.sha256, entry.content_type, False)
        task = self._inflight.get(url)
        if task is None:  # one request per URL at a time: rows naming the same URL share it
            task = asyncio.get_running_loop().create_task(self._fetch(url))
            self._inflight[url] = task
            task.add_done_callback(lambda _t: self._inflight.pop(url, None))
        return await asyncio.shield(task)

    async def _fetch(self, url: str) -> Fetched:
        started = self.clock()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._once(url)
            except E.ProviderError as exc:
                decision = self.retry.decide(exc, attempt, self.clock() - started)
                if not decision.retry:
                    tried = f" (after {attempt} attempts)" if attempt > 1 else ""
                    raise E.DocumentError(f"{url}: {exc}{tried}", source=url,
                                          transient=isinstance(exc, E.TransientError)) from None
                self.stats.retries += 1
                await self.sleep(decision.delay_s)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=self.resolver, limit=0, ttl_dns_cache=300)
            timeout = aiohttp.ClientTimeout(total=self.spec.timeout_s, connect=min(10.0, self.spec.timeout_s))
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=True,
                                                  headers={"User-Agent": self.spec.user_agent})
        return self._session

    def _check_host(self, url: str) -> str:
        """The URL's host (lower case); a refused scheme or IP literal raises BadRequest."""
        why = url_refusal(url)
        if why is not None:
            raise E.BadRequest(why)
        host = urlsplit(url).hostname or ""
        try:
            why = address_refusal(host, allow_private=self.spec.allow_private)
        except ValueError:  # a name: the resolver checks the addresses it resolves to
            return host
        if why is not None:
            raise E.BadRequest(why)
        return host

    async def _once(self, url: str) -> Fetched:
        """One attempt: follow redirects by hand, conditional on what the store holds."""
        stored = self.store.fetched(url)
        current = url
        for _hop in range(self.spec.max_redirects + 1):
            host = self._check_host(current)
            if self.spec.robots:
                rules = await self._rules(current)
                if rules.unreachable is not None:
                    raise E.ConnectionFailed(f"its robots.txt could not be read ({rules.unreachable})")
                if not rules.allows(current, self.spec.user_agent):
                    raise E.BadRequest(f"robots.txt of {urlsplit(current).netloc} disallows it for "
                                       f"{self.spec.user_agent!r}")
            headers = {}
            if stored is not None and stored.final_url == current:
                if stored.etag:
                    headers["If-None-Match"] = stored.etag
                if stored.last_modified:
                    headers["If-Modified-Since"] = stored.last_modified
            async with self.gate.slot(host):
                self.stats.requests += 1
                try:
                    async with self._http().get(current, headers=headers, allow_redirects=False) as resp:
                        if resp.status in _REDIRECTS and "Location" in resp.headers:
                            current = urljoin(current, resp.headers["Location"])
                            continue
                        if resp.status == 304 and stored is not None and headers:
                            body = self.store.body(stored.sha256)
                            if body is not None:
                                self.stats.not_modified += 1
                                self.store.confirm(url, self.wall())
                                self._checked.add(url)
                                return Fetched(url, current, body, stored.sha256, stored.content_type, True)
                            raise E.Overloaded("answered 304 Not Modified for a body no longer stored")
                        if resp.status >= 300:
                            wait = _retry_after(dict(resp.headers), self.wall())
                            if wait:  # the server asked the whole host to wait
                                self.gate.pace.pause(host, self.clock() + wait)
                            raise _status_error(resp.status, resp.reason or "", wait)
                        body = await self._read(resp)
                        ctype = resp.headers.get("Content-Type")
                        etag, modified = resp.headers.get("ETag"), resp.headers.get("Last-Modified")
                except E.ProviderError:
                    raise
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    raise _transport_error(exc) from exc
            sha = hashlib.sha256(body).hexdigest()
            now = self.wall()
            self.store.put_fetched(FetchedEntry(url, sha, ctype, etag, modified, current, now, now), body)
            self._checked.add(url)
            self.stats.fetched += 1
            return Fetched(url, current, body, sha, ctype, True)
        raise E.BadRequest(f"more than {self.spec.max_redirects} redirects ([fetch] max_redirects)")

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        cap = self.spec.max_bytes
        size = resp.content_length
        over = f"more than {human_bytes(cap)} ([fetch] max_mb = {self.spec.max_mb:g}); raise max_mb to fetch it"
        if size is not None and size > cap:
            raise E.BadRequest(f"over the size cap: {human_bytes(size)} is {over}")
        chunks: list[bytes] = []
        total = 0
        async for chunk in resp.content.iter_chunked(65536):
            total += len(chunk)
            if total > cap:
                raise E.BadRequest(f"over the size cap: {over}")
            chunks.append(chunk)
        return b"".join(chunks)

    # -- robots.txt -----------------------------------------------------------------------------
    async def _rules(self, url: str) -> RobotsRules:
        parts = urlsplit(url)
        origin = f"{parts.scheme.lower()}://{parts.netloc.lower()}"
        task = self._robots.get(origin)
        if task is None or (task.done() and (task.exception() is not None or task.result().unreachable)):
            # read once per origin; unreachable (or refused) means asking again next time
            task = asyncio.get_running_loop().create_task(self._read_robots(origin, parts.hostname or ""))
            self._robots[origin] = task
        return await asyncio.shield(task)

    async def _read_robots(self, origin: str, host: str) -> RobotsRules:
        self.stats.robots += 1
        async with self.gate.slot(host):
            self.stats.requests += 1
            try:
                async with self._http().get(f"{origin}/robots.txt", max_redirects=5) as resp:
                    text = ""
                    if 200 <= resp.status < 300:
                        text = (await resp.content.read(ROBOTS_MAX_BYTES)).decode("utf-8", errors="replace")
                    rules = RobotsRules.from_answer(resp.status, text)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                err = _transport_error(exc)
                if isinstance(err, E.TerminalError):  # a refused address or an unknown host: the page's too
                    raise err from exc
                rules = RobotsRules.from_answer(None, why=str(err))
        delay = rules.crawl_delay(self.spec.user_agent)
        if delay:
            self.gate.pace.slow_down(host, delay)
        return rules

    async def aclose(self) -> None:
        """Close the connection pool and the resolver."""
        for task in [*self._inflight.values(), *self._robots.values()]:
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.resolver.close()
