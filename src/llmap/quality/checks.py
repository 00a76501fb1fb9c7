"""``[output] checks``: rules across fields, DuckDB SQL over a row's input columns and its answer.

::

    [output]
    checks = [
      { sql = "region != 'LATAM' OR country IN ('BR', 'MX', 'AR')",
        message = "a LATAM region needs a Latin American country" },
      { sql = "low <= high", message = "low must not exceed high" },
    ]

Each check is a boolean expression over two relations side by side: ``input``,
every column of the input with its input type (the key included; ``_row``, the
row number, when the job has no key), and ``output``, the answer's fields typed
as ``escalate_if`` types them (``string`` VARCHAR, ``integer`` BIGINT, ``number``
DOUBLE, ``boolean`` BOOLEAN). A name found in only one of them needs no prefix;
a name in both is written ``input.x`` or ``output.x``. NULL passes, as in a SQL
``CHECK`` constraint: a check fails only when it is false.

Checks are bound at preflight (:meth:`Checks.bind`, from :func:`llmap.plan.check_input`):
a syntax error, an unknown column (with the closest name), a result that is not
true/false is a one-line error, exit 2, before any request. The input columns a
check reads are kept in the ledger's row data, so a check sees them at run time.

They run in the settle stage (:class:`~llmap.run.settle.Settler`), where fields
are validated: an answer that breaks a check is re-asked with the check's
message (as an invalid answer is, within ``[output] max_reask``), and when the
re-asks are spent the row fails with ``CheckFailed: <message> (check <sql>, ...)``.
A stored answer (the response cache, an identical row) is checked against each
row it settles, since a check may read columns the prompt does not.
The evaluation reuses ``escalate_if``'s DuckDB machinery
(:class:`~llmap.control.cascade.SqlCondition`): the answers settling in one
event-loop turn are checked in one query, and the connection cannot read files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import duckdb
import pyarrow as pa

from llmap import errors as E
from llmap.control.cascade import DUCKDB_TYPES, SqlCondition
from llmap.spec.quality import CheckSpec

__all__ = ["Checks", "check_error", "duckdb_types"]


def duckdb_types(schema: pa.Schema) -> dict[str, str]:
    """The DuckDB type a check sees for each input column: BIGINT, DOUBLE, BOOLEAN or VARCHAR for the plain
    types, DuckDB's own type (DATE, TIMESTAMP, DECIMAL(10,2)...) for the rest (cast from the ledger's text)."""
    out: dict[str, str] = {}
    other = []
    for f in schema:
        t = f.type
        if pa.types.is_boolean(t):
            out[f.name] = "BOOLEAN"
        elif pa.types.is_integer(t):
            out[f.name] = "BIGINT"
        elif pa.types.is_floating(t):
            out[f.name] = "DOUBLE"
        elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t):
            out[f.name] = "VARCHAR"
        else:
            out[f.name] = ""
            other.append(f)
    if other:
        con = duckdb.connect()
        try:
            con.register("t", pa.schema(other).empty_table())
            for name, kind, *_ in con.execute("DESCRIBE SELECT * FROM t").fetchall():
                out[name] = kind
        finally:
            con.close()
    return out


def check_error(check: CheckSpec, reasks: int) -> str:
    """A row's ``_error`` when ``check`` still failed after ``reasks`` re-asks."""
    return f"CheckFailed: {check.message} (check {check.sql!r}, after {reasks} re-asks)"


def _references(con_sql: str) -> list[list[str]]:
    """The column references of a query, as DuckDB parses them (``[["region"], ["input", "country"]]``)."""
    con = duckdb.connect()
    try:
        tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [con_sql]).fetchone()[0])
    finally:
        con.close()
    refs: list[list[str]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("class") == "COLUMN_REF":
                refs.append(list(node.get("column_names") or []))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(tree)
    return refs


class Checks:
    """The job's checks, bound (see the module docstring). Build with :meth:`bind`; not thread-safe.

    Attributes:
        specs: the checks, in ``[output] checks`` order.
        columns: the input columns they read (kept in the ledger's row data), in input order.
    """

    def __init__(self, specs: Sequence[CheckSpec], conds: Sequence[SqlCondition], columns: Sequence[str]) -> None:
        self.specs = list(specs)
        self._conds = list(conds)
        self.columns = list(columns)

    @classmethod
    def bind(cls, specs: Sequence[CheckSpec], field_types: Mapping[str, str], input_types: Mapping[str, str], *,
             source: str = "") -> Checks:
        """Bind every check against the input's columns and the fields.

        Args:
            specs: ``[output] checks``.
            field_types: output field -> llmap type.
            input_types: input column -> DuckDB type (:func:`duckdb_types`), the key (or ``_row``) included.
            source: how to name the job in errors ("" for no prefix).

        Raises:
            SpecError: one line naming the check (``[output] checks #2``), the problem and the columns.
        """
        relations = {"input": dict(input_types), "output": {n: DUCKDB_TYPES[t] for n, t in field_types.items()}}
        conds: list[SqlCondition] = []
        columns: set[str] = set()
        lower = {c.lower(): c for c in input_types}
        try:
            for i, spec in enumerate(specs, 1):
                name = f"[output] checks #{i}"
                try:
                    cond = SqlCondition.bind(spec.sql, relations, name=name, when_null=True, what="column",
                                             example="low <= high")
                except ValueError as exc:
                    raise E.SpecError(f"{source}: {exc}" if source else str(exc)) from None
                conds.append(cond)
                for ref in _references(cond.sql):
                    if len(ref) == 2 and ref[0].lower() == "input":
                        name_ = ref[1]
                    elif len(ref) == 1:
                        name_ = ref[0]
                    else:
                        continue
                    if name_.lower() in lower:
                        columns.add(lower[name_.lower()])
        except BaseException:
            for c in conds:
                c.close()
            raise
        return cls(specs, conds, [c for c in input_types if c in columns])

    def __bool__(self) -> bool:
        return bool(self.specs)

    async def first_failure(self, row: Mapping[str, Any], output: Mapping[str, Any]) -> CheckSpec | None:
        """The first check ``output`` breaks for ``row`` (its input columns), or None when it meets every one.

        The answers of one event-loop turn are checked together, one query per check.

        Raises:
            ValueError: a value DuckDB cannot evaluate (a failed cast), naming the check.
        """
        for spec, cond in zip(self.specs, self._conds, strict=True):
            if not await cond.holds_row((row, output)):
                return spec
        return None

    def failures(self, rows: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]
                 ) -> list[CheckSpec | None]:
        """:meth:`first_failure` for several rows at once (a pack's), one query per check.

        Raises:
            ValueError: as :meth:`first_failure`.
        """
        found: list[CheckSpec | None] = [None] * len(outputs)
        for spec, cond in zip(self.specs, self._conds, strict=True):
            todo = [i for i, f in enumerate(found) if f is None]
            if not todo:
                break
            verdicts = cond.evaluate_rows([(rows[i], outputs[i]) for i in todo])
            for i, ok in zip(todo, verdicts, strict=True):
                if not ok:
                    found[i] = spec
        return found

    def close(self) -> None:
        """Release the DuckDB connections."""
        for c in self._conds:
            c.close()
