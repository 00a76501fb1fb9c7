"""Per-row confidence (``_confidence``): the probability of the answer the model chose, from its token
log-probabilities.

**What is computed.** For each field the confidence covers (:func:`covered_fields`), the answer's JSON
text is scanned for the field's value and its character span (:func:`json_spans`). The value's
characters are the ones between a string's quotes, or a number, ``true``, ``false`` or ``null`` as
written (an empty string: its closing quote). The completion's tokens (``Completion.logprobs``: token
text and natural-log probability, in order; their texts concatenate to the answer) are laid over the
text, and the field's probability is ``exp`` of the sum of the log-probabilities of every token that
overlaps those characters: the joint probability of the tokens that wrote the value. The row's
``_confidence`` is the product over the covered fields: the joint probability of the values the model
chose, as it sampled them (given the text before them). The JSON around a value (quotes, ``":"``,
braces) is left out: under a grammar or a strict schema it is forced, and a server may report its
probability before the grammar's mask (llama-cpp-python's server does: a forced ``"`` can have a raw
probability of 1e-10), which says nothing about the value. A token that writes both structure and value
(`` "coun``) counts whole. Where one enum value is a prefix of another (``city``, ``city_north``), the
choice to stop is in the closing quote's token, which is not counted: the figure is then an upper bound.

In a pack each item gets its own: the item is found in the answer's ``items`` array by its ``id``, and
its fields' spans are read inside it.

**Where there is none** (``_confidence`` null): the provider returns no log-probabilities (Anthropic's
Messages API has none), the server refused the parameter (remembered like a structured-output dialect,
:mod:`llmap.control.dialect`), the answer came from the response cache stored without one, the job has
no field the confidence covers, or ``[output] confidence = false``. ``llmap report`` says which. Nothing
is invented.

Which fields: ``[output] confidence = "auto"`` (the default) covers the enum, boolean and integer
fields and the strings of at most :data:`SHORT_STRING` characters (``max_length``); free text and
decimal numbers have no single "value the model chose" worth a probability. A list names the fields.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from llmap import errors as E
from llmap.spec import FieldSpec

__all__ = ["SHORT_STRING", "Confidence", "covered_fields", "json_spans", "span_probability", "value_chars"]

#: A string field with ``max_length`` at most this is "short": ``"auto"`` covers it.
SHORT_STRING = 64

_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_WS = re.compile(r"[ \t\n\r]*")
_STRING = json.decoder.scanstring  # type: ignore[attr-defined]

#: A value's path in a JSON document (keys and indices) -> its character span ``(start, end)``.
Spans = dict[tuple[Any, ...], tuple[int, int]]


def covered_fields(fields: Mapping[str, FieldSpec], setting: Any, *, source: str = "job") -> tuple[str, ...]:
    """The fields ``_confidence`` covers, from ``[output] confidence``.

    Args:
        fields: the output fields.
        setting: ``"auto"``, ``True``, ``False`` or a list of field names.
        source: how to name the job in errors.

    Raises:
        SpecError: ``true`` with no field to cover, or a listed name that is not a field.
    """
    if setting is False:
        return ()
    if isinstance(setting, list):
        unknown = [n for n in setting if n not in fields]
        if unknown:
            raise E.SpecError(f"{source}: [output] confidence names {unknown[0]!r}, which is not an output field; "
                              f"fields: {', '.join(fields)}")
        return tuple(n for n in fields if n in setting)
    auto = tuple(n for n, f in fields.items()
                 if f.enum is not None or f.type in ("boolean", "integer")
                 or (f.type == "string" and f.max_length is not None and f.max_length <= SHORT_STRING))
    if setting is True and not auto:
        raise E.SpecError(f"{source}: [output] confidence = true, but no field is an enum, a boolean, an integer or "
                          f"a string with max_length <= {SHORT_STRING}; list the fields to cover, e.g. "
                          f"confidence = [\"{next(iter(fields))}\"], or drop it")
    return auto


# -- where each value is in the text ----------------------------------------------------------------
def json_spans(text: str) -> Spans:
    """Every value of the JSON document in ``text`` with its character span, keyed by path.

    ``{"a": 1, "b": [true, "x"]}`` gives ``(): (0, 25)``, ``("a",): (6, 7)``, ``("b",): (14, 25)``,
    ``("b", 0): (15, 19)``, ``("b", 1): (21, 24)``. A string's span holds its quotes.

    Raises:
        ValueError: ``text`` is not one JSON value (surrounding whitespace allowed).
    """
    spans: Spans = {}
    end = _value(text, _WS.match(text, 0).end(), (), spans)
    if _WS.match(text, end).end() != len(text):
        raise ValueError(f"extra text after the JSON value at {end}")
    return spans


def _value(text: str, i: int, path: tuple[Any, ...], spans: Spans) -> int:
    if i >= len(text):
        raise ValueError("the text ends before a value")
    c = text[i]
    if c == "{":
        j = _WS.match(text, i + 1).end()
        if text.startswith("}", j):
            spans[path] = (i, j + 1)
            return j + 1
        while True:
            if not text.startswith('"', j):
                raise ValueError(f"a key was expected at {j}")
            key, j = _STRING(text, j + 1)
            j = _WS.match(text, j).end()
            if not text.startswith(":", j):
                raise ValueError(f"':' was expected at {j}")
            j = _value(text, _WS.match(text, j + 1).end(), (*path, key), spans)
            j = _WS.match(text, j).end()
            if text.startswith("}", j):
                spans[path] = (i, j + 1)
                return j + 1
            if not text.startswith(",", j):
                raise ValueError(f"',' or '}}' was expected at {j}")
            j = _WS.match(text, j + 1).end()
    if c == "[":
        j = _WS.match(text, i + 1).end()
        n = 0
        if text.startswith("]", j):
            spans[path] = (i, j + 1)
            return j + 1
        while True:
            j = _WS.match(text, _value(text, j, (*path, n), spans)).end()
            n += 1
            if text.startswith("]", j):
                spans[path] = (i, j + 1)
                return j + 1
            if not text.startswith(",", j):
                raise ValueError(f"',' or ']' was expected at {j}")
            j = _WS.match(text, j + 1).end()
    if c == '"':
        _, j = _STRING(text, i + 1)
        spans[path] = (i, j)
        return j
    for word in ("true", "false", "null"):
        if text.startswith(word, i):
            spans[path] = (i, i + len(word))
            return i + len(word)
    m = _NUMBER.match(text, i)
    if m is None:
        raise ValueError(f"a value was expected at {i}")
    spans[path] = (i, m.end())
    return m.end()


# -- the probability of a span --------------------------------------------------------------------
def _offsets(text: str, tokens: Sequence[tuple[str, float | None]]) -> list[tuple[int, int]] | None:
    """Each token's character span in ``text``, or None when the tokens' texts do not make ``text``."""
    joined = "".join(t for t, _ in tokens)
    if joined == text:
        base = 0
    else:  # a server that trims or pads the content: the tokens must still hold it once, in one piece
        base = -joined.find(text) if text and joined.count(text) == 1 else None
        if base is None:
            return None
    out, at = [], base
    for t, _ in tokens:
        out.append((at, at + len(t)))
        at += len(t)
    return out


def value_chars(text: str, span: tuple[int, int]) -> tuple[int, int]:
    """The characters that are a value's own in its JSON span: a string's between its quotes (an empty
    string: its closing quote), anything else as written."""
    start, end = span
    if text[start] == '"':
        return (start + 1, end - 1) if end - start > 2 else (end - 1, end)
    return start, end


def span_probability(text: str, tokens: Sequence[tuple[str, float | None]], span: tuple[int, int]) -> float | None:
    """The joint probability of the tokens that wrote ``text[span[0]:span[1]]``: every token overlapping it.

    Args:
        text: the answer.
        tokens: ``(token text, natural-log probability)`` in order; their texts make ``text``.
        span: the characters, ``(start, end)`` (a value's: :func:`value_chars`).

    Returns:
        ``exp(sum of the log-probabilities)``, in [0, 1]; None when the tokens do not make ``text`` or one
        of them has no log-probability.
    """
    offsets = _offsets(text, tokens)
    if offsets is None:
        return None
    start, end = span
    total = 0.0
    for (a, b), (_, lp) in zip(offsets, tokens, strict=True):
        if a < end and b > start:
            if lp is None or not math.isfinite(lp):
                return None if lp is None or math.isnan(lp) else 0.0
            total += lp
    return min(1.0, math.exp(total))


class Confidence:
    """How a job's answers get their ``_confidence``.

    Args:
        fields: the output fields.
        setting: ``[output] confidence``.
        source: how to name the job in errors.

    Attributes:
        fields: the covered fields, in spec order (empty: no confidence).
        ask: whether requests ask for log-probabilities (``Request.logprobs``).

    Raises:
        SpecError: see :func:`covered_fields`.
    """

    def __init__(self, fields: Mapping[str, FieldSpec], setting: Any = "auto", *, source: str = "job") -> None:
        self.fields = covered_fields(fields, setting, source=source)
        self.ask = bool(self.fields)

    def _joint(self, text: str, tokens: Sequence[tuple[str, float | None]], spans: Spans,
               prefix: tuple[Any, ...]) -> float | None:
        p = 1.0
        for name in self.fields:
            span = spans.get((*prefix, name))
            if span is None:
                return None
            q = span_probability(text, tokens, value_chars(text, span))
            if q is None:
                return None
            p *= q
        return p

    def row(self, content: str, logprobs: Sequence[tuple[str, float | None]] | None) -> float | None:
        """One row's confidence from its answer and the answer's token log-probabilities, or None
        (no log-probabilities, no covered field, or text the tokens do not make)."""
        if not self.fields or not logprobs:
            return None
        try:
            spans = json_spans(content)
        except ValueError:
            return None
        return self._joint(content, logprobs, spans, ())

    def pack(self, content: str, logprobs: Sequence[tuple[str, float | None]] | None,
             ids: Sequence[str]) -> dict[str, float | None]:
        """Each packed item's confidence (by row id), from the spans of its own fields in the answer."""
        out: dict[str, float | None] = dict.fromkeys(ids)
        if not self.fields or not logprobs:
            return out
        try:
            spans = json_spans(content)
            doc = json.loads(content)
        except ValueError:
            return out
        items = doc.get("items") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            return out
        wanted = set(out)
        for i, item in enumerate(items):
            rid = item.get("id") if isinstance(item, dict) else None
            rid = str(rid) if isinstance(rid, str | int) and not isinstance(rid, bool) else None
            if rid in wanted:
                out[rid] = self._joint(content, logprobs, spans, ("items", i))
                wanted.discard(rid)  # a duplicated id keeps its first item (settle splits it anyway)
        return out
