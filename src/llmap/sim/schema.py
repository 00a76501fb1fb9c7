"""Compiled JSON schemas: deterministic value generators for the simulator.

A schema is analysed once (:func:`compile_schema`, cached by its JSON text,
key order kept) into closures ``gen(h, depth) -> value``; the hot path only walks
them. Each value is a function of a 64-bit hash ``h`` that is mixed with the
field name (objects) or the index (arrays) on the way down, so a field's
value depends on the request seed and the field's path only.

Supported keywords: ``type`` (object, array, string, integer, number,
boolean, null, or a list of those), ``properties``, ``items``, ``enum``,
``const``, ``minimum``/``maximum`` and the exclusive forms,
``minItems``/``maxItems``, ``minLength``/``maxLength``, ``pattern`` (a
matching string is built from the regex, :mod:`llmap.sim.regex`), the string
formats date, time, date-time, email, uri and uuid, ``anyOf``/``oneOf``,
``allOf`` with one member, and local ``$ref`` (``#/$defs/...``). Unknown
keywords (``multipleOf``...) are ignored. A nullable type (``[T, "null"]``
or an ``anyOf`` with ``{"type": "null"}``) gets a value of type T. Numbers with no bounds fall in
[0, 1) with 2 decimals; integers with no bounds in [0, 100]; arrays with no
bounds have 1 to 3 items.

A schema is *packed* (several rows in one request) when its top level is an
array of objects with an ``id`` property, or an object with such an array
property; :class:`SchemaPlan` records where the items go.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

__all__ = ["Gen", "SchemaPlan", "canonical_json", "compact_json", "compile_schema", "mix", "row_seed", "salt",
           "schema_key", "words"]

_MASK = 0xFFFFFFFFFFFFFFFF
_MAX_DEPTH = 6  # from this depth arrays shrink to minItems, so $ref recursion ends

_WORDS = (
    "amber", "basil", "cedar", "delta", "ember", "fable", "grove", "harbor",
    "iris", "jade", "kelp", "lumen", "maple", "north", "opal", "pixel",
    "quartz", "river", "sage", "tidal", "umber", "velvet", "willow", "xenon",
    "yarrow", "zephyr", "acorn", "birch", "comet", "dune", "echo", "flint",
)  # fmt: skip

Gen = Callable[[int, int], Any]
"""A compiled schema node: ``gen(h, depth) -> value`` for a 64-bit hash ``h``."""


def mix(x: int) -> int:
    """SplitMix64 finaliser: a cheap, well-spread 64-bit hash of ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def salt(text: str) -> int:
    """A stable 64-bit salt for a field name or an id (not Python's ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def canonical_json(value: Any) -> str:
    """``value`` as JSON with sorted keys and no spaces (for hashing)."""
    return _CANONICAL(value)


def compact_json(value: Any) -> str:
    """``value`` as JSON with no spaces, key order kept."""
    return _COMPACT(value)


def schema_key(schema: Any) -> str:
    """The :func:`compile_schema` cache key: compact JSON, key order kept."""
    return _COMPACT(schema)


def words(h: int, n: int) -> str:
    """``n`` words picked from a fixed list by successive 5-bit slices of ``h``."""
    return " ".join(_WORDS[(h >> (5 * i)) & 31] for i in range(n))


def _date(h: int) -> str:
    return f"20{10 + h % 15}-{1 + (h >> 8) % 12:02d}-{1 + (h >> 16) % 28:02d}"


def _time(h: int) -> str:
    return f"{(h >> 24) % 24:02d}:{(h >> 32) % 60:02d}:00"


def _uuid(h: int) -> str:
    x = f"{h:016x}{mix(h):016x}"
    return f"{x[:8]}-{x[8:12]}-4{x[13:16]}-a{x[17:20]}-{x[20:32]}"


_FORMATS: dict[str, Callable[[int], str]] = {
    "date": _date,
    "time": _time,
    "date-time": lambda h: f"{_date(h)}T{_time(h)}Z",
    "email": lambda h: f"{_WORDS[h & 31]}{h % 1000}@example.com",
    "uri": lambda h: f"https://example.com/{_WORDS[h & 31]}/{h % 10000}",
    "uuid": _uuid,
}


def _string_gen(schema: Mapping[str, Any]) -> Gen:
    base = _FORMATS.get(str(schema.get("format")), lambda h: words(h, 2 + h % 3))
    lo = int(schema.get("minLength", 0))
    hi = schema.get("maxLength")
    if isinstance(schema.get("pattern"), str):
        from llmap.sim.regex import pattern_gen

        matching = pattern_gen(schema["pattern"], lo, None if hi is None else int(hi))
        if matching is not None:
            return lambda h, d: matching(h)
    if lo == 0 and hi is None:
        return lambda h, d: base(h)

    def gen(h: int, d: int) -> str:
        s = base(h)
        if len(s) < lo:
            s = (s + " " + "x" * lo)[:lo]
        if hi is not None and len(s) > int(hi):
            s = s[: int(hi)]
        return s

    return gen


def _num(value: Any) -> float | None:
    """A numeric bound, or ``None`` (draft-4 boolean ``exclusive*`` is ignored)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _bounds(schema: Mapping[str, Any], width: float) -> tuple[float, float, bool, bool]:
    """``(lo, hi, lo_exclusive, hi_exclusive)``; a missing side is ``width`` away."""
    lo, lo_ex = _num(schema.get("minimum")), False
    if lo is None and _num(schema.get("exclusiveMinimum")) is not None:
        lo, lo_ex = _num(schema["exclusiveMinimum"]), True
    hi, hi_ex = _num(schema.get("maximum")), False
    if hi is None and _num(schema.get("exclusiveMaximum")) is not None:
        hi, hi_ex = _num(schema["exclusiveMaximum"]), True
    if lo is None and hi is None:
        lo, hi = 0, width
    elif lo is None:
        lo = min(0, hi - width)
    elif hi is None:
        hi = max(lo + width, width)
    return lo, hi, lo_ex, hi_ex


