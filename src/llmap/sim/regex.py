"""Strings that match a regex, for the simulator's ``pattern`` fields.

A small generator over Python's own regex parse tree (``re._parser``): each
node picks its value from a 64-bit hash, so the same seed always gives the
same string. It covers what :func:`llmap.prompt.pattern.portable_pattern`
lets through (literals, classes and ranges, ``.``, groups, alternation,
``?``/``*``/``+``/``{m,n}``, anchors); a pattern it cannot satisfy gives
``None`` and the caller falls back to plain words.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any

try:  # Python 3.11+
    from re import _constants as C  # type: ignore[attr-defined]
    from re import _parser as P  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_constants as C  # type: ignore[no-redef]
    import sre_parse as P  # type: ignore[no-redef]

__all__ = ["pattern_gen"]

_MASK = 0xFFFFFFFFFFFFFFFF
_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-."
_CATEGORY = {
    C.CATEGORY_DIGIT: "0123456789",
    C.CATEGORY_WORD: "abcdefghijklmnopqrstuvwxyz0123456789_",
    C.CATEGORY_SPACE: " ",
}
#: Most repetitions an open-ended quantifier (``*``, ``+``, ``{m,}``) adds above its minimum
#: (or ``min_length``, when that is larger).
_EXTRA_REPEATS = 3


def _next(h: int) -> int:
    h = (h + 0x9E3779B97F4A7C15) & _MASK
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    return h ^ (h >> 31)


def _class_chars(items: list[tuple[Any, Any]]) -> str:
    negate = any(op is C.NEGATE for op, _ in items)
    chars: list[str] = []
    for op, av in items:
        if op is C.LITERAL:
            chars.append(chr(av))
        elif op is C.RANGE:
            lo, hi = av
            chars.extend(chr(c) for c in range(lo, min(hi, lo + 200) + 1))
        elif op is C.CATEGORY:
            chars.extend(_CATEGORY.get(av, ""))
    if negate:
        return "".join(c for c in _ALPHABET if c not in chars)
    return "".join(chars)


def _emit(tree: Any, h: int, out: list[str], extra: int) -> int:
    for op, av in tree:
        h = _next(h)
        if op is C.LITERAL:
            out.append(chr(av))
        elif op is C.NOT_LITERAL:
            out.append(next(c for c in _ALPHABET if ord(c) != av))
        elif op is C.ANY:
            out.append(_ALPHABET[h % 26])
        elif op is C.IN:
            chars = _class_chars(av)
            if not chars:
                raise ValueError("empty class")
            out.append(chars[h % len(chars)])
        elif op in (C.MAX_REPEAT, C.MIN_REPEAT):
            lo, hi, sub = av
            top = lo + extra if hi is C.MAXREPEAT else hi
            for _ in range(lo + h % (top - lo + 1)):
                h = _emit(sub, _next(h), out, extra)
        elif op is C.SUBPATTERN:
            h = _emit(av[-1], h, out, extra)
        elif op is C.BRANCH:
            options = av[1]
            h = _emit(options[h % len(options)], h, out, extra)
        elif op is C.AT:
            continue
        else:
            raise ValueError(f"unsupported regex node {op}")
    return h


@lru_cache(maxsize=256)
def pattern_gen(pattern: str, min_length: int = 0, max_length: int | None = None) -> Callable[[int], str] | None:
    """A generator of strings matching ``pattern`` (searched, as JSON Schema does).

    Args:
        pattern: the regex.
        min_length, max_length: length bounds the string must also meet.

    Returns:
        ``gen(h) -> str``, deterministic in the 64-bit hash ``h``; it tries a
        few derived hashes until the length bounds hold. ``None`` when the
        pattern does not parse or no string of the right length came out.
    """
    try:
        compiled = re.compile(pattern)
        tree = P.parse(pattern)
    except (re.error, ValueError, TypeError):
        return None

    def attempt(h: int) -> str | None:
        out: list[str] = []
        try:
            _emit(tree, h, out, max(_EXTRA_REPEATS, min_length))
        except (ValueError, StopIteration):
            return None
        s = "".join(out)
        if len(s) < min_length or (max_length is not None and len(s) > max_length):
            return None
        return s if compiled.search(s) else None

    if all(attempt(h) is None for h in range(32)):
        return None

    def gen(h: int) -> str:
        for _ in range(32):
            s = attempt(h)
            if s is not None:
                return s
            h = _next(h)
        return next(s for s in map(attempt, range(32)) if s is not None)

    return gen
