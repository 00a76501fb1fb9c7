"""Bounds in the embedded model's grammar: integer and number ranges, string lengths, the schema converter.

The range expressions are regular (literals, classes, sequences, ``|``, groups,
``{m,n}``), so each is translated to a Python regex here and checked against
every integer of small ranges, and by property on large ones.
"""

from __future__ import annotations

import random
import re
from decimal import Decimal

import pytest

from llmap.prompt.grammar import (
    FRACTION_DIGITS,
    INT_DIGITS,
    integer_range,
    number_range,
    schema_to_gbnf,
)

_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\[[^\]]*\]|\{\d+(?:,\d*)?\}|[()|?*+])')


def to_regex(expr: str) -> re.Pattern[str]:
    """Compile a GBNF expression of literals, classes, groups, ``|`` and repetitions into a regex."""
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        assert m, f"cannot read {expr[pos:]!r}"
        tok = m.group(1)
        pos = m.end()
        if tok.startswith('"'):
            out.append("(?:" + re.escape(tok[1:-1].encode().decode("unicode_escape")) + ")")
        elif tok == "(":
            out.append("(?:")
        else:
            out.append(tok)
        while pos < len(expr) and expr[pos] == " ":
            pos += 1
    return re.compile("".join(out))


def accepts(expr: str):
    rx = to_regex(expr)
    return lambda s: rx.fullmatch(s) is not None


def test_the_regex_translation_can_fail():
    ok = accepts(integer_range(3, 7))
    assert ok("5") and not ok("8") and not ok("") and not ok("05")


BOUNDS = [-1000, -101, -100, -99, -42, -10, -9, -1, 0, 1, 7, 9, 10, 11, 19, 20, 99, 100, 101, 120, 199, 200, 555,
          600, 999, 1000]


@pytest.mark.parametrize("lo", [*BOUNDS, None])
def test_integer_ranges_match_exactly_their_integers(lo):
    words = [str(i) for i in range(-1200, 1201)] + ["-0", "00", "007", "+5", "", "-", "1.0", "1e2", " 1", "--1"]
    for hi in [*BOUNDS, None]:
        if lo is not None and hi is not None and lo > hi:
            with pytest.raises(ValueError, match="empty integer range"):
                integer_range(lo, hi)
            continue
        ok = accepts(integer_range(lo, hi))
        for w in words:
            want = re.fullmatch(r"-?(0|[1-9][0-9]*)", w) is not None and w != "-0" and (
                (lo is None or int(w) >= lo) and (hi is None or int(w) <= hi))
            assert ok(w) == want, (lo, hi, w)


