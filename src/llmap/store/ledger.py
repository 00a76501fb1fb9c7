"""The ledger: one SQLite file per job, the source of truth for every row.

A row is ``pending -> done | failed | skipped``. A result is committed here
before it is counted or shown, and the output file is exported from here, so
a crash (Ctrl-C, SIGKILL, power loss of the process) never loses a finished
row and a re-run continues where the last one stopped.

SQLite runs in WAL mode with ``synchronous=NORMAL``: a commit survives a
killed process; one writer (the engine's event loop) commits results in
batches. A write that finds the disk full raises
:class:`~llmap.errors.DiskFull` (its transaction is rolled back whole). The schema is built from named migrations
(:mod:`llmap.store.ledger_schema`) recorded in ``_migrations`` (the simonw/llm pattern), so later versions can add
to it.

Each run *plans* the rows it sees into the ledger with its run id; rows that
a later run no longer sees (input changed, ``limit`` lowered) keep their old
plan id and leave the export. Before a run changes a row, the row's earlier
state is kept in ``row_history`` (:mod:`llmap.store.history`): ``llmap runs``
lists the runs and ``llmap rollback`` undoes one.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from llmap.errors import SpecError
from llmap.store.diskfull import guard, guard_writes
from llmap.store.history import snapshot_all, snapshot_planned
from llmap.store.ledger_schema import MIGRATIONS
from llmap.store.migrate import apply_migrations
from llmap.store.results import Encoded, PlannedRow, RowResult

__all__ = ["MIGRATIONS", "STATUSES", "Encoded", "Ledger", "PlannedRow", "RowResult", "open_for_reading"]

#: Every status a row can have. ``fallback``: no model answered; ``[output] fallback`` was used.
STATUSES = ("pending", "done", "failed", "skipped", "fallback")

_UPSERT = """
INSERT INTO rows (key, seq, plan, input_hash, status, data, error, truncated, created_at, updated_at, born)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (key) DO UPDATE SET
    seq = excluded.seq,
    plan = excluded.plan,
    data = excluded.data,
    truncated = excluded.truncated,
    updated_at = excluded.updated_at,
    status = CASE WHEN rows.status = 'done' AND rows.input_hash = excluded.input_hash
                  THEN 'done' ELSE excluded.status END,
    output = CASE WHEN rows.status = 'done' AND rows.input_hash = excluded.input_hash
                  THEN rows.output ELSE NULL END,
    confidence = CASE WHEN rows.status = 'done' AND rows.input_hash = excluded.input_hash
                      THEN rows.confidence ELSE NULL END,
    raw = CASE WHEN rows.status = 'done' AND rows.input_hash = excluded.input_hash THEN NULL ELSE rows.raw END,
    error = CASE WHEN rows.status = 'done' AND rows.input_hash = excluded.input_hash
                 THEN NULL ELSE excluded.error END,
    attempts = CASE WHEN rows.input_hash = excluded.input_hash THEN rows.attempts ELSE 0 END,
    input_hash = excluded.input_hash
"""

def _connect_readonly(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                         check_same_thread=False)
    try:
        db.execute("PRAGMA busy_timeout = 5000")
        applied = {r[0] for r in db.execute("SELECT name FROM _migrations")}
    except BaseException:
        db.close()
        raise
    missing = [name for name, _ in MIGRATIONS if name not in applied]
    if missing:
        db.close()
        raise SpecError(f"ledger {str(path)!r} was written by an older llmap (it lacks {missing[0]}); run "
                        "`llmap run` on the job once to upgrade it")
    return db


_RECORD = """
UPDATE rows SET status = ?, output = ?, error = ?, attempts = attempts + ?, prompt_tokens = ?,
    completion_tokens = ?, latency_s = ?, model = ?, source = ?, updated_at = ?, confidence = ?, raw = ?,
    input_hash = COALESCE(?, input_hash)
WHERE key = ?
"""
# the run is the same for every request and attempt of a commit: bound once, as an integer literal
_REQUEST = """
INSERT INTO requests (t, model, outcome, latency_s, prompt_tokens, completion_tokens, pack_size,
    cache_read_tokens, cache_write_tokens, cost_usd, path, run)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, {run:d})
