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
plan id and leave the export.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmap.errors import SpecError
from llmap.store.diskfull import guard, guard_writes
from llmap.store.ledger_schema import MIGRATIONS
from llmap.store.migrate import apply_migrations

__all__ = ["MIGRATIONS", "STATUSES", "Encoded", "Ledger", "PlannedRow", "RowResult", "open_for_reading"]

#: Every status a row can have. ``fallback``: no model answered; ``[output] fallback`` was used.
STATUSES = ("pending", "done", "failed", "skipped", "fallback")

@dataclass(frozen=True, slots=True)
class PlannedRow:
    """A row as the planner hands it to the ledger.

    Attributes:
        key: the row's key as text.
        seq: position in the input (0-based), for export order.
        input_hash: hash of the row's inputs and the request fingerprint.
        data: JSON text of the row's projected columns.
        status: ``pending`` or ``skipped``.
        error: the skip reason, for ``skipped`` rows.
        truncated: JSON list of the columns cut to ``[input] max_chars``, or None.
    """

    key: str
    seq: int
    input_hash: str
    data: str
    status: str = "pending"
    error: str | None = None
    truncated: str | None = None


@dataclass(slots=True)
class RowResult:
    """The outcome of one row, as the dispatcher reports it.

    Attributes:
        key: the row's key.
        status: ``done``, ``failed`` or ``fallback``.
        output: field name -> value for ``done`` rows.
        error: the error text for ``failed`` rows.
        attempts: requests spent on this row in this run (re-asks and retries count).
        prompt_tokens, completion_tokens: usage summed over those requests.
        latency_s: seconds spent waiting for answers, summed over this row's
            requests (queueing for a rate limit not included).
        model: ``provider:name`` of the model that settled the row.
        source: where the answer came from: ``model``, ``cache`` (the response
            cache or an identical request in this run) or ``stale`` (an expired
            cache entry served because every model failed).
        tried: every model answer on the way (cascade, re-asks):
            ``(model, outcome, output or None, prompt tokens, completion tokens)``.
    """

    key: str
    status: str
    output: dict[str, Any] | None = None
    error: str | None = None
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    model: str | None = None
    source: str | None = None
    tried: list[tuple[str, str, dict[str, Any] | None, int, int]] | None = None


@dataclass(slots=True)
class Encoded:
    """Settled rows in the ledger's column shapes: what :meth:`Ledger.record` writes.

    Encoded where the rows settled (a Ray worker encodes its results, so the driver's commit is
    mostly ``executemany``); :meth:`of` is the one encoding, which :meth:`Ledger.record` uses too.

    Attributes:
        rows: per row, its update: ``(status, output JSON or None, error, attempts, prompt_tokens,
            completion_tokens, latency_s, model, source, updated_at, key)`` (``updated_at`` in POSIX
            seconds, the key last).
        attempts: per model answer on the way (:attr:`RowResult.tried`): ``(key, model, outcome,
            output JSON or None, prompt_tokens, completion_tokens, created_at)``.
    """

    rows: list[tuple] = field(default_factory=list)
    attempts: list[tuple] = field(default_factory=list)

    @classmethod
    def of(cls, results: Iterable[RowResult], now: float | None = None) -> Encoded:
        """``results`` encoded, stamped ``now`` (POSIX seconds; default: the time of the call)."""
        now = time.time() if now is None else now
        dumps = _dumps
        rows, attempts = [], []
        for r in results:
            output = r.output
            text = dumps(output) if output is not None else None
            rows.append((r.status, text, r.error, r.attempts, r.prompt_tokens, r.completion_tokens, r.latency_s,
                         r.model, r.source, now, r.key))
            if r.tried:  # the answer that settled the row is its last one: its JSON text is encoded once
                attempts += [(r.key, model, outcome, text if out is output else dumps(out) if out is not None
                              else None, pt, ct, now) for model, outcome, out, pt, ct in r.tried]
        return cls(rows, attempts)

    def __len__(self) -> int:
        """Rows held."""
        return len(self.rows)

    def extend(self, other: Encoded) -> None:
        """Add ``other``'s rows and attempts."""
        self.rows += other.rows
        self.attempts += other.attempts

    def clear(self) -> None:
        """Forget every row and attempt (they were committed)."""
        self.rows.clear()
        self.attempts.clear()

    def decode(self) -> list[RowResult]:
        """The rows as :class:`RowResult` (``tried`` rebuilt from the attempts), for hooks that read them."""
        tried: dict[str, list] = {}
        for key, model, outcome, out, pt, ct, _ in self.attempts:
            tried.setdefault(key, []).append((model, outcome, json.loads(out) if out is not None else None, pt, ct))
        return [RowResult(key, status, json.loads(out) if out is not None else None, error, attempts, pt, ct, lat,
                          model, source, tried.get(key))
                for status, out, error, attempts, pt, ct, lat, model, source, _, key in self.rows]


_dumps = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(value, ensure_ascii=False), without its checks


_UPSERT = """
INSERT INTO rows (key, seq, plan, input_hash, status, data, error, truncated, created_at, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
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
    completion_tokens = ?, latency_s = ?, model = ?, source = ?, updated_at = ?
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
    def reset(self) -> None:
        """Forget every row (``--fresh``). Run history is kept."""
        self._db.execute("DELETE FROM rows")

    @guard_writes("ledger")
    def start_run(self, spec_hash: str) -> int:
        """Record a new run and return its id, which is also its plan id."""
        cur = self._db.execute("INSERT INTO runs (started_at, spec_hash) VALUES (?, ?)", (time.time(), spec_hash))
        return int(cur.lastrowid)

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
            "retries = ?, cached = ?, by_model = ?, exit_reason = ?, cache_read_tokens = ?, cache_write_tokens = ? "
            "WHERE id = ?",
            (time.time(), sum(c.values()), c["done"], c["failed"], c["skipped"], c["pending"], c["fallback"],
             requests, prompt_tokens, completion_tokens, cost_usd, rate_limited, retries, cached,
             json.dumps(by_model or {}), exit_reason, cache_read_tokens, cache_write_tokens, run_id),
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
        other row becomes ``pending`` (or ``skipped``) again.
        """
        now = time.time()
        params = [(r.key, r.seq, run_id, r.input_hash, r.status, r.data, r.error, r.truncated, now, now) for r in rows]
        with self._db:
            self._db.execute("BEGIN")
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
        """Pages of ``(key, data, status, output, error, model, source)`` in input order."""
        last = -1
        while True:
            rows = self._db.execute(
                "SELECT seq, key, data, status, output, error, model, source FROM rows WHERE plan = ? AND seq > ? "
                "ORDER BY seq LIMIT ?",
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