def _integer_gen(schema: Mapping[str, Any]) -> Gen:
    lo, hi, lo_ex, hi_ex = _bounds(schema, 100)
    first = math.floor(lo) + 1 if lo_ex else math.ceil(lo)
    last = math.ceil(hi) - 1 if hi_ex else math.floor(hi)
    span = max(last - first + 1, 1)
    return lambda h, d: first + h % span


def _number_gen(schema: Mapping[str, Any]) -> Gen:
    if all(_num(schema.get(k)) is None for k in _NUMBER_BOUNDS):
        return lambda h, d: (h % 100) / 100  # [0, 1) with 2 decimals
    lo, hi, lo_ex, hi_ex = _bounds(schema, 1.0)
    mid = lo + (hi - lo) / 2

    def gen(h: int, d: int) -> float:
        v = round(lo + (h % 10_000) / 10_000 * (hi - lo), 2)
        if v < lo or v > hi or (lo_ex and v <= lo) or (hi_ex and v >= hi):
            return mid
        return v

    return gen


_NUMBER_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


class _Compiler:
    """Turns one schema into :data:`Gen` closures; resolves local ``$ref``."""

    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root
        self.refs: dict[str, list[Gen]] = {}

    def resolve(self, schema: Any) -> Mapping[str, Any]:
        seen = 0
        while isinstance(schema, Mapping) and "$ref" in schema and seen < 32:
            schema = self._lookup(schema["$ref"])
            seen += 1
        return schema if isinstance(schema, Mapping) else {}

    def _lookup(self, ref: str) -> Any:
        if not ref.startswith("#"):
            raise ValueError(f"only local $ref is supported, got {ref!r}")
        node: Any = self.root
        for part in ref[1:].split("/"):
            if part:
                node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def compile(self, schema: Any) -> Gen:
        if isinstance(schema, Mapping) and "$ref" in schema:
            ref = schema["$ref"]
            if ref not in self.refs:
                holder: list[Gen] = []
                self.refs[ref] = holder
                holder.append(self.compile(self._lookup(ref)))
            holder = self.refs[ref]
            return lambda h, d: holder[0](h, d)
        if not isinstance(schema, Mapping):
            return lambda h, d: words(h, 2)  # `true` / `{}`: any value will do
        if "const" in schema:
            const = schema["const"]
            return lambda h, d: const
        if "enum" in schema and schema["enum"]:
            choices = list(schema["enum"])
            return lambda h, d: choices[h % len(choices)]
        variants = schema.get("anyOf") or schema.get("oneOf")
        if variants:
            useful = [v for v in variants if self.resolve(v).get("type") != "null"] or variants
            gens = [self.compile(v) for v in useful]
            return lambda h, d: gens[h % len(gens)](mix(h), d)
        if schema.get("allOf") and len(schema["allOf"]) == 1:
            return self.compile(schema["allOf"][0])
        return self._typed(schema, _schema_type(schema))

    def _typed(self, schema: Mapping[str, Any], kind: str) -> Gen:
        if kind == "object":
            return self._object(schema)
        if kind == "array":
            return self._array(schema)
        if kind == "integer":
            return _integer_gen(schema)
        if kind == "number":
            return _number_gen(schema)
        if kind == "boolean":
            return lambda h, d: bool(h & 1)
        if kind == "null":
            return lambda h, d: None
        return _string_gen(schema)

    def _object(self, schema: Mapping[str, Any]) -> Gen:
        props = [
            (name, salt(name), self.compile(sub))
            for name, sub in (schema.get("properties") or {}).items()
        ]
        return lambda h, d: {name: g(mix(h ^ k), d + 1) for name, k, g in props}

    def _array(self, schema: Mapping[str, Any]) -> Gen:
        item = self.compile(schema.get("items", {"type": "string"}))
        lo = int(schema.get("minItems", 0 if "maxItems" in schema else 1))
        hi = int(schema.get("maxItems", max(lo, 1) + 2))
        span = max(hi - lo + 1, 1)
        floor = int(schema.get("minItems", 0))  # what JSON Schema requires, used when deep

        def gen(h: int, d: int) -> list[Any]:
            n = floor if d >= _MAX_DEPTH else lo + h % span
            return [item(mix(h ^ ((i + 1) * 0x9E3779B97F4A7C15 & _MASK)), d + 1) for i in range(n)]

        return gen


