"""EscalateIf: ``escalate_if`` bound and evaluated by DuckDB (llmap.control.cascade).

Every test of the old hand-written parser (tests/prompt/test_condition.py, for
llmap/prompt/condition.py) is kept here, rewritten to DuckDB SQL semantics.
Where SQL differs from the old grammar the test asserts the SQL behaviour and
says so in a comment starting ``SQL:``. The old semantics, for reference:
double quotes made string literals, NULL logic was two-valued (``NOT`` of a
NULL comparison was true), a field named like a keyword could not be
referenced, there was no arithmetic, and every comparison was type-checked by
the grammar (``kind = 3`` was an error). In DuckDB SQL single quotes are
strings, double quotes name a field, NULL is three-valued and a NULL result does
not escalate, and types follow DuckDB's implicit casts.
"""

from __future__ import annotations

import asyncio
import builtins
import itertools

import pytest

from llmap.control.cascade import DUCKDB_TYPES, EscalateIf

FIELDS = {
    "kind": "string",
    "confidence": "number",
    "n": "integer",
    "flag": "boolean",
    "a": "boolean",
    "b": "boolean",
    "c": "boolean",
}


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


# --- the example ------------------------------------------------------


@pytest.mark.parametrize(
    ("confidence", "expected"),
    [(0.5, True), (0.69999, True), (0.7, False), (0.9, False), (0, True), (1, False)],
)
def test_confidence_below_threshold(confidence, expected):
    # (0 and 1 are ints: a validated JSON number may be one; they fill the DOUBLE column as 0.0 and 1.0)
    cond = EscalateIf.bind("confidence < 0.7", {"kind": "string", "confidence": "number"})
    assert cond.evaluate({"kind": "spam", "confidence": confidence}) is expected


def test_attributes():
    # SQL: EscalateIf has no fields_used, and no value equality or hash (it owns a DuckDB
    # connection); two binds of one text are two independent conditions.
    cond = bind("confidence < 0.7 OR kind = 'other'")
    other = bind("confidence < 0.7 OR kind = 'other'")
    assert cond.text == "confidence < 0.7 OR kind = 'other'"
    assert repr(cond) == "EscalateIf(\"confidence < 0.7 OR kind = 'other'\")"
    other.close()
    assert cond.evaluate({"confidence": 0.9, "kind": "other"}) is True  # closing the other left this one working
    cond.close()


def test_duckdb_types_cover_every_field_type():
    assert DUCKDB_TYPES == {"string": "VARCHAR", "integer": "BIGINT", "number": "DOUBLE", "boolean": "BOOLEAN"}


# --- comparisons --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        ("n = 3", {"n": 3}, True),
        ("n == 3", {"n": 3}, True),
        ("n = 3", {"n": 4}, False),
        ("n != 3", {"n": 4}, True),
        ("n <> 3", {"n": 3}, False),
        ("n <= 3", {"n": 3}, True),
        ("n < 3", {"n": 3}, False),
        ("n >= 3", {"n": 3}, True),
        ("n > 3", {"n": 3}, False),
        ("n>=3", {"n": 2}, False),
        # int and float compare numerically
        ("n = 3.0", {"n": 3}, True),
        ("confidence = 1", {"confidence": 1.0}, True),
        # integer literals stay exact (no float rounding): n is a BIGINT
        ("n = 9007199254740993", {"n": 9007199254740992}, False),
        ("n = 9007199254740993", {"n": 9007199254740993}, True),
        ("confidence < n", {"confidence": 0.5, "n": 1}, True),
        ("confidence > .5", {"confidence": 0.6}, True),
        ("confidence > 5.", {"confidence": 5.5}, True),
        ("confidence < 1e-3", {"confidence": 0.0001}, True),
        ("confidence < 1E-3", {"confidence": 0.01}, False),
        ("confidence > -1", {"confidence": -0.5}, True),
        ("confidence > -1.5", {"confidence": -2}, False),
        # literal on the left
        ("0.7 > confidence", {"confidence": 0.5}, True),
        # strings: exact, case-sensitive, ordered lexicographically
        ("kind = 'spam'", {"kind": "spam"}, True),
        ("kind = 'spam'", {"kind": "Spam"}, False),
        ("kind < 'b'", {"kind": "a"}, True),
        # SQL: the old case ('kind = "spam"' is True) is now an error: double quotes name a
        # field (see test_double_quotes_name_a_field_not_a_string); a string is single-quoted.
        # booleans
        ("flag = TRUE", {"flag": True}, True),
        ("flag = true", {"flag": False}, False),
        ("flag != FALSE", {"flag": True}, True),
        ("flag = (n > 2)", {"flag": True, "n": 3}, True),
        ("flag = (n > 2)", {"flag": True, "n": 1}, False),
    ],
)
def test_comparisons(text, answer, expected):
    assert holds(text, answer) is expected


