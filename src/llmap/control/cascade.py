"""Cascades: ``escalate_if``, a DuckDB SQL condition on one model's answer.

``[[model]] escalate_if = "confidence < 0.7 OR kind = 'other'"`` sends a row
on to the next model when the answer meets the condition. The condition is
DuckDB SQL, the dialect ``[input] where`` and ``order_by`` already use, over
the output fields as typed columns (``string`` → VARCHAR, ``integer`` →
BIGINT, ``number`` → DOUBLE, ``boolean`` → BOOLEAN):

- single quotes are strings (``kind = 'other'``); double quotes name a field
  (``"kind"``), as in SQL;
- NULL is three-valued: ``confidence < 0.7`` is NULL for a NULL confidence,
  and a condition that is NULL does not escalate (write
  ``confidence IS NULL OR confidence < 0.7`` to escalate those too);
- any DuckDB expression works: ``IN``, ``LIKE``/``ILIKE``, ``BETWEEN``,
  ``length(summary) < 20``, ``regexp_matches(kind, '^x')``, arithmetic.

:meth:`EscalateIf.bind` checks the condition before any request, against a
zero-row relation of the fields: a bad name, a type DuckDB cannot compare or a
non-boolean result is a one-line error. At run time the answers that settle
in one event-loop turn are evaluated together in one query
(:meth:`EscalateIf.holds`); a pack's answers in one call
(:meth:`EscalateIf.evaluate_many`). The connection cannot read files or the
network (``enable_external_access = false``).
"""

from __future__ import annotations

import asyncio
import difflib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import duckdb
import pyarrow as pa

__all__ = ["DUCKDB_TYPES", "EscalateIf", "SqlCondition"]

#: llmap field type -> the DuckDB column type answers are evaluated as.
DUCKDB_TYPES: dict[str, str] = {"string": "VARCHAR", "integer": "BIGINT", "number": "DOUBLE", "boolean": "BOOLEAN"}
#: DuckDB types whose values travel as their plain Arrow twin (others as text, cast in a view).
_ARROW_BY_DUCKDB: dict[str, pa.DataType] = {"VARCHAR": pa.string(), "BIGINT": pa.int64(), "DOUBLE": pa.float64(),
                                            "BOOLEAN": pa.bool_()}