def _schema_type(schema: Mapping[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        if "properties" in schema:
            return "object"
        if "items" in schema:
            return "array"
        return "string"
    return str(kind)


@dataclass(frozen=True, slots=True)
class SchemaPlan:
    """A compiled schema, ready to generate values.

    Attributes:
        generate: ``generate(seed, 0)`` gives a value valid against the schema.
        pack_key: for a packed object schema, the property holding the items;
            ``""`` when the top level itself is the array of items; ``None``
            when the schema is not packed.
        item: generator of one packed item (``None`` when not packed).
    """

    generate: Gen
    pack_key: str | None
    item: Gen | None


def _is_id_items(compiler: _Compiler, schema: Any) -> bool:
    s = compiler.resolve(schema)
    if _schema_type(s) != "array":
        return False
    items = compiler.resolve(s.get("items"))
    return _schema_type(items) == "object" and "id" in (items.get("properties") or {})


@lru_cache(maxsize=512)
def compile_schema(schema_text: str) -> SchemaPlan:
    """Analyse a JSON schema once; cached by its JSON text.

    Args:
        schema_text: the schema as JSON. Key order is kept (not sorted), so
            generated objects list their properties in the schema's order.

    Returns:
        The :class:`SchemaPlan`.

    Raises:
        ValueError: the text is not a JSON object, or a ``$ref`` is not local
            or points nowhere.
    """
    schema = json.loads(schema_text)
    if not isinstance(schema, Mapping):
        raise ValueError("a JSON schema must be an object")
    try:
        return _plan(schema)
    except (KeyError, IndexError, TypeError, RecursionError) as exc:
        raise ValueError(f"unsupported JSON schema: {exc!r}") from exc


def _plan(schema: Mapping[str, Any]) -> SchemaPlan:
    c = _Compiler(schema)
    top = c.resolve(schema)
    pack_key: str | None = None
    items_schema: Any = None
    if _is_id_items(c, top):
        pack_key, items_schema = "", top.get("items")
    elif _schema_type(top) == "object":
        for name, sub in (top.get("properties") or {}).items():
            if _is_id_items(c, sub):
                pack_key, items_schema = name, c.resolve(sub).get("items")
                break
    item = c.compile(items_schema) if pack_key is not None else None
    return SchemaPlan(generate=c.compile(schema), pack_key=pack_key, item=item)


def row_seed(model: Any, text: str) -> int:
    """The seed of one row's answer: sha256 of the model and the row's text.

    A structured answer depends only on the model and the row: the last user
    message of an unpacked request, or an item's values (joined by newlines,
    ``id`` left out) of a packed one. So a row whose user template is just
    ``{{ text }}`` gets the same answer packed or unpacked, which lets tests
    check that packed answers are matched to the right rows.
    """
    canonical = canonical_json({"model": model, "row": text})
    return int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:8], "big")
