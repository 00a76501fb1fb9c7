"""Documents the tests make: PDFs with a text layer, scans inside PDFs, HTML pages, and a page server.

Nothing here is copied from ``../shared/data``: the bell-schedule test set is
built from its notes at test time (:func:`bell_notes` skips when they are absent).
"""

from __future__ import annotations

import asyncio
import csv
import html
import io
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from _support import SHARED_DATA

BELL_SCHEDULES = SHARED_DATA / "bell_schedules_2024_25.csv"


def bell_rows() -> list[dict[str, str]]:
    """The bell-schedule rows (``district_id``, ``grade_level``, ``notes``, ``instructional_minutes``...), or a
    skip when ``../shared/data`` is absent."""
    if not BELL_SCHEDULES.is_file():
        pytest.skip(f"{BELL_SCHEDULES} is absent")
    with open(BELL_SCHEDULES, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _pdf_string(text: str) -> bytes:
    raw = text.encode("cp1252")
    return b"(" + raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b")"


def pdf_with_text(pages: list[list[str]], *, size: int = 10) -> bytes:
    """A PDF whose pages hold these lines as real text (Helvetica, WinAnsi), one line per text line.

    A page is as wide as its longest line needs, so no line wraps.
    """
    objs: list[bytes] = [b"<< /Type /Catalog /Pages 2 0 R >>", b""]
    kids = []
    font_id = 3
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    for lines in pages:
        width = max(612, int(max((len(x) for x in lines), default=0) * size * 0.6) + 72)
        ops = b"BT /F1 %d Tf 36 740 Td %d TL\n" % (size, size + 4)
        ops += b"".join(_pdf_string(line) + b" Tj T*\n" for line in lines) + b"ET"
        objs.append(b"<< /Length %d >>\nstream\n" % len(ops) + ops + b"\nendstream")
        content_id = len(objs)
        objs.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d 792] /Contents %d 0 R "
                    b"/Resources << /Font << /F1 %d 0 R >> >> >>" % (width, content_id, font_id))
        kids.append(len(objs))
    objs[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(kids))
    out = b"%PDF-1.4\n"
    offsets = []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + o + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return out


def text_image(lines: list[str], *, px: int = 42):
    """A white picture with these lines drawn in black (about 10 pt at 300 dpi): a scan."""
    from PIL import Image, ImageDraw, ImageFont

    dejavu = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    font = ImageFont.truetype(str(dejavu), px) if dejavu.is_file() else ImageFont.load_default(size=px)
    width = int(max(font.getlength(x) for x in lines)) + 3 * px
    image = Image.new("L", (width, (len(lines) + 2) * int(px * 1.6)), 255)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((int(1.5 * px), int((i + 1) * px * 1.6)), line, font=font, fill=0)
    return image


def scanned_pdf(pages: list[list[str]]) -> bytes:
    """A PDF whose pages are pictures of these lines (no text layer), at 300 dpi."""
    images = [text_image(lines) for lines in pages]
    out = io.BytesIO()
    images[0].save(out, format="PDF", resolution=300.0, save_all=True, append_images=images[1:])
    return out.getvalue()


def png(lines: list[str]) -> bytes:
    out = io.BytesIO()
    text_image(lines).save(out, format="PNG")
    return out.getvalue()


def html_page(title: str, text: str) -> bytes:
    """A district web page: navigation, a sidebar and a footer around one article holding ``text``."""
    t, body = html.escape(title), html.escape(text)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{t} bell schedule</title></head>
<body>
<header><div class="brand">{t}</div>
<nav><a href="/">Home</a> | <a href="/schools">Schools</a> | <a href="/calendar">Calendar</a></nav></header>
<aside><ul><li><a href="/enroll">Enrollment</a></li><li><a href="/board">Board meetings</a></li></ul></aside>
<main><article><p>{body}</p></article></main>
<footer><p>Copyright 2024 {t}. All rights reserved. Contact us | Privacy policy</p></footer>
</body></html>""".encode()


@dataclass
class Page:
    """What :class:`PageServer` answers at one path."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    etag: str | None = None
    last_modified: str | None = None


class PageServer:
    """An aiohttp server on 127.0.0.1 in its own thread, answering :class:`Page` objects by path.

    ``hits[path]`` counts requests (``conditional[path]`` those with a validator), ``pages`` may be changed
    while it runs; ``handler`` may replace the answer for a path (``(request, hits) -> web.Response``).
    """

    def __init__(self) -> None:
        self.pages: dict[str, Page] = {}
        self.hits: dict[str, int] = {}
        self.conditional: dict[str, int] = {}
        self.handlers: dict[str, Callable] = {}
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def total_hits(self, *, robots: bool = False) -> int:
        return sum(n for p, n in self.hits.items() if robots or p != "/robots.txt")

    async def _handle(self, request):
        from aiohttp import web

        path = request.path_qs
        self.hits[path] = self.hits.get(path, 0) + 1
        if path in self.handlers:
            return await self.handlers[path](request, self.hits[path])
        page = self.pages.get(path)
        if page is None:
            return web.Response(status=404, text="not found")
        headers = dict(page.headers)
        if page.etag:
            headers["ETag"] = page.etag
        if page.last_modified:
            headers["Last-Modified"] = page.last_modified
        inm, ims = request.headers.get("If-None-Match"), request.headers.get("If-Modified-Since")
        if inm or ims:
            self.conditional[path] = self.conditional.get(path, 0) + 1
            if (inm and inm == page.etag) or (not inm and ims and ims == page.last_modified):
                return web.Response(status=304, headers=headers)
        return web.Response(status=page.status, body=page.body, headers=headers)

    def __enter__(self) -> PageServer:
        threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True).start()
        if not self._ready.wait(10):
            raise RuntimeError("the page server did not start")
        return self

    async def _serve(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
