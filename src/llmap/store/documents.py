"""The document store: fetched bodies by URL and validator, extracted text by content, file hashes by stat.

One SQLite file beside the response cache, ``$LLMAP_CACHE_DIR/documents.sqlite``
(its own file and tables: the response cache's are not touched), shared by
every job on the machine:

- ``fetched``: per URL, the body's SHA-256, its ``Content-Type``, its
  validators (``ETag``, ``Last-Modified``), when it was fetched and when the
  server last confirmed it (a ``304 Not Modified``). :mod:`llmap.io.fetch`
  reads it to send conditional requests and to skip the network while an
  entry is younger than ``[fetch] max_age``.
- ``bodies``: the fetched bodies, by SHA-256 (two URLs with one body store it once).
- ``texts``: extracted text per ``(SHA-256, recipe)``: the recipe names the kind
  the bytes were read as, the OCR language and the extractor's version, so a
  document is extracted (and OCR'd) once, whichever job, row or name it
  comes under.
- ``files``: a local file's SHA-256 keyed by its path, size and mtime, so a
  rerun hashes only the files that changed.

The store is a cache: deleting the file loses nothing but time. It runs in
WAL mode with a ``busy_timeout`` (several runs may share it), its schema comes
from named migrations (:mod:`llmap.store.migrate`), and a full disk is one
:class:`~llmap.errors.DiskFull` naming it (:mod:`llmap.store.diskfull`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmap.store.cache import default_cache_dir
from llmap.store.diskfull import guard_writes
from llmap.store.migrate import open_store

__all__ = ["FILE_NAME", "DocumentStore", "FetchedEntry", "TextEntry"]

#: The store's file name inside the cache folder.
FILE_NAME = "documents.sqlite"
#: How long (milliseconds) a connection waits for another process's write lock.
BUSY_TIMEOUT_MS = 10_000

MIGRATIONS: list[tuple[str, str]] = [
    (
        "001_documents",
        """
        CREATE TABLE bodies (
            sha256 TEXT PRIMARY KEY,
            data BLOB NOT NULL,
            stored_at REAL NOT NULL
        );
        CREATE TABLE fetched (
            url TEXT PRIMARY KEY,
            sha256 TEXT NOT NULL,
            content_type TEXT,
            etag TEXT,
            last_modified TEXT,
            final_url TEXT NOT NULL,
            fetched_at REAL NOT NULL,
            checked_at REAL NOT NULL
        );
        CREATE TABLE texts (
            sha256 TEXT NOT NULL,
            recipe TEXT NOT NULL,
            pages TEXT NOT NULL,
            total_pages INTEGER NOT NULL,
            ocr_pages INTEGER NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (sha256, recipe)
        );
        CREATE TABLE files (
            path TEXT PRIMARY KEY,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            sha256 TEXT NOT NULL
        )
        """,
    ),
]


@dataclass(frozen=True, slots=True)
class FetchedEntry:
    """What the store knows about one URL.

    Attributes:
        url: the URL as the row gave it.
        sha256: the body's SHA-256 (hex).
        content_type: the answer's ``Content-Type``, or None.
        etag, last_modified: the validators the server sent, or None.
        final_url: where the redirects ended.
        fetched_at: when the body was fetched (POSIX seconds).
        checked_at: when the server last confirmed it (the fetch, or a later 304).
    """

    url: str
    sha256: str
    content_type: str | None
    etag: str | None
    last_modified: str | None
    final_url: str
    fetched_at: float
    checked_at: float


@dataclass(frozen=True, slots=True)
class TextEntry:
    """A document's extracted text.

    Attributes:
        pages: the text of each page extracted, in order (normalised; see :mod:`llmap.io.extract`).
        total_pages: the document's pages; more than ``len(pages)`` when extraction stopped once
            the pages held more than the column's ``max_tokens``.
        ocr_pages: how many of ``pages`` were read by OCR.
    """

    pages: tuple[str, ...]
    total_pages: int
    ocr_pages: int

    @property
    def complete(self) -> bool:
        """Every page was extracted."""
        return len(self.pages) >= self.total_pages


class DocumentStore:
    """The SQLite document store (see the module docstring).

    Args:
        path: the SQLite file; default ``default_cache_dir() / "documents.sqlite"``; its folder is
            created if missing.
        clock: POSIX seconds now (tests inject a fake one).
        readonly: open an existing file read-only (``llmap estimate``): nothing is written, and the
            ``put_*`` methods do nothing.

    Raises:
        sqlite3.Error: the file cannot be opened, or (``readonly``) does not exist.
    """

    def __init__(self, path: Path | None = None, *, clock: Callable[[], float] = time.time,
                 readonly: bool = False) -> None:
        self.path = Path(path) if path is not None else default_cache_dir() / FILE_NAME
        self.readonly = readonly
        self._clock = clock
        self._lock = threading.Lock()
        if readonly:
            self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            return
        self._db = open_store(self.path, MIGRATIONS, busy_timeout_ms=BUSY_TIMEOUT_MS)

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    # -- local files ------------------------------------------------------------------------
    def file_hash(self, path: str, size: int, mtime_ns: int) -> str | None:
        """The SHA-256 recorded for ``path`` at this size and mtime (nanoseconds), or None."""
        with self._lock:
            row = self._db.execute("SELECT sha256 FROM files WHERE path = ? AND size = ? AND mtime_ns = ?",
                                   (path, size, mtime_ns)).fetchone()
        return row[0] if row else None

    @guard_writes("document cache")
    def put_file_hash(self, path: str, size: int, mtime_ns: int, sha256: str) -> None:
        """Record ``path``'s SHA-256 at this size and mtime."""
        if self.readonly:
            return
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", (path, size, mtime_ns, sha256))

    # -- fetched URLs -------------------------------------------------------------------------
    def fetched(self, url: str) -> FetchedEntry | None:
        """What was fetched from ``url``, or None."""
        with self._lock:
            row = self._db.execute("SELECT url, sha256, content_type, etag, last_modified, final_url, fetched_at, "
                                   "checked_at FROM fetched WHERE url = ?", (url,)).fetchone()
        return FetchedEntry(*row) if row else None

    def body(self, sha256: str) -> bytes | None:
        """A stored body by its SHA-256, or None."""
        with self._lock:
            row = self._db.execute("SELECT data FROM bodies WHERE sha256 = ?", (sha256,)).fetchone()
        return bytes(row[0]) if row else None

    @guard_writes("document cache")
    def put_fetched(self, entry: FetchedEntry, body: bytes) -> None:
        """Record a fetched body and its validators (one transaction)."""
        if self.readonly:
            return
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT OR IGNORE INTO bodies VALUES (?, ?, ?)", (entry.sha256, body, self._clock()))
            self._db.execute("INSERT OR REPLACE INTO fetched VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (entry.url, entry.sha256, entry.content_type, entry.etag, entry.last_modified,
                              entry.final_url, entry.fetched_at, entry.checked_at))

    @guard_writes("document cache")
    def confirm(self, url: str, checked_at: float) -> None:
        """The server confirmed ``url``'s stored body (a ``304 Not Modified``) at ``checked_at``."""
        if self.readonly:
            return
        with self._lock:
            self._db.execute("UPDATE fetched SET checked_at = ? WHERE url = ?", (checked_at, url))

    # -- extracted text -----------------------------------------------------------------------
    def text(self, sha256: str, recipe: str) -> TextEntry | None:
        """The text extracted from the bytes ``sha256`` by ``recipe``, or None."""
        with self._lock:
            row = self._db.execute("SELECT pages, total_pages, ocr_pages FROM texts WHERE sha256 = ? AND recipe = ?",
                                   (sha256, recipe)).fetchone()
        if row is None:
            return None
        return TextEntry(tuple(json.loads(row[0])), int(row[1]), int(row[2]))

    @guard_writes("document cache")
    def put_text(self, sha256: str, recipe: str, entry: TextEntry) -> None:
        """Record the text extracted from the bytes ``sha256`` by ``recipe``."""
        if self.readonly:
            return
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO texts VALUES (?, ?, ?, ?, ?, ?)",
                             (sha256, recipe, json.dumps(list(entry.pages), ensure_ascii=False), entry.total_pages,
                              entry.ocr_pages, self._clock()))

    # -- housekeeping -------------------------------------------------------------------------
    @guard_writes("document cache")
    def prune(self, older_than_s: float) -> int:
        """Forget what was fetched, extracted or hashed more than ``older_than_s`` seconds ago.

        Returns:
            The URLs, texts and file hashes forgotten. Bodies no URL points to any more go too.
        """
        if self.readonly:
            return 0
        cutoff = self._clock() - older_than_s
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            n = self._db.execute("DELETE FROM fetched WHERE checked_at < ?", (cutoff,)).rowcount
            n += self._db.execute("DELETE FROM texts WHERE created_at < ?", (cutoff,)).rowcount
            self._db.execute("DELETE FROM bodies WHERE sha256 NOT IN (SELECT sha256 FROM fetched)")
        return n
