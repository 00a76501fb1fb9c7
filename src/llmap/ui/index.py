"""The page's index of a ledger's rows: a SQLite file beside the ledger, built on first use and kept up to date.

A 1,000,000-row ledger cannot be filtered by an output field (``json_extract`` over every row) or searched for a
word within the page's 300 ms: this index can. It lives in ``<ledger>.ui-index`` (delete it at any time: the next
``llmap ui`` builds it again) and holds, per row of the ledger, one narrow line: key, input position, plan, status,
model, source, error class, the ``--by`` group's value, the confidence when the ledger has one, and every output
field's value, each with an index; plus an FTS5 table over the row's input values, answer values and error text.

It follows the ledger by the rows whose ``updated_at`` is past the last one it saw (migration ``009_ui`` indexes
that column), in chunks of :data:`CHUNK` rows: the first build and a re-plan of every row (each run plans every row
again) go in steps while the page works, and a live run costs it the rows that settled since the last look. The
ledger is attached read-only: this index never writes the ledger and never blocks its writer (WAL).

Row counts per ``(plan, status, model, source, error class, group)`` are kept in memory and moved row by row as rows
change, so the live view never counts a million rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CHUNK", "Columns", "UiIndex", "error_class_sql", "index_path", "json_path", "text_sql"]

#: Version of the index's layout: an index of another version is rebuilt.
INDEX_VERSION = 1
#: Ledger rows read per step of a build or a catch-up.
CHUNK = 20_000


def index_path(ledger_path: Path) -> Path:
    """The index file of a ledger: ``<ledger>.ui-index`` beside it."""
    return ledger_path.with_name(ledger_path.name + ".ui-index")


def json_path(name: str) -> str:
    """A JSON path naming one top-level member, quoted (a column may hold dots or spaces)."""
    return '$."' + name.replace('"', '\\"') + '"'


def error_class_sql(col: str = "error") -> str:
    """SQL for an error's class: the word before ``:`` in ``"Class: message"`` (see ``run/settle.error_text``),
    ``other`` for an error of another shape, NULL without an error."""
    head = f"substr({col}, 1, instr({col}, ':') - 1)"
    return (f"CASE WHEN {col} IS NULL THEN NULL WHEN instr({col}, ':') > 1 AND instr({head}, ' ') = 0 "
            f"THEN {head} ELSE 'other' END")


def text_sql(alias: str = "") -> str:
    """SQL for the text a row is searched by: its input values, its answer's values and its error."""
    p = f"{alias}." if alias else ""
    return (f"coalesce((SELECT group_concat(value, ' ') FROM json_each({p}data)), '') || ' ' || "
            f"coalesce((SELECT group_concat(value, ' ') FROM json_each({p}output)), '') || ' ' || "
            f"coalesce({p}error, '')")


@dataclass(frozen=True)
class Columns:
    """What the index keeps of each row, beyond key, position, plan, status, model, source and error class.

    Attributes:
        fields: the job's output fields, in spec order (index column ``f0``, ``f1``, ...).
        group: the input column rows are grouped by (``--by``; stored in the ledger's row data), or None.
        confidence: the ledger's rows have a ``confidence`` column (the quality work's migration).
    """

    fields: tuple[str, ...]
    group: str | None = None
    confidence: bool = False

    def signature(self) -> str:
        return json.dumps([INDEX_VERSION, list(self.fields), self.group, self.confidence])

    def ledger_exprs(self, alias: str = "") -> dict[str, str]:
        """Index column -> the SQL that computes it from a ledger row (also what queries use while no index
        is ready)."""
        p = f"{alias}." if alias else ""
        out = {"err": error_class_sql(f"{p}error"),
               "grp": f"json_extract({p}data, '{json_path(self.group)}')" if self.group else "NULL",
               "conf": f"{p}confidence" if self.confidence else "NULL"}
        for i, name in enumerate(self.fields):
            out[f"f{i}"] = f"json_extract({p}output, '{json_path(name)}')"
        return out


def _crc(text: str | None) -> int | None:
    return None if text is None else zlib.crc32(text.encode("utf-8", "surrogatepass"))


def _dump_counts(counts: Counter) -> str:
    return json.dumps([[list(cell), n] for cell, n in counts.items() if n])


#: The columns of one counted cell: (plan, status, model, source, error class, group).
Cell = tuple[int, str, str | None, str | None, str | None, object]