_LLMAP_BY_DUCKDB = {v: k for k, v in DUCKDB_TYPES.items()}


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class SqlCondition:
    """A DuckDB boolean expression over typed relations, bound once and evaluated in batches.

    The machinery ``escalate_if`` (:class:`EscalateIf`, one relation ``answers``) and ``[output]
    checks`` (:mod:`llmap.quality.checks`, the relations ``input`` and ``output`` side by side)
    share. Build it with :meth:`bind`. Not thread-safe: use it from one event loop.

    Attributes:
        text: the condition as written.
        sql: the query it runs (``SELECT coalesce((text), ...) FROM ...``).
    """

    def __init__(self, text: str, relations: Mapping[str, Mapping[str, str]], con: duckdb.DuckDBPyConnection, *,
                 name: str, when_null: bool = False) -> None:
        self.text = text
        self._name = name
        self._relations = {r: dict(cols) for r, cols in relations.items()}
        # columns whose DuckDB type has no plain Arrow twin travel as text and are cast in a view
        self._schemas = {r: pa.schema([(n, _ARROW_BY_DUCKDB.get(t, pa.string())) for n, t in cols.items()])
                         for r, cols in self._relations.items()}
        self._casts = {r: {n: t for n, t in cols.items() if t not in _ARROW_BY_DUCKDB}
                       for r, cols in self._relations.items()}
        self._con = con
        self.sql = f"SELECT coalesce(({text}), {'true' if when_null else 'false'}) FROM {self._from()}"
        self._batch: list[tuple[Any, asyncio.Future[bool]]] = []
        for r, casts in self._casts.items():
            if casts:
                cols = ", ".join(f"CAST({_quote(n)} AS {casts[n]}) AS {_quote(n)}" if n in casts else _quote(n)
                                 for n in self._relations[r])
                con.register("_raw_" + r, self._schemas[r].empty_table())  # the view binds against it
                con.execute(f"CREATE TEMP VIEW {_quote(r)} AS SELECT {cols} FROM {_quote('_raw_' + r)}")
                con.unregister("_raw_" + r)

    def _from(self) -> str:
        return " POSITIONAL JOIN ".join(_quote(r) if r != "answers" else r for r in self._relations)

    def _table_name(self, relation: str) -> str:
        return "_raw_" + relation if self._casts[relation] else relation

    @classmethod
    def bind(cls, text: str, relations: Mapping[str, Mapping[str, str]], *, name: str, when_null: bool = False,
             what: str = "field", example: str = "confidence < 0.7") -> SqlCondition:
        """Check ``text`` against the relations' typed columns and compile it.

        Args:
            text: the condition, DuckDB SQL.
            relations: relation name -> column name -> DuckDB type (``BIGINT``, ``VARCHAR``, ``DATE``...).
            name: how to name the condition in errors.
            when_null: what a NULL result counts as (``escalate_if``: False; a check: True, as SQL's CHECK).
            what: how errors call a column (``field`` or ``column``).
            example: a condition to suggest in errors.

        Raises:
            ValueError: see :meth:`EscalateIf.bind`.
        """
        if not text.strip():
            raise ValueError(f"{name} is empty; write a condition such as \"{example}\" or remove it")
        con = duckdb.connect()
        con.execute("SET enable_external_access = false")
        try:
            cond = cls(text, relations, con, name=name, when_null=when_null)
        except duckdb.Error as exc:
            con.close()
            raise ValueError(f"{name} {text!r}: {_first_line(exc)}") from None
        try:
            if len(duckdb.extract_statements(cond.sql)) != 1:
                raise ValueError(f"{name} {text!r} is more than one SQL statement; write one condition, "
                                 f"e.g. \"{example}\"")
            cond._register([tuple({} for _ in relations)])  # one all-NULL row: the expression's type
            try:
                kind = con.execute(f"SELECT typeof(({text})) FROM {cond._from()} LIMIT 1").fetchall()[0][0]
            finally:
                cond._unregister()
        except duckdb.Error as exc:
            cond.close()
            names = [n for cols in relations.values() for n in cols]
            listed = "; ".join(f"{r if len(relations) > 1 else what + 's'}: "
                               + ", ".join(f"{n} ({_word(t)})" for n, t in cols.items())
                               for r, cols in relations.items())
            raise ValueError(f"{name} {text!r}: {_explain(exc, text, names, what)}; {listed}") from None
        except ValueError:
            cond.close()
            raise
        if kind not in ("BOOLEAN", '"NULL"', "NULL"):
            cond.close()
            example = f"{text} = '...'" if kind == "VARCHAR" else f"{text} > 0"
            raise ValueError(f"{name} {text!r} is a {kind}, not a condition; compare it, e.g. \"{example}\"")
        try:  # an all-NULL row: a literal DuckDB cannot cast (confidence < 'high') fails here, not on every row
            cond.evaluate_rows([tuple({} for _ in relations)])
        except ValueError:
            cond.close()
            raise
        return cond

    def _register(self, rows: Sequence[Sequence[Mapping[str, Any]]]) -> None:
        for i, (r, cols) in enumerate(self._relations.items()):
            casts = self._casts[r]
            values = [{c: _plain(row[i].get(c)) if c in casts else row[i].get(c) for c in cols} for row in rows]
            try:
                table = pa.Table.from_pylist(values, schema=self._schemas[r])
            except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
                who = "an answer has a value its field's" if r in ("answers", "output") else \
                    "a row has a value its input column's"
                raise ValueError(f"{self._name} {self.text!r}: {who} type cannot hold: {_first_line(exc)}") from exc
            self._con.register(self._table_name(r), table)

    def _unregister(self) -> None:
        for r in self._relations:
            self._con.unregister(self._table_name(r))

    def evaluate_rows(self, rows: Sequence[Sequence[Mapping[str, Any]]]) -> list[bool]:
        """Whether each row meets the condition, in one query.

        Args:
            rows: per row, one mapping per relation (in :meth:`bind`'s order): column name -> value; a
                missing column is NULL.

        Raises:
            ValueError: one line naming the condition: a value of the wrong type for its column, or
                one DuckDB cannot evaluate (e.g. a failed cast).
        """
        if not rows:
            return []
        self._register(rows)
        try:
            return [bool(v) for (v,) in self._con.execute(self.sql).fetchall()]
        except duckdb.Error as exc:
            raise ValueError(f"{self._name} {self.text!r}: {_first_line(exc)}") from exc
        finally:
            self._unregister()

    async def holds_row(self, row: Any) -> bool:
        """Whether ``row`` (one mapping per relation, as :meth:`evaluate_rows` takes) meets the condition, with
        the rows of one event-loop turn evaluated together in one query; when the turn's query fails, each row
        is evaluated alone, so one bad value fails its own row and not the others settling with it.

        Raises:
            ValueError: as :meth:`evaluate_rows`, for this row only.
        """
        return await self._holds(row)

    async def _holds(self, item: Any) -> bool:
        loop = asyncio.get_running_loop()
        if not self._batch:
            loop.call_soon(self._run_batch)
        fut: asyncio.Future[bool] = loop.create_future()
        self._batch.append((item, fut))
        return await fut

    def _evaluate_items(self, items: list[Any]) -> list[bool]:
        return self.evaluate_rows(items)

    def _run_batch(self) -> None:
        batch, self._batch = self._batch, []
        try:
            verdicts: list[bool | Exception] = list(self._evaluate_items([a for a, _ in batch]))
        except Exception:  # one answer's bad value (e.g. a failed cast): each alone, so only its row fails
            verdicts = [self._verdict(a) for a, _ in batch]
        for (_, fut), v in zip(batch, verdicts, strict=True):
            if fut.done():
                continue
            if isinstance(v, Exception):
                fut.set_exception(v)
            else:
                fut.set_result(v)

    def _verdict(self, item: Any) -> bool | Exception:
        try:
            return self._evaluate_items([item])[0]
        except Exception as exc:
            return exc

    def close(self) -> None:
        """Release the DuckDB connection."""
        self._con.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.text!r})"


