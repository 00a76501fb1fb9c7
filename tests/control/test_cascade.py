"""EscalateIf (llmap.control.cascade): what llmap decides about an ``escalate_if`` condition.

The condition is DuckDB SQL, and DuckDB's own semantics (comparisons, LIKE, literals, casts, precedence) are
DuckDB's: they are not retested here. These tests cover llmap's decisions: how the output fields are bound as
typed columns, which mistakes are refused at bind (before any request) and in what words, what a NULL result
means (it does not escalate), that values are data and the connection reaches no file or network, and how
many answers are evaluated at once (one query per event-loop turn, one bad answer failing alone).
"""

from __future__ import annotations

import asyncio
import builtins
import itertools

import pytest

from llmap.control.cascade import DUCKDB_TYPES, EscalateIf

FIELDS = {"kind": "string", "confidence": "number", "n": "integer", "flag": "boolean"}
ALL_FIELDS = "fields: kind (string), confidence (number), n (integer), flag (boolean)"


def bind(text: str, fields: dict | None = None, **kwargs) -> EscalateIf:
    return EscalateIf.bind(text, FIELDS if fields is None else fields, **kwargs)


def holds(text: str, answer: dict, fields: dict | None = None) -> bool:
    cond = bind(text, fields)
    try:
        return cond.evaluate(answer)
    finally:
        cond.close()


def error(text: str, fields: dict | None = None, **kwargs) -> str:
    """The bind-time error for ``text``; asserts it is one line."""
    with pytest.raises(ValueError) as info:
        bind(text, fields, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def eval_error(text: str, answer: dict, fields: dict | None = None) -> str:
    """The evaluation-time error for ``text`` on ``answer`` (the condition binds); asserts it is one line."""
    cond = bind(text, fields)
    try:
        with pytest.raises(ValueError) as info:
            cond.evaluate(answer)
    finally:
        cond.close()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"escalate_if {text!r}: ")
    return message


# --- binding: the fields as typed columns ----------------------------------------


def test_each_field_type_is_a_typed_column():
    assert DUCKDB_TYPES == {"string": "VARCHAR", "integer": "BIGINT", "number": "DOUBLE", "boolean": "BOOLEAN"}
    # a validated JSON number may be an int: it fills the DOUBLE column (0 -> 0.0)
    assert [holds("confidence < 0.7", {"confidence": c}) for c in (0, 0.5, 0.7, 1)] == [True, True, False, False]
    # integers stay exact in BIGINT (no float rounding past 2**53)
    assert holds("n = 9007199254740993", {"n": 9007199254740993}) is True
    assert holds("n = 9007199254740993", {"n": 9007199254740992}) is False
    assert holds("flag AND kind = 'x'", {"flag": True, "kind": "x"}) is True


def test_a_condition_is_an_object_of_its_own():
    # EscalateIf owns a DuckDB connection: two binds of one text are independent
    cond = bind("confidence < 0.7 OR kind = 'other'")
    other = bind("confidence < 0.7 OR kind = 'other'")
    assert cond.text == "confidence < 0.7 OR kind = 'other'"
    assert repr(cond) == "EscalateIf(\"confidence < 0.7 OR kind = 'other'\")"
    other.close()
    assert cond.evaluate({"confidence": 0.9, "kind": "other"}) is True  # closing the other left this one working
    cond.close()


def test_answer_keys_outside_the_fields_are_ignored():
    assert holds("kind = 'x'", {"kind": "x", "other": object()}) is True


ODD = {"select": "integer", "my field": "string", 'we"ird': "boolean", "answers": "integer"}


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        ('"select" = 1', {"select": 1}, True),
        ("\"my field\" = 'x y'", {"my field": "x y"}, True),
        ('"we""ird"', {'we"ird': True}, True),
        ('"we""ird"', {'we"ird': False}, False),
        ("answers = 3", {"answers": 3}, True),  # a field named like the evaluator's table
        ("answers = 3", {"answers": 4}, False),
    ],
)
def test_any_field_name_is_bound_and_referenced_quoted(text, answer, expected):
    assert holds(text, answer, ODD) is expected