def test_large_integer_ranges_by_property():
    rnd = random.Random(19)
    for _ in range(300):
        a, b = sorted(rnd.randint(-10 ** rnd.randint(1, 12), 10 ** rnd.randint(1, 12)) for _ in range(2))
        ok = accepts(integer_range(a, b))
        probes = {a, b, a - 1, b + 1, a + 1, b - 1, (a + b) // 2, 0, -1, 1}
        probes |= {rnd.randint(a, b) for _ in range(20)}
        probes |= {rnd.randint(2 * a - b - 1, 2 * b - a + 1) for _ in range(20)}
        for x in probes:
            assert ok(str(x)) == (a <= x <= b), (a, b, x)


def test_an_open_side_allows_up_to_int_digits():
    ok = accepts(integer_range(5, None))
    assert ok("9" * INT_DIGITS) and not ok("9" * (INT_DIGITS + 1)) and ok("5") and not ok("4")
    neg = accepts(integer_range(None, -3))
    assert neg("-3") and neg("-" + "9" * INT_DIGITS) and not neg("-2") and not neg("0")


def _decimals(lo: int, hi: int, step: Decimal) -> list[Decimal]:
    out, x = [], Decimal(lo)
    while x <= hi:
        out.append(x)
        x += step
    return out


@pytest.mark.parametrize(("lo", "hi"), [(0, 1), (0.25, 3.5), (-1.5, 2), (-2.75, -0.5), (0.1, 0.1), (120, 600),
                                        (-0.05, 0.05), (3, None), (None, 0.5), (1.005, 1.02)])
def test_number_ranges_match_plain_decimals_in_range(lo, hi):
    ok = accepts(number_range(lo, hi))
    a = Decimal(repr(lo)) if lo is not None else None
    b = Decimal(repr(hi)) if hi is not None else None
    span_lo = int(a) - 2 if a is not None else int(b) - 3
    span_hi = int(b) + 2 if b is not None else int(a) + 3
    for x in _decimals(span_lo, span_hi, Decimal("0.005")):
        inside = (a is None or x >= a) and (b is None or x <= b)
        plain = format(x, "f")
        for text in {plain, format(x.normalize(), "f"), plain + "0" if "." in plain else plain + ".0"}:
            if text.startswith("-") and Decimal(text) == 0:
                continue  # "-0" and "-0.0" are allowed where 0 is: JSON reads them as 0
            assert ok(text) == inside, (lo, hi, text)
    assert not ok("1e2") and not ok(".5") and not ok("01.5") and not ok("+1")


def test_number_range_limits_decimals_and_rounds_long_bounds_inwards():
    ok = accepts(number_range(0, 1))
    assert ok("0." + "1" * FRACTION_DIGITS) and not ok("0." + "1" * (FRACTION_DIGITS + 1))
    ok = accepts(number_range(0.1234567890123456789, 0.5))
    assert not ok("0.123456789012345") and ok("0.123456789012346")


def test_empty_and_infinite_number_ranges_are_errors():
    with pytest.raises(ValueError, match="empty number range"):
        number_range(2, 1)
    with pytest.raises(ValueError, match="not finite"):
        number_range(0, float("inf"))


# -- the schema converter (llama-cpp-python's, extended) ---------------------
llama_grammar = pytest.importorskip("llama_cpp.llama_grammar", reason="needs llmap[local]")


def _schema(**props):
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def test_bounds_shape_the_grammar():
    g = schema_to_gbnf(_schema(minutes={"type": "integer", "minimum": 120, "maximum": 600},
                               share={"type": "number", "minimum": 0, "maximum": 1},
                               code={"type": "string", "maxLength": 3},
                               kind={"type": "string", "enum": ["a", "b"]}))
    rules = dict(line.split(" ::= ", 1) for line in g.splitlines())
    assert rules["minutes"] == integer_range(120, 600) + " space"
    assert rules["share"] == number_range(0, 1) + " space"
    assert rules["code"] == '"\\"" char{0,3} "\\"" space'
    assert rules["kind"] == '"\\"a\\"" | "\\"b\\""'
    # llama-cpp-python's own converter has no bounds: the difference this module makes
    plain = llama_grammar.json_schema_to_gbnf(
        '{"type": "object", "properties": {"minutes": {"type": "integer", "minimum": 120, "maximum": 600}}}')
    assert "120" not in plain and "integral-part" in plain


def test_nullable_bounded_fields_keep_their_bounds():
    g = schema_to_gbnf(_schema(m={"anyOf": [{"type": "integer", "minimum": 1, "maximum": 5}, {"type": "null"}]}))
    assert integer_range(1, 5) + " space" in g and "null" in g


def test_integer_bounds_that_are_floats_or_exclusive_round_inwards():
    g = schema_to_gbnf(_schema(a={"type": "integer", "minimum": 0.5, "exclusiveMaximum": 10}))
    assert integer_range(1, 9) + " space" in g


def test_every_grammar_parses_in_llama_cpp():
    from llama_cpp import LlamaGrammar

    for schema in (_schema(a={"type": "integer", "minimum": -50, "maximum": 1234}),
                   _schema(b={"type": "number", "minimum": -0.5, "maximum": 99.25}),
                   _schema(c={"type": "string", "minLength": 2, "maxLength": 40}),
                   _schema(d={"type": "integer", "minimum": 0})):
        grammar = LlamaGrammar.from_string(schema_to_gbnf(schema), verbose=False)
        assert grammar is not None
