"""The ledger's ``labels`` table: the true answers a person gave, per row and field.

One value per ``(key, field)``, stored as JSON text with where it came from (``source``: the file
``llmap label`` read, ``review:...``) and when. Importing a label again for the same row and field
replaces it. Labels are never touched by a run or a rollback.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["Label", "read_labels", "write_labels"]


@dataclass(frozen=True, slots=True)
class Label:
    """One true answer.

    Attributes:
        key: the row's key (as the ledger keeps it).
        field: the output field.
        value: the true value (typed as the field: str, int, float, bool, or None for "null").
        source: where it came from (a file name, ``gold:COLUMN``).
    """

    key: str
    field: str
    value: Any
    source: str


def write_labels(db: sqlite3.Connection, labels: Iterable[Label], *, now: float | None = None) -> int:
    """Store labels in one transaction (a label for the same row and field replaces the old one).

    Returns:
        How many were written.
    """
    stamp = time.time() if now is None else now
    rows = [(lb.key, lb.field, json.dumps(lb.value, ensure_ascii=False), lb.source, stamp) for lb in labels]
    with db:
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO labels (key, field, value, source, created_at) VALUES (?, ?, ?, ?, ?) "
                       "ON CONFLICT (key, field) DO UPDATE SET value = excluded.value, source = excluded.source, "
                       "created_at = excluded.created_at", rows)
    return len(rows)


def read_labels(db: sqlite3.Connection) -> list[Label]:
    """Every stored label, by key and field."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'labels'").fetchone() is None:
        return []
    return [Label(k, f, json.loads(v) if v is not None else None, s)
            for k, f, v, s in db.execute("SELECT key, field, value, source FROM labels ORDER BY key, field")]
