"""``[input.documents]`` (columns that hold a path or URL to a document) and ``[fetch]`` (how URLs are fetched).

::

    [input]
    path = "districts.csv"
    document_dirs = ["/srv/schedules"]      # folders document paths may point into, besides the job's own

    [input.documents]
    schedule = { kind = "pdf", max_tokens = 4000 }   # kind: "auto" (default), "pdf", "html", "image", "text"

    [fetch]
    allow_private = true                    # let URLs reach loopback and private addresses (off by default)

The column's value is a path (relative paths resolve against the job file's
folder) or an ``http(s)://`` URL; the template reads the column like any other
(``{{ schedule }}``) and gets the document's text. See :mod:`llmap.io.documents`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from llmap.durations import parse_duration
from llmap.spec.base import StrictModel

__all__ = ["DOCUMENT_KINDS", "DocumentSpec", "FetchSpec"]

#: The kinds a document column may declare.
DOCUMENT_KINDS = ("auto", "pdf", "html", "image", "text")


class DocumentSpec(StrictModel):
    """One document column: ``[input.documents] COLUMN = { kind = "pdf", max_tokens = 4000 }``.

    Args (TOML keys):
        kind: ``"pdf"`` (the text layer; pages without one are read by OCR), ``"html"`` (the page's main
            text), ``"image"`` (sent as an image part to models that take images, else read by OCR),
            ``"text"`` (plain text), or ``"auto"`` (default): from the file's first bytes, its
            ``Content-Type`` and its name.
        max_tokens: the most tokens of the document a prompt gets (default 4,000, counted as
            characters / 4). Longer documents are cut at a page boundary (a paragraph's, for a page
            with no pages) and the prompt says so.
        ocr_lang: Tesseract's language(s) for OCR, e.g. ``"eng"`` (default) or ``"eng+spa"``; each needs
            its language data installed (Debian: ``tesseract-ocr-spa``).
    """

    kind: Literal["auto", "pdf", "html", "image", "text"] = "auto"
    max_tokens: int = Field(default=4000, ge=1)
    ocr_lang: str = Field(default="eng", pattern=r"^[A-Za-z_]+(\+[A-Za-z_]+)*$")


class FetchSpec(StrictModel):
    """``[fetch]``: how document URLs are fetched (politely; see :mod:`llmap.io.fetch`).

    Args (TOML keys):
        allow_private: let URLs reach loopback, private, link-local and other non-public addresses
            (tests, intranets). Default false: such a URL fails its row.
        per_host_rpm: requests per minute to one host (default 60); a ``Crawl-delay`` in robots.txt
            or a ``Retry-After`` slows it further.
        per_host_concurrency: requests in flight to one host at once (default 2).
        max_mb: the largest body fetched, in megabytes (default 20); a larger page fails its row.
        timeout_s: seconds for one request, connect to last byte (default 30).
        max_redirects: redirects followed per URL (default 5); each hop is checked like the URL.
        max_attempts: attempts per URL, the first included (default 3); only transient errors
            (429, 5xx, timeouts, refused connections) are retried, with backoff and ``Retry-After``.
        robots: obey robots.txt (default true).
        max_age: how long a fetched body is used without asking the server again (default ``"1d"``);
            after that llmap revalidates it with ``If-None-Match`` / ``If-Modified-Since``.
        user_agent: the ``User-Agent`` header, and the name robots.txt rules are matched against
            (default ``"llmap"``).
    """

    allow_private: bool = False
    per_host_rpm: float = Field(default=60.0, gt=0)
    per_host_concurrency: int = Field(default=2, ge=1)
    max_mb: float = Field(default=20.0, gt=0)
    timeout_s: float = Field(default=30.0, gt=0)
    max_redirects: int = Field(default=5, ge=0)
    max_attempts: int = Field(default=3, ge=1, le=20)
    robots: bool = True
    max_age: str = "1d"
    user_agent: str = Field(default="llmap", min_length=1)

    @field_validator("max_age")
    @classmethod
    def _duration(cls, v: str) -> str:
        try:
            parse_duration(v)
        except ValueError:
            raise ValueError(f"max_age {v!r} is not a duration; write e.g. \"1d\", \"12h\" or \"0s\"") from None
        return v

    @property
    def max_age_s(self) -> float:
        """``max_age`` in seconds."""
        return parse_duration(self.max_age)

    @property
    def max_bytes(self) -> int:
        """``max_mb`` in bytes (10^6 bytes a megabyte)."""
        return int(self.max_mb * 1_000_000)
