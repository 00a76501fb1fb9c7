"""Sources: read rows from CSV, Parquet, JSONL, a DuckDB query, or an Arrow table.

DuckDB does the reading: it projects to the columns the job uses (a 36-column
file is read for its 3 columns), applies ``where`` while scanning, caps rows
at ``limit``, and streams Arrow record batches so memory does not grow with
the input. DuckDB errors are mapped here into :class:`~llmap.errors.InputError`.
"""

from __future__ import annotations

import difflib
import re
import shutil
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from llmap.errors import InputError
from llmap.io.diagnose import (
    check_file,
    csv_shape_problem,
    explain,
    jsonl_shape_problem,
    missing_file,
)
from llmap.io.encoding import canonical, duckdb_csv_encoding, is_utf8, transcode_to_utf8

__all__ = ["Source", "column_hint", "quote_ident"]

_READERS = {
    ".csv": "read_csv",
    ".tsv": "read_csv",
    ".parquet": "read_parquet",
    ".jsonl": "read_json",
    ".ndjson": "read_json",
    ".json": "read_json",
}

#: Rows per Arrow batch when streaming (a batch is the unit of planning work).
BATCH_ROWS = 4096


def quote_ident(name: str) -> str:
    """Quote a column name for DuckDB SQL."""
    return '"' + name.replace('"', '""') + '"'


def column_hint(name: str, columns: Sequence[str]) -> str:
    """``did you mean 'x'? `` for the column closest to ``name`` (case first, then spelling), or ``""``.

    Also says when the columns look like a CSV read without a header line.
    """
    lower = {c.lower(): c for c in columns}
    near = [lower[name.lower()]] if name.lower() in lower else difflib.get_close_matches(name, list(columns), n=1,
                                                                                         cutoff=0.6)
    hint = f"did you mean {near[0]!r}? " if near else ""
    if columns and all(re.fullmatch(r"column\d+", c) for c in columns):
        hint += "the file seems to have no header line (add one naming the columns); "
    return hint


def _shown(columns: Sequence[str], most: int = 20) -> str:
    return ", ".join(columns[:most]) + (" ..." if len(columns) > most else "")


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