class UiIndex:
    """The index of one ledger (see the module docstring). One thread calls :meth:`sync`; any thread reads.

    Args:
        ledger_path: the job's ledger (it must exist and hold migration ``009_ui``).
        columns: what to keep of each row.
        path: the index file (default :func:`index_path` of the ledger).
        clock: POSIX seconds (for :attr:`synced_at`).

    Raises:
        sqlite3.Error: the index file cannot be created (a read-only folder: pass another ``path``).
    """

    def __init__(self, ledger_path: Path, columns: Columns, *, path: Path | None = None,
                 clock=time.time) -> None:
        self.ledger_path = Path(ledger_path)
        self.columns = columns
        self.path = Path(path) if path is not None else index_path(self.ledger_path)
        self.clock = clock
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        self._mark: tuple[float, int] = (-1.0, -1)
        self._ready = False
        self._behind = True
        self._rewind = 0.0
        self._counts_due = False
        self.synced_at: float | None = None
        self.indexed = 0
        self._db = self._open()

    # -- the file ---------------------------------------------------------------------------------------------
    def _ledger_birth(self) -> str:
        db = sqlite3.connect(f"{self.ledger_path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT min(applied_at) FROM _migrations").fetchone()
        finally:
            db.close()
        return repr(row[0])

    def _open(self) -> sqlite3.Connection:
        identity = json.dumps([self.columns.signature(), self._ledger_birth()])
        db = self._connect()
        try:
            have = db.execute("SELECT v FROM meta WHERE k = 'identity'").fetchone()
        except sqlite3.Error:
            have = None
        if have is None or have[0] != identity:
            db.close()
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(f"{self.path}{suffix}")
            db = self._connect()
            self._create(db, identity)
        else:
            mark = db.execute("SELECT v FROM meta WHERE k = 'mark'").fetchone()
            if mark is not None:
                t, rid = json.loads(mark[0])
                self._mark = (float(t), int(rid))
            saved = db.execute("SELECT v FROM meta WHERE k = 'counts'").fetchone()
            if saved is not None:  # the counts as of the mark, saved with it
                self._counts = Counter({tuple(cell): n for cell, n in json.loads(saved[0])})
                self.indexed = sum(self._counts.values())
            else:
                self._counts_due = True  # counted by the first sync, not here: the page starts at once
        db.execute(f"ATTACH DATABASE '{self.ledger_path.resolve().as_uri()}?mode=ro' AS L")
        self._create_temp(db)
        return db

    def _connect(self) -> sqlite3.Connection:
        # a file: URI, so that the ledger can be attached read-only (mode=ro) on the same connection
        db = sqlite3.connect(self.path.resolve().as_uri(), uri=True, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = OFF")  # a lost index is rebuilt, never trusted over the ledger
        db.execute("PRAGMA busy_timeout = 5000")
        db.execute("PRAGMA journal_size_limit = 16777216")  # the build's big transactions leave no big WAL file
        db.create_function("crc", 1, _crc, deterministic=True)
        return db

    def _field_cols(self) -> list[str]:
        return [f"f{i}" for i in range(len(self.columns.fields))]

    def indexed_columns(self) -> list[str]:
        """The index columns with an index ``r_<name>`` on ``(plan, <name>, seq)``."""
        extra = (["grp"] if self.columns.group else []) + (["conf"] if self.columns.confidence else [])
        return ["status", "model", "err", *extra, *self._field_cols()]

    def _create(self, db: sqlite3.Connection, identity: str) -> None:
        fcols = "".join(f", {c}" for c in self._field_cols())
        db.execute("BEGIN")
        db.execute("CREATE TABLE meta (k TEXT PRIMARY KEY, v TEXT)")
        # th: a checksum of the searched text, so a re-plan that changes nothing leaves the FTS table alone
        db.execute(f"CREATE TABLE r (id INTEGER PRIMARY KEY, key TEXT NOT NULL, seq INTEGER, plan INTEGER, "
                   f"status TEXT, model TEXT, source TEXT, err TEXT, grp, conf REAL{fcols}, upd REAL, th INTEGER)")
        # detail=none: words without positions (word, prefix and AND queries; no phrases): a smaller index
        db.execute("CREATE VIRTUAL TABLE fts USING fts5(t, detail=none)")
        db.execute("INSERT INTO meta VALUES ('identity', ?)", (identity,))
        db.execute("COMMIT")

    def _create_indexes(self, db: sqlite3.Connection) -> None:
        """The secondary indexes, made once the first build has filled the table (faster than row by row)."""
        db.execute("CREATE UNIQUE INDEX IF NOT EXISTS r_key ON r (key)")  # the catch-up's upsert, the sort by key
        for name in self.indexed_columns():
            db.execute(f"CREATE INDEX IF NOT EXISTS r_{name} ON r (plan, {name}, seq)")
        db.execute("CREATE INDEX IF NOT EXISTS r_seq ON r (plan, seq)")
        db.execute("PRAGMA analysis_limit = 1000")
        db.execute("ANALYZE main")
        db.execute("INSERT OR REPLACE INTO meta VALUES ('built', '1')")

    def _create_temp(self, db: sqlite3.Connection) -> None:
        fcols = "".join(f", {c}" for c in self._field_cols())
        db.execute(f"CREATE TEMP TABLE chg (lid INTEGER, key TEXT, seq INTEGER, plan INTEGER, status TEXT, "
                   f"model TEXT, source TEXT, err TEXT, grp, conf REAL{fcols}, upd REAL, t TEXT, th INTEGER, "
                   "old INTEGER, oth INTEGER)")

    def _load_counts(self, db: sqlite3.Connection) -> None:
        counts: Counter = Counter()
        for *cell, n in db.execute("SELECT plan, status, model, source, err, grp, count(*) FROM r "
                                   "GROUP BY plan, status, model, source, err, grp"):
            counts[tuple(cell)] = n
        db.execute("INSERT OR REPLACE INTO meta VALUES ('counts', ?)", (_dump_counts(counts),))
        with self._lock:
            self._counts = counts
            self.indexed = sum(counts.values())

    def close(self) -> None:
        """Close the index's connection (the file stays for the next time)."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    # -- following the ledger -----------------------------------------------------------------------------------
    def sync(self, *, max_chunks: int = 1_000_000) -> int:
        """Take in the ledger rows that changed since the last call, :data:`CHUNK` rows per transaction.

        The first call on a new index builds it: every ledger row in file order, then the secondary indexes.

        Args:
            max_chunks: stop after this many chunks (the caller's loop calls again; the page keeps working).

        Returns:
            Ledger rows read.
        """
        total = 0
        if self._counts_due and self._built():
            self._load_counts(self._db)
            self._counts_due = False
        if self._rewind and self._built():
            self._mark, self._rewind = (self._mark[0] - self._rewind, -1), 0.0
        for _ in range(max_chunks):
            if not self._built():
                total += self._build_step()
                self._behind = True
                continue
            n = self._pull()
            total += n
            if n < CHUNK:
                self._behind = False
                self._ready = True
                break
            self._behind = True
        self.synced_at = self.clock()
        return total

    def _built(self) -> bool:
        if not hasattr(self, "_built_flag"):
            self._built_flag = self._db.execute("SELECT 1 FROM meta WHERE k = 'built'").fetchone() is not None
        return self._built_flag

    def _select(self, where: str) -> str:
        exprs = self.columns.ledger_exprs()
        cols = ["err", "grp", "conf", *self._field_cols()]
        return (f"SELECT rowid, key, seq, plan, status, model, source, {', '.join(exprs[c] for c in cols)}, "
                f"updated_at, {text_sql()}, NULL, NULL, NULL FROM L.rows {where}")

    def _build_step(self) -> int:
        """One chunk of the first build: ledger rows by rowid, appended; the indexes come after the last."""
        db = self._db
        names = ["key", "seq", "plan", "status", "model", "source", "err", "grp", "conf", *self._field_cols(), "upd"]
        db.execute("BEGIN IMMEDIATE")
        try:
            if self._mark == (-1.0, -1):  # where the catch-up starts once built: what changes from now on
                top = db.execute("SELECT max(updated_at) FROM L.rows").fetchone()[0]
                self._mark = (float(top) if top is not None else -1.0, -1)
                db.execute("INSERT OR REPLACE INTO meta VALUES ('mark', ?)", (json.dumps(list(self._mark)),))
                db.execute("INSERT OR REPLACE INTO meta VALUES ('next', '0')")
            after = int(db.execute("SELECT v FROM meta WHERE k = 'next'").fetchone()[0])
            db.execute("DELETE FROM temp.chg")
            db.execute(f"INSERT INTO temp.chg {self._select('WHERE rowid > ? ORDER BY rowid LIMIT ?')}",
                       (after, CHUNK))
            n, top_lid = db.execute("SELECT count(*), max(lid) FROM temp.chg").fetchone()
            # ids are the ledger's rowids here (unique in the ledger); rows added later get new ones
            db.execute(f"INSERT INTO r (id, {', '.join(names)}, th) SELECT lid, {', '.join(names)}, crc(t) "
                       "FROM temp.chg")
            db.execute("INSERT INTO fts (rowid, t) SELECT lid, t FROM temp.chg")
            if n:
                db.execute("UPDATE meta SET v = ? WHERE k = 'next'", (str(top_lid),))
            if n < CHUNK:
                self._create_indexes(db)
                self._built_flag = True
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self.indexed += n
        if n < CHUNK:
            self._load_counts(db)
            with contextlib.suppress(sqlite3.Error):  # readers may hold it: then the next checkpoints do it
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return n

    def _pull(self) -> int:
        """One chunk of the catch-up: the ledger rows changed since the mark, in ``updated_at`` order."""
        db = self._db
        cols = ["seq", "plan", "status", "model", "source", "err", "grp", "conf", *self._field_cols(), "upd", "th"]
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM temp.chg")
            db.execute(f"INSERT INTO temp.chg {self._select('WHERE updated_at >= ? AND NOT (updated_at = ? AND rowid <= ?) ORDER BY updated_at, rowid LIMIT ?')}",  # noqa: E501
                       (self._mark[0], self._mark[0], self._mark[1], CHUNK))
            db.execute("UPDATE temp.chg SET th = crc(t), (old, oth) = (SELECT id, th FROM r WHERE r.key = chg.key)")
            moved = db.execute(
                "SELECT c.plan, c.status, c.model, c.source, c.err, c.grp, r.plan, r.status, r.model, r.source, "
                "r.err, r.grp, r.id IS NULL FROM temp.chg c LEFT JOIN r ON r.id = c.old").fetchall()
            if not moved:
                db.execute("COMMIT")
                return 0
            last = db.execute("SELECT upd, lid FROM temp.chg ORDER BY upd DESC, lid DESC LIMIT 1").fetchone()
            # the words of rows whose text changed leave the FTS table before the new ones go in
            stale = db.execute("SELECT old FROM temp.chg WHERE old IS NOT NULL AND oth IS NOT th").fetchall()
            db.executemany("DELETE FROM fts WHERE rowid = ?", stale)
            db.execute(
                f"INSERT INTO r (key, {', '.join(cols)}) SELECT key, {', '.join(cols)} FROM temp.chg WHERE true "
                f"ON CONFLICT (key) DO UPDATE SET {', '.join(f'{n} = excluded.{n}' for n in cols)}")
            db.execute("INSERT INTO fts (rowid, t) SELECT r.id, c.t FROM temp.chg c JOIN r ON r.key = c.key "
                       "WHERE c.old IS NULL OR c.oth IS NOT c.th")
            delta: Counter = Counter()
            for row in moved:
                if not row[12]:
                    delta[tuple(row[6:12])] -= 1
                delta[tuple(row[0:6])] += 1
            with self._lock:
                counts = Counter(self._counts)
            counts.update(delta)  # update keeps the cells that fall to 0 or below (+ would drop them)
            mark = (float(last[0]), int(last[1]))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('mark', ?)", (json.dumps(list(mark)),))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('counts', ?)", (_dump_counts(counts),))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self._mark = mark
        with self._lock:
            self._counts = Counter({k: v for k, v in counts.items() if v})
            self.indexed += sum(1 for row in moved if row[12])
        return len(moved)

    def rewind(self, seconds: float) -> None:
        """Have the next :meth:`sync` read again the rows changed in the ``seconds`` before its mark (after a write
        of this process's own, whose ``updated_at`` may be earlier than a change the index has already seen)."""
        self._rewind = max(self._rewind, seconds)

    # -- what the page reads ------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True once the index has caught up with the ledger at least once (queries may use it)."""
        return self._ready

    @property
    def behind(self) -> bool:
        """True while the last step read a full chunk: more changed rows wait (a build, a re-plan)."""
        return self._behind

    def counts(self) -> dict[Cell, int]:
        """Rows per ``(plan, status, model, source, error class, group)`` as of the last :meth:`sync`."""
        with self._lock:
            return {k: v for k, v in self._counts.items() if v}

    def reader(self) -> sqlite3.Connection:
        """A new read-only connection to the index file (one per thread)."""
        db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        db.execute("PRAGMA busy_timeout = 5000")
        return db