"""
_ATTEMPT = """
INSERT INTO attempts (key, model, outcome, output, prompt_tokens, completion_tokens, created_at, run)
VALUES (?, ?, ?, ?, ?, ?, ?, {run:d})
"""


def _request_entry(r: Sequence[Any]) -> tuple:
    """A request log entry padded to the table's 11 columns (older shapes lack cache tokens, cost, path)."""
    if len(r) == 11 and type(r) is tuple:  # the shape DispatchStats.log writes
        return r
    r = tuple(r)
    return r + (0,) * (9 - len(r)) + (None,) * (11 - max(9, len(r)))


#: WAL pages between automatic checkpoints (about 2 MB at SQLite's 4 KB pages).
WAL_CHECKPOINT_PAGES = 512


class Ledger:
    """A job's SQLite ledger.

    Args:
        path: the SQLite file; its folder is created if missing.
        readonly: open an existing ledger read-only (``status``, ``export``,
            ``report``, ``llmap.map``'s results): no migration, no write, no
            lock, so it works while a run writes the file (WAL readers never
            block the writer).

    Raises:
        sqlite3.Error: the file cannot be opened or is not a ledger.
        SpecError: ``readonly`` and the ledger's schema is older than this llmap's.
    """

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            self._db = _connect_readonly(self.path)
            return
        self._settled: dict[int, int] = {}  # run id -> rows recorded by this process
        self._fresh: set[int] = set()  # runs that started on an empty ledger (nothing to keep in history)
        with guard(self.path, "ledger"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA busy_timeout = 5000")
            # A run commits every event-loop turn in which answers arrive (small transactions): checkpoint
            # the WAL every WAL_CHECKPOINT_PAGES pages (SQLite's default, 1,000 pages, is a 4 MB WAL file)
            # and cut the file back to that size, so the WAL stays small beside the ledger.
            self._db.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
            self._db.execute(f"PRAGMA journal_size_limit = {WAL_CHECKPOINT_PAGES * 4096}")
            self._migrate()

    def _migrate(self) -> None:
        apply_migrations(self._db, MIGRATIONS)

    @property
    def connection(self) -> sqlite3.Connection:
        """The underlying SQLite connection (for read-only queries elsewhere)."""
        return self._db

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- meta -----------------------------------------------------------------
    @guard_writes("ledger")
    def set_meta(self, k: str, v: bytes | str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, v))

    def get_meta(self, k: str) -> Any:
        row = self._db.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()
        return row[0] if row else None

    # -- runs -----------------------------------------------------------------
    @guard_writes("ledger")
    def reset(self, run_id: int | None = None) -> None:
        """Forget every row (``--fresh``). Run history is kept; with ``run_id``, each row's state is kept in
        ``row_history`` under that run, so ``llmap rollback`` can bring them back."""
        with self._db:
            self._db.execute("BEGIN")
            if run_id is not None:
                snapshot_all(self._db, run_id)
                self._fresh.add(run_id)  # no row left to keep when the run plans
            self._db.execute("DELETE FROM rows")

    @guard_writes("ledger")
    def start_run(self, spec_hash: str, *, models: Sequence[str] = (), prompt_hash: str | None = None) -> int:
        """Record a new run and return its id, which is also its plan id.

        Args:
            spec_hash: the request fingerprint (prompt, fields, model settings).
            models: the models it runs with (``provider:name``), for ``llmap runs``.
            prompt_hash: the hash of the prompt and the fields alone, for ``llmap runs``.

        The plan and the meta the run is about to replace (the output's layout, the stored columns) are kept
        with it, for :func:`~llmap.store.history.rollback`.
        """
        prev = self.latest_plan()
        cur = self._db.execute(
            "INSERT INTO runs (started_at, spec_hash, models, prompt_hash, prev_plan, prev_output_schema, "
            "prev_data_columns) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (time.time(), spec_hash, json.dumps(list(models)), prompt_hash, prev, self.get_meta("output_schema"),
             self.get_meta("data_columns")))
        run_id = int(cur.lastrowid)
        if self._db.execute("SELECT 1 FROM rows LIMIT 1").fetchone() is None:
            self._fresh.add(run_id)
        return run_id

    @guard_writes("ledger")
    def end_run(self, run_id: int, *, exit_reason: str, requests: int, prompt_tokens: int,
                completion_tokens: int, cost_usd: float = 0.0, rate_limited: int = 0, retries: int = 0,
                cached: int = 0, by_model: dict[str, Any] | None = None, cache_read_tokens: int = 0,
                cache_write_tokens: int = 0) -> None:
        """Stamp a run's end with its row counts and usage.

        Args:
            run_id: the run.
            exit_reason: ``complete``, ``interrupted`` or ``stopped: <why>``.
            requests, prompt_tokens, completion_tokens, cost_usd, rate_limited,
                retries, cached: this run's totals (tokens, USD, 429 answers,
                retried attempts, rows answered from the cache or dedup).
            by_model: ``{model: {"requests", "prompt_tokens", "completion_tokens", "cost_usd", ...}}``.
            cache_read_tokens, cache_write_tokens: of the prompt tokens, those
                read from / written to the providers' prompt caches.
        """
        c = self.counts(run_id)
        self._db.execute(
            "UPDATE runs SET ended_at = ?, rows_total = ?, done = ?, failed = ?, skipped = ?, pending = ?, "
            "fallback = ?, requests = ?, prompt_tokens = ?, completion_tokens = ?, cost_usd = ?, rate_limited = ?, "
            "retries = ?, cached = ?, by_model = ?, exit_reason = ?, cache_read_tokens = ?, cache_write_tokens = ?, "
            "settled = ? WHERE id = ?",
            (time.time(), sum(c.values()), c["done"], c["failed"], c["skipped"], c["pending"], c["fallback"],
             requests, prompt_tokens, completion_tokens, cost_usd, rate_limited, retries, cached,
             json.dumps(by_model or {}), exit_reason, cache_read_tokens, cache_write_tokens,
             self._settled.get(run_id, 0), run_id),
        )

    def latest_plan(self) -> int | None:
        """The plan id of the most recent run that planned rows, or None."""
        row = self._db.execute("SELECT max(plan) FROM rows").fetchone()
        return row[0]

    # -- planning -------------------------------------------------------------
    @guard_writes("ledger")
    def plan(self, run_id: int, rows: Iterable[PlannedRow]) -> None:
        """Upsert a batch of rows into plan ``run_id`` in one transaction.

        A row already ``done`` with the same ``input_hash`` stays done; any
        other row becomes ``pending`` (or ``skipped``) again. A row about to change is first kept in
        ``row_history`` (:func:`~llmap.store.history.snapshot_planned`).
        """
        now = time.time()
        rows = list(rows)
        params = [(r.key, r.seq, run_id, r.input_hash, r.status, r.data, r.error, r.truncated, now, now, run_id)
                  for r in rows]
        with self._db:
            self._db.execute("BEGIN")
            if run_id not in self._fresh:
                prev = self._db.execute("SELECT prev_plan FROM runs WHERE id = ?", (run_id,)).fetchone()
                snapshot_planned(self._db, run_id, prev[0] if prev else None,
                                 [(r.key, r.seq, r.input_hash, r.data, r.truncated) for r in rows])
            self._db.executemany(_UPSERT, params)

    # -- results --------------------------------------------------------------
    @guard_writes("ledger")
    def record(self, results: Sequence[RowResult] | Encoded, *, run_id: int = 0,
               requests: Sequence[tuple] = (), also: Sequence[tuple[str, tuple]] = ()) -> None:
        """Commit a batch of results, the model answers each went through, and the request log.

        Args:
            results: settled rows, as :class:`RowResult` or already :class:`Encoded`.
            run_id: the run they belong to.
            requests: request log entries ``(t, model, outcome, latency_s,
                prompt_tokens, completion_tokens, pack_size, cache_read_tokens,
                cache_write_tokens)``: ``t`` in POSIX seconds; ``outcome``
                ``"200"``, another HTTP status, or an error class such as
                ``RequestTimeout``; the last two are the prompt tokens read from
                and written to the provider's prompt cache (may be left off: 0),
                then its cost (USD) and path (``"batch"``, or None for real time).
            also: more ``(sql, params)`` statements committed in the same
                transaction (a batch marked collected with its results).

        Returns once durable.
        """
        enc = results if isinstance(results, Encoded) else Encoded.of(results)
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(_RECORD, enc.rows)
            if enc.attempts:
                self._db.executemany(_ATTEMPT.format(run=int(run_id)), enc.attempts)
            if requests:
                self._db.executemany(_REQUEST.format(run=int(run_id)), list(map(_request_entry, requests)))
            for sql, args in also:
                self._db.execute(sql, args)
        if results:
            self._settled[run_id] = self._settled.get(run_id, 0) + len(results)

    # -- reading --------------------------------------------------------------
    def counts(self, plan: int) -> dict[str, int]:
        """Rows per status in ``plan``; every status is present (0 if none)."""
        out = dict.fromkeys(STATUSES, 0)
        for status, n in self._db.execute("SELECT status, count(*) FROM rows WHERE plan = ? GROUP BY status", (plan,)):
            out[status] = n
        return out

    def pending(self, plan: int, *, after_seq: int, limit: int, hashes: bool = False) -> list[tuple]:
        """Up to ``limit`` pending rows of ``plan`` after ``after_seq``: ``(seq, key, data JSON)``, with
        ``hashes`` ``(seq, key, data JSON, input hash)`` (rows with one input hash render one request)."""
        return self._db.execute(
            f"SELECT seq, key, data{', input_hash' if hashes else ''} FROM rows WHERE plan = ? AND status = 'pending' "
            "AND seq > ? ORDER BY seq LIMIT ?",
            (plan, after_seq, limit),
        ).fetchall()

    def iter_rows(self, plan: int, *, page: int = 5000) -> Iterator[list[tuple]]:
        """Pages of ``(key, data, status, output, error, model, source, confidence, raw)`` in input order."""
        last = -1
        while True:
            rows = self._db.execute(
                "SELECT seq, key, data, status, output, error, model, source, confidence, raw FROM rows "
                "WHERE plan = ? AND seq > ? ORDER BY seq LIMIT ?",
                (plan, last, page),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [r[1:] for r in rows]

    def grouped_counts(self, plan: int, column: str) -> list[tuple[Any, str, int]]:
        """``(group value, status, rows)`` for a column stored in the rows' data."""
        path = '$."' + column.replace('"', '\\"') + '"'
        return self._db.execute(
            "SELECT json_extract(data, ?) AS g, status, count(*) FROM rows WHERE plan = ? "
            "GROUP BY g, status ORDER BY g, status",
            (path, plan),
        ).fetchall()

    def statuses(self, plan: int) -> Iterator[tuple[str, str]]:
        """``(key, status)`` for every row of ``plan`` (for grouping by unstored columns)."""
        yield from self._db.execute("SELECT key, status FROM rows WHERE plan = ?", (plan,))

    def settled_by_model(self, plan: int) -> list[tuple[str | None, str, str | None, int, int, int]]:
        """Per ``(model, status, source)``: rows, prompt tokens, completion tokens (for ``llmap report``)."""
        return self._db.execute(
            "SELECT model, status, source, count(*), coalesce(sum(prompt_tokens), 0), "
            "coalesce(sum(completion_tokens), 0) FROM rows WHERE plan = ? GROUP BY model, status, source "
            "ORDER BY model, status, source",
            (plan,),
        ).fetchall()

    def cache_by_model(self, run_id: int) -> list[tuple[str, int, int]]:
        """Per model in one run: prompt tokens read from and written to its prompt cache (the request log)."""
        return self._db.execute(
            "SELECT model, coalesce(sum(cache_read_tokens), 0), coalesce(sum(cache_write_tokens), 0) FROM requests "
            "WHERE run = ? GROUP BY model HAVING sum(cache_read_tokens) > 0 OR sum(cache_write_tokens) > 0 "
            "ORDER BY model", (run_id,),
        ).fetchall()

    def attempts_by_model(self, run_id: int) -> list[tuple[str, str, int, int, int]]:
        """Per ``(model, outcome)`` in one run: answers, prompt tokens, completion tokens."""
        return self._db.execute(
            "SELECT model, outcome, count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0) "
            "FROM attempts WHERE run = ? GROUP BY model, outcome ORDER BY model, outcome",
            (run_id,),
        ).fetchall()


def open_for_reading(path: Path, *, job: str) -> tuple[Ledger, int]:
    """A job's ledger opened read-only (never written, never locked: it works while a run holds the
    job), and its latest plan.

    Raises:
        SpecError: there is no ledger, or no row planned yet (run the job first), or the file is not
            a ledger.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"job {job!r} has no ledger at {str(path)!r} yet; run `llmap run` on it first")
    try:
        ledger = Ledger(path, readonly=True)
    except sqlite3.Error as exc:
        raise SpecError(f"cannot read the ledger {str(path)!r}: {exc}; is it a llmap ledger?") from None
    plan = ledger.latest_plan()
    if plan is None:
        ledger.close()
        raise SpecError(f"job {job!r} has no planned rows yet; run `llmap run` on it first")
    return ledger, plan