@dataclass(frozen=True)
class _File:
    """What a file source reads: its format, the file DuckDB opens and that file's encoding."""

    fmt: str  # "csv", "jsonl", "json" or "parquet"
    read_path: Path  # the input, or its temporary UTF-8 copy
    encoding: str  # Python's name for read_path's encoding


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class Source:
    """One input, queried through DuckDB.

    Build with :meth:`from_path`, :meth:`from_sql` or :meth:`from_arrow`.

    Attributes:
        label: how errors name the input (a path, ``[input] sql``, ``data``).
        where: optional DuckDB SQL boolean expression applied while reading.
        order_by: optional DuckDB SQL ``ORDER BY`` list: which rows go first.
        limit: optional cap on rows (after ``where`` and ``order_by``).
    """

    def __init__(self, relation_sql: str, *, label: str, con: duckdb.DuckDBPyConnection,
                 where: str | None = None, limit: int | None = None, order_by: str | None = None) -> None:
        self._rel = relation_sql
        self._con = con
        self.label = label
        self.where = where
        self.order_by = order_by
        self.limit = limit
        self._schema: pa.Schema | None = None
        self._file: _File | None = None
        self._cleanup: weakref.finalize | None = None

    # -- construction -------------------------------------------------------
    @classmethod
    def from_path(cls, path: Path, *, where: str | None = None, limit: int | None = None,
                  order_by: str | None = None, encoding: str | None = None) -> Source:
        """A file source; the reader is picked by extension.

        Args:
            path: a .csv, .tsv, .parquet, .jsonl, .ndjson or .json file.
            where, limit, order_by: see the class attributes.
            encoding: the text encoding of a CSV or JSON file (a Python codec
                name, e.g. ``latin-1``, ``cp1252``); None means UTF-8. See
                :mod:`llmap.io.encoding` for how each is read.

        Raises:
            InputError: the extension is unknown, the file does not exist, is
                a folder or empty, ``encoding`` does not apply or fails to decode it.
        """
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            raise InputError(
                f"input {str(path)!r}: unknown file type {path.suffix!r}; use .csv, .parquet or .jsonl, or [input] sql"
            )
        if not path.exists():
            raise InputError(missing_file("input file", path, "check [input] path (relative to the job file)"))
        label = str(path)
        check_file(path, label)
        suffix = path.suffix.lower()
        fmt = {"read_csv": "csv", "read_parquet": "parquet"}.get(reader, "json" if suffix == ".json" else "jsonl")
        if encoding is not None and fmt == "parquet":
            raise InputError(f"[input] encoding applies to CSV and JSON files; {label} is Parquet, which stores text "
                             "as UTF-8: remove [input] encoding")
        read_path, read_encoding = path, "utf-8"
        opts = ", delim='\\t'" if suffix == ".tsv" else ", format='newline_delimited'" if fmt == "jsonl" else ""
        if encoding is not None and fmt != "parquet":
            native = duckdb_csv_encoding(encoding) if fmt == "csv" else "utf-8" if is_utf8(encoding) else None
            if native is None:  # DuckDB cannot decode it offline: read a UTF-8 copy
                read_path = transcode_to_utf8(path, encoding, label=label)
            elif native != "utf-8":
                opts += f", encoding={_sql_str(native)}"
                read_encoding = canonical(encoding)
        rel = f"{reader}({_sql_str(str(read_path))}{opts})"
        src = cls(rel, label=label, con=_connect(path.parent), where=where, limit=limit, order_by=order_by)
        src._file = _File(fmt, read_path, read_encoding)
        if read_path != path:  # a temporary UTF-8 copy: deleted on close, or when the source is collected
            src._cleanup = weakref.finalize(src, shutil.rmtree, read_path.parent, True)
        return src

    @classmethod
    def from_sql(cls, sql: str, *, base_dir: Path, where: str | None = None, limit: int | None = None,
                 order_by: str | None = None) -> Source:
        """A DuckDB query source; relative file names in it resolve against ``base_dir``."""
        return cls(f"({sql.strip().rstrip(';')})", label="[input] sql", con=_connect(base_dir),
                   where=where, limit=limit, order_by=order_by)

    @classmethod
    def from_arrow(cls, table: pa.Table, *, where: str | None = None, limit: int | None = None) -> Source:
        """An in-memory Arrow table (used by :func:`llmap.map`)."""
        con = duckdb.connect()
        con.register("llmap_input", table)
        return cls("llmap_input", label="data", con=con, where=where, limit=limit)

    # -- header -------------------------------------------------------------
    @property
    def schema(self) -> pa.Schema:
        """The input's columns and Arrow types (reads only the header / a sample).

        Raises:
            InputError: the input cannot be read or the query fails.
        """
        if self._schema is None:
            try:
                schema = _arrow_table(self._con.sql(f"SELECT * FROM {self._rel} LIMIT 0")).schema
            except duckdb.Error as exc:
                raise InputError(self._explain(exc) or f"cannot read input {self.label}: {_first_line(exc)}; "
                                 "check the file and its format") from None
            f, problem = self._file, None
            if f is not None and f.fmt == "csv":
                problem = csv_shape_problem(f.read_path, schema.names, encoding=f.encoding, label=self.label)
            elif f is not None and f.fmt == "jsonl":
                problem = jsonl_shape_problem(f.read_path, schema.names, label=self.label)
            if problem:
                raise InputError(problem)
            self._schema = schema
        return self._schema

    def _explain(self, exc: BaseException) -> str | None:
        """A one-line message for a reader error on a file source (see :mod:`llmap.io.diagnose`), or None."""
        f = self._file
        return explain(str(exc), fmt=f.fmt, label=self.label, read_path=f.read_path) if f is not None else None

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    def require_columns(self, needed: Sequence[tuple[str, str]]) -> None:
        """Check that every column the job names exists.

        Args:
            needed: ``(column, who names it)`` pairs, e.g. ``("state", "[output] keep")``.

        Raises:
            InputError: naming the first missing column, who wants it, the
                closest name among the input's columns, and those columns.
        """
        have = self.columns
        for col, who in needed:
            if col in have:
                continue
            raise InputError(f"{who} names column {col!r}, which input {self.label} lacks; "
                             f"{column_hint(col, have)}input columns: {_shown(have)}")

    # -- queries ------------------------------------------------------------
    def _select(self, columns: Sequence[str]) -> str:
        cols = ", ".join(quote_ident(c) for c in columns) if columns else "1 AS _one"
        sql = f"SELECT {cols} FROM {self._rel}"
        if self.where:
            sql += f" WHERE ({self.where})"
        if self.order_by:
            sql += f" ORDER BY {self.order_by}"
        if self.limit is not None:
            sql += f" LIMIT {int(self.limit)}"
        return sql

    def _run(self, sql: str, what: str) -> duckdb.DuckDBPyRelation:
        try:
            return self._con.sql(sql)
        except duckdb.Error as exc:
            raise self._input_error(exc, what) from None

    def _fetch(self, sql: str, what: str) -> list[tuple]:
        """Run a query to the end; reading errors (found only while the file is read) become InputError."""
        rel = self._run(sql, what)
        try:
            return rel.fetchall()
        except duckdb.Error as exc:
            raise self._input_error(exc, what) from None

    def _input_error(self, exc: duckdb.Error, what: str) -> InputError:
        explained = self._explain(exc)
        if explained:
            return InputError(explained)
        msg = _first_line(exc)
        if (self.where or self.order_by) and re.search(r"Binder Error|Parser Error|Conversion Error|Catalog Error",
                                                       msg):
            what = " and ".join(f"{k} {v!r}" for k, v in (("where", self.where), ("order_by", self.order_by)) if v)
            return InputError(
                f"[input] {what} fails on {self.label}: {msg}; fix the expression "
                f"(DuckDB SQL over columns: {', '.join(self.columns[:20])})"
            )
        return InputError(f"cannot {what} input {self.label}: {msg}")

    def check_where(self) -> None:
        """Compile ``where`` and ``order_by`` against the input without reading rows.

        Raises:
            InputError: an expression does not parse or names unknown columns.
        """
        if self.where or self.order_by:
            self._run(f"SELECT * FROM ({self._select(self.columns)}) LIMIT 0", "filter")

    def count(self) -> int:
        """Rows the job will see (after ``where`` and ``limit``)."""
        return int(self._fetch(f"SELECT count(*) FROM ({self._select([])})", "count")[0][0])

    def first_duplicate(self, key: str | Sequence[str]) -> tuple[Any, int] | None:
        """The first key value that occurs more than once, with its count, or None.

        Args:
            key: a column, or the columns of a composite key (then the value is a tuple).
        """
        cols = [key] if isinstance(key, str) else list(key)
        k = ", ".join(quote_ident(c) for c in cols)
        rows = self._fetch(
            f"SELECT {k}, count(*) AS n FROM ({self._select(cols)}) GROUP BY {k} HAVING count(*) > 1 "
            f"ORDER BY n DESC, {k} LIMIT 1",
            "check keys of",
        )
        if not rows:
            return None
        value = rows[0][0] if isinstance(key, str) else tuple(rows[0][:len(cols)])
        return value, int(rows[0][len(cols)])

    def null_keys(self, key: str | Sequence[str]) -> int:
        """How many rows have a NULL key (any of a composite key's columns NULL)."""
        cols = [key] if isinstance(key, str) else list(key)
        nulls = " OR ".join(f"{quote_ident(c)} IS NULL" for c in cols)
        sql = f"SELECT count(*) FROM ({self._select(cols)}) WHERE {nulls}"
        return int(self._fetch(sql, "check keys of")[0][0])

    def distinct_counts(self, columns: Sequence[str]) -> tuple[int, dict[str, int], dict[str, int]]:
        """Rows, distinct values per column and NULLs per column (for guessing a key; reads the input once).

        Returns:
            ``(rows, {column: distinct values}, {column: NULL values})`` after ``where`` and ``limit``.
        """
        if not columns:
            return self.count(), {}, {}
        parts = ["count(*)"]
        for c in columns:
            q = quote_ident(c)
            parts += [f"count(DISTINCT {q})", f"count(*) - count({q})"]
        row = self._fetch(f"SELECT {', '.join(parts)} FROM ({self._select(columns)})", "read")[0]
        distinct = {c: int(row[1 + 2 * i]) for i, c in enumerate(columns)}
        nulls = {c: int(row[2 + 2 * i]) for i, c in enumerate(columns)}
        return int(row[0]), distinct, nulls

    def sample(self, columns: Sequence[str], n: int, *, seed: int) -> pa.Table:
        """``n`` rows drawn at random (reservoir sampling, repeatable with ``seed``) from the rows a run would
        read (after ``where``, ``order_by`` and ``limit``), in input order.

        Args:
            columns: the columns to read.
            n: rows to draw; all rows when the input has fewer.
            seed: the sample's seed: the same seed draws the same rows from the same input.

        Returns:
            An Arrow table of ``columns`` plus ``_seq``, each row's 0-based position in the rows a run reads.

        Raises:
            InputError: the input cannot be read.
        """
        inner = self._select(list(columns))
        cols = ", ".join(quote_ident(c) for c in columns)
        sql = (f"SELECT * FROM (SELECT {cols + ', ' if cols else ''}(row_number() OVER ()) - 1 AS _seq "
               f"FROM ({inner})) USING SAMPLE reservoir({int(n)} ROWS) REPEATABLE ({int(seed)}) ORDER BY _seq")
        rel = self._run(sql, "sample")
        try:
            return _arrow_table(rel)
        except (duckdb.Error, OSError, pa.ArrowException) as exc:
            raise InputError(self._explain(exc) or f"reading input {self.label} failed: {_first_line(exc)}") from None

    def batches(self, columns: Sequence[str], *, batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """Stream the projected, filtered, limited rows as Arrow record batches.

        Args:
            columns: the columns to read, in this order.
            batch_rows: rows per batch.

        Yields:
            ``pyarrow.RecordBatch`` objects with exactly ``columns``.

        Raises:
            InputError: the input cannot be read.
        """
        rel = self._run(self._select(columns), "read")
        try:
            yield from _arrow_reader(rel, batch_rows)
        except (duckdb.Error, OSError, pa.ArrowException) as exc:  # DuckDB errors reach Arrow's reader as OSError
            raise InputError(self._explain(exc) or f"reading input {self.label} failed: {_first_line(exc)}") from None

    def arrow_schema(self, columns: Sequence[str]) -> pa.Schema:
        """Arrow types of the given columns, as :meth:`batches` will yield them."""
        return pa.schema([self.schema.field(c) for c in columns])

    def close(self) -> None:
        self._con.close()
        if self._cleanup is not None:
            self._cleanup()


def _arrow_table(rel: duckdb.DuckDBPyRelation) -> pa.Table:
    return rel.to_arrow_table()


def _arrow_reader(rel: duckdb.DuckDBPyRelation, batch_rows: int) -> pa.RecordBatchReader:
    return rel.to_arrow_reader(batch_rows)


#: DuckDB's memory cap for reading input; larger sorts and aggregates spill to a temp folder.
#: Keeps llmap's peak RSS flat (under ~300 MB for a 1M-row CSV); see bench/b6_scale.py.
DUCKDB_MEMORY_LIMIT = "128MB"
#: DuckDB worker threads: one bounds per-thread buffers (reading is never llmap's bottleneck).
DUCKDB_THREADS = 1


def _connect(base_dir: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(config={"memory_limit": DUCKDB_MEMORY_LIMIT, "threads": DUCKDB_THREADS})
    # Relative file names inside [input] sql resolve against the job file's folder.
    con.execute(f"SET file_search_path = {_sql_str(str(base_dir))}")
    return con
