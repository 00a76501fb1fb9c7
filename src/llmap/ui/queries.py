"""Pages of rows: the table's filters and sorts as SQL, over the page's index or, while it builds, the ledger.

A :class:`RowQuery` is what the page asks for (status, model, error class, group, output field values, confidence
below a value, words to search, a sort and a page). :func:`page` answers it from the index
(:class:`~llmap.ui.index.UiIndex`): the narrowest filter picks the index SQLite walks (it knows each filter's rows:
the in-memory counts, or a count capped at :data:`NARROW`), then the page's rows are read from the ledger by key.
While the index is not built yet, :func:`ledger_page` answers the same query from the ledger itself
(``json_extract`` and ``LIKE``: correct, slower on a large ledger).

A filter's count above :data:`COUNT_CAP` rows is given as "at least": counting exactly would scan up to every
row (the plan's own count, with no filter, is always exact). Words
are searched in FTS5 (each word whole, or as a prefix when typed with ``*`` after it); when more
than :data:`NARROW` rows match, they come in the ledger's order, unsorted, and the page says so.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from llmap.store.ledger import STATUSES
from llmap.ui.index import Columns, UiIndex

__all__ = ["COUNT_CAP", "NARROW", "RowPage", "RowQuery", "fts_query", "iter_keys", "ledger_page", "page", "read_rows"]

#: Rows counted at most for a filter's total (above it the page says "100,000+").
COUNT_CAP = 100_000
#: A filter matching at most this many rows is walked through its own index and sorted in memory.
NARROW = 20_000
#: Rows per page at most.
MAX_LIMIT = 500
#: Characters of one value in a table cell (the row's detail shows it whole).
CELL_CHARS = 300

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class RowQuery:
    """What the table asks for.

    Attributes:
        status: one of :data:`~llmap.store.ledger.STATUSES`, or None for all.
        model: ``provider:name`` of the model that settled the row.
        error: an error class (``AnswerInvalid``, ``RequestTimeout``, ``other``).
        group: the ``--by`` column's value (typed: str, int, float, bool), or None for all; see ``has_group``.
        has_group: filter on ``group`` (so that a NULL group value can be asked for).
        fields: ``(field, value)`` pairs: the answer's field equals the value (typed as the field).
        conf_below: only rows whose confidence is below this (0 to 1).
        text: words to search in the row's inputs, answer and error.
        sort: ``seq`` (input order), ``key``, ``status``, ``model``, ``error``, ``group``, ``conf`` or
            ``field:NAME``.
        desc: descending.
        offset, limit: the page.
    """

    status: str | None = None
    model: str | None = None
    error: str | None = None
    group: Any = None
    has_group: bool = False
    fields: tuple[tuple[str, Any], ...] = ()
    conf_below: float | None = None
    text: str | None = None
    sort: str = "seq"
    desc: bool = False
    offset: int = 0
    limit: int = 50

    @classmethod
    def from_params(cls, params: Mapping[str, str], columns: Columns, types: Mapping[str, str]) -> RowQuery:
        """Read a query from URL parameters: ``status``, ``model``, ``error``, ``group`` (JSON), ``f.NAME``
        (a field's value), ``conf_lt``, ``q``, ``sort``, ``desc``, ``offset``, ``limit``.

        Args:
            params: the URL's query parameters.
            columns: what the index keeps (the fields, the group column).
            types: field name -> its spec type (``string``, ``integer``, ``number``, ``boolean``).

        Raises:
            ValueError: a parameter the page cannot have sent (one line naming it).
        """
        status = params.get("status") or None
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        fields = []
        for k, v in params.items():
            if k.startswith("f.") and v != "":
                name = k[2:]
                if name not in columns.fields:
                    raise ValueError(f"no output field {name!r}; the job's fields: {', '.join(columns.fields)}")
                fields.append((name, typed(v, types.get(name, "string"))))
        has_group = "group" in params and params["group"] != ""
        group = None
        if has_group:
            if not columns.group:
                raise ValueError("no group column: start the page with --by COLUMN")
            try:
                group = json.loads(params["group"])
            except ValueError:
                raise ValueError(f"group must be a JSON value, got {params['group']!r}") from None
        conf = params.get("conf_lt") or None
        conf_below = None
        if conf is not None:
            if not columns.confidence:
                raise ValueError("this ledger has no confidence column yet (a ledger from before migration "
                                 "007_quality: the next `llmap run` adds it)")
            try:
                conf_below = float(conf)
            except ValueError:
                raise ValueError(f"conf_lt must be a number between 0 and 1, got {conf!r}") from None
        sort = params.get("sort") or "seq"
        if sort not in ("seq", "key", "status", "model", "error", "group", "conf") and not (
                sort.startswith("field:") and sort[6:] in columns.fields):
            raise ValueError(f"cannot sort by {sort!r}")
        try:
            offset = max(0, int(params.get("offset") or 0))
            limit = min(MAX_LIMIT, max(1, int(params.get("limit") or 50)))
        except ValueError:
            raise ValueError("offset and limit must be whole numbers") from None
        return cls(status=status, model=params.get("model") or None, error=params.get("error") or None,
                   group=group, has_group=has_group, fields=tuple(fields), conf_below=conf_below,
                   text=(params.get("q") or "").strip() or None, sort=sort,
                   desc=params.get("desc") in ("1", "true"), offset=offset, limit=limit)


def typed(text: str, kind: str) -> Any:
    """A field value typed in the page, as the field's type stores it (``null`` is None).

    Raises:
        ValueError: not a value of that type.
    """
    if text == "null":
        return None
    if kind == "integer":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
    if kind == "number":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if kind == "boolean":
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{text!r} is not true or false")
        return 1 if text.lower() in ("true", "1") else 0  # how json_extract gives a JSON boolean
    return text


def fts_query(text: str) -> str | None:
    """FTS5 query for words typed in the search box: every word must occur (AND), each quoted (no FTS syntax
    reaches SQLite); a word typed with a ``*`` after it matches the words it begins (``distr*``), when it has
    2 characters or more. None when no word."""
    parts = []
    for m in _WORD.finditer(text):
        word = m.group(0)
        prefix = text[m.end():m.end() + 1] == "*" and len(word) >= 2
        parts.append(f'"{word}"' + ("*" if prefix else ""))
    return " ".join(parts) or None


@dataclass
class RowPage:
    """One page of the table.

    Attributes:
        keys: the rows' keys, in page order.
        total: rows matching (at most :data:`COUNT_CAP` counted; see ``capped``).
        capped: there are more than ``total``.
        sorted: the rows follow the sort asked (False for a search matching more than :data:`NARROW` rows).
        indexed: answered from the index (False: from the ledger while the index builds).
    """

    keys: list[str]
    total: int
    capped: bool = False
    sorted: bool = True
    indexed: bool = True
    rows: list[dict[str, Any]] = field(default_factory=list)


def _sort_col(q: RowQuery, columns: Columns) -> str:
    if q.sort.startswith("field:"):
        return f"f{columns.fields.index(q.sort[6:])}"
    return {"error": "err", "group": "grp"}.get(q.sort, q.sort)


def _conditions(q: RowQuery, columns: Columns, expr: Mapping[str, str]) -> list[tuple[str, str, tuple]]:
    """``(index column, SQL, params)`` per filter (the text search apart)."""
    out: list[tuple[str, str, tuple]] = []
    for col, value in (("status", q.status), ("model", q.model), ("err", q.error)):
        if value is not None:
            out.append((col, f"{expr[col]} = ?", (value,)))
    if q.has_group:
        out.append(("grp", f"{expr['grp']} IS ?", (q.group,)))
    for name, value in q.fields:
        col = f"f{columns.fields.index(name)}"
        out.append((col, f"{expr[col]} IS ?", (value,)))
    if q.conf_below is not None:
        out.append(("conf", f"{expr['conf']} < ?", (q.conf_below,)))
    return out


def _counted(index: UiIndex, plan: int, q: RowQuery) -> dict[str, int]:
    """Exact rows per categorical filter from the index's in-memory counts (status, model, error, group)."""
    counts = index.counts()
    out: dict[str, int] = {}
    for col, pos, active, value in (("status", 1, q.status is not None, q.status),
                                    ("model", 2, q.model is not None, q.model),
                                    ("err", 4, q.error is not None, q.error), ("grp", 5, q.has_group, q.group)):
        if active:
            out[col] = sum(n for cell, n in counts.items() if cell[0] == plan and cell[pos] == value)
    return out


def _order(sort: str, desc: bool) -> str:
    way = "DESC" if desc else "ASC"
    if sort in ("seq", "key"):  # unique in a plan: nothing to break ties
        return f"{sort} {way}"
    return f"{sort} {way}, seq {way}"


def page(index: UiIndex, db: sqlite3.Connection, plan: int, q: RowQuery) -> RowPage:
    """A page of rows from the index.

    Args:
        index: the ledger's index (ready).
        db: a read-only connection to the index file (:meth:`UiIndex.reader`), owned by this thread.
        plan: the ledger's latest plan.
        q: the query.
    """
    columns = index.columns
    expr = {c: c for c in ("status", "model", "err", "grp", "conf", *[f"f{i}" for i in range(len(columns.fields))])}
    conds = _conditions(q, columns, expr)
    where = " AND ".join(["plan = ?", *[c[1] for c in conds]])
    params: tuple = (plan, *[p for c in conds for p in c[2]])
    sort = _sort_col(q, columns)
    order = _order(sort, q.desc)
    if q.text:
        match = fts_query(q.text)
        if match is None:
            return RowPage([], 0)
        ids = [r[0] for r in db.execute("SELECT rowid FROM fts WHERE fts MATCH ? LIMIT ?", (match, NARROW + 1))]
        if len(ids) <= NARROW:  # the matches drive: each looked up once, filtered, sorted
            found = [r[0] for r in db.execute(
                f"SELECT r.id FROM (SELECT value AS v FROM json_each(?)) j CROSS JOIN r ON r.id = j.v WHERE {where} "
                f"ORDER BY {order}",
                (json.dumps(ids), *params))]
            return RowPage(_keys(db, found[q.offset:q.offset + q.limit]), len(found))
        found = [r[0] for r in db.execute(
            f"SELECT r.id FROM fts JOIN r ON r.id = fts.rowid WHERE fts MATCH ? AND {where} ORDER BY fts.rowid "
            "LIMIT ? OFFSET ?", (match, *params, q.limit, q.offset))]
        return RowPage(_keys(db, found), NARROW, capped=True, sorted=False)
    # each filter's rows: exact for the counted columns, capped at COUNT_CAP + 1 for the others
    sizes = _counted(index, plan, q)
    for col, sql, p in conds:
        if col not in sizes:
            sizes[col] = db.execute(f"SELECT count(*) FROM (SELECT 1 FROM r WHERE plan = ? AND {sql} LIMIT ?)",
                                    (plan, *p, COUNT_CAP + 1)).fetchone()[0]
    # the narrowest filter's own index, sorted after, unless the sort's index (or a wide filter) does better
    hint = ""
    narrow = min(sizes, key=lambda c: sizes[c]) if sizes else None
    if narrow is not None and sizes[narrow] <= COUNT_CAP and narrow != sort:
        hint = f" INDEXED BY r_{narrow}"
    elif sort == "key":
        hint = " INDEXED BY r_key"
    in_order = sort == "seq" and len(conds) == 1 and narrow != "conf"  # the filter's index walks in input order
    if hint and hint != " INDEXED BY r_key" and not in_order:
        # a narrow filter: one walk of its index gives every match, sorted; the page is a slice of it
        found = [r[0] for r in db.execute(f"SELECT id FROM r{hint} WHERE {where} ORDER BY {order} LIMIT ?",
                                          (*params, COUNT_CAP + 1))]
        return RowPage(_keys(db, found[q.offset:q.offset + q.limit]), min(len(found), COUNT_CAP),
                       len(found) > COUNT_CAP)
    if not conds:
        total, capped = sum(n for cell, n in index.counts().items() if cell[0] == plan), False
    elif len(conds) == 1:
        total, capped = min(sizes[conds[0][0]], COUNT_CAP), sizes[conds[0][0]] > COUNT_CAP
    else:
        total = db.execute(f"SELECT count(*) FROM (SELECT 1 FROM r{hint} WHERE {where} LIMIT ?)",
                           (*params, COUNT_CAP + 1)).fetchone()[0]
        capped = total > COUNT_CAP
        total = min(total, COUNT_CAP)
    # ids first: the page's offset walks the index alone, the keys are read for the page's rows only
    found = [r[0] for r in db.execute(f"SELECT id FROM r{hint} WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?",
                                      (*params, q.limit, q.offset))]
    return RowPage(_keys(db, found), total, capped)


def _keys(db: sqlite3.Connection, ids: list[int]) -> list[str]:
    keys = dict(db.execute("SELECT id, key FROM r WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(ids),)))
    return [keys[i] for i in ids if i in keys]


def ledger_page(ledger: sqlite3.Connection, columns: Columns, plan: int, q: RowQuery) -> RowPage:
    """The same page from the ledger itself (while the index builds): every filter is an expression over the
    row's JSON, the text search a ``LIKE``."""
    expr = {"status": "status", "model": "model", **columns.ledger_exprs(), "seq": "seq", "key": "key"}
    conds = _conditions(q, columns, expr)
    where = " AND ".join(["plan = ?", *[c[1] for c in conds]])
    params: tuple = (plan, *[p for c in conds for p in c[2]])
    if q.text:
        where, params = _like(q.text, where, params)
    sort = expr.get(_sort_col(q, columns), "seq")
    order = f"{sort} {'DESC' if q.desc else 'ASC'}, seq {'DESC' if q.desc else 'ASC'}"
    cap = COUNT_CAP + 1 if conds or q.text else -1  # every row of the plan is counted exactly (its own index)
    total = ledger.execute(f"SELECT count(*) FROM (SELECT 1 FROM rows WHERE {where} LIMIT ?)",
                           (*params, cap)).fetchone()[0]
    if cap < 0:
        return RowPage(_ledger_keys(ledger, where, params, order, q), total, indexed=False)
    return RowPage(_ledger_keys(ledger, where, params, order, q), min(total, COUNT_CAP), capped=total > COUNT_CAP,
                   indexed=False)


def _ledger_keys(ledger: sqlite3.Connection, where: str, params: tuple, order: str, q: RowQuery) -> list[str]:
    return [r[0] for r in ledger.execute(f"SELECT key FROM rows WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?",
                                         (*params, q.limit, q.offset))]


def _like(text: str, where: str, params: tuple) -> tuple[str, tuple]:
    """The search as ``LIKE`` conditions over the ledger's row (every word somewhere in it)."""
    for word in _WORD.findall(text):
        like = "%" + word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where += (" AND (key LIKE ? ESCAPE '\\' OR data LIKE ? ESCAPE '\\' OR output LIKE ? ESCAPE '\\' "
                  "OR error LIKE ? ESCAPE '\\')")
        params += (like,) * 4
    return where, params


def _cell(value: Any) -> Any:
    if isinstance(value, str) and len(value) > CELL_CHARS:
        return value[:CELL_CHARS] + "…"
    return value


def read_rows(ledger: sqlite3.Connection, keys: list[str], *, confidence: bool = False) -> list[dict[str, Any]]:
    """The table's rows for ``keys``, from the ledger, in the order of ``keys``: key, position, status, model,
    source, error, the input columns the ledger keeps (``data``) and the answer (``output``), long values cut to
    :data:`CELL_CHARS` characters."""
    if not keys:
        return []
    conf = "confidence" if confidence else "NULL"
    found = {}
    for key, seq, status, model, source, error, data, output, c in ledger.execute(
            f"SELECT key, seq, status, model, source, error, data, output, {conf} FROM rows "
            "WHERE key IN (SELECT value FROM json_each(?))", (json.dumps(keys),)):
        found[key] = {"key": key, "seq": seq, "status": status, "model": model, "source": source,
                      "error": _cell(error), "conf": c,
                      "data": {k: _cell(v) for k, v in json.loads(data or "{}").items()},
                      "output": {k: _cell(v) for k, v in json.loads(output).items()} if output else None}
    return [found[k] for k in keys if k in found]


def iter_keys(db: sqlite3.Connection, columns: Columns, plan: int, q: RowQuery, *, indexed: bool,
              statuses: tuple[str, ...] | None = None, chunk: int = 5_000) -> Iterator[list[str]]:
    """Every key the query's filters select (sort and page ignored), ``chunk`` keys at a time in input order.

    Args:
        db: a connection to the index (``indexed``) or to the ledger.
        columns: what the index keeps.
        plan: the latest plan.
        q: the filters.
        indexed: ``db`` is the index (else the ledger, searched with ``LIKE``).
        statuses: only rows with one of these statuses (besides ``q.status``).
        chunk: keys per list.
    """
    if indexed:
        expr = {c: c for c in ("status", "model", "err", "grp", "conf", *[f"f{i}" for i in range(len(columns.fields))])}
        table = "r"
    else:
        expr = {"status": "status", "model": "model", **columns.ledger_exprs()}
        table = "rows"
    conds = _conditions(q, columns, expr)
    where = " AND ".join(["plan = ?", *[c[1] for c in conds]])
    params: tuple = (plan, *[p for c in conds for p in c[2]])
    if statuses:
        where += f" AND status IN ({', '.join('?' * len(statuses))})"
        params += tuple(statuses)
    if q.text and indexed:
        match = fts_query(q.text)
        if match is None:
            return
        where += " AND id IN (SELECT rowid FROM fts WHERE fts MATCH ?)"
        params += (match,)
    elif q.text:
        where, params = _like(q.text, where, params)
    last = -1
    while True:
        got = db.execute(f"SELECT key, seq FROM {table} WHERE {where} AND seq > ? ORDER BY seq LIMIT ?",
                         (*params, last, chunk)).fetchall()
        if not got:
            return
        yield [k for k, _ in got]
        last = got[-1][1]
