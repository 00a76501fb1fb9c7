"""The URL fetcher against a local server: cache by URL and validator, redirects, caps, retries, safety."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from _documents import Page, PageServer
from _support import FakeTime
from llmap.errors import DocumentError
from llmap.io.fetch import Fetcher
from llmap.spec import FetchSpec
from llmap.store.documents import DocumentStore

FAST = {"allow_private": True, "per_host_rpm": 60000}


@pytest.fixture
def server() -> Iterator[PageServer]:
    with PageServer() as s:
        yield s


def _fetcher(tmp_path: Path, fake_time: FakeTime | None = None, **kw) -> Fetcher:
    spec = FetchSpec(**{**FAST, **kw})
    store = DocumentStore(tmp_path / "documents.sqlite")
    if fake_time is None:
        return Fetcher(spec, store)
    return Fetcher(spec, store, sleep=fake_time.sleep, clock=fake_time.clock)


async def test_a_body_is_fetched_once_and_served_from_the_store_while_fresh(tmp_path: Path, server) -> None:
    server.pages["/a.html"] = Page(b"<p>hello</p>", headers={"Content-Type": "text/html"}, etag='"v1"')
    f = _fetcher(tmp_path)
    try:
        got = await f.fetch(server.url("/a.html"))
        again = await f.fetch(server.url("/a.html"))
    finally:
        await f.aclose()
    assert got.body == again.body == b"<p>hello</p>" and got.content_type == "text/html"
    assert got.network and not again.network
    assert server.hits["/a.html"] == 1 and f.stats.fetched == 1 and f.stats.from_store == 1
    # another fetcher on the same store (the next run) does not ask either
    f2 = _fetcher(tmp_path)
    try:
        assert (await f2.fetch(server.url("/a.html"))).body == b"<p>hello</p>"
    finally:
        await f2.aclose()
    assert server.hits["/a.html"] == 1


@pytest.mark.parametrize("validator", ["etag", "last_modified"])
async def test_a_stale_body_is_revalidated_and_a_304_keeps_it(tmp_path: Path, server, validator: str) -> None:
    page = Page(b"v1 body")
    setattr(page, validator, '"abc"' if validator == "etag" else "Wed, 21 Oct 2015 07:28:00 GMT")
    server.pages["/p"] = page

    async def one_run() -> tuple[bytes, Fetcher]:
        f = _fetcher(tmp_path, max_age="0s")  # every run checks the page again
        try:
            got = await f.fetch(server.url("/p"))
            assert (await f.fetch(server.url("/p"))).body == got.body  # one run asks about a URL once
            return got.body, f
        finally:
            await f.aclose()

    assert (await one_run())[0] == b"v1 body" and server.hits["/p"] == 1
    body, f = await one_run()
    assert body == b"v1 body" and f.stats.not_modified == 1 and server.conditional["/p"] == 1
    server.pages["/p"] = Page(b"v2 body", etag='"def"')  # the page changed: a 200 replaces it
    body, f = await one_run()
    assert body == b"v2 body" and f.stats.fetched == 1 and server.hits["/p"] == 3


async def test_redirects_are_followed_and_bounded(tmp_path: Path, server) -> None:
    server.pages["/final"] = Page(b"here")
    server.pages["/r1"] = Page(status=302, headers={"Location": "/final"})
    server.pages["/loop"] = Page(status=301, headers={"Location": "/loop"})
    f = _fetcher(tmp_path, max_redirects=3)
    try:
        got = await f.fetch(server.url("/r1"))
        assert got.body == b"here" and got.final_url == server.url("/final")
        with pytest.raises(DocumentError, match="more than 3 redirects") as err:
            await f.fetch(server.url("/loop"))
    finally:
        await f.aclose()
    assert not err.value.transient and server.hits["/loop"] == 4


async def test_a_redirect_to_another_scheme_is_refused(tmp_path: Path, server) -> None:
    server.pages["/to-file"] = Page(status=302, headers={"Location": "file:///etc/passwd"})
    f = _fetcher(tmp_path)
    try:
        with pytest.raises(DocumentError, match="only http and https URLs are fetched, not file"):
            await f.fetch(server.url("/to-file"))
    finally:
        await f.aclose()


async def test_a_404_fails_at_once(tmp_path: Path, server) -> None:
    f = _fetcher(tmp_path)
    try:
        with pytest.raises(DocumentError) as err:
            await f.fetch(server.url("/missing.pdf"))
    finally:
        await f.aclose()
    assert str(err.value) == f"{server.url('/missing.pdf')}: HTTP 404 Not Found"
    assert not err.value.transient and server.hits["/missing.pdf"] == 1


async def test_a_503_with_retry_after_is_retried_after_the_wait(tmp_path: Path, server, fake_time: FakeTime) -> None:
    async def flaky(request, n):
        if n < 3:
            return web.Response(status=503, headers={"Retry-After": "7"})
        return web.Response(body=b"at last")

    server.handlers["/busy"] = flaky
    f = _fetcher(tmp_path, fake_time)
    try:
        assert (await f.fetch(server.url("/busy"))).body == b"at last"
    finally:
        await f.aclose()
    assert server.hits["/busy"] == 3 and f.stats.retries == 2
    assert sum(s >= 7 for s in fake_time.sleeps) == 2  # each retry waited out the server's Retry-After


async def test_retries_end_in_a_transient_error(tmp_path: Path, server, fake_time: FakeTime) -> None:
    async def down(request, n):
        return web.Response(status=502)

    server.handlers["/down"] = down
    f = _fetcher(tmp_path, fake_time, max_attempts=2)
    try:
        with pytest.raises(DocumentError, match=r"HTTP 502 Bad Gateway \(after 2 attempts\)") as err:
            await f.fetch(server.url("/down"))
    finally:
        await f.aclose()
    assert err.value.transient and server.hits["/down"] == 2


async def test_bodies_over_the_size_cap_are_refused(tmp_path: Path, server) -> None:
    server.pages["/big"] = Page(b"x" * 3000)

    async def streamed(request, n):
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(10):
            await resp.write(b"y" * 500)
        await resp.write_eof()
        return resp

    server.handlers["/stream"] = streamed
    f = _fetcher(tmp_path, max_mb=0.002)
    try:
        cap = r"over the size cap: 3.0 kB is more than 2.0 kB \(\[fetch\] max_mb = 0.002\)"
        with pytest.raises(DocumentError, match=cap):
            await f.fetch(server.url("/big"))
        with pytest.raises(DocumentError, match=r"over the size cap: more than 2.0 kB"):
            await f.fetch(server.url("/stream"))
    finally:
        await f.aclose()


async def test_robots_txt_is_obeyed_and_read_once_per_origin(tmp_path: Path, server) -> None:
    server.pages["/robots.txt"] = Page(b"User-agent: *\nDisallow: /private/\n")
    server.pages["/private/a.pdf"] = Page(b"%PDF-1.4 secret")
    server.pages["/public/a.pdf"] = Page(b"%PDF-1.4 open")
    f = _fetcher(tmp_path)
    try:
        with pytest.raises(DocumentError, match=r"robots.txt of 127.0.0.1:\d+ disallows it for 'llmap'"):
            await f.fetch(server.url("/private/a.pdf"))
        assert (await f.fetch(server.url("/public/a.pdf"))).body == b"%PDF-1.4 open"
    finally:
        await f.aclose()
    assert "/private/a.pdf" not in server.hits and server.hits["/robots.txt"] == 1


async def test_robots_can_be_turned_off(tmp_path: Path, server) -> None:
    server.pages["/robots.txt"] = Page(b"User-agent: *\nDisallow: /\n")
    server.pages["/a"] = Page(b"ok")
    f = _fetcher(tmp_path, robots=False)
    try:
        assert (await f.fetch(server.url("/a"))).body == b"ok"
    finally:
        await f.aclose()
    assert "/robots.txt" not in server.hits


async def test_an_unreachable_robots_txt_fails_transiently(tmp_path: Path, server, fake_time: FakeTime) -> None:
    server.pages["/robots.txt"] = Page(b"oops", status=500)
    server.pages["/a"] = Page(b"ok")
    f = _fetcher(tmp_path, fake_time, max_attempts=2)
    try:
        with pytest.raises(DocumentError, match="robots.txt could not be read") as err:
            await f.fetch(server.url("/a"))
    finally:
        await f.aclose()
    assert err.value.transient and "/a" not in server.hits and server.hits["/robots.txt"] == 2


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_private_addresses_are_refused_by_default(tmp_path: Path, server, host: str) -> None:
    server.pages["/a"] = Page(b"ok")
    f = _fetcher(tmp_path, allow_private=False)
    try:
        with pytest.raises(DocumentError, match="loopback address; set \\[fetch\\] allow_private = true") as err:
            await f.fetch(f"http://{host}:{server.port}/a")
    finally:
        await f.aclose()
    assert not err.value.transient and server.total_hits(robots=True) == 0


async def test_a_redirect_to_a_private_address_is_refused(tmp_path: Path, server) -> None:
    """A public page that redirects inward: the hop is checked like the URL (here the test's own server plays
    the public one, so only the hop's literal address is refused)."""
    server.pages["/out"] = Page(status=302, headers={"Location": "http://10.0.0.1/admin"})
    f = _fetcher(tmp_path, allow_private=False)
    f.resolver.allow_private = True  # the first hop, by name, plays a public host
    try:
        with pytest.raises(DocumentError, match="10.0.0.1 is a private address"):
            await f.fetch(f"http://localhost:{server.port}/out")
    finally:
        await f.aclose()
    assert server.hits["/out"] == 1


async def test_refused_schemes_are_not_fetched(tmp_path: Path) -> None:
    f = _fetcher(tmp_path)
    try:
        with pytest.raises(DocumentError, match="^ftp://x.org/a.pdf: only http and https"):
            await f.fetch("ftp://x.org/a.pdf")
    finally:
        await f.aclose()


async def test_rows_naming_one_url_share_one_request(tmp_path: Path, server) -> None:
    import asyncio

    server.pages["/same"] = Page(b"shared")
    f = _fetcher(tmp_path)
    try:
        got = await asyncio.gather(*(f.fetch(server.url("/same")) for _ in range(5)))
    finally:
        await f.aclose()
    assert {g.body for g in got} == {b"shared"} and server.hits["/same"] == 1
