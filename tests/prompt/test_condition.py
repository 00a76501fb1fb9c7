"""Condition: parsing, type checks, evaluation and error messages of escalate_if."""

from __future__ import annotations

import builtins

import pytest

from llmap.prompt.condition import Condition

FIELDS = {
    "kind": "string",
    "confidence": "number",
    "n": "integer",
    "flag": "boolean",
    "a": "boolean",
    "b": "boolean",
    "c": "boolean",
}


def holds(text: str, answer: dict) -> bool:
    return Condition.parse(text, FIELDS).evaluate(answer)


def error(text: str, fields: dict | None = None) -> str:
    with pytest.raises(ValueError) as info:
        Condition.parse(text, FIELDS if fields is None else fields)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- the example ------------------------------------------------------


@pytest.mark.parametrize(
    ("confidence", "expected"),
    [(0.5, True), (0.69999, True), (0.7, False), (0.9, False), (0, True), (1, False)],
)
def test_confidence_below_threshold(confidence, expected):
    cond = Condition.parse("confidence < 0.7", {"kind": "string", "confidence": "number"})
    assert cond.evaluate({"kind": "spam", "confidence": confidence}) is expected


def test_attributes():
    cond = Condition.parse("confidence < 0.7 OR kind = 'other'", FIELDS)
    assert cond.text == "confidence < 0.7 OR kind = 'other'"
    assert cond.fields_used == frozenset({"confidence", "kind"})
    assert isinstance(cond.fields_used, frozenset)
    assert repr(cond) == "Condition(\"confidence < 0.7 OR kind = 'other'\")"
    assert cond == Condition.parse("confidence < 0.7 OR kind = 'other'", FIELDS)
    assert cond != Condition.parse("confidence < 0.8 OR kind = 'other'", FIELDS)
    assert hash(cond) == hash(Condition.parse("confidence < 0.7 OR kind = 'other'", FIELDS))


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
        # integer literals stay exact (no float rounding)
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
        ('kind = "spam"', {"kind": "spam"}, True),
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
        # a boolean is not the number 1
        ("n IN (1)", {"n": True}, False),
        # NULL never matches, in or not in
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
    assert holds(text, answer) is False


def test_not_negates_a_null_comparison():
    # documented two-valued logic: NOT (False) is True
    assert holds("NOT (confidence >= 0.7)", {}) is True


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("confidence < 0.7", {"confidence": "0.5"}),
        ("kind = 'spam'", {"kind": 5}),
        ("n = 1", {"n": True}),
        ("flag = TRUE", {"flag": 1}),
        ("flag", {"flag": 1}),
        ("kind LIKE '%'", {"kind": 5}),
        ("confidence < 0.7", {"confidence": [0.5]}),
    ],
)
def test_values_of_the_wrong_type_behave_like_null(text, answer):
    assert holds(text, answer) is False


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
        ('"say ""hi"""', 'say "hi"'),
        ('"it\'s"', "it's"),
        ("'a \"quoted\" word'", 'a "quoted" word'),
        ("'AND OR NOT ( ) ,'", "AND OR NOT ( ) ,"),
        ("'caf\u00e9'", "caf\u00e9"),
        ("'back\\slash'", "back\\slash"),
    ],
)
def test_string_literals(literal, value):
    assert holds(f"kind = {literal}", {"kind": value}) is True
    assert holds(f"kind = {literal}", {"kind": value + "x"}) is False


def test_whitespace_and_newlines_are_separators():
    assert holds("confidence < 0.7\n  AND\tkind = 'x'", {"confidence": 0.1, "kind": "x"})


# --- safety -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["__import__('os')", "__import__('os').system('echo hi')", "1 == 1", "' OR '1'='1", "kind"],
)
def test_values_are_data_never_code(value, monkeypatch):
    called = []

    def forbidden(*args, **kwargs):
        called.append(args)
        raise RuntimeError("eval/exec/compile/__import__ must not be called")

    with monkeypatch.context() as m:
        for name in ("eval", "exec", "compile", "__import__"):
            m.setattr(builtins, name, forbidden)
        like = Condition.parse("kind = 'spam' OR kind LIKE '%os%'", FIELDS)
        equal = Condition.parse("kind = 'x'", FIELDS)
        results = (like.evaluate({"kind": value}), equal.evaluate({"kind": value}))
    assert called == []
    assert results == ("os" in value, False)