def test_double_quotes_name_a_field_not_a_string():
    # SQL: the old grammar read "spam" as the string 'spam'; SQL reads it as a field named spam.
    message = error('kind = "spam"')
    assert message.startswith("escalate_if 'kind = \"spam\"': ")
    assert "unknown field 'spam' (in SQL double quotes name a field: write 'spam' for a string)" in message
    assert holds("kind = 'spam'", {"kind": "spam"}) is True


# --- AND / OR / NOT precedence and parentheses --------------------------------

TRUTH = [(x, y, z) for x in (False, True) for y in (False, True) for z in (False, True)]


@pytest.mark.parametrize(("x", "y", "z"), TRUTH)
def test_and_binds_tighter_than_or(x, y, z):
    answer = {"a": x, "b": y, "c": z}
    assert holds("a OR b AND c", answer) is (x or (y and z))
    assert holds("a AND b OR c", answer) is ((x and y) or z)


@pytest.mark.parametrize(("x", "y", "z"), TRUTH)
def test_parentheses_override_precedence(x, y, z):
    answer = {"a": x, "b": y, "c": z}
    assert holds("(a OR b) AND c", answer) is ((x or y) and z)
    assert holds("a AND (b OR c)", answer) is (x and (y or z))
    assert holds("((a))", answer) is x


@pytest.mark.parametrize(("x", "y", "z"), TRUTH)
def test_not_binds_tightest(x, y, z):
    answer = {"a": x, "b": y, "c": z}
    assert holds("NOT a AND b", answer) is ((not x) and y)
    assert holds("NOT (a AND b)", answer) is (not (x and y))
    assert holds("NOT NOT a OR c", answer) is (x or z)
    assert holds("NOT a OR NOT b AND c", answer) is ((not x) or ((not y) and z))


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        # NOT applies to the whole comparison, as in SQL
        ("NOT n = 3", {"n": 3}, False),
        ("NOT n = 3", {"n": 4}, True),
        ("NOT confidence < 0.7 AND kind = 'x'", {"confidence": 0.9, "kind": "x"}, True),
        ("confidence < 0.7 or kind = 'other'", {"confidence": 0.9, "kind": "other"}, True),
        ("confidence < 0.7 And kind = 'other'", {"confidence": 0.5, "kind": "spam"}, False),
    ],
)
def test_keywords_are_case_insensitive_and_not_covers_comparison(text, answer, expected):
    assert holds(text, answer) is expected


# --- IN / NOT IN --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        ("kind IN ('spam', 'ham')", {"kind": "ham"}, True),
        ("kind IN ('spam', 'ham')", {"kind": "eggs"}, False),
        ("kind in ('spam')", {"kind": "spam"}, True),
        ("kind NOT IN ('spam', 'ham')", {"kind": "eggs"}, True),
        ("kind not in ('spam', 'ham')", {"kind": "spam"}, False),
        ("n IN (1, 2, 3)", {"n": 2}, True),
        ("n IN (1, 2.5)", {"n": 2}, False),
        ("confidence IN (1, 0.5)", {"confidence": 1.0}, True),
        ("flag IN (TRUE)", {"flag": True}, True),
        # SQL: the old case "a boolean is not the number 1" (n IN (1) with n = True is False)
        # is now an error: True cannot fill the BIGINT column (test_values_of_the_wrong_type_are_an_error).
        # NULL never matches, in or not in (SQL: NULL IN / NOT IN is NULL, which does not escalate)
        ("kind IN ('spam')", {}, False),
        ("kind NOT IN ('spam')", {"kind": None}, False),
    ],
)
def test_in(text, answer, expected):
    assert holds(text, answer) is expected


# --- IS [NOT] NULL and NULL semantics -----------------------------------------


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        ("kind IS NULL", {"kind": None}, True),
        ("kind IS NULL", {}, True),
        ("kind is null", {"kind": ""}, False),
        ("kind IS NOT NULL", {"kind": "x"}, True),
        ("kind IS NOT NULL", {}, False),
        ("confidence IS NULL OR confidence < 0.7", {}, True),
        ("confidence IS NULL OR confidence < 0.7", {"confidence": 0.9}, False),
        ("flag IS NOT NULL", {"flag": False}, True),
    ],
)
def test_is_null(text, answer, expected):
    assert holds(text, answer) is expected


