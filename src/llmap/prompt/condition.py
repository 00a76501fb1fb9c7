"""A safe, SQL-like boolean condition over one answer's fields.

Used by ``escalate_if = "confidence < 0.7"``: after a cheap model answers a
row, the condition is evaluated on that answer (field name -> value) and, when
it holds, the row goes on to the next model. The text is parsed once, up
front, by a small tokenizer and recursive-descent parser; nothing is ever
passed to ``eval`` and no database is involved, so a field value such as
``"__import__('os')"`` is only ever a string.

Grammar (keywords are case-insensitive, field names are case-sensitive)::

    expr    := or
    or      := and (OR and)*
    and     := not (AND not)*
    not     := NOT not | cmp
    cmp     := operand ( cmpop operand
                       | [NOT] IN '(' literal (',' literal)* ')'
                       | IS [NOT] NULL
                       | [NOT] LIKE string )?
    cmpop   := = | == | != | <> | < | <= | > | >=
    operand := field | literal | '(' expr ')'
    literal := integer | decimal | string | TRUE | FALSE | NULL

- Fields are identifiers ``[A-Za-z_][A-Za-z0-9_]*`` that must name one of the
  answer's fields. A field whose name is a keyword (``in``, ``like``, ...)
  cannot be referred to.
- Strings are single-quoted with ``''`` for a quote inside (``'it''s'``).
  Double-quoted strings are *also string literals* (``"spam"`` equals
  ``'spam'``, with ``""`` for a quote inside), because conditions live in TOML
  where either quote is natural; they are never field names as in standard
  SQL.
- Numbers: ``3``, ``-2``, ``0.7``, ``.5``, ``5.``, ``1e-3``. A literal
  without ``.`` or an exponent is an int, otherwise a float. There is no
  arithmetic.
- ``LIKE`` matches the whole string, case-sensitively; ``%`` is any run of
  characters, ``_`` is one character; there is no ``ESCAPE`` clause.
- A bare boolean field (``needs_review``) or ``TRUE``/``FALSE`` is a condition.

Types are checked at parse time: both sides of a comparison must have the
same kind (``integer`` and ``number`` fields are both numbers and compare
numerically), booleans only take ``=``/``!=``, ``LIKE`` needs a string, and
``AND``/``OR``/``NOT`` need true/false operands.

NULL semantics are a simplified, two-valued SQL: a missing key reads as NULL
(None); any comparison, ``IN``, or ``LIKE`` with a NULL side is False (so
``confidence < 0.7`` is False when confidence is missing, and so is
``confidence NOT IN (1)``); ``IS NULL`` is True for None or a missing key; a
bare boolean field is True only when the value is ``True``. ``NOT`` then
simply negates, so ``NOT (confidence >= 0.7)`` *is* True for a missing
confidence. A value whose Python type does not match its field's kind
(which a validated answer never has) is treated like NULL rather than raising.
"""

from __future__ import annotations

import difflib
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Condition"]

#: llmap field type -> the kind used for type checks and comparisons.
_KIND_OF_TYPE: dict[str, str] = {
    "string": "string",
    "integer": "number",
    "number": "number",
    "boolean": "boolean",
}
_KEYWORDS = frozenset({"AND", "OR", "NOT", "IN", "IS", "NULL", "LIKE", "TRUE", "FALSE"})
_MAX_DEPTH = 64
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    "==": operator.eq,
    "!=": operator.ne,
    "<>": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<num>-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op><=|>=|<>|!=|==|=|<|>)
  | (?P<punct>[(),])
    """,
    re.VERBOSE,
)
_BAD_CHAR_HINTS = {
    "!": "; use != for 'not equal' or NOT to negate",
    "&": "; use AND",
    "|": "; use OR",
    "`": "; write field names without quotes",
    "-": "; arithmetic is not supported",
    "+": "; arithmetic is not supported",
}


def _runtime_kind(value: Any) -> str | None:
    """The kind of a runtime value, or None for NULL and unsupported types."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return None


# --- tokens -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "num" "str" "ident" "kw" "op" "(" ")" "," "end"
    value: Any  # int/float for num, str for str/ident/op, upper-cased keyword for kw
    pos: int  # 0-based offset of the first character
    text: str  # the source text of the token ("" for end)
    quote: str = ""  # "'" or '"' for strings