def test_code_in_the_condition_text_is_rejected():
    assert "syntax error" in error("__import__('os')", {"__import__": "string"})
    assert "unknown field '__import__'" in error("__import__ = 'x'")


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # unknown field, with the known ones listed and a suggestion
        (
            "confidnce < 0.7",
            "escalate_if \"confidnce < 0.7\": unknown field 'confidnce' (did you mean "
            "'confidence'?); fields are: kind, confidence, n, flag, a, b, c",
        ),
        ("Kind = 'x'", "unknown field 'Kind' (did you mean 'kind'?)"),
        ("zzz = 1", "unknown field 'zzz'; fields are: kind, confidence"),
        # missing value
        (
            "confidence <",
            "escalate_if \"confidence <\": syntax error at position 13: expected a value after '<'",
        ),
        ("confidence < AND", "position 14: expected a value after '<', found 'AND'"),
        ("NOT", "position 4: expected a value after 'NOT'"),
        ("a AND", "position 6: expected a value after 'AND'"),
        (") a", "position 1: expected a condition, found ')'"),
        ("()", "position 2: expected a value after '(', found ')'"),
        # trailing garbage
        (
            "confidence < 0.7 x",
            "position 18: unexpected 'x' after a complete condition; join conditions with AND or OR",
        ),
        ("confidence < 0.7 0.8", "position 18: unexpected '0.8'"),
        ("confidence < 0.7)", "position 17: unexpected ')' without a matching '('"),
        (
            "confidence < 0.7 < 1",
            "position 18: unexpected '<'; comparisons do not chain, join them with AND",
        ),
        # unclosed paren
        ("(confidence < 0.7", "position 18: unclosed '(' from position 1; add ')'"),
        ("a AND (b OR (c)", "position 16: unclosed '(' from position 7; add ')'"),
        ("kind IN ('a', 'b'", "position 18: unclosed '(' from position 9; add ')'"),
        ("(a b)", "position 4: expected ')' after 'a', found 'b'"),
        # bad tokens
        ("confidence $ 1", "position 12: unexpected character '$'"),
        ("a && b", "position 3: unexpected character '&'; use AND"),
        ("a || b", "position 3: unexpected character '|'; use OR"),
        ("!a", "position 1: unexpected character '!'; use != for 'not equal' or NOT to negate"),
        (
            "confidence - 1 > 0",
            "position 12: unexpected character '-'; arithmetic is not supported",
        ),
        ("`kind` = 'x'", "unexpected character '`'; write field names without quotes"),
        ("n = 1abc", "position 5: malformed number '1abc'"),
        ("n = 1.2.3", "position 5: malformed number '1.2.3'"),
        (
            "kind = 'abc",
            "position 8: unterminated string; close it with ' (write '' for a ' inside)",
        ),
        ('kind = "abc', 'position 8: unterminated string; close it with "'),
        # keyword misuse
        ("kind NOT = 'a'", "position 10: expected IN or LIKE after 'NOT', found '='"),
        ("kind IS 'a'", "position 9: expected NULL after 'IS', found \"'a'\""),
        ("kind IN 'a'", "position 9: expected '(' and a list of values after 'IN'"),
        ("kind IN ()", "position 10: expected a literal value"),
        ("kind IN ('a' 'b')", "position 14: expected ',' or ')' in the IN list"),
        (
            "kind IN (kind)",
            "position 10: expected a literal value (a number, a quoted string, TRUE or FALSE)",
        ),
        (
            "kind LIKE 5",
            "position 11: expected a quoted pattern such as '%spam%' after 'LIKE', found '5'",
        ),
        ("kind LIKE kind", "expected a quoted pattern"),
        # empty
        ("", 'escalate_if "": empty condition; write one such as confidence < 0.7'),
        ("   \n", "empty condition"),
        # nesting
        ("(" * 100 + "a" + ")" * 100, "nested too deeply"),
        ("NOT " * 100 + "a", "nested too deeply"),
    ],
)
def test_syntax_and_name_errors(text, expected):
    assert expected in error(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # type mismatch names both sides, and the fix
        (
            "confidence < '0.7'",
            "cannot compare number field 'confidence' with string '0.7'; write 0.7 without quotes",
        ),
        (
            "confidence < 'high'",
            "cannot compare number field 'confidence' with string 'high'; compare it with a number",
        ),
        ("'high' > n", "cannot compare string 'high' with integer field 'n'"),
        ("kind = 3", "cannot compare string field 'kind' with number 3; quote it: '3'"),
        ("kind = TRUE", "cannot compare string field 'kind' with boolean TRUE; quote it: 'TRUE'"),
        (
            "flag = 'true'",
            "cannot compare boolean field 'flag' with string 'true'; write TRUE without quotes",
        ),
        ("flag = 1", "cannot compare boolean field 'flag' with number 1"),
        ("kind = n", "cannot compare string field 'kind' with integer field 'n'"),
        ("(n > 1) = 1", "cannot compare a true/false condition with number 1"),
        ("flag < TRUE", "booleans cannot be ordered with '<'; use = or !="),
        ("n IN (1, 'a')", "IN list mixes types: integer field 'n' cannot match string 'a'"),
        (
            "kind NOT IN ('a', 2)",
            "NOT IN list mixes types: string field 'kind' cannot match number 2",
        ),
        ("kind IN ('a', NULL)", "NULL never matches in IN (...); use IS NULL or IS NOT NULL"),
        ("n LIKE '1%'", "LIKE needs a string, but integer field 'n' is not; use = or < instead"),
        ("flag NOT LIKE 'x'", "NOT LIKE needs a string, but boolean field 'flag' is not"),
        # NULL must use IS NULL
        ("kind = NULL", "comparing with NULL with '=' is never true; use IS NULL or IS NOT NULL"),
        ("NULL != kind", "comparing with NULL with '!=' is never true"),
        ("n < NULL", "comparing with NULL with '<' is never true; use IS NULL"),
        # the condition must be true/false
        (
            "confidence",
            "the condition must be true or false, but number field 'confidence' is not; compare it, e.g. confidence > 0",
        ),
        ("kind", "but string field 'kind' is not; compare it, e.g. kind = '...'"),
        ("0.7", "the condition must be true or false, but number 0.7 is not"),
        ("NULL", "but NULL is not"),
        (
            "flag AND confidence",
            "each side of AND must be true or false, but number field 'confidence' is not",
        ),
        ("kind OR flag", "each side of OR must be true or false, but string field 'kind' is not"),
        ("NOT n", "what follows NOT must be true or false, but integer field 'n' is not"),
        # double quotes make strings, not field names
        (
            "\"kind\" = 'spam'",
            '"kind" is a string, not a field (double quotes make strings); write the field as kind without quotes',
        ),
        ('"confidence" < 0.7', "write the field as confidence without quotes"),
        ("\"kind\" LIKE '%'", "write the field as kind without quotes"),
        ('"kind" IS NULL', "write the field as kind without quotes"),
    ],
)
def test_type_errors(text, expected):
    message = error(text)
    assert message.startswith(f'escalate_if "{text}": ')
    assert expected in message


def test_double_quoted_string_equal_to_a_field_name_is_fine_against_a_field():
    assert holds('kind = "flag"', {"kind": "flag"}) is True


def test_error_names_the_spec_key_and_stays_on_one_line():
    with pytest.raises(ValueError, match=r'^models\[0\]\.escalate_if "a AND  b": unknown field'):
        Condition.parse("a AND\n b", {"x": "boolean"}, name="models[0].escalate_if")


def test_unknown_field_type_is_rejected():
    with pytest.raises(
        ValueError,
        match=r"field 'x' has unknown type 'float'; types are: string, integer, number, boolean",
    ):
        Condition.parse("x > 1", {"x": "float"})


def test_a_field_named_like_a_keyword_cannot_be_referenced():
    assert "expected a condition, found 'like'" in error("like = 1", {"like": "integer"})
