"""The named-migrations runner shared by the ledger and the response cache."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from llmap.store.ledger import MIGRATIONS as LEDGER_MIGRATIONS
from llmap.store.ledger import Ledger
from llmap.store.migrate import apply_migrations

M1 = ("001_a", "CREATE TABLE a (x INTEGER); CREATE INDEX a_x ON a (x)")
M2 = ("002_b", "CREATE TABLE b (y TEXT);\nINSERT INTO b VALUES ('one');")


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA busy_timeout = 5000")
    return db


def applied(db: sqlite3.Connection) -> list[str]:
    return [r[0] for r in db.execute("SELECT name FROM _migrations ORDER BY applied_at, name")]


def tables(db: sqlite3.Connection) -> set[str]:
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")}


def test_applies_in_order_and_records_names(tmp_path: Path) -> None:
    db = connect(tmp_path / "x.sqlite")
    apply_migrations(db, [M1, M2])
    assert applied(db) == ["001_a", "002_b"]
    assert {"a", "a_x", "b"} <= tables(db)
    assert db.execute("SELECT y FROM b").fetchall() == [("one",)]


def test_second_run_is_a_no_op_and_new_migrations_are_added(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite"
    apply_migrations(connect(path), [M1])
    db = connect(path)
    apply_migrations(db, [M1])  # would fail with "table a already exists" if re-run
    assert applied(db) == ["001_a"]
    apply_migrations(db, [M1, M2])
    assert applied(db) == ["001_a", "002_b"]
    assert db.execute("SELECT count(*) FROM b").fetchone() == (1,)


def test_failed_migration_is_rolled_back_and_not_recorded(tmp_path: Path) -> None:
    db = connect(tmp_path / "x.sqlite")
    bad = ("002_bad", "CREATE TABLE c (z INTEGER); CREATE TABLE a (x INTEGER)")
    with pytest.raises(sqlite3.OperationalError, match="already exists"):
        apply_migrations(db, [M1, bad])
    assert applied(db) == ["001_a"]
    assert "c" not in tables(db)
    assert not db.in_transaction


class _RacingMigrations(list):
    """Iterating first lets another connection apply the same migrations (a second process)."""

    def __init__(self, items: list[tuple[str, str]], other: sqlite3.Connection) -> None:
        super().__init__(items)
        self.other = other

    def __iter__(self):
        apply_migrations(self.other, list(super().__iter__()))
        return super().__iter__()


def test_migration_applied_meanwhile_by_another_connection_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite"
    db, other = connect(path), connect(path)
    apply_migrations(db, _RacingMigrations([M1, M2], other))
    assert applied(db) == ["001_a", "002_b"]
    assert db.execute("SELECT count(*) FROM b").fetchone() == (1,)


def test_ledger_uses_the_runner(tmp_path: Path) -> None:
    path = tmp_path / "job.ledger.sqlite"
    with Ledger(path):
        pass
    with Ledger(path) as ledger:  # reopening must not re-apply
        assert ledger.counts(1)["fallback"] == 0
    db = connect(path)
    assert applied(db) == [name for name, _ in LEDGER_MIGRATIONS]
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