@pytest.mark.parametrize(
    "text",
    [
        "confidence < 0.7",
        "confidence >= 0.7",
        "confidence = 0.7",
        "confidence != 0.7",
        "kind = 'x'",
        "kind != 'x'",
        "kind LIKE '%'",
        "kind NOT LIKE 'x'",
        "kind IN ('x')",
        "kind NOT IN ('x')",
        "flag",
        "flag = FALSE",
        "flag != TRUE",
        "n < confidence",
    ],
)
@pytest.mark.parametrize(
    "answer", [{}, {"kind": None, "confidence": None, "flag": None, "n": None}]
)
def test_any_comparison_with_null_is_false(text, answer):
    # SQL: the comparison is NULL (not false), and a NULL condition does not escalate.
    assert holds(text, answer) is False


def test_not_negates_a_null_comparison():
    # SQL: the old two-valued logic made NOT (False) True for a missing confidence. In SQL
    # NOT NULL is NULL, so the row does not escalate; say IS NULL to catch a missing value.
    assert holds("NOT (confidence >= 0.7)", {}) is False
    assert holds("confidence IS NULL OR NOT (confidence >= 0.7)", {}) is True
    assert holds("NOT (confidence >= 0.7)", {"confidence": 0.5}) is True


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("confidence < 0.7", {"confidence": "0.5"}),
        ("kind = 'spam'", {"kind": 5}),
        ("n = 1", {"n": True}),
        ("n IN (1)", {"n": True}),  # the old test_in case "a boolean is not the number 1"
        ("flag = TRUE", {"flag": 1}),
        ("flag", {"flag": 1}),
        ("kind LIKE '%'", {"kind": 5}),
        ("confidence < 0.7", {"confidence": [0.5]}),
        ("n > 0", {"n": 2**63}),  # a valid JSON integer that no BIGINT holds
    ],
)
def test_values_of_the_wrong_type_are_an_error(text, answer):
    # SQL: the old evaluator read a wrong-typed value as NULL (False). A value fills a typed
    # column now, and one that does not fit is a one-line error naming the condition, so the
    # row fails with a reason instead of being routed on a guess. (Validated answers never
    # carry one, except an integer too large for BIGINT.)
    message = eval_error(text, answer)
    assert "an answer has a value its field's type cannot hold" in message


# --- LIKE ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("spam", "spam", True),
        ("spam", "spam!", False),
        ("sp%", "spam", True),
        ("sp%", "sp", True),
        ("%am", "spam", True),
        ("%p%", "spam", True),
        ("%p%", "ham", False),
        ("s_am", "spam", True),
        ("s_am", "sam", False),
        ("s_am", "sppam", False),
        ("SP%", "spam", False),  # case-sensitive
        ("a.c", "abc", False),  # regex characters are literal
        ("a.c", "a.c", True),
        ("(x)*", "(x)*", True),
        ("%", "", True),
        ("%", "multi\nline", True),
        ("it''s%", "it's fine", True),
    ],
)
def test_like(pattern, value, expected):
    assert holds(f"kind LIKE '{pattern}'", {"kind": value}) is expected
    assert holds(f"kind NOT LIKE '{pattern}'", {"kind": value}) is (not expected)


# --- bare booleans ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        ("flag", {"flag": True}, True),
        ("flag", {"flag": False}, False),
        ("NOT flag", {"flag": False}, True),
        ("flag AND confidence < 0.7", {"flag": True, "confidence": 0.1}, True),
        ("(flag)", {"flag": True}, True),
        ("TRUE", {}, True),
        ("FALSE", {}, False),
        ("false OR flag", {"flag": True}, True),
    ],
)
def test_bare_boolean(text, answer, expected):
    assert holds(text, answer) is expected


# --- string literals ----------------------------------------------------------


@pytest.mark.parametrize(
    ("literal", "value"),
    [
        ("'it''s'", "it's"),
        ("''''", "'"),
        ("''", ""),
        # SQL: the old '"say ""hi"""' and '"it\'s"' were double-quoted strings; in SQL they name
        # fields (test_double_quoted_literals_are_field_names). Their single-quoted spellings:
        ("'say \"hi\"'", 'say "hi"'),
        ("'it''s'", "it's"),
        ("'a \"quoted\" word'", 'a "quoted" word'),
        ("'AND OR NOT ( ) ,'", "AND OR NOT ( ) ,"),
        ("'caf\u00e9'", "caf\u00e9"),
        ("'back\\slash'", "back\\slash"),  # no backslash escapes in SQL strings
        ("'semi; colon -- not a comment'", "semi; colon -- not a comment"),
    ],
)
def test_string_literals(literal, value):
    assert holds(f"kind = {literal}", {"kind": value}) is True
    assert holds(f"kind = {literal}", {"kind": value + "x"}) is False


