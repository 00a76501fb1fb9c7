"""The embeddings cache: one SQLite file beside the response cache, shared by every job on this machine.

Embeddings are cached like answers: content-addressed. A vector's key is
:func:`vector_key` of the embedding model and the text, so the same text is
embedded once per model, whichever job or run asked first. The file is
``embeddings.sqlite`` in :func:`~llmap.store.cache.default_cache_dir` (WAL mode,
a busy timeout, named migrations), beside ``responses.sqlite``. The job's own
ledger keeps the vectors its operator used too (``op_vectors``), so a job
resumes without it; this file is what another job, or ``--fresh``, reuses.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llmap.store.cache import BUSY_TIMEOUT_MS, canonical_json, default_cache_dir
from llmap.store.diskfull import guard, guard_writes
from llmap.store.migrate import open_store

__all__ = ["FILE_NAME", "VectorCache", "stored_vectors", "vector_key"]

#: The cache's file name inside the cache folder.
FILE_NAME = "embeddings.sqlite"
_CHUNK = 500

MIGRATIONS: list[tuple[str, str]] = [
    (
        "001_vectors",
        """
        CREATE TABLE vectors (
            key TEXT PRIMARY KEY,
            model TEXT NOT NULL,
            dim INTEGER NOT NULL,
            vec BLOB NOT NULL,
            created_at REAL NOT NULL
        );
        """,
    ),
]


def stored_vectors(db: sqlite3.Connection, table: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The float32 vectors among ``keys`` in ``table`` (columns ``key``, ``vec``), read in chunks of
    :data:`_CHUNK` keys (SQLite's limit on bound parameters)."""
    out: dict[str, np.ndarray] = {}
    keys = list(dict.fromkeys(keys))
    for i in range(0, len(keys), _CHUNK):
        chunk = keys[i:i + _CHUNK]
        q = f"SELECT key, vec FROM {table} WHERE key IN ({','.join('?' * len(chunk))})"
        for k, blob in db.execute(q, chunk):
            out[k] = np.frombuffer(blob, dtype=np.float32)
    return out


def vector_key(model: str, text: str) -> str:
    """The key of ``text`` embedded by ``model`` (``provider:name``): SHA-256 of their canonical JSON."""
    return hashlib.sha256(canonical_json({"model": model, "text": text}).encode("utf-8")).hexdigest()


class VectorCache:
    """Embeddings stored by :func:`vector_key`.

    Args:
        path: the SQLite file; default ``default_cache_dir() / "embeddings.sqlite"`` (its folder is created).

    Raises:
        DiskFull: the file cannot be created for lack of space.
        sqlite3.Error: the file cannot be opened or is not an embeddings cache.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_dir() / FILE_NAME
        with guard(self.path, "embeddings cache"):
            self._db = open_store(self.path, MIGRATIONS, busy_timeout_ms=BUSY_TIMEOUT_MS)

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored vectors among ``keys`` (float32)."""
        return stored_vectors(self._db, "vectors", keys)

    @guard_writes("embeddings cache")
    def put_many(self, model: str, items: Sequence[tuple[str, np.ndarray]]) -> None:
        """Store ``(key, vector)`` pairs of ``model`` in one transaction."""
        if not items:
            return
        now = time.time()
        rows = [(k, model, int(v.shape[0]), np.asarray(v, dtype=np.float32).tobytes(), now) for k, v in items]
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO vectors (key, model, dim, vec, created_at) "
                                 "VALUES (?, ?, ?, ?, ?)", rows)

    def close(self) -> None:
        """Close the file."""
        self._db.close()