# --- syntax tree (each node is pure; `value` reads one answer) ----------------


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    type: str  # llmap type: string / integer / number / boolean

    def value(self, answer: Mapping[str, Any]) -> Any:
        return answer.get(self.name)


@dataclass(frozen=True, slots=True)
class _Literal:
    literal: Any
    kind: str  # "string" "number" "boolean" "null"
    text: str = field(compare=False)
    quote: str = field(default="", compare=False)

    def value(self, answer: Mapping[str, Any]) -> Any:
        return self.literal


@dataclass(frozen=True, slots=True)
class _Compare:
    op: str
    left: Any
    right: Any

    def value(self, answer: Mapping[str, Any]) -> bool:
        a, b = self.left.value(answer), self.right.value(answer)
        kind = _runtime_kind(a)
        if kind is None or kind != _runtime_kind(b):
            return False
        return bool(_OPS[self.op](a, b))


@dataclass(frozen=True, slots=True)
class _In:
    operand: Any
    options: tuple[Any, ...]
    kind: str
    negated: bool

    def value(self, answer: Mapping[str, Any]) -> bool:
        v = self.operand.value(answer)
        if _runtime_kind(v) != self.kind:
            return False
        return (v in self.options) != self.negated


@dataclass(frozen=True, slots=True)
class _IsNull:
    operand: Any
    negated: bool

    def value(self, answer: Mapping[str, Any]) -> bool:
        return (self.operand.value(answer) is None) != self.negated


@dataclass(frozen=True, slots=True)
class _Like:
    operand: Any
    pattern: str
    negated: bool
    regex: re.Pattern[str] = field(compare=False)

    def value(self, answer: Mapping[str, Any]) -> bool:
        v = self.operand.value(answer)
        if not isinstance(v, str):
            return False
        return (self.regex.fullmatch(v) is not None) != self.negated


@dataclass(frozen=True, slots=True)
class _Truth:
    """A bare boolean field or literal used as a condition."""

    operand: Any

    def value(self, answer: Mapping[str, Any]) -> bool:
        return self.operand.value(answer) is True


@dataclass(frozen=True, slots=True)
class _Not:
    operand: Any

    def value(self, answer: Mapping[str, Any]) -> bool:
        return not self.operand.value(answer)


@dataclass(frozen=True, slots=True)
class _And:
    operands: tuple[Any, ...]

    def value(self, answer: Mapping[str, Any]) -> bool:
        return all(o.value(answer) for o in self.operands)


@dataclass(frozen=True, slots=True)
class _Or:
    operands: tuple[Any, ...]

    def value(self, answer: Mapping[str, Any]) -> bool:
        return any(o.value(answer) for o in self.operands)


def _kind(node: Any) -> str:
    """Static kind of a node: string / number / boolean / null."""
    if isinstance(node, _Field):
        return _KIND_OF_TYPE[node.type]
    if isinstance(node, _Literal):
        return node.kind
    return "boolean"


def _describe(node: Any) -> str:
    if isinstance(node, _Field):
        return f"{node.type} field '{node.name}'"
    if isinstance(node, _Literal):
        return "NULL" if node.kind == "null" else f"{node.kind} {node.text}"
    return "a true/false condition"