@pytest.mark.parametrize(
    ("literal", "field"),
    [('"say ""hi"""', 'say "hi"'), ('"it\'s"', "it's")],
)
def test_double_quoted_literals_are_field_names(literal, field):
    # SQL: these were strings in the old grammar; now they name a field, with the hint.
    message = error(f"kind = {literal}")
    assert f"unknown field {field!r} (in SQL double quotes name a field: write '{field}' for a string)" in message


def test_whitespace_and_newlines_are_separators():
    assert holds("confidence < 0.7\n  AND\tkind = 'x'", {"confidence": 0.1, "kind": "x"})


# --- safety -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["__import__('os')", "__import__('os').system('echo hi')", "1 == 1", "' OR '1'='1", "kind",
     "x'); SELECT true; --"],
)
def test_values_are_data_never_code(value, monkeypatch):
    called = []

    def forbidden(*args, **kwargs):
        called.append(args)
        raise RuntimeError("eval/exec/compile must not be called")

    like = bind("kind = 'spam' OR kind LIKE '%os%'")
    equal = bind("kind = 'x'")
    with monkeypatch.context() as m:
        # SQL: __import__ is not patched (DuckDB and pyarrow import lazily); values reach DuckDB
        # as an Arrow column, never spliced into the SQL text, so SQL in a value is only data.
        for name in ("eval", "exec", "compile"):
            m.setattr(builtins, name, forbidden)
        results = (like.evaluate({"kind": value}), equal.evaluate({"kind": value}))
    like.close()
    equal.close()
    assert called == []
    assert results == ("os" in value, False)


def test_code_in_the_condition_text_is_rejected():
    # SQL: a call is parsed as a DuckDB function call, and there is no function __import__.
    assert "Scalar Function with name __import__ does not exist" in error(
        "__import__('os')", {"__import__": "string"}
    )
    assert "unknown field '__import__'" in error("__import__ = 'x'")


# --- errors -------------------------------------------------------------------

