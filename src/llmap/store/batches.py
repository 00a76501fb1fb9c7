"""The ledger's record of batches: what was submitted, where, and which rows each line answers.

A batch goes through these states (``batches.state``), each written and
committed before the step that depends on it:

- ``intent``: written *before* the batch is created at the provider, with its
  tag, the hash of its file, its request count and its lines
  (``batch_lines``: custom id -> pack item -> row keys). A crash from here on
  leaves a record to reconcile: the provider's list of batches says whether
  it was created (:meth:`~llmap.providers.batch.base.BatchAPI.find`);
- ``open``: the provider answered with its id (``provider_id``), recorded at once;
- ``collected``: its results were applied to the rows (or it was refused at
  validation: no request of it ran);
- ``dropped``: it was never created (refused before creation, or not found
  when reconciled): its rows are free again.

A row in a batch that is ``intent`` or ``open`` is *held*: no other batch
and no real-time request takes it while that batch may still answer it.
Rows stay ``pending`` in ``rows`` all along; a line's answer settles them
like any other answer.

A line answers one request: one row, or one pack of rows (``item`` is the
row id inside the pack). Rows whose request is identical to a line's (the
same cache key) are attached to that line as well and get its answer:
duplicates are never submitted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from llmap.store.diskfull import guard_writes
from llmap.store.ledger import Ledger

__all__ = ["BatchBook", "BatchRecord", "Line"]

#: States in which a batch may still answer its rows.
HELD = ("intent", "open")
_COLUMNS = ("id, run, model, provider, tag, requests, bytes, tokens, state, provider_id, status, counts, error, "
            "cancel, created_at, submitted_at, seen_at, ended_at")


@dataclass(frozen=True, slots=True)
class Line:
    """One row's place in a batch: ``custom_id`` (the line), ``item`` (its id inside a pack; the leading row's
    key), ``key`` (the row), ``ckey`` (the cache key of the item's single-row request, or None) and
    ``input_hash`` (the row's input hash when it was submitted: a row whose inputs, prompt or model changed since
    is neither held by the line nor settled by its answer)."""

    custom_id: str
    item: str
    key: str
    ckey: str | None = None
    input_hash: str | None = None


@dataclass
class BatchRecord:
    """One row of ``batches`` (times are POSIX seconds)."""

    id: int
    run: int
    model: str
    provider: str
    tag: str
    requests: int
    bytes: int
    tokens: int
    state: str
    provider_id: str | None
    status: str | None
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    cancel: str | None = None
    created_at: float = 0.0
    submitted_at: float | None = None
    seen_at: float | None = None
    ended_at: float | None = None

    @property
    def held(self) -> bool:
        """True while the batch may still answer its rows."""
        return self.state in HELD


def _record(row: tuple) -> BatchRecord:
    r = list(row)
    r[11] = json.loads(r[11]) if r[11] else {}
    return BatchRecord(*r)


class BatchBook:
    """Reads and writes the batch tables of a job's ledger (migration ``006_batches``).

    Args:
        ledger: the job's ledger, open for writing (or read-only, for the readers).
    """

    def __init__(self, ledger: Ledger, *, model: str | None = None) -> None:
        """``model``: see only that model's batches (its label, ``"openai:gpt-4o"``) where held batches are read:
        a guaranteed cascade's phase collects its own model's batches, never the other phase's."""
        self.db = ledger.connection
        self.path = ledger.path  # a full disk names the ledger
        self._only = " AND model = ?" if model is not None else ""
        self._only_b = " AND b.model = ?" if model is not None else ""
        self._args: tuple = (model,) if model is not None else ()

    # -- writing --------------------------------------------------------------
    @guard_writes("ledger")
    def intent(self, *, run: int, model: str, provider: str, tag: str, file_hash: str, requests: int, size: int,
               tokens: int, lines: Iterable[Line], now: float | None = None) -> int:
        """Record a batch about to be created, with its lines, in one transaction; returns its local id."""
        now = time.time() if now is None else now
        with self.db:
            self.db.execute("BEGIN")
            cur = self.db.execute(
                "INSERT INTO batches (run, model, provider, tag, file_hash, requests, bytes, tokens, state, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'intent', ?)",
                (run, model, provider, tag, file_hash, requests, size, tokens, now))
            bid = int(cur.lastrowid)
            self.db.executemany("INSERT INTO batch_lines (batch, custom_id, item, key, ckey, input_hash) "
                                "VALUES (?, ?, ?, ?, ?, ?)",
                                [(bid, ln.custom_id, ln.item, ln.key, ln.ckey, ln.input_hash) for ln in lines])
        return bid

    @guard_writes("ledger")
    def attach(self, batch: int, lines: Iterable[Line]) -> None:
        """Attach rows to lines of a held batch (their request is identical to the line's item)."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR IGNORE INTO batch_lines (batch, custom_id, item, key, ckey, input_hash) "
                                "VALUES (?, ?, ?, ?, ?, ?)",
                                [(batch, ln.custom_id, ln.item, ln.key, ln.ckey, ln.input_hash) for ln in lines])

    @guard_writes("ledger")
    def opened(self, batch: int, provider_id: str, status: str, *, now: float | None = None) -> None:
        """The provider created the batch: record its id (state ``open``)."""
        now = time.time() if now is None else now
        self.db.execute("UPDATE batches SET state = 'open', provider_id = ?, status = ?, submitted_at = ?, "
                        "seen_at = ? WHERE id = ?", (provider_id, status, now, now, batch))

    @guard_writes("ledger")
    def seen(self, batch: int, status: str, counts: dict[str, int], *, now: float | None = None) -> None:
        """The provider's status and request counts, as last polled."""
        self.db.execute("UPDATE batches SET status = ?, counts = ?, seen_at = ? WHERE id = ?",
                        (status, json.dumps(counts), time.time() if now is None else now, batch))

    @staticmethod
    def collected_sql(batch: int, status: str, counts: dict[str, int], *, error: str | None = None,
                      now: float | None = None) -> tuple[str, tuple]:
        """The statement that marks a batch collected: committed with its results
        (:meth:`Ledger.record <llmap.store.ledger.Ledger.record>`'s ``also``), so a crash never applies them twice."""
        now = time.time() if now is None else now
        return ("UPDATE batches SET state = 'collected', status = ?, counts = ?, error = ?, seen_at = ?, ended_at = ? "
                "WHERE id = ?", (status, json.dumps(counts), error, now, now, batch))

    @guard_writes("ledger")
    def dropped(self, batch: int, error: str, *, now: float | None = None) -> None:
        """The batch was never created: its rows are free again."""
        self.db.execute("UPDATE batches SET state = 'dropped', error = ?, ended_at = ? WHERE id = ?",
                        (error, time.time() if now is None else now, batch))

    @guard_writes("ledger")
    def cancelling(self, batch: int, why: str) -> None:
        """Record that llmap (``deadline``) or the user (``user``) asked the provider to cancel the batch."""
        self.db.execute("UPDATE batches SET cancel = ? WHERE id = ?", (why, batch))

    # -- reading --------------------------------------------------------------
    def held(self) -> list[BatchRecord]:
        """Batches that may still answer (``intent`` or ``open``), oldest first."""
        return [_record(r) for r in self.db.execute(
            f"SELECT {_COLUMNS} FROM batches WHERE state IN ('intent', 'open'){self._only} ORDER BY id", self._args)]

    def get(self, batch: int) -> BatchRecord:
        """One batch by its local id."""
        return _record(self.db.execute(f"SELECT {_COLUMNS} FROM batches WHERE id = ?", (batch,)).fetchone())

    def recent(self, limit: int = 50) -> list[BatchRecord]:
        """The latest batches, newest first (``llmap status``)."""
        return [_record(r) for r in self.db.execute(f"SELECT {_COLUMNS} FROM batches ORDER BY id DESC LIMIT ?",
                                                    (limit,))]

    def known_ids(self) -> set[str]:
        """Every provider id the ledger holds."""
        return {r[0] for r in self.db.execute("SELECT provider_id FROM batches WHERE provider_id IS NOT NULL")}

    def lines(self, batch: int) -> list[Line]:
        """The rows of one batch's lines."""
        return [Line(*r) for r in self.db.execute(
            "SELECT custom_id, item, key, ckey, input_hash FROM batch_lines WHERE batch = ? ORDER BY rowid",
            (batch,))]

    def row_data(self, batch: int) -> dict[str, tuple[str, str]]:
        """Row key -> (status, data JSON) for every row of one batch's lines; a row whose input hash changed
        since it was submitted has the status ``"changed"`` (the line's answer is not its answer any more)."""
        return {k: (st if h is None or h == ih else "changed", d) for k, st, d, h, ih in self.db.execute(
            "SELECT r.key, r.status, r.data, l.input_hash, r.input_hash FROM batch_lines l JOIN rows r "
            "ON r.key = l.key WHERE l.batch = ?", (batch,))}

    def held_items(self) -> dict[str, tuple[int, str, str]]:
        """Cache key -> (batch, custom id, item) of every item of a held batch: an identical row joins it."""
        return {ck: (b, cid, item) for ck, b, cid, item in self.db.execute(
            "SELECT l.ckey, l.batch, l.custom_id, l.item FROM batch_lines l JOIN batches b ON b.id = l.batch "
            f"WHERE b.state IN ('intent', 'open') AND l.ckey IS NOT NULL AND l.item = l.key{self._only_b}", self._args)}

    def free_pending(self, plan: int, *, after_seq: int, limit: int,
                     only: str | None = None) -> list[tuple[int, str, str, str]]:
        """Up to ``limit`` pending rows of ``plan`` after ``after_seq`` that no held batch holds (a row changed
        since its batch took it is free): ``(seq, key, data JSON, input hash)``. ``only``: a further condition
        over ``rows`` (a guaranteed cascade's phase: :mod:`llmap.run.guaranteed`)."""
        extra = f" AND ({only})" if only else ""
        return self.db.execute(
            "SELECT seq, key, data, input_hash FROM rows WHERE plan = ? AND status = 'pending' AND seq > ? AND "
            "key NOT IN (SELECT l.key FROM batch_lines l JOIN batches b ON b.id = l.batch JOIN rows r "
            "ON r.key = l.key WHERE b.state IN ('intent', 'open') AND (l.input_hash IS NULL "
            f"OR l.input_hash = r.input_hash)){extra} ORDER BY seq LIMIT ?", (plan, after_seq, limit)).fetchall()

    def held_rows(self) -> int:
        """Rows held by batches that may still answer."""
        return int(self.db.execute(
            "SELECT count(DISTINCT l.key) FROM batch_lines l JOIN batches b ON b.id = l.batch "
            f"WHERE b.state IN ('intent', 'open'){self._only_b}", self._args).fetchone()[0])

    def summary(self, plan: int) -> list[dict[str, Any]]:
        """Per batch of the latest 50: its ids, state, provider status, lines, rows and rows of ``plan`` done
        (``llmap status``)."""
        out = []
        for rec in self.recent():
            rows, done = self.db.execute(
                "SELECT count(DISTINCT l.key), count(DISTINCT CASE WHEN r.status = 'done' THEN l.key END) "
                "FROM batch_lines l LEFT JOIN rows r ON r.key = l.key AND r.plan = ? WHERE l.batch = ?",
                (plan, rec.id)).fetchone()
            out.append({"batch": rec.id, "provider_id": rec.provider_id, "state": rec.state, "status": rec.status,
                        "requests": rec.requests, "rows": rows, "done": done, "counts": rec.counts,
                        "created_at": rec.created_at, "seen_at": rec.seen_at, "cancel": rec.cancel,
                        "error": rec.error})
        return out