def _like_regex(pattern: str) -> re.Pattern[str]:
    parts = [".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern]
    return re.compile("".join(parts), re.DOTALL)


# --- parser -------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str, fields: Mapping[str, str], name: str) -> None:
        self.text = text
        self.fields = fields
        self.label = f'{name} "{text.translate({9: 32, 10: 32, 13: 32})}"'
        self.used: set[str] = set()
        self.depth = 0
        self.tokens = self._tokenize()
        self.i = 0

    # errors
    def fail(self, message: str) -> ValueError:
        return ValueError(f"{self.label}: {message}")

    def syntax(self, tok: _Token, message: str) -> ValueError:
        return self.fail(f"syntax error at position {tok.pos + 1}: {message}")

    # tokens
    def _tokenize(self) -> list[_Token]:
        text, pos, out = self.text, 0, []
        while pos < len(text):
            c = text[pos]
            if c in "'\"":
                pos = self._string(pos, out)
                continue
            m = _TOKEN.match(text, pos)
            if m is None:
                hint = _BAD_CHAR_HINTS.get(c, "")
                raise self.fail(
                    f"syntax error at position {pos + 1}: unexpected character {c!r}{hint}"
                )
            kind, raw = m.lastgroup, m.group()
            if kind == "num":
                end = m.end()
                while end < len(text) and (text[end].isalnum() or text[end] in "_."):
                    end += 1
                if end != m.end():
                    raise self.fail(
                        f"syntax error at position {pos + 1}: malformed number {text[pos:end]!r}"
                    )
                is_float = any(ch in raw for ch in ".eE")
                out.append(_Token("num", float(raw) if is_float else int(raw), pos, raw))
            elif kind == "ident":
                if raw.upper() in _KEYWORDS:
                    out.append(_Token("kw", raw.upper(), pos, raw))
                else:
                    out.append(_Token("ident", raw, pos, raw))
            elif kind == "op":
                out.append(_Token("op", raw, pos, raw))
            elif kind == "punct":
                out.append(_Token(raw, raw, pos, raw))
            pos = m.end()
        out.append(_Token("end", None, len(text), ""))
        return out

    def _string(self, start: int, out: list[_Token]) -> int:
        text, q = self.text, self.text[start]
        chars: list[str] = []
        pos = start + 1
        while True:
            j = text.find(q, pos)
            if j < 0:
                raise self.fail(
                    f"syntax error at position {start + 1}: unterminated string; "
                    f"close it with {q} (write {q}{q} for a {q} inside)"
                )
            chars.append(text[pos:j])
            if text.startswith(q, j + 1):  # doubled quote = one quote character
                chars.append(q)
                pos = j + 2
                continue
            out.append(_Token("str", "".join(chars), start, text[start : j + 1], q))
            return j + 1

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def advance(self) -> _Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def at_kw(self, *words: str) -> bool:
        tok = self.peek()
        return tok.kind == "kw" and tok.value in words

    def expected(self, what: str) -> ValueError:
        tok = self.peek()
        prev = self.tokens[self.i - 1] if self.i else None
        msg = f"expected {what}"
        if prev is not None:
            msg += f" after {prev.text!r}"
        if tok.kind != "end":
            msg += f", found {tok.text!r}"
        return self.syntax(tok, msg)

    def nest(self, tok: _Token) -> None:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.syntax(tok, f"nested too deeply (more than {_MAX_DEPTH} levels)")

    # grammar
    def parse(self) -> Any:
        if self.peek().kind == "end":
            raise self.fail("empty condition; write one such as confidence < 0.7")
        node = self.parse_or()
        tok = self.peek()
        if tok.kind == ")":
            raise self.syntax(tok, "unexpected ')' without a matching '('")
        if tok.kind == "op":
            raise self.syntax(
                tok,
                f"unexpected {tok.text!r}; comparisons do not chain, join them with AND",
            )
        if tok.kind != "end":
            raise self.syntax(
                tok,
                f"unexpected {tok.text!r} after a complete condition; join conditions with AND or OR",
            )
        return self.condition(node, "the condition")

    def condition(self, node: Any, where: str) -> Any:
        """Check that ``node`` is true/false; wrap a bare boolean operand."""
        if _kind(node) != "boolean":
            if isinstance(node, _Field):
                example = "= '...'" if node.type == "string" else "> 0"
                fix = f"compare it, e.g. {node.name} {example}"
            else:
                fix = "compare it with =, <, IN, LIKE or IS NULL"
            raise self.fail(f"{where} must be true or false, but {_describe(node)} is not; {fix}")
        if isinstance(node, _Field | _Literal):
            return _Truth(node)
        return node

    def parse_or(self) -> Any:
        items = [self.parse_and()]
        while self.at_kw("OR"):
            self.advance()
            items.append(self.parse_and())
        if len(items) == 1:
            return items[0]
        return _Or(tuple(self.condition(n, "each side of OR") for n in items))

    def parse_and(self) -> Any:
        items = [self.parse_not()]
        while self.at_kw("AND"):
            self.advance()
            items.append(self.parse_not())
        if len(items) == 1:
            return items[0]
        return _And(tuple(self.condition(n, "each side of AND") for n in items))

    def parse_not(self) -> Any:
        if not self.at_kw("NOT"):
            return self.parse_cmp()
        tok = self.advance()
        self.nest(tok)
        inner = self.parse_not()
        self.depth -= 1
        return _Not(self.condition(inner, "what follows NOT"))

    def parse_cmp(self) -> Any:
        left = self.parse_operand()
        tok = self.peek()
        if tok.kind == "op":
            self.advance()
            right = self.parse_operand()
            self.check_compare(tok.value, left, right)
            return _Compare(tok.value, left, right)
        negated = False
        if self.at_kw("NOT"):
            self.advance()
            negated = True
            if not self.at_kw("IN", "LIKE"):
                raise self.expected("IN or LIKE")
        if self.at_kw("IN"):
            self.advance()
            return self.parse_in(left, negated)
        if self.at_kw("LIKE"):
            self.advance()
            return self.parse_like(left, negated)
        if self.at_kw("IS"):
            self.advance()
            negated = self.at_kw("NOT")
            if negated:
                self.advance()
            if not self.at_kw("NULL"):
                raise self.expected("NULL")
            self.advance()
            self.check_not_quoted_field(left)
            return _IsNull(left, negated)
        return left

    def parse_operand(self) -> Any:
        tok = self.peek()
        if tok.kind == "(":
            self.advance()
            self.nest(tok)
            node = self.parse_or()
            self.depth -= 1
            if self.peek().kind != ")":
                if self.peek().kind == "end":
                    raise self.syntax(
                        self.peek(), f"unclosed '(' from position {tok.pos + 1}; add ')'"
                    )
                raise self.expected("')'")
            self.advance()
            return node
        if tok.kind == "ident":
            self.advance()
            return self.field(tok)
        if tok.kind in ("num", "str") or self.at_kw("TRUE", "FALSE", "NULL"):
            return self.literal()
        raise self.expected("a value" if self.i else "a condition")

    def literal(self) -> _Literal:
        tok = self.peek()
        if tok.kind == "num":
            self.advance()
            return _Literal(tok.value, "number", tok.text)
        if tok.kind == "str":
            self.advance()
            return _Literal(tok.value, "string", tok.text, tok.quote)
        if self.at_kw("TRUE", "FALSE"):
            self.advance()
            return _Literal(tok.value == "TRUE", "boolean", tok.value)
        if self.at_kw("NULL"):
            self.advance()
            return _Literal(None, "null", "NULL")
        raise self.expected("a literal value (a number, a quoted string, TRUE or FALSE)")

    def field(self, tok: _Token) -> _Field:
        name = tok.value
        if name not in self.fields:
            known = ", ".join(self.fields) or "(none)"
            close = difflib.get_close_matches(name, list(self.fields), n=1)
            folded = [f for f in self.fields if f.lower() == name.lower()]
            guess = folded or close
            hint = f" (did you mean '{guess[0]}'?)" if guess else ""
            raise self.fail(f"unknown field '{name}'{hint}; fields are: {known}")
        self.used.add(name)
        return _Field(name, self.fields[name])

    def parse_in(self, left: Any, negated: bool) -> _In:
        word = "NOT IN" if negated else "IN"
        opened = self.peek()
        if opened.kind != "(":
            raise self.expected("'(' and a list of values")
        self.advance()
        options = [self.literal()]
        while self.peek().kind == ",":
            self.advance()
            options.append(self.literal())
        if self.peek().kind != ")":
            if self.peek().kind == "end":
                raise self.syntax(
                    self.peek(), f"unclosed '(' from position {opened.pos + 1}; add ')'"
                )
            raise self.expected("',' or ')' in the IN list")
        self.advance()
        self.check_not_quoted_field(left)
        kind = _kind(left)
        for opt in options:
            if opt.kind == "null":
                raise self.fail(f"NULL never matches in {word} (...); use IS NULL or IS NOT NULL")
            if opt.kind != kind:
                raise self.fail(
                    f"{word} list mixes types: {_describe(left)} cannot match {_describe(opt)}"
                    f"{self.quote_hint(left, opt)}"
                )
        return _In(left, tuple(o.literal for o in options), kind, negated)

    def parse_like(self, left: Any, negated: bool) -> _Like:
        word = "NOT LIKE" if negated else "LIKE"
        tok = self.peek()
        if tok.kind != "str":
            raise self.expected("a quoted pattern such as '%spam%'")
        self.advance()
        self.check_not_quoted_field(left)
        if _kind(left) != "string":
            raise self.fail(
                f"{word} needs a string, but {_describe(left)} is not; use = or < instead"
            )
        return _Like(left, tok.value, negated, _like_regex(tok.value))

    def check_compare(self, op: str, left: Any, right: Any) -> None:
        for a, b in ((left, right), (right, left)):
            if not isinstance(b, _Field):
                self.check_not_quoted_field(a)
        kl, kr = _kind(left), _kind(right)
        if "null" in (kl, kr):
            fix = "IS NULL or IS NOT NULL" if op in ("=", "==", "!=", "<>") else "IS NULL"
            raise self.fail(f"comparing with NULL with {op!r} is never true; use {fix}")
        if kl != kr:
            raise self.fail(
                f"cannot compare {_describe(left)} with {_describe(right)}"
                f"{self.quote_hint(left, right) or self.quote_hint(right, left)}"
            )
        if kl == "boolean" and op not in ("=", "==", "!=", "<>"):
            raise self.fail(f"booleans cannot be ordered with {op!r}; use = or !=")

    def check_not_quoted_field(self, node: Any) -> None:
        if isinstance(node, _Literal) and node.quote == '"' and node.literal in self.fields:
            raise self.fail(
                f"{node.text} is a string, not a field (double quotes make strings); "
                f"write the field as {node.literal} without quotes"
            )

    @staticmethod
    def quote_hint(target: Any, lit: Any) -> str:
        """A fix for a literal of the wrong kind, or "" (``target`` is the other side)."""
        if not isinstance(lit, _Literal):
            return ""
        want = _kind(target)
        if want == "number" and lit.kind == "string":
            try:
                float(lit.literal)
            except ValueError:
                return "; compare it with a number"
            return f"; write {lit.literal} without quotes"
        if want == "string" and lit.kind in ("number", "boolean"):
            return f"; quote it: '{lit.text}'"
        if want == "boolean" and lit.kind == "string" and lit.literal.upper() in ("TRUE", "FALSE"):
            return f"; write {lit.literal.upper()} without quotes"
        return ""


# --- public -------------------------------------------------------------------


class Condition:
    """A parsed, type-checked boolean condition over one answer's fields.

    Build one with :meth:`Condition.parse`; it is immutable, pure, and safe to
    share across tasks. See the module docstring for the grammar and the NULL
    semantics.

    Attributes:
        text: the condition as written, e.g. ``"confidence < 0.7"``.
        fields_used: the names of the fields the condition reads.
    """

    __slots__ = ("_fields_used", "_root", "_text")

    def __init__(self, text: str, root: Any, fields_used: frozenset[str]) -> None:
        """Internal; use :meth:`Condition.parse`."""
        self._text = text
        self._root = root
        self._fields_used = fields_used

    @classmethod
    def parse(cls, text: str, fields: Mapping[str, str], *, name: str = "escalate_if") -> Condition:
        """Parse and type-check ``text`` against the answer's fields.

        Args:
            text: the condition, e.g. ``"confidence < 0.7 OR kind = 'other'"``.
            fields: field name -> llmap type (``"string"``, ``"integer"``,
                ``"number"`` or ``"boolean"``), in spec order (used in messages).
            name: what the condition is called in error messages (the spec key).

        Returns:
            The parsed condition.

        Raises:
            ValueError: one line naming the problem and the fix, prefixed with
                ``name "text":``: an empty condition, an unknown field (with the
                known ones listed), a syntax error (with its 1-based character
                position: bad character, unterminated string, unclosed ``(``,
                missing value, trailing text), a type mismatch (naming both
                sides), a comparison with NULL, a non-boolean condition, or a
                field of unknown type in ``fields``.
        """
        for fname, ftype in fields.items():
            if ftype not in _KIND_OF_TYPE:
                raise ValueError(
                    f"{name}: field '{fname}' has unknown type {ftype!r}; "
                    f"types are: {', '.join(_KIND_OF_TYPE)}"
                )
        parser = _Parser(text, fields, name)
        root = parser.parse()
        return cls(text, root, frozenset(parser.used))

    @property
    def text(self) -> str:
        """The condition as written."""
        return self._text

    @property
    def fields_used(self) -> frozenset[str]:
        """Names of the fields the condition reads."""
        return self._fields_used

    def evaluate(self, answer: Mapping[str, Any]) -> bool:
        """Whether the condition holds for one answer.

        Args:
            answer: field name -> value (str, int, float, bool or None). Missing
                keys read as NULL; extra keys are ignored.

        Returns:
            True or False; never raises for any mapping of plain values.
        """
        return bool(self._root.value(answer))

    def __repr__(self) -> str:
        return f"Condition({self._text!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Condition):
            return NotImplemented
        return self._text == other._text and self._root == other._root

    def __hash__(self) -> int:
        return hash((self._text, self._root))