ALL_FIELDS = "fields: kind (string), confidence (number), n (integer), flag (boolean), a (boolean), b (boolean), c (boolean)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # unknown field, with the known ones listed and a suggestion
        (
            "confidnce < 0.7",
            f"escalate_if 'confidnce < 0.7': unknown field 'confidnce' (did you mean 'confidence'?); {ALL_FIELDS}",
        ),
        ("zzz = 1", f"escalate_if 'zzz = 1': unknown field 'zzz'; {ALL_FIELDS}"),
        ("kindd = 'x'", "unknown field 'kindd' (did you mean 'kind'?)"),
        # SQL: DuckDB's parser names the token it stopped at; there is no position or hint of
        # its own. Missing value:
        ("confidence <", 'syntax error at or near ")"'),
        ("confidence < AND", 'syntax error at or near "AND"'),
        ("NOT", 'syntax error at or near ")"'),
        ("a AND", 'syntax error at or near ")"'),
        (") a", 'syntax error at or near "a"'),
        # trailing garbage
        ("confidence < 0.7 x", 'syntax error at or near "x"'),
        ("confidence < 0.7 0.8", 'syntax error at or near "0.8"'),
        ("confidence < 0.7)", 'syntax error at or near ")"'),
        ("confidence < 0.7 < 1", "Chained comparisons are not supported, use AND to combine comparisons"),
        # unclosed paren (the parser meets the end of the condition)
        ("(confidence < 0.7", "syntax error at or near"),
        ("a AND (b OR (c)", "syntax error at or near"),
        ("kind IN ('a', 'b'", "syntax error at or near"),
        ("(a b)", 'syntax error at or near "b"'),
        # bad tokens
        ("confidence $ 1", 'syntax error at or near "$"'),
        ("a && b", "No function matches the given name and argument types '&&(BOOLEAN, BOOLEAN)'"),
        ("!a", "Scalar Function with name ! does not exist"),
        ("n = 1abc", 'syntax error at or near "abc"'),
        ("n = 1.2.3", 'syntax error at or near "1.2.3"'),
        ("kind = 'abc", "unterminated string literal"),
        ('kind = "abc', "unterminated quoted identifier"),  # SQL: "..." is an identifier
        # keyword misuse
        ("kind NOT = 'a'", 'syntax error at or near "="'),
        ("kind IS 'a'", "syntax error at or near \"'a'\""),
        ("kind IN ('a' 'b')", "syntax error at or near \"'b'\""),
        ("kind LIKE 5", "No function matches the given name and argument types '~~(VARCHAR, INTEGER_LITERAL)'"),
        # empty
        ("", 'escalate_if is empty; write a condition such as "confidence < 0.7" or remove it'),
        ("   \n", "escalate_if is empty"),
        # nesting: DuckDB's limit is 1000 levels (the old grammar's was 64)
        ("(" * 1000 + "a" + ")" * 1000, "Max expression depth limit of 1000 exceeded"),
        ("NOT " * 1000 + "a", "Max expression depth limit of 1000 exceeded"),
    ],
)
def test_syntax_and_name_errors(text, expected):
    message = error(text)
    assert expected in message
    if text.strip():
        assert message.startswith(f"escalate_if {text!r}")


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        # SQL: identifiers are case-insensitive (old: unknown field 'Kind', did you mean 'kind')
        ("Kind = 'x'", {"kind": "x"}, True),
        # SQL: || is string concatenation and & | are bitwise; 'a OR b' is the spelling (old: use OR)
        # (see test_non_boolean_results_are_refused_at_bind for 'a || b')
        # SQL: arithmetic is supported (old: unexpected character '-')
        ("confidence - 1 > 0", {"confidence": 1.5}, True),
        ("confidence - 1 > 0", {"confidence": 0.5}, False),
        # SQL: backticks quote an identifier in DuckDB (old: write field names without quotes)
        ("`kind` = 'x'", {"kind": "x"}, True),
        ("`kind` = 'x'", {"kind": "y"}, False),
        # SQL: IN with a string on the right is a substring test in DuckDB (old: expected '(')
        ("kind IN 'abc'", {"kind": "bc"}, True),
        ("kind IN 'abc'", {"kind": "x"}, False),
        # SQL: an empty IN list is false (old: expected a literal value)
        ("kind IN ()", {"kind": "x"}, False),
        # SQL: IN lists and LIKE patterns may be expressions, fields included (old: literals only)
        ("kind IN (kind)", {"kind": "x"}, True),
        ("kind IN ('z', kind)", {"kind": "x"}, True),
        ("kind LIKE kind", {"kind": "a%"}, True),
        ("kind NOT LIKE kind", {"kind": "a%"}, False),
        # SQL: 100 levels of nesting are fine (old: nested too deeply past 64)
        ("(" * 100 + "a" + ")" * 100, {"a": True}, True),
        ("NOT " * 100 + "a", {"a": False}, False),
        ("NOT " * 101 + "a", {"a": False}, True),
    ],
)
def test_old_syntax_errors_that_are_valid_sql(text, answer, expected):
    assert holds(text, answer) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # SQL: DuckDB casts a string literal to the field's type; when it cannot, bind says so
        # before any request (old: cannot compare number field 'confidence' with string 'high')
        ("confidence < 'high'", "Conversion Error: Could not convert string 'high' to DOUBLE"),
        ("'high' > n", "Conversion Error: Could not convert string 'high' to INT64"),
        ("n IN (1, 'a')", "Conversion Error: Could not convert string 'a' to INT64"),
        ("kind NOT IN ('a', 2)", "Conversion Error: Could not convert string 'a' to INT32"),
        ("flag = 'maybe'", "Conversion Error: Could not convert string 'maybe' to BOOL"),
        # LIKE needs a string (old: LIKE needs a string, but integer field 'n' is not)
        ("n LIKE '1%'", "No function matches the given name and argument types '~~(BIGINT, STRING_LITERAL)'"),
        ("flag NOT LIKE 'x'", "No function matches the given name and argument types '!~~(BOOLEAN, STRING_LITERAL)'"),
        # the condition must be true or false
        ("confidence", "is a DOUBLE, not a condition; compare it, e.g. \"confidence > 0\""),
        ("kind", "is a VARCHAR, not a condition; compare it, e.g. \"kind = '...'\""),
        ("n", "is a BIGINT, not a condition; compare it, e.g. \"n > 0\""),
        ("0.7", "is a DECIMAL(2,1), not a condition"),
    ],
)
def test_type_errors(text, expected):
    message = error(text)
    assert message.startswith(f"escalate_if {text!r}")
    assert expected in message


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        # SQL: DuckDB's implicit casts make these old type errors valid conditions.
        # a quoted number is cast to the field's type (old: write 0.7 without quotes)
        ("confidence < '0.7'", {"confidence": 0.5}, True),
        ("confidence < '0.7'", {"confidence": 0.9}, False),
        # a number compared with a string field casts the field (old: quote it: '3')
        ("kind = 3", {"kind": "3"}, True),
        ("kind = 3", {"kind": "03"}, True),  # compared as numbers, not as text
        ("kind = TRUE", {"kind": "true"}, True),
        ("kind = n", {"kind": "3", "n": 3}, True),
        # a quoted boolean or a number is cast to BOOLEAN (old: write TRUE without quotes)
        ("flag = 'true'", {"flag": True}, True),
        ("flag = 1", {"flag": True}, True),
        ("flag = 1", {"flag": False}, False),
        ("(n > 1) = 1", {"n": 2}, True),
        # booleans are ordered, false < true (old: booleans cannot be ordered)
        ("flag < TRUE", {"flag": False}, True),
        ("flag < TRUE", {"flag": True}, False),
        # a NULL in the IN list: a match is true, a miss is NULL (old: NULL never matches in IN)
        ("kind IN ('a', NULL)", {"kind": "a"}, True),
        ("kind IN ('a', NULL)", {"kind": "b"}, False),
        ("NOT (kind IN ('a', NULL))", {"kind": "b"}, False),  # NOT NULL is NULL
        # = NULL is NULL, never met (old: use IS NULL); valid SQL, it just never escalates
        ("kind = NULL", {"kind": None}, False),
        ("kind = NULL", {"kind": "x"}, False),
        ("NULL != kind", {"kind": "x"}, False),
        ("n < NULL", {"n": 1}, False),
        ("NULL", {}, False),  # old: the condition must be true or false, but NULL is not
        # numbers cast to BOOLEAN in AND/OR/NOT (old: each side of AND must be true or false)
        ("flag AND confidence", {"flag": True, "confidence": 0.5}, True),
        ("flag AND confidence", {"flag": True, "confidence": 0.0}, False),
        ("NOT n", {"n": 0}, True),
        ("NOT n", {"n": 2}, False),
        ("kind OR flag", {"kind": "true", "flag": False}, True),
        # double quotes name the field (old: "kind" is a string, not a field)
        ("\"kind\" = 'spam'", {"kind": "spam"}, True),
        ("\"kind\" = 'spam'", {"kind": "ham"}, False),
        ('"confidence" < 0.7', {"confidence": 0.5}, True),
        ("\"kind\" LIKE '%'", {"kind": "x"}, True),
        ('"kind" IS NULL', {}, True),
        ('"kind" IS NULL', {"kind": "x"}, False),
    ],
)
def test_old_type_errors_that_are_valid_sql(text, answer, expected):
    assert holds(text, answer) is expected


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        # a string field cast to a number or boolean fails on the rows whose text does not cast
        ("kind = 3", {"kind": "x"}, "Could not convert string 'x' to INT32 when casting from source column kind"),
        ("kind = TRUE", {"kind": "x"}, "Could not convert string 'x' to BOOL"),
        ("kind = n", {"kind": "x", "n": 3}, "Could not convert string 'x' to INT64"),
        ("kind OR flag", {"kind": "x", "flag": True}, "Could not convert string 'x' to BOOL"),
    ],
)
def test_a_cast_that_fails_on_one_answer_is_a_one_line_error(text, answer, expected):
    # SQL: which values cast is only known per answer, so this fails at evaluation, for that row alone.
    assert expected in eval_error(text, answer)


