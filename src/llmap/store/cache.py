"""The response cache: one SQLite file shared by every llmap job on this machine.

The cache is content-addressed. A request's key is the SHA-256 of its
canonical JSON (provider, model, parameters, messages, schema; see
:func:`request_key`), so the same request gets the same answer without a
second call, whichever job or row asked first, and any change to the request
(another model, temperature, prompt or schema) misses.

Only *validated* answers are stored: the caller puts an entry after the
parser accepted the answer against the job's schema, never a failure, a
refusal or an answer that did not validate. The cache does not check this.

Entries older than ``ttl_s`` seconds are *stale*: :meth:`ResponseCache.get_many`
hides them, :meth:`ResponseCache.get_stale_many` still returns them, for
stale-if-error (when every model fails for a row, an expired answer beats none).

Several llmap processes may open the file at once: it runs in WAL mode
(readers never wait for the writer) with a ``busy_timeout``, each write is one
short transaction, and the schema comes from named migrations
(:mod:`llmap.store.migrate`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmap.store.diskfull import guard_writes, is_disk_full
from llmap.store.migrate import open_store

__all__ = [
    "CacheEntry",
    "CacheStats",
    "ResponseCache",
    "canonical_json",
    "default_cache_dir",
    "request_key",
]

#: The cache's file name inside the cache folder.
FILE_NAME = "responses.sqlite"

#: How long (milliseconds) a connection waits for another process's write lock.
BUSY_TIMEOUT_MS = 10_000

# Keys per ``IN (...)`` list: well under SQLite's bound-parameter limit (999 before 3.32).
_CHUNK = 500

MIGRATIONS: list[tuple[str, str]] = [
    (
        "001_responses",
        """
        CREATE TABLE responses (
            key TEXT PRIMARY KEY,
            model TEXT NOT NULL,
            output TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            hits INTEGER NOT NULL DEFAULT 0,
            last_hit_at REAL
        );
        CREATE INDEX responses_created_at ON responses (created_at);
        """,
    ),
    (
        # an answer's confidence and latency stay with it (a cached row keeps its _confidence; eval --models)
        "002_confidence_latency",
        """
        ALTER TABLE responses ADD COLUMN confidence REAL;
        ALTER TABLE responses ADD COLUMN latency_s REAL;
        """,
    ),
]


def default_cache_dir() -> Path:
    """llmap's cache folder: ``$LLMAP_CACHE_DIR``, else platformdirs' user cache dir for ``llmap``.

    The response cache (``responses.sqlite``) and downloaded models
    (``models/``) live here. The folder is not created by this function.
    """
    env = os.environ.get("LLMAP_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("llmap"))


def request_key(
    *,
    provider: str,
    model: str,
    params: Mapping[str, Any],
    messages: Sequence[Mapping[str, Any]],
    schema: Mapping[str, Any] | None,
) -> str:
    """The cache key of one request: SHA-256 (64 hex digits) of its canonical JSON.

    Canonical JSON is ``json.dumps`` with ``sort_keys=True``, the separators
    ``(",", ":")`` and ``ensure_ascii=False`` of the object
    ``{"provider", "model", "params", "messages", "schema"}``, so the order of
    mapping keys (parameters, schema properties) never changes the key, while
    any change of value does. Note that JSON tells ``1`` from ``1.0``: pass
    parameters with stable types.

    Args:
        provider: the provider's name, e.g. ``"openai"``.
        model: the model name as sent, e.g. ``"gpt-4o-mini"``.
        params: sampling parameters sent with the request (temperature, max_tokens, ...).
        messages: the chat messages, in order (their order matters).
        schema: the JSON schema the answer must follow, or None.

    Raises:
        TypeError: a value is not JSON-serialisable.
        ValueError: a float is NaN or infinite (not valid JSON).
    """
    canonical = canonical_json({"provider": provider, "model": model, "params": params, "messages": messages,
                                "schema": schema})
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def canonical_json(value: Any) -> str:
    """``value`` as canonical JSON: sorted keys, no spaces, UTF-8 text kept, NaN refused (:func:`request_key`).

    Raises:
        TypeError: a value is not JSON-serialisable.
        ValueError: a float is NaN or infinite.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One cached answer.

    Attributes:
        key: the request key (:func:`request_key`).
        model: ``provider:name`` of the model that answered.
        output: the validated answer, field name -> value (JSON-serialisable).
        prompt_tokens, completion_tokens: the usage of the original call (tokens).
        created_at: clock seconds (POSIX time by default) when the answer was
            stored; None in an entry handed to :meth:`ResponseCache.put_many`
            means "now".
        hits: times the entry was served (set by reads; ignored by ``put_many``).
        fresh: False when the entry is older than the cache's TTL (set by reads).
        confidence: the answer's confidence (:mod:`llmap.quality.confidence`); None: stored without one.
        latency_s: seconds the original request took, or None when unknown.
    """

    key: str
    model: str
    output: dict[str, Any]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    created_at: float | None = None
    hits: int = 0
    fresh: bool = True
    confidence: float | None = None
    latency_s: float | None = None


@dataclass(frozen=True, slots=True)
class CacheStats:
    """What the cache holds.

    Attributes:
        path: the SQLite file.
        entries: cached answers.
        size_bytes: bytes on disk: the file plus its WAL file.
        hits: times any entry was served, summed.
        oldest_created_at, newest_created_at: clock seconds, or None when empty.
        by_model: ``provider:name`` -> entries, most entries first.
    """

    path: Path
    entries: int
    size_bytes: int
    hits: int
    oldest_created_at: float | None
    newest_created_at: float | None
    by_model: dict[str, int] = field(default_factory=dict)


def _chunks(keys: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(keys), _CHUNK):
        yield keys[i : i + _CHUNK]


class ResponseCache:
    """The persistent response cache (a SQLite file; see the module docstring).

    Thread-safe: one connection guarded by a lock. Use as a context manager
    or call :meth:`close`.

    Args:
        path: the SQLite file; default ``default_cache_dir() / "responses.sqlite"``.
            Its folder is created if missing.
        ttl_s: seconds an entry stays fresh; None (default) = forever.
        clock: returns the current time in seconds (POSIX time by default);
            tests inject a fake one to move time without sleeping.
        readonly: open an existing file read-only: nothing is written or
            migrated (read with ``count_hits=False``); ``sqlite3.Error`` when
            it does not exist.

    Raises:
        ValueError: ``ttl_s`` is negative.
        sqlite3.Error: the file cannot be opened or is not a response cache.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.time,
        readonly: bool = False,
    ) -> None:
        if ttl_s is not None and ttl_s < 0:
            raise ValueError(f"ttl_s must be >= 0 seconds or None, not {ttl_s!r}")
        self.path = Path(path) if path is not None else default_cache_dir() / FILE_NAME
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._extra = "confidence, latency_s"  # columns an older file, opened read-only, may lack
        if readonly:  # an existing file, never written or migrated (``llmap estimate``): use count_hits=False
            self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            cols = {r[1] for r in self._db.execute("PRAGMA table_info(responses)")}
            if "confidence" not in cols:
                self._extra = "NULL, NULL"
            return
        self._db = open_store(self.path, MIGRATIONS, busy_timeout_ms=BUSY_TIMEOUT_MS)

    # -- lifecycle ------------------------------------------------------------
    def close(self) -> None:
        """Close the connection. Further calls raise ``sqlite3.ProgrammingError``."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------
    def get_many(self, keys: Iterable[str], *, count_hits: bool = True) -> dict[str, CacheEntry]:
        """The fresh entries among ``keys`` (younger than ``ttl_s``).

        Args:
            keys: request keys; unknown and duplicate keys are fine.
            count_hits: count the entries found as hits now (one write
                transaction). A run passes False and counts the hits it
                actually serves with :meth:`record_hits`, in batches.

        Returns:
            key -> entry for each key found and fresh; missing keys are absent.
        """
        return self._get(keys, stale_ok=False, count_hits=count_hits)

    def get_stale_many(self, keys: Iterable[str]) -> dict[str, CacheEntry]:
        """The entries among ``keys`` whatever their age, counted as hits.

        For stale-if-error: when every model failed for a row, an expired
        answer is served rather than none. ``entry.fresh`` tells which is which.

        Args:
            keys: request keys; unknown and duplicate keys are fine.

        Returns:
            key -> entry for each key found.
        """
        return self._get(keys, stale_ok=True)

    def _get(self, keys: Iterable[str], *, stale_ok: bool, count_hits: bool = True) -> dict[str, CacheEntry]:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        now = self._clock()
        cutoff = now - self.ttl_s if self.ttl_s is not None else None
        found: dict[str, CacheEntry] = {}
        with self._lock:
            for chunk in _chunks(wanted):
                marks = ",".join("?" * len(chunk))
                sql = (
                    f"SELECT key, model, output, prompt_tokens, completion_tokens, created_at, hits, {self._extra} "
                    f"FROM responses WHERE key IN ({marks})"
                )
                args: list[Any] = list(chunk)
                if cutoff is not None and not stale_ok:
                    sql += " AND created_at > ?"
                    args.append(cutoff)
                for key, model, output, pt, ct, created_at, hits, conf, latency in self._db.execute(sql, args):
                    found[key] = CacheEntry(
                        key=key,
                        model=model,
                        output=json.loads(output),
                        prompt_tokens=pt,
                        completion_tokens=ct,
                        created_at=created_at,
                        hits=hits + 1,
                        fresh=cutoff is None or created_at > cutoff,
                        confidence=conf, latency_s=latency,
                    )
            if found and count_hits:
                self._count_hits(list(found), now)
        return found

    def record_hits(self, keys: Sequence[str], *, wait: bool = False) -> None:
        """Count ``keys`` as served once each (hits and ``last_hit_at``), in one transaction.

        Hit counts are statistics: when another process holds the write lock
        (beyond the busy timeout, or at once when ``wait`` is False) the count
        is skipped rather than blocking or failing the caller.
        """
        if not keys:
            return
        with self._lock, self._busy_timeout(wait):
            self._count_hits(list(keys), self._clock())

    @contextlib.contextmanager
    def _busy_timeout(self, wait: bool) -> Iterator[None]:
        """Inside: a locked file fails at once unless ``wait`` (then up to :data:`BUSY_TIMEOUT_MS`)."""
        if wait:
            yield
            return
        self._db.execute("PRAGMA busy_timeout = 0")
        try:
            yield
        finally:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    def _count_hits(self, keys: list[str], now: float) -> None:
        # Hit counts are statistics: a writer holding the lock past busy_timeout
        # must not fail a read, so a locked database skips the count; so does a full disk.
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return
        try:
            for chunk in _chunks(keys):
                marks = ",".join("?" * len(chunk))
                self._db.execute(
                    f"UPDATE responses SET hits = hits + 1, last_hit_at = ? WHERE key IN ({marks})",
                    [now, *chunk],
                )
            self._db.execute("COMMIT")
        except BaseException as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if is_disk_full(exc):
                return
            raise

    # -- writing --------------------------------------------------------------
    @guard_writes("response cache")
    def put_many(self, entries: Iterable[CacheEntry], *, wait: bool = True) -> int:
        """Store answers in one transaction; an existing key is overwritten.

        The caller guarantees that every entry is a *validated* answer (it
        passed the job's schema); failures are never cached. Overwriting keeps
        the key's hit count and restarts its age.

        Args:
            entries: the answers; ``created_at=None`` stamps them with the clock's now.
            wait: when another process holds the write lock, wait for it (up
                to :data:`BUSY_TIMEOUT_MS`). With False, a locked file writes
                nothing and returns 0 at once (try again later), so an event
                loop is never held for seconds.

        Returns:
            The number of entries written.

        Raises:
            TypeError: an output is not JSON-serialisable (nothing is written).
            DiskFull: the disk is full (nothing is written).
        """
        now = self._clock()
        rows = [
            (
                e.key,
                e.model,
                json.dumps(e.output, ensure_ascii=False, separators=(",", ":"), allow_nan=False),
                e.prompt_tokens,
                e.completion_tokens,
                now if e.created_at is None else e.created_at,
                e.confidence, e.latency_s,
            )
            for e in entries
        ]
        if not rows:
            return 0
        with self._lock, self._busy_timeout(wait):
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if wait or "locked" not in str(exc):
                    raise
                return 0
            try:
                self._db.executemany(
                    "INSERT INTO responses (key, model, output, prompt_tokens, completion_tokens, created_at, "
                    "confidence, latency_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                    "model = excluded.model, output = excluded.output, prompt_tokens = excluded.prompt_tokens, "
                    "completion_tokens = excluded.completion_tokens, created_at = excluded.created_at, "
                    "confidence = coalesce(excluded.confidence, responses.confidence), "
                    "latency_s = coalesce(excluded.latency_s, responses.latency_s)",
                    rows,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(rows)

    def prune(self, older_than_s: float) -> int:
        """Delete the entries stored more than ``older_than_s`` seconds ago.

        Args:
            older_than_s: age in seconds (>= 0); ``0`` deletes every entry stored before now.

        Returns:
            The number of entries deleted.

        Raises:
            ValueError: ``older_than_s`` is negative.
        """
        if older_than_s < 0:
            raise ValueError(f"older_than_s must be >= 0 seconds, not {older_than_s!r}")
        cutoff = self._clock() - older_than_s
        with self._lock:
            return self._db.execute("DELETE FROM responses WHERE created_at < ?", (cutoff,)).rowcount

    def clear(self) -> int:
        """Delete every entry. Returns the number deleted."""
        with self._lock:
            return self._db.execute("DELETE FROM responses").rowcount

    def vacuum(self) -> bool:
        """Give freed pages back to the file system (after a large prune or clear).

        Returns:
            False when another process was using the file, so nothing was done.
        """
        with self._lock:
            try:
                self._db.execute("VACUUM")
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError:
                return False
        return True

    # -- statistics -----------------------------------------------------------
    def stats(self) -> CacheStats:
        """Counts, size on disk, hits and age range of the cache (see :class:`CacheStats`)."""
        with self._lock:
            entries, hits, oldest, newest = self._db.execute(
                "SELECT count(*), coalesce(sum(hits), 0), min(created_at), max(created_at) FROM responses"
            ).fetchone()
            by_model = dict(
                self._db.execute(
                    "SELECT model, count(*) AS n FROM responses GROUP BY model ORDER BY n DESC, model"
                ).fetchall()
            )
        size = 0
        for p in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(FileNotFoundError):
                size += p.stat().st_size
        return CacheStats(
            path=self.path,
            entries=entries,
            size_bytes=size,
            hits=hits,
            oldest_created_at=oldest,
            newest_created_at=newest,
            by_model=by_model,
        )