def test_fields_that_differ_only_in_case_are_refused():
    # SQL names are case-insensitive: "Kind" would silently read the field kind
    message = error('"Kind" = 1', {"kind": "string", "Kind": "integer"})
    assert message == ("escalate_if: fields 'kind' and 'Kind' differ only in case, and SQL names are "
                       "case-insensitive; rename one of them to use escalate_if")


def test_unknown_field_type_is_rejected():
    with pytest.raises(
        ValueError,
        match=r"^escalate_if: field 'x' has unknown type 'float'; types are: string, integer, number, boolean$",
    ):
        EscalateIf.bind("x > 1", {"x": "float"})


# --- errors at bind, before any request ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("confidnce < 0.7",
         f"escalate_if 'confidnce < 0.7': unknown field 'confidnce' (did you mean 'confidence'?); {ALL_FIELDS}"),
        ("zzz = 1", f"escalate_if 'zzz = 1': unknown field 'zzz'; {ALL_FIELDS}"),  # nothing close: no suggestion
        ("kind = \"spam\"", "escalate_if 'kind = \"spam\"': unknown field 'spam' (in SQL double quotes name a "
                            "field: write 'spam' for a string)"),
        ("confidence < 0.7 x", "escalate_if 'confidence < 0.7 x': syntax error at or near \"x\"; " + ALL_FIELDS),
        ("(confidence < 0.7", "escalate_if '(confidence < 0.7': syntax error at or near"),
        ("", 'escalate_if is empty; write a condition such as "confidence < 0.7" or remove it'),
        ("   \n", "escalate_if is empty"),
    ],
)
def test_syntax_and_name_errors_are_one_line_naming_the_fields(text, expected):
    assert expected in error(text)


def test_error_names_the_spec_key():
    # the text is quoted as Python's repr: a newline shows as \n and the message stays on one line
    with pytest.raises(ValueError, match=r"^models\[0\]\.escalate_if 'a AND\\n b': unknown field 'a'") as info:
        EscalateIf.bind("a AND\n b", {"x": "boolean"}, name="models[0].escalate_if")
    assert "\n" not in str(info.value)
    assert str(info.value).endswith("; fields: x (boolean)")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("confidence", "is a DOUBLE, not a condition; compare it, e.g. \"confidence > 0\""),
        ("kind", "is a VARCHAR, not a condition; compare it, e.g. \"kind = '...'\""),
        ("n + 1", "is a BIGINT, not a condition; compare it, e.g. \"n + 1 > 0\""),
        ("kind || 'x'", "is a VARCHAR, not a condition"),
    ],
)
def test_a_result_that_is_not_true_or_false_is_refused(text, expected):
    message = error(text)
    assert message.startswith(f"escalate_if {text!r}") and expected in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # tried on an all-NULL answer at bind: a literal that cannot cast, a bad pattern
        ("confidence < 'high'", "Conversion Error: Could not convert string 'high' to DOUBLE"),
        ("flag = 'maybe'", "Could not convert string 'maybe' to BOOL"),
        ("regexp_matches(kind, '[')", "missing ]"),
    ],
)
def test_what_would_fail_on_every_answer_fails_at_bind(text, expected):
    message = error(text)
    assert message.startswith(f"escalate_if {text!r}") and expected in message


def test_more_than_one_statement_is_refused():
    # bind checks one expression; a second statement smuggled through the wrapping SELECT
    # would otherwise run in its place (this one escalated every row)
    message = error("true)); SELECT (concat('BOOLEAN'", {"a": "boolean"})
    assert message == ("escalate_if \"true)); SELECT (concat('BOOLEAN'\" is more than one SQL statement; "
                       "write one condition, e.g. \"confidence < 0.7\"")


def test_an_sql_comment_cannot_hide_the_rest_of_the_query():
    assert "syntax error" in error("true -- the rest")
    assert "unterminated /* comment" in error("true /* the rest")