def test_double_quoted_string_equal_to_a_field_name_is_fine_against_a_field():
    # SQL: the old grammar read "flag" as the string 'flag'. In SQL it is the boolean field flag,
    # so kind is cast to BOOLEAN: a failed cast for kind = 'flag', a comparison for kind = 'true'.
    assert "Could not convert string 'flag' to BOOL" in eval_error('kind = "flag"', {"kind": "flag", "flag": True})
    assert holds('kind = "flag"', {"kind": "true", "flag": True}) is True
    assert holds("kind = 'flag'", {"kind": "flag"}) is True  # the string, single-quoted


def test_error_names_the_spec_key_and_stays_on_one_line():
    # SQL: the text is quoted as Python's repr (a newline shows as \n), not with whitespace collapsed.
    with pytest.raises(ValueError, match=r"^models\[0\]\.escalate_if 'a AND\\n b': unknown field 'a'") as info:
        EscalateIf.bind("a AND\n b", {"x": "boolean"}, name="models[0].escalate_if")
    assert "\n" not in str(info.value)
    assert str(info.value).endswith("; fields: x (boolean)")


def test_unknown_field_type_is_rejected():
    with pytest.raises(
        ValueError,
        match=r"^escalate_if: field 'x' has unknown type 'float'; types are: string, integer, number, boolean$",
    ):
        EscalateIf.bind("x > 1", {"x": "float"})


