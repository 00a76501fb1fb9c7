"""JSON Schema -> GBNF grammar for the embedded model, with the fields' bounds in the grammar.

The embedded model decodes under a llama.cpp grammar, so it can only write
answers the grammar allows. llama-cpp-python 0.3.36's converter
(``llama_grammar.SchemaConverter``) keeps ``enum``, ``pattern`` and string
lengths, but ignores ``minimum`` and ``maximum``: a field ``minutes = { type =
"integer", minimum = 120, maximum = 600 }`` let the model write 10^15, and no
re-ask could fix it. Here bounds become grammar rules:

* a bounded **integer** is a finite set of digit strings: :func:`integer_range`
  writes it as an alternation of digit ranges (``[120, 600]`` is ``"1" [2-9]
  [0-9] | [2-5] [0-9] [0-9] | "600"``);
* a bounded **number** is a bounded integer part and a fraction compared digit
  by digit (:func:`number_range`); no exponent, at most
  :data:`FRACTION_DIGITS` decimals;
* a string's ``maxLength``/``minLength`` is a bounded repetition of its
  character rule (``char{0,40}``, which llama.cpp's parser reads natively).

Everything else (``enum``, ``pattern``, objects, arrays, unions) is
llama-cpp-python's converter. The expressions use only literals, character
ranges, sequences, ``|``, groups and ``{m,n}``: they are regular, which the
tests use to check them against every integer of small ranges.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

__all__ = ["FRACTION_DIGITS", "INT_DIGITS", "integer_range", "number_range", "schema_to_gbnf", "string_length"]

#: Most digits of an integer with no upper bound (llama-cpp-python's converter allows 16).
INT_DIGITS = 16
#: Most decimals of a bounded number.
FRACTION_DIGITS = 15


# -- integers ----------------------------------------------------------------
def _digit(lo: int, hi: int) -> str:
    return f'"{lo}"' if lo == hi else ("[0-9]" if (lo, hi) == (0, 9) else f"[{lo}-{hi}]")


def _any_digits(lo: int, hi: int) -> str:
    """``lo`` to ``hi`` digits of any value ("" when hi is 0)."""
    if hi <= 0:
        return ""
    if lo == hi:
        return "[0-9]" if lo == 1 else f"[0-9]{{{lo}}}"
    return f"[0-9]{{{lo},{hi}}}"


def _seq(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _alt(parts: list[str]) -> str:
    parts = [p for p in dict.fromkeys(parts)]
    if not parts:
        raise ValueError("empty range")
    return parts[0] if len(parts) == 1 else "(" + " | ".join(parts) + ")"


def _same_length(a: str, b: str) -> list[str]:
    """Alternatives matching every digit string of ``len(a)`` digits from ``a`` to ``b`` (inclusive)."""
    if not a:
        return [""]
    if a == b:
        return [f'"{a}"']
    a0, b0 = int(a[0]), int(b[0])
    if a0 == b0:
        return [_seq(f'"{a[0]}"', _alt(_same_length(a[1:], b[1:])))]
    n = len(a) - 1
    out: list[str] = []
    lo, hi = a0, b0
    if a[1:] != "0" * n:  # a's own first digit needs the rest >= a[1:]
        out.append(_seq(f'"{a[0]}"', _alt(_same_length(a[1:], "9" * n))))
        lo = a0 + 1
    if b[1:] != "9" * n:
        hi = b0 - 1
    if lo <= hi:
        out.append(_seq(_digit(lo, hi), _any_digits(n, n)))
    if b[1:] != "9" * n:
        out.append(_seq(f'"{b[0]}"', _alt(_same_length("0" * n, b[1:]))))
    return out


def _uint(lo: int, hi: int | None) -> list[str]:
    """Alternatives for the decimal strings (no leading zeros) of integers in [lo, hi]; ``hi`` None: no bound
    (at most :data:`INT_DIGITS` digits)."""
    if hi is not None and lo > hi:
        return []
    out: list[str] = []
    top = len(str(hi)) if hi is not None else max(INT_DIGITS, len(str(lo)))
    for n in range(len(str(lo)), top + 1):
        first = 0 if n == 1 else 10 ** (n - 1)
        last = 10 ** n - 1
        a, b = max(lo, first), last if hi is None else min(hi, last)
        if a > b:
            continue
        if hi is None and a == first and n > 1:  # every longer number: one repetition covers them all
            out.append(_seq("[1-9]", _any_digits(n - 1, top - 1)))
            break
        out += _same_length(str(a), str(b))
    return out


def integer_range(lo: int | None, hi: int | None) -> str:
    """A GBNF expression matching the JSON integers from ``lo`` to ``hi``, both included.

    Integers are written as JSON writes them: no leading zeros, no ``+``, no
    ``-0``. A missing bound leaves that side open, up to :data:`INT_DIGITS` digits.

    Args:
        lo: the least integer allowed, or None.
        hi: the greatest integer allowed, or None.

    Raises:
        ValueError: ``lo > hi``.
    """
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"empty integer range [{lo}, {hi}]")
    alts: list[str] = []
    if lo is None or lo < 0:  # negative part: "-" then magnitudes
        mag_lo = 1 if hi is None or hi >= 0 else -hi
        alts += [_seq('"-"', _alt(_uint(mag_lo, None if lo is None else -lo)))]
    if hi is None or hi >= 0:
        alts += _uint(max(lo or 0, 0), hi)
    return _alt(alts)


# -- numbers -----------------------------------------------------------------
def _fraction(a: str | None, b: str | None, m: int, min_len: int) -> list[str]:
    """Alternatives for digit strings ``d`` of ``min_len`` to ``m`` digits with ``0.a <= 0.d <= 0.b``.

    ``a``/``b`` are digit strings without trailing zeros; None leaves that side
    open (``b == ""`` means 0: only zeros). An empty list: no such string.
    """
    if b == "":
        return [] if a else [_seq(f'"0"{{{min_len},{m}}}') if m else ""]
    if m == 0:
        return [""] if not a and min_len == 0 else []
    if a is None and b is None:
        return [_any_digits(min_len, m)]
    out: list[str] = []
    if min_len == 0 and not a:
        out.append("")  # nothing more: the value so far is >= 0.a
    a0 = int(a[0]) if a else 0
    b0 = int(b[0]) if b is not None else 9
    rest = max(0, min_len - 1)

    def then(digit: int, sub: list[str]) -> None:
        if sub:
            out.append(_seq(f'"{digit}"', _alt(sub)))

    if a and b is not None and a0 == b0:
        then(a0, _fraction(a[1:].rstrip("0") or None, b[1:].rstrip("0"), m - 1, rest))
        return out
    lo, hi = a0, b0
    if a:
        then(a0, _fraction(a[1:].rstrip("0") or None, None, m - 1, rest))
        lo += 1
    if b is not None:
        hi -= 1
    if lo <= hi:
        out.append(_seq(_digit(lo, hi), _any_digits(rest, m - 1)))
    if b is not None:
        then(b0, _fraction(None, b[1:].rstrip("0"), m - 1, rest))
    return out


def _split(x: Decimal) -> tuple[int, str]:
    """Integer part and fraction digits (no trailing zeros) of a non-negative decimal."""
    i = int(x)
    frac = x - i
    digits = format(frac, "f").partition(".")[2].rstrip("0") if frac else ""
    return i, digits


def _unsigned_number(a: Decimal, b: Decimal | None) -> list[str]:
    """Alternatives for plain decimals (no sign, no exponent) from ``a`` >= 0 to ``b`` (None: no bound)."""
    ia, fa = _split(a)
    ib, fb = _split(b) if b is not None else (None, None)

    def frac(lo: str | None, hi: str | None) -> str:
        digits = _alt(_fraction(lo or None, hi, FRACTION_DIGITS, 1))
        return f'("." {digits})?' if not lo else f'"." {digits}'

    if ib is not None and ia == ib:
        return [_seq(f'"{ia}"', frac(fa, fb))]
    out = [_seq(f'"{ia}"', frac(fa, None))]
    middle = _uint(ia + 1, None if ib is None else ib - 1)
    if middle:
        out.append(_seq(_alt(middle), frac(None, None)))
    if ib is not None:
        out.append(_seq(f'"{ib}"', frac(None, fb)))
    return out


def _decimal(x: float | int, rounding: str) -> Decimal:
    d = Decimal(repr(x)) if isinstance(x, float) else Decimal(x)
    if d.as_tuple().exponent < -FRACTION_DIGITS:  # type: ignore[operator]
        d = d.quantize(Decimal(1).scaleb(-FRACTION_DIGITS), rounding=rounding)
    return d


def number_range(lo: float | int | None, hi: float | int | None) -> str:
    """A GBNF expression matching JSON numbers from ``lo`` to ``hi`` (both included), written as plain decimals.

    No exponent, at most :data:`FRACTION_DIGITS` decimals (a bound with more is
    rounded inwards); integers and trailing zeros are allowed (``5``, ``5.0``).

    Args:
        lo: the least number allowed, or None.
        hi: the greatest number allowed, or None.

    Raises:
        ValueError: ``lo > hi``, or a bound that is not finite.
    """
    for x in (lo, hi):
        if x is not None and not math.isfinite(x):
            raise ValueError(f"bound {x!r} is not finite")
    a = _decimal(lo, ROUND_CEILING) if lo is not None else None
    b = _decimal(hi, ROUND_FLOOR) if hi is not None else None
    if a is not None and b is not None and a > b:
        raise ValueError(f"empty number range [{lo}, {hi}]")
    alts: list[str] = []
    if a is None or a < 0:  # negative part: "-" then magnitudes from max(-b, 0) to -a
        mag_lo = Decimal(0) if b is None or b >= 0 else -b
        alts.append(_seq('"-"', _alt(_unsigned_number(mag_lo, None if a is None else -a))))
    if b is None or b >= 0:
        alts += _unsigned_number(max(a, Decimal(0)) if a is not None else Decimal(0), b)
    return _alt(alts)


# -- strings -----------------------------------------------------------------
def string_length(char_rule: str, min_len: int, max_len: int | None) -> str:
    """A JSON string of ``min_len`` to ``max_len`` characters of ``char_rule`` (None: no upper bound)."""
    if max_len is not None and min_len > max_len:
        raise ValueError(f"empty length range [{min_len}, {max_len}]")
    rep = f"{{{min_len},}}" if max_len is None else f"{{{min_len},{max_len}}}"
    return f'"\\"" {char_rule}{rep} "\\""'


# -- schema ------------------------------------------------------------------
def _bounds(schema: Mapping[str, Any]) -> tuple[Any, Any]:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if schema.get("type") == "integer":
        lo = None if lo is None else math.ceil(lo)
        hi = None if hi is None else math.floor(hi)
        if isinstance(xlo, int | float) and not isinstance(xlo, bool):
            lo = max(lo, math.floor(xlo) + 1) if lo is not None else math.floor(xlo) + 1
        if isinstance(xhi, int | float) and not isinstance(xhi, bool):
            hi = min(hi, math.ceil(xhi) - 1) if hi is not None else math.ceil(xhi) - 1
    return lo, hi


def _converter() -> Any:
    from llama_cpp.llama_grammar import PRIMITIVE_RULES, RESERVED_NAMES, SchemaConverter

    class Bounded(SchemaConverter):  # type: ignore[misc]
        """llama-cpp-python's converter, with bounds on integers, numbers and string lengths."""

        def visit(self, schema: dict[str, Any], name: str) -> str:
            rule = name + "-" if name in RESERVED_NAMES else name or "root"
            plain = not any(k in schema for k in ("enum", "const", "$ref", "anyOf", "oneOf", "allOf"))
            t = schema.get("type")
            if plain and t in ("integer", "number") and any(
                    k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
                lo, hi = _bounds(schema)
                expr = integer_range(lo, hi) if t == "integer" else number_range(lo, hi)
                return self._add_rule(rule, f"{expr} space")
            if plain and t == "string" and "pattern" not in schema and "format" not in schema and (
                    "minLength" in schema or "maxLength" in schema):
                char = self._add_primitive("char", PRIMITIVE_RULES["char"])
                body = string_length(char, int(schema.get("minLength", 0)), schema.get("maxLength"))
                return self._add_rule(rule, f"{body} space")
            return super().visit(schema, name)

    return Bounded(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def schema_to_gbnf(schema: Mapping[str, Any], *, json_spacing: bool = True) -> str:
    """The GBNF grammar (start rule ``root``) for answers that satisfy ``schema``, bounds included.

    Needs llama-cpp-python (the embedded model's extra); imported on first use.

    Args:
        schema: a JSON Schema.
        json_spacing: whitespace exactly as Python's ``json.dumps`` writes it (``", "`` between
            items, ``": "`` after a key, nothing else), which is how llmap writes the few-shot
            answers; the text between two values is then fixed, so the decoder can write it
            without asking the model (see :mod:`llmap.providers.local.decoder`). False keeps
            llama-cpp-python's optional single space around every token.

    Raises:
        ValueError: a bound range is empty, or the schema has a construct the converter rejects.
    """
    conv = _converter()
    tree = conv.resolve_refs(json.loads(json.dumps(schema)), "schema")
    try:
        conv.visit(tree, "")
    except AssertionError as exc:  # the converter's way of saying "unsupported"
        raise ValueError(str(exc) or "unsupported schema") from None
    text = conv.format_grammar()
    if json_spacing:  # the converter writes `":" space` after keys and `"," space` between items
        text = text.replace('":" space', '": "').replace('"," space', '", "')
        text = re.sub(r"^space ::= .*$", 'space ::= ""', text, flags=re.MULTILINE)
    return text
