"""``[output] checks``: bound against the input's columns and the fields, evaluated with DuckDB."""

from __future__ import annotations

import asyncio

import pyarrow as pa
import pytest

from llmap import errors as E
from llmap.quality.checks import Checks, duckdb_types
from llmap.spec import CheckSpec

FIELDS = {"region": "string", "low": "integer", "high": "integer"}
INPUT = {"id": "BIGINT", "country": "VARCHAR", "opened": "DATE", "region": "VARCHAR", "unused": "VARCHAR"}


def bind(*sqls: str, fields=FIELDS, inputs=INPUT) -> Checks:
    return Checks.bind([CheckSpec(sql=s, message=f"m{i}") for i, s in enumerate(sqls)], fields, inputs)


def test_input_types_are_duckdbs():
    schema = pa.schema([("a", pa.int32()), ("b", pa.float32()), ("c", pa.large_string()), ("d", pa.date32()),
                        ("e", pa.bool_()), ("f", pa.decimal128(10, 2)), ("g", pa.timestamp("us"))])
    assert duckdb_types(schema) == {"a": "BIGINT", "b": "DOUBLE", "c": "VARCHAR", "d": "DATE", "e": "BOOLEAN",
                                    "f": "DECIMAL(10,2)", "g": "TIMESTAMP"}


def test_checks_read_input_and_output_and_keep_the_columns_they_read():
    checks = bind("output.region != 'LATAM' OR country IN ('BR', 'MX')", "low <= high",
                  "opened < DATE '2020-01-01' OR id > 10")
    assert checks.columns == ["id", "country", "opened"]  # input order; 'unused' is not read
    rows = [{"id": 1, "country": "ID", "opened": "2019-05-01"}, {"id": 2, "country": "BR", "opened": "2021-01-01"},
            {"id": 30, "country": "BR", "opened": "2021-01-01"}]
    outs = [{"region": "LATAM", "low": 1, "high": 2}, {"region": "LATAM", "low": 1, "high": 2},
            {"region": "LATAM", "low": 5, "high": 2}]
    got = checks.failures(rows, outs)
    assert [g.sql if g else None for g in got] == ["output.region != 'LATAM' OR country IN ('BR', 'MX')",
                                                   "opened < DATE '2020-01-01' OR id > 10", "low <= high"]
    assert asyncio.run(checks.first_failure(rows[0], {"region": "APAC", "low": 1, "high": 1})) is None
    checks.close()


def test_null_passes_as_in_a_sql_check_constraint():
    checks = bind("low <= high")
    assert checks.failures([{}], [{"low": None, "high": 3}]) == [None]


@pytest.mark.parametrize(("sql", "words"), [
    ("contry = 'BR'", "unknown column 'contry' (did you mean 'country'?)"),
    ("region = 'x'", 'Ambiguous reference to column name "region"'),
    ("low + 1", "is a BIGINT, not a condition"),
    ("true)); SELECT (concat('BOOLEAN'", "more than one SQL statement"),
])
def test_bad_checks_are_one_line_spec_errors_naming_the_check(sql, words):
    with pytest.raises(E.SpecError) as info:
        bind("low <= high", sql)
    message = str(info.value)
    assert message.startswith("[output] checks #2") and words in message and "\n" not in message
