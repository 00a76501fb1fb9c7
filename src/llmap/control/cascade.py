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
import re
from collections.abc import Mapping, Sequence
from typing import Any

import duckdb
import pyarrow as pa

__all__ = ["DUCKDB_TYPES", "EscalateIf"]

#: llmap field type -> the DuckDB column type answers are evaluated as.
DUCKDB_TYPES: dict[str, str] = {"string": "VARCHAR", "integer": "BIGINT", "number": "DOUBLE", "boolean": "BOOLEAN"}
_ARROW_TYPES: dict[str, pa.DataType] = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(),
                                        "boolean": pa.bool_()}


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class EscalateIf:
    """One model's ``escalate_if``, bound to the job's output fields.

    Build it with :meth:`bind`. Not thread-safe: use it from one event loop.

    Attributes:
        text: the condition as written.
    """

    def __init__(self, text: str, field_types: Mapping[str, str], con: duckdb.DuckDBPyConnection, *,
                 name: str = "escalate_if") -> None:
        self.text = text
        self._name = name
        self._types = dict(field_types)
        self._schema = pa.schema([(n, _ARROW_TYPES[t]) for n, t in self._types.items()])
        self._con = con
        self._sql = f"SELECT coalesce(({text}), false) FROM answers"
        self._batch: list[tuple[Mapping[str, Any], asyncio.Future[bool]]] = []

    @classmethod
    def bind(cls, text: str, field_types: Mapping[str, str], *, name: str = "escalate_if") -> EscalateIf:
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
        con = duckdb.connect()
        con.execute("SET enable_external_access = false")
        cols = ", ".join(f"NULL::{DUCKDB_TYPES[t]} AS {_quote(n)}" for n, t in field_types.items())
        try:
            if len(duckdb.extract_statements(f"SELECT coalesce(({text}), false) FROM answers")) != 1:
                con.close()
                raise ValueError(f"{name} {text!r} is more than one SQL statement; write one condition, "
                                 "e.g. \"confidence < 0.7\"")
            kind = con.execute(f"SELECT typeof(({text})) FROM (SELECT {cols}) LIMIT 1").fetchall()[0][0]
        except duckdb.Error as exc:
            con.close()
            fields = ", ".join(f"{n} ({t})" for n, t in field_types.items())
            raise ValueError(f"{name} {text!r}: {_explain(exc, text, list(field_types))}; fields: {fields}") from None
        if kind not in ("BOOLEAN", '"NULL"', "NULL"):
            con.close()
            example = f"{text} = '...'" if kind == "VARCHAR" else f"{text} > 0"
            raise ValueError(f"{name} {text!r} is a {kind}, not a condition; compare it, e.g. \"{example}\"")
        cond = cls(text, field_types, con, name=name)
        try:  # an all-NULL answer: a literal DuckDB cannot cast (confidence < 'high') fails here, not on every row
            cond.evaluate_many([{}])
        except ValueError:
            cond.close()
            raise
        return cond

    def evaluate_many(self, answers: Sequence[Mapping[str, Any]]) -> list[bool]:
        """Whether each answer meets the condition (NULL counts as not met), in one query.

        Args:
            answers: validated answers, field name -> value; a missing field is NULL.

        Raises:
            ValueError: one line naming the condition: a value of the wrong type
                for its field, or one DuckDB cannot evaluate (e.g. a failed cast).
        """
        if not answers:
            return []
        try:
            table = pa.Table.from_pylist([{n: a.get(n) for n in self._types} for a in answers], schema=self._schema)
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"{self._name} {self.text!r}: an answer has a value its field's type cannot hold: "
                             f"{_first_line(exc)}") from exc
        self._con.register("answers", table)
        try:
            return [bool(v) for (v,) in self._con.execute(self._sql).fetchall()]
        except duckdb.Error as exc:
            raise ValueError(f"{self._name} {self.text!r}: {_first_line(exc)}") from exc
        finally:
            self._con.unregister("answers")

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
        loop = asyncio.get_running_loop()
        if not self._batch:
            loop.call_soon(self._run_batch)
        fut: asyncio.Future[bool] = loop.create_future()
        self._batch.append((answer, fut))
        return await fut

    def _run_batch(self) -> None:
        batch, self._batch = self._batch, []
        try:
            verdicts: list[bool | Exception] = list(self.evaluate_many([a for a, _ in batch]))
        except Exception:  # one answer's bad value (e.g. a failed cast): each alone, so only its row fails
            verdicts = [self._verdict(a) for a, _ in batch]
        for (_, fut), v in zip(batch, verdicts, strict=True):
            if fut.done():
                continue
            if isinstance(v, Exception):
                fut.set_exception(v)
            else:
                fut.set_result(v)

    def _verdict(self, answer: Mapping[str, Any]) -> bool | Exception:
        try:
            return self.evaluate(answer)
        except Exception as exc:
            return exc

    def close(self) -> None:
        """Release the DuckDB connection."""
        self._con.close()

    def __repr__(self) -> str:
        return f"EscalateIf({self.text!r})"


def _explain(exc: BaseException, text: str, fields: list[str]) -> str:
    """DuckDB's error in the job's words: an unknown field (with the closest name), else its first line."""
    why = _first_line(exc)
    missing = re.search(r'column "(.*)" not found', why)
    if missing is None:
        return why.replace("Binder Error: ", "").replace("Parser Error: ", "")
    name = missing.group(1)
    if _quote(name) in text:  # a double-quoted string: in SQL that names a column
        return f"unknown field {name!r} (in SQL double quotes name a field: write '{name}' for a string)"
    close = difflib.get_close_matches(name, fields, n=1)
    return f"unknown field {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__