def test_a_field_named_like_a_keyword_is_referenced_quoted():
    # SQL: the old grammar could not refer to a field named like a keyword; SQL can, in double quotes.
    assert 'syntax error at or near "="' in error("like = 1", {"like": "integer"})
    assert holds('"like" = 1', {"like": 1}, {"like": "integer"}) is True
    assert holds('"like" = 1', {"like": 2}, {"like": "integer"}) is False


# --- new with DuckDB: three-valued NULL ----------------------------------------


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        # the case: a NULL confidence does not meet confidence < 0.7 ...
        ("confidence < 0.7", {"confidence": None}, False),
        ("confidence < 0.7", {}, False),
        # ... unless the condition asks for NULL explicitly
        ("confidence IS NULL OR confidence < 0.7", {"confidence": None}, True),
        ("confidence IS NULL OR confidence < 0.7", {"confidence": 0.5}, True),
        ("coalesce(confidence, 0) < 0.7", {}, True),
        # NULL OR TRUE is TRUE; NULL AND FALSE is FALSE; NULL AND TRUE, NULL OR FALSE are NULL
        ("a OR b", {"a": None, "b": True}, True),
        ("a OR b", {"a": None, "b": False}, False),
        ("a AND b", {"a": None, "b": True}, False),
        ("NOT (a AND b)", {"a": None, "b": False}, True),  # NOT FALSE
        ("NOT (a AND b)", {"a": None, "b": True}, False),  # NOT NULL is NULL
        ("NOT a", {"a": None}, False),
        ("a IS NOT TRUE", {"a": None}, True),
        ("a IS DISTINCT FROM TRUE", {"a": None}, True),
    ],
)
def test_null_is_three_valued_and_a_null_result_does_not_escalate(text, answer, expected):
    assert holds(text, answer) is expected


# --- new with DuckDB: the rest of SQL --------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        ("confidence BETWEEN 0.2 AND 0.5", {"confidence": 0.3}, True),
        ("confidence BETWEEN 0.2 AND 0.5", {"confidence": 0.6}, False),
        ("kind ILIKE 'SP%'", {"kind": "spam"}, True),
        ("length(kind) < 3", {"kind": "xy"}, True),
        ("length(kind) < 3", {"kind": "xyz"}, False),
        ("regexp_matches(kind, '^x\\d+$')", {"kind": "x12"}, True),
        ("regexp_matches(kind, '^x\\d+$')", {"kind": "x1y"}, False),
        ("CASE WHEN kind = 'x' THEN confidence < 0.9 ELSE confidence < 0.5 END", {"kind": "x", "confidence": 0.8}, True),
        ("CASE WHEN kind = 'x' THEN confidence < 0.9 ELSE confidence < 0.5 END", {"kind": "y", "confidence": 0.8}, False),
        ("n % 2 = 1", {"n": 7}, True),
        ("kind LIKE 'a\\%' ESCAPE '\\'", {"kind": "a%"}, True),
        ("kind LIKE 'a\\%' ESCAPE '\\'", {"kind": "ab"}, False),
    ],
)
def test_any_duckdb_expression(text, answer, expected):
    assert holds(text, answer) is expected


def test_answer_keys_outside_the_fields_are_ignored():
    assert holds("kind = 'x'", {"kind": "x", "other": object()}) is True


def test_non_boolean_results_are_refused_at_bind():
    assert "is a VARCHAR, not a condition" in error("a || b")  # SQL: || concatenates strings
    assert "is a VARCHAR, not a condition" in error("kind || 'x'")
    assert "is a BIGINT, not a condition" in error("n + 1")
    assert "is a TUPLE, not a condition" in error("()")
    assert "is a BIGINT, not a condition" in error("length(kind)")


def test_a_bad_regular_expression_is_refused_at_bind():
    # the pattern is compiled when the condition is tried on an all-NULL answer, before any request
    assert "missing ]" in error("regexp_matches(kind, '[')")


def test_unknown_field_suggests_the_closest_one():
    message = error("confidense < 0.7 AND kind = 'x'")
    assert "unknown field 'confidense' (did you mean 'confidence'?)" in message
    assert "unknown field 'qqq';" in error("qqq < 0.7")  # nothing close: no suggestion