# --- NULL: a missing or NULL value, and a NULL result --------------------------------


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        ("confidence < 0.7", {"confidence": None}, False),  # NULL result: does not escalate
        ("confidence < 0.7", {}, False),  # a missing field is NULL
        ("NOT (confidence >= 0.7)", {}, False),  # NOT NULL is still NULL
        ("kind NOT IN ('x')", {"kind": None}, False),
        ("confidence IS NULL OR confidence < 0.7", {}, True),  # asking for NULL explicitly
        ("confidence IS NULL OR confidence < 0.7", {"confidence": 0.9}, False),
        ("coalesce(confidence, 0) < 0.7", {}, True),
        ("NULL", {}, False),
    ],
)
def test_a_null_result_does_not_escalate(text, answer, expected):
    assert holds(text, answer) is expected


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("confidence < 0.7", {"confidence": "0.5"}),
        ("kind = 'spam'", {"kind": 5}),
        ("n = 1", {"n": True}),
        ("flag", {"flag": 1}),
        ("confidence < 0.7", {"confidence": [0.5]}),
        ("n > 0", {"n": 2**63}),  # a valid JSON integer that no BIGINT holds
    ],
)
def test_a_value_its_field_cannot_hold_is_an_error_not_a_null(text, answer):
    # the row fails with a reason instead of being routed on a guess
    assert "an answer has a value its field's type cannot hold" in eval_error(text, answer)


def test_a_cast_that_fails_on_one_answer_is_a_one_line_error():
    # which values cast is only known per answer, so this fails at evaluation, for that row alone
    assert "Could not convert string 'x' to INT32" in eval_error("kind = 3", {"kind": "x"})


# --- safety: values are data, no file or network ---------------------------------------


@pytest.mark.parametrize(
    "value", ["__import__('os').system('echo hi')", "' OR '1'='1", "kind", "x'); SELECT true; --"],
)
def test_values_are_data_never_code(value, monkeypatch):
    called = []

    def forbidden(*args, **kwargs):
        called.append(args)
        raise RuntimeError("eval/exec/compile must not be called")

    like = bind("kind = 'spam' OR kind LIKE '%os%'")
    equal = bind("kind = 'x'")
    with monkeypatch.context() as m:
        # values reach DuckDB as an Arrow column, never spliced into the SQL text
        for name in ("eval", "exec", "compile"):
            m.setattr(builtins, name, forbidden)
        results = (like.evaluate({"kind": value}), equal.evaluate({"kind": value}))
    like.close()
    equal.close()
    assert called == []
    assert results == ("os" in value, False)


@pytest.fixture
def csv_file(tmp_path):
    path = tmp_path / "secret.csv"
    path.write_text("a\n1\n")
    return path


def test_no_file_or_network_at_bind(csv_file):
    message = error(f"(SELECT count(*) FROM read_csv('{csv_file}')) > 0")
    assert f'Permission Error: Cannot access file "{csv_file}" - file system operations are disabled' in message
    assert "file system operations are disabled" in error(f"(SELECT count(*) FROM '{csv_file}') > 0")
    message = error("(SELECT count(*) FROM 'https://example.com/x.csv') > 0")
    assert 'Cannot access file "https://example.com/x.csv" - file system operations are disabled' in message
    assert "Scalar Function with name getenv does not exist" in error("kind = getenv('HOME')")


def test_no_file_at_evaluation(csv_file):
    # a table function takes constant paths only, so an answer's value can never name a file ...
    assert "does not support lateral join column parameters" in error("(SELECT count(*) FROM read_csv(kind)) > 0")
    # ... and the connection the answers are evaluated on refuses files, and cannot be re-opened
    cond = bind("kind = 'x'")
    try:
        assert cond.evaluate({"kind": str(csv_file)}) is False
        with pytest.raises(Exception, match="file system operations are disabled"):
            cond._con.execute(f"SELECT * FROM read_csv('{csv_file}')")
        with pytest.raises(Exception, match="Cannot enable external access"):
            cond._con.execute("SET enable_external_access = true")
    finally:
        cond.close()


# --- evaluation over many answers: evaluate_many and holds() ----------------------------

GRID = [
    {"kind": k, "confidence": c, "n": n, "flag": f}
    for k, c, n, f in itertools.product(["spam", "other", None], [0.1, 0.7, None], [0, 5, None], [True, False, None])
]
CONDITIONS = [
    "confidence < 0.7 OR kind = 'other'",
    "confidence IS NULL OR confidence < 0.7",
    "NOT flag AND n > 1",
    "kind LIKE 'sp%' AND coalesce(n, 0) < 3",
]


