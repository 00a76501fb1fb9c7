"""Runs and rollback: each row's state before a run changed it, and the way back.

Every run has an id (``runs.id``, also its plan id). Before a run changes a row,
the row's state as it was is copied into ``row_history`` under that run's id
(once per run and row), so the ledger keeps each row's earlier results:

- when the run plans it (:func:`snapshot_planned`): every row it will ask again
  (not ``done``, or its inputs, prompt, fields or model changed) and every row
  whose stored data or position changed. A row that stays ``done`` exactly as it
  was is not copied: it only moves to the new plan, and a rollback moves it back
  to the plan before (``runs.prev_plan``). A row the run adds is new
  (``rows.born``): a rollback removes it;
- when ``--fresh`` forgets every row (:func:`snapshot_all`).

A run's own request log, cost and usage (``requests``, ``runs``) are never
changed by a rollback: money spent stays spent.

:func:`rollback` puts every row a run changed back to its state before it: the
copied rows are restored, the rows it added are removed, the rows it only
re-planned go back to the previous plan, and the meta the run replaced (the
output's layout, the stored columns) comes back. Later runs are rolled back
first, newest first, so rolling back run N leaves the ledger as it was before N.
It sends no request. The export follows (the caller writes it again).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmap.errors import SpecError

__all__ = ["ROW_COLUMNS", "RunInfo", "list_runs", "rollback", "snapshot_all", "snapshot_keys", "snapshot_planned"]

#: The columns of ``rows`` that a copy keeps (every one).
ROW_COLUMNS = ("key", "seq", "plan", "input_hash", "status", "attempts", "data", "output", "prompt_tokens",
               "completion_tokens", "latency_s", "model", "error", "created_at", "updated_at", "source", "truncated",
               "confidence", "raw", "born")
_COLS = ", ".join(ROW_COLUMNS)
_CHUNK = 500


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i:i + _CHUNK]


def snapshot_planned(db: sqlite3.Connection, run_id: int, prev_plan: int | None,
                     planned: Sequence[tuple[str, int, str, str, str | None]]) -> int:
    """Copy the rows run ``run_id`` is about to plan and change into ``row_history`` (inside the caller's
    transaction).

    Args:
        db: the ledger's connection, in a transaction.
        run_id: the run planning them.
        prev_plan: the latest plan before this run (``runs.prev_plan``).
        planned: ``(key, seq, input_hash, data, truncated)`` of each row about to be planned.

    Returns:
        How many rows were copied.
    """
    keys = [p[0] for p in planned]
    existing: dict[str, tuple] = {}
    for chunk in _chunks(keys):
        marks = ",".join("?" * len(chunk))
        for row in db.execute(f"SELECT key, status, input_hash, data, truncated, seq, plan FROM rows "
                              f"WHERE key IN ({marks})", list(chunk)):
            existing[row[0]] = row[1:]
    changed = []
    for key, seq, ihash, data, truncated in planned:
        e = existing.get(key)
        if e is None:
            continue
        status, old_hash, old_data, old_trunc, old_seq, old_plan = e
        if not (status == "done" and old_hash == ihash and old_data == data and old_trunc == truncated
                and old_seq == seq and old_plan == prev_plan):
            changed.append(key)
    n = 0
    for chunk in _chunks(changed):
        marks = ",".join("?" * len(chunk))
        n += db.execute(f"INSERT OR IGNORE INTO row_history (run, {_COLS}) SELECT ?, {_COLS} FROM rows "
                        f"WHERE key IN ({marks})", [run_id, *chunk]).rowcount
    return n


def snapshot_keys(db: sqlite3.Connection, run_id: int, keys: Sequence[str]) -> int:
    """Copy the rows ``keys`` into ``row_history`` under ``run_id`` (inside the caller's transaction): a run is
    about to change them outside its plan (a guaranteed cascade sends rows kept earlier to the oracle)."""
    n = 0
    for chunk in _chunks(list(keys)):
        marks = ",".join("?" * len(chunk))
        n += db.execute(f"INSERT OR IGNORE INTO row_history (run, {_COLS}) SELECT ?, {_COLS} FROM rows "
                        f"WHERE key IN ({marks})", [run_id, *chunk]).rowcount
    return n


def snapshot_all(db: sqlite3.Connection, run_id: int) -> int:
    """Copy every row into ``row_history`` under ``run_id`` (``--fresh`` is about to forget them)."""
    return db.execute(f"INSERT OR IGNORE INTO row_history (run, {_COLS}) SELECT ?, {_COLS} FROM rows",
                      (run_id,)).rowcount


@dataclass
class RunInfo:
    """One run, as ``llmap runs`` lists it.

    Attributes:
        run_id: the run's id (also its plan id).
        started_at, ended_at: POSIX seconds (``ended_at`` None: still running, or killed).
        exit_reason: ``complete``, ``interrupted``, ``stopped: ...`` or None.
        settled: rows this run settled (done, failed, skipped or fallback; from the model or the cache).
        done, failed, pending: rows of its plan per status at its end.
        requests: requests it sent.
        cost_usd: what it spent, USD.
        models: the models it ran with (``provider:name``).
        spec_hash: the hash of prompt, fields and model settings (what makes done rows stale).
        prompt_hash: the hash of the prompt and the fields alone.
        changed: rows whose earlier state it keeps in ``row_history``.
        rolled_back_at: POSIX seconds of its rollback, or None.
    """

    run_id: int
    started_at: float
    ended_at: float | None
    exit_reason: str | None
    settled: int | None
    done: int | None
    failed: int | None
    pending: int | None
    requests: int | None
    cost_usd: float | None
    models: list[str] = field(default_factory=list)
    spec_hash: str = ""
    prompt_hash: str | None = None
    changed: int = 0
    rolled_back_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The run as JSON-ready values (``llmap runs --json``)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def list_runs(db: sqlite3.Connection) -> list[RunInfo]:
    """Every run of the ledger, oldest first."""
    changed = dict(db.execute("SELECT run, count(*) FROM row_history GROUP BY run"))
    out = []
    for r in db.execute("SELECT id, started_at, ended_at, exit_reason, settled, done, failed, pending, requests, "
                        "cost_usd, models, by_model, spec_hash, prompt_hash, rolled_back_at FROM runs ORDER BY id"):
        (rid, started, ended, reason, settled, done, failed, pending, requests, cost, models, by_model, spec_hash,
         prompt_hash, rolled) = r
        names = _json_list(models)
        if not names:  # a run of an older llmap: the models that sent requests
            try:
                names = sorted(json.loads(by_model or "{}"))
            except ValueError:
                names = []
        out.append(RunInfo(rid, started, ended, reason, settled, done, failed, pending, requests, cost, names,
                           spec_hash, prompt_hash, int(changed.get(rid, 0)), rolled))
    return out


def _json_list(text: str | None) -> list[str]:
    try:
        value = json.loads(text) if text else []
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def rollback(db: sqlite3.Connection, run_id: int, *, now: float | None = None) -> list[int]:
    """Put every row run ``run_id`` (and each later run not yet rolled back) changed back to its state before.

    One transaction; no request; ``runs`` and ``requests`` (the cost history) are left as they were, but
    each rolled-back run is stamped ``rolled_back_at``.

    Args:
        db: the ledger's connection (writable; the caller holds the job's lock).
        run_id: the run to undo.
        now: POSIX seconds for the stamp; default the time now.

    Returns:
        The runs rolled back, newest first.

    Raises:
        SpecError: no such run, or it was rolled back already.
    """
    info = db.execute("SELECT id, rolled_back_at FROM runs WHERE id = ?", (run_id,)).fetchone()
    if info is None:
        ids = [r[0] for r in db.execute("SELECT id FROM runs ORDER BY id")]
        known = f"runs are {ids[0]}..{ids[-1]}" if ids else "the ledger has no runs yet"
        raise SpecError(f"run {run_id} not found; {known} (see `llmap runs`)")
    if info[1] is not None:
        raise SpecError(f"run {run_id} was rolled back already; see `llmap runs`")
    later = [r[0] for r in db.execute("SELECT id FROM runs WHERE id >= ? AND rolled_back_at IS NULL ORDER BY id DESC",
                                      (run_id,))]
    stamp = time.time() if now is None else now
    with db:
        db.execute("BEGIN IMMEDIATE")
        for rid in later:
            _undo(db, rid)
            db.execute("UPDATE runs SET rolled_back_at = ? WHERE id = ?", (stamp, rid))
        db.execute("DELETE FROM meta WHERE k = 'complete'")  # --if-changed compares against a complete run
    return later


def _undo(db: sqlite3.Connection, rid: int) -> None:
    prev_plan, schema, columns = db.execute(
        "SELECT prev_plan, prev_output_schema, prev_data_columns FROM runs WHERE id = ?", (rid,)).fetchone()
    copied = "SELECT key FROM row_history WHERE run = ?"
    # rows the run added (no copy, born in it): gone; rows it only re-planned: back to the plan before
    db.execute(f"DELETE FROM rows WHERE plan = ? AND born = ? AND key NOT IN ({copied})", (rid, rid, rid))
    if prev_plan is None:
        db.execute(f"DELETE FROM rows WHERE plan = ? AND key NOT IN ({copied})", (rid, rid))
    else:
        db.execute(f"UPDATE rows SET plan = ? WHERE plan = ? AND key NOT IN ({copied})", (prev_plan, rid, rid))
    db.execute(f"INSERT OR REPLACE INTO rows ({_COLS}) SELECT {_COLS} FROM row_history WHERE run = ?", (rid,))
    for k, v in (("output_schema", schema), ("data_columns", columns)):
        if v is not None:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, v))