class EscalateIf(SqlCondition):
    """One model's ``escalate_if``, bound to the job's output fields (one relation, ``answers``).

    Build it with :meth:`bind`. Not thread-safe: use it from one event loop.

    Attributes:
        text: the condition as written.
    """

    @classmethod
    def bind(cls, text: str, field_types: Mapping[str, str], *, name: str = "escalate_if") -> EscalateIf:  # type: ignore[override]
        """Check ``text`` against the fields and compile it.

        Args:
            text: the condition, DuckDB SQL.
            field_types: output field name -> llmap type (``string``, ``integer``, ``number``, ``boolean``).
            name: how to name the condition in errors (e.g. ``[[model]] 'mini' escalate_if``).

        Raises:
            ValueError: one line naming the problem: a syntax error, an unknown
                field (with the fields there are), a type DuckDB cannot compare
                or a literal it cannot cast (e.g. ``confidence < 'high'``), a
                result that is not true/false, more than one SQL statement, an
                unknown field type, or two fields whose names differ only in case.
        """
        if not text.strip():
            raise ValueError(f"{name} is empty; write a condition such as \"confidence < 0.7\" or remove it")
        for n, t in field_types.items():
            if t not in DUCKDB_TYPES:
                raise ValueError(f"{name}: field {n!r} has unknown type {t!r}; types are: {', '.join(DUCKDB_TYPES)}")
        folded: dict[str, str] = {}
        for n in field_types:
            if (other := folded.setdefault(n.lower(), n)) != n:
                raise ValueError(f"{name}: fields {other!r} and {n!r} differ only in case, and SQL names are "
                                 "case-insensitive; rename one of them to use escalate_if")
        types = {n: DUCKDB_TYPES[t] for n, t in field_types.items()}
        return super().bind(text, {"answers": types}, name=name)  # type: ignore[return-value]

    def evaluate_many(self, answers: Sequence[Mapping[str, Any]]) -> list[bool]:
        """Whether each answer meets the condition (NULL counts as not met), in one query.

        Args:
            answers: validated answers, field name -> value; a missing field is NULL.

        Raises:
            ValueError: one line naming the condition: a value of the wrong type
                for its field, or one DuckDB cannot evaluate (e.g. a failed cast).
        """
        return self.evaluate_rows([(a,) for a in answers])

    def _evaluate_items(self, items: list[Any]) -> list[bool]:
        return self.evaluate_many(items)

    def evaluate(self, answer: Mapping[str, Any]) -> bool:
        """Whether one answer meets the condition (NULL counts as not met).

        Raises:
            ValueError: as :meth:`evaluate_many`.
        """
        return self.evaluate_many([answer])[0]

    async def holds(self, answer: Mapping[str, Any]) -> bool:
        """:meth:`evaluate`, with the answers of one event-loop turn evaluated together in one query.

        Raises:
            ValueError: as :meth:`evaluate_many`, for this answer only: when the
                turn's query fails, each answer is evaluated alone, so one bad
                value fails its own row and not the others settling with it.
        """
        return await self._holds(answer)


def _plain(value: Any) -> Any:
    """A value bound for a column cast from text (a DATE kept in the ledger as text): its text."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def _word(duck_type: str) -> str:
    """How errors name a column's type: the llmap field type, else the DuckDB type."""
    return _LLMAP_BY_DUCKDB.get(duck_type, duck_type)


def _explain(exc: BaseException, text: str, fields: list[str], what: str = "field") -> str:
    """DuckDB's error in the job's words: an unknown field (with the closest name), else its first line."""
    why = _first_line(exc)
    missing = re.search(r'column "(.*)" not found', why)
    if missing is None:
        return why.replace("Binder Error: ", "").replace("Parser Error: ", "")
    name = missing.group(1)
    if _quote(name) in text:  # a double-quoted string: in SQL that names a column
        return f"unknown {what} {name!r} (in SQL double quotes name a {what}: write '{name}' for a string)"
    close = difflib.get_close_matches(name, fields, n=1)
    return f"unknown {what} {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__