@pytest.mark.parametrize("text", CONDITIONS)
def test_evaluate_many_agrees_with_evaluate(text):
    cond = bind(text)
    try:
        one_by_one = [cond.evaluate(a) for a in GRID]
        assert cond.evaluate_many(GRID) == one_by_one
        assert any(one_by_one) and not all(one_by_one)  # the grid tells the answers apart
        assert cond.evaluate_many(list(reversed(GRID))) == list(reversed(one_by_one))  # order kept
    finally:
        cond.close()


def test_evaluate_many_of_nothing_is_nothing():
    cond = bind("confidence < 0.7")
    assert cond.evaluate_many([]) == []
    cond.close()


@pytest.mark.parametrize("text", CONDITIONS)
def test_holds_agrees_with_evaluate(text):
    cond = bind(text)

    async def main() -> list[bool]:
        return list(await asyncio.gather(*(cond.holds(a) for a in GRID)))

    try:
        assert asyncio.run(main()) == [cond.evaluate(a) for a in GRID]
    finally:
        cond.close()


class Spy:
    """Wraps a condition's evaluate_many and records each call's batch size."""

    def __init__(self, cond: EscalateIf, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[int] = []
        real = cond.evaluate_many

        def evaluate_many(answers):
            self.calls.append(len(answers))
            return real(answers)

        monkeypatch.setattr(cond, "evaluate_many", evaluate_many)


def test_holds_from_many_coroutines_in_one_turn_runs_one_query(monkeypatch):
    cond = bind("confidence < 0.7")
    spy = Spy(cond, monkeypatch)
    answers = [{"confidence": i / 100} for i in range(100)]

    async def main() -> list[bool]:
        return list(await asyncio.gather(*(cond.holds(a) for a in answers)))

    try:
        assert asyncio.run(main()) == [i < 70 for i in range(100)]
    finally:
        cond.close()
    assert spy.calls == [100]


def test_holds_in_two_turns_runs_two_queries(monkeypatch):
    cond = bind("confidence < 0.7")
    spy = Spy(cond, monkeypatch)

    async def main() -> tuple[list[bool], list[bool]]:
        first = await asyncio.gather(cond.holds({"confidence": 0.1}), cond.holds({"confidence": 0.9}))
        second = await asyncio.gather(*(cond.holds({"confidence": 0.5}) for _ in range(3)))
        return list(first), list(second)

    try:
        assert asyncio.run(main()) == ([True, False], [True, True, True])
    finally:
        cond.close()
    assert spy.calls == [2, 3]


def test_holds_fails_only_the_answer_that_breaks_the_query():
    # one answer whose kind does not cast to BOOLEAN, among good ones settling in the same turn:
    # that row fails with a one-line error; the others get their verdicts
    cond = bind('kind = "flag"')
    answers = [{"kind": "true", "flag": True}, {"kind": "nope", "flag": True}, {"kind": "false", "flag": True}]

    async def main() -> list[object]:
        return list(await asyncio.gather(*(cond.holds(a) for a in answers), return_exceptions=True))

    try:
        first, bad, third = asyncio.run(main())
    finally:
        cond.close()
    assert (first, third) == (True, False)
    assert isinstance(bad, ValueError)
    assert "Could not convert string 'nope' to BOOL" in str(bad) and "\n" not in str(bad)


def test_holds_fails_only_the_answer_with_a_wrong_typed_value():
    cond = bind("n > 1")

    async def main() -> list[object]:
        return list(await asyncio.gather(cond.holds({"n": 2}), cond.holds({"n": 2**64}), cond.holds({"n": 0}),
                                         return_exceptions=True))

    try:
        good, bad, other = asyncio.run(main())
    finally:
        cond.close()
    assert (good, other) == (True, False)
    assert isinstance(bad, ValueError) and "cannot hold" in str(bad)


def test_evaluate_many_raises_for_the_whole_batch():
    # evaluate_many is one query: a bad answer fails it (a pack's caller sees one error)
    cond = bind('kind = "flag"')
    try:
        with pytest.raises(ValueError, match="Could not convert string 'nope' to BOOL"):
            cond.evaluate_many([{"kind": "true", "flag": True}, {"kind": "nope", "flag": True}])
    finally:
        cond.close()