def test_fields_that_differ_only_in_case_are_refused():
    # SQL names are case-insensitive: "Kind" would silently read the field kind
    message = error('"Kind" = 1', {"kind": "string", "Kind": "integer"})
    assert message == ("escalate_if: fields 'kind' and 'Kind' differ only in case, and SQL names are "
                       "case-insensitive; rename one of them to use escalate_if")


def test_more_than_one_statement_is_refused():
    # bind checks one expression; a second statement smuggled through the wrapping SELECT
    # would otherwise run in its place (this one escalated every row)
    message = error("true)); SELECT (concat('BOOLEAN'", {"a": "boolean"})
    assert message == ("escalate_if \"true)); SELECT (concat('BOOLEAN'\" is more than one SQL statement; "
                       "write one condition, e.g. \"confidence < 0.7\"")


def test_an_sql_comment_cannot_hide_the_rest_of_the_query():
    assert "syntax error" in error("true -- the rest")
    assert "unterminated /* comment" in error("true /* the rest")


# --- new with DuckDB: external access --------------------------------------------


@pytest.fixture
def csv_file(tmp_path):
    path = tmp_path / "secret.csv"
    path.write_text("a\n1\n")
    return path


def test_a_table_function_cannot_read_a_file_at_bind(csv_file):
    message = error(f"(SELECT count(*) FROM read_csv('{csv_file}')) > 0")
    assert f'Permission Error: Cannot access file "{csv_file}" - file system operations are disabled' in message
    message = error(f"kind IN (SELECT * FROM glob('{csv_file.parent}/*'))")
    assert "file system operations are disabled" in message


def test_a_file_path_as_a_table_is_not_read(csv_file):
    # a replacement scan (FROM 'file.csv') tries the file, and is refused
    message = error(f"(SELECT count(*) FROM '{csv_file}') > 0")
    assert f'Permission Error: Cannot access file "{csv_file}" - file system operations are disabled' in message
    # a path DuckDB does not take for a file is no table at all
    assert "Table with name /etc/hostname does not exist" in error("(SELECT count(*) FROM '/etc/hostname') > 0")


def test_the_network_is_refused():
    message = error("(SELECT count(*) FROM 'https://example.com/x.csv') > 0")
    assert 'Cannot access file "https://example.com/x.csv" - file system operations are disabled' in message


def test_a_file_cannot_be_read_at_evaluation(csv_file):
    # A table function takes constant paths only, so an answer's value can never name a file ...
    assert "does not support lateral join column parameters" in error("(SELECT count(*) FROM read_csv(kind)) > 0")
    # ... and the connection the answers are evaluated on refuses files, and cannot be re-opened.
    cond = bind("kind = 'x'")
    try:
        assert cond.evaluate({"kind": str(csv_file)}) is False
        with pytest.raises(Exception, match="file system operations are disabled"):
            cond._con.execute(f"SELECT * FROM read_csv('{csv_file}')")
        with pytest.raises(Exception, match="Cannot enable external access"):
            cond._con.execute("SET enable_external_access = true")
    finally:
        cond.close()


def test_functions_that_leak_the_environment_do_not_exist():
    assert "Scalar Function with name getenv does not exist" in error("kind = getenv('HOME')")


# --- new with DuckDB: odd field names ------------------------------------------

ODD = {"select": "integer", "my field": "string", 'we"ird': "boolean", "caf\u00e9": "number", "1st": "integer",
       "answers": "integer"}


@pytest.mark.parametrize(
    ("text", "answer", "expected"),
    [
        ('"select" = 1', {"select": 1}, True),
        ('"select" = 1', {"select": 2}, False),
        ("\"my field\" = 'x y'", {"my field": "x y"}, True),
        ('"we""ird"', {'we"ird': True}, True),
        ('"we""ird"', {'we"ird': False}, False),
        ('"caf\u00e9" > 0.5', {"caf\u00e9": 0.9}, True),
        ("caf\u00e9 > 0.5", {"caf\u00e9": 0.1}, False),  # a non-ASCII name needs no quotes
        ('"1st" = 3', {"1st": 3}, True),
        ("answers = 3", {"answers": 3}, True),  # a field named like the evaluator's table
        ("answers = 3", {"answers": 4}, False),
    ],
)
def test_a_field_with_an_odd_name_is_referenced_quoted(text, answer, expected):
    assert holds(text, answer, ODD) is expected


def test_an_odd_field_name_unquoted_is_an_error():
    assert "SELECT clause without selection list" in error("select", ODD)
    assert 'syntax error at or near "field"' in error("my field = 'x'", ODD)
    assert "unknown field 'my'" in error("my = 'x'", ODD)


# --- new with DuckDB: evaluate_many and holds() ----------------------------------

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
