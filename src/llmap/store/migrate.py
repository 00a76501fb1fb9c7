"""Named, recorded SQLite migrations (the simonw/llm ``migrations.py`` pattern).

A schema is a list of ``(name, sql)`` pairs applied in order. Each applied
name is recorded in the ``_migrations`` table, so opening a file again runs
only the migrations it has not seen, and a later llmap version can append to
the list without touching what older files already hold.

Each migration runs in its own ``BEGIN IMMEDIATE ... COMMIT`` (all of it or
none of it). Inside the transaction the ``_migrations`` table is checked
again, so two processes opening the same new file at once (several llmap runs
sharing one response cache) apply each migration exactly once: the second
waits for the first's write lock (``busy_timeout``), then sees it done.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

__all__ = ["apply_migrations", "open_store"]


def apply_migrations(db: sqlite3.Connection, migrations: list[tuple[str, str]]) -> None:
    """Apply the migrations ``db`` has not recorded yet, in list order.

    Args:
        db: an open connection in autocommit mode (``isolation_level=None``),
            so that the explicit ``BEGIN IMMEDIATE`` here owns the transaction.
        migrations: ``(name, sql)`` pairs. ``sql`` holds one or more statements
            separated by ``;`` (so a statement must not contain a ``;`` of its
            own, e.g. inside a string literal or a trigger body).

    Raises:
        sqlite3.Error: a statement failed; that migration is rolled back and
            not recorded, and the ones before it stay applied.
    """
    db.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    done = {r[0] for r in db.execute("SELECT name FROM _migrations")}
    for name, sql in migrations:
        if name in done:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have applied it since we looked.
            if db.execute("SELECT 1 FROM _migrations WHERE name = ?", (name,)).fetchone() is None:
                for stmt in sql.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute("INSERT INTO _migrations VALUES (?, ?)", (name, time.time()))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def open_store(path: Path, migrations: list[tuple[str, str]], *, busy_timeout_ms: int) -> sqlite3.Connection:
    """Open (creating its folder) a SQLite store shared across threads and processes: autocommit,
    ``busy_timeout`` first (switching to WAL needs a lock another process may hold), WAL with
    ``synchronous = NORMAL`` (a process kill loses nothing committed), then ``migrations`` applied.

    Raises:
        sqlite3.Error: the file cannot be opened or migrated (the connection is closed first).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000)
    try:
        db.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        apply_migrations(db, migrations)
    except BaseException:
        db.close()
        raise
    return db
