"""``pattern`` constraints: one regex dialect that every structured-output backend accepts.

A field's ``pattern`` goes three ways: into the JSON Schema sent to the
server (OpenAI, vLLM, llama-cpp-python's server, llama.cpp's grammar for the
embedded model) and into llmap's own pydantic validation. They do not all
read the same regexes. llama-cpp-python 0.3.36's JSON-Schema-to-grammar
converter (``llama_grammar._visit_pattern``):

- asserts that a pattern starts with ``^`` and ends with ``$`` (anything else
  is an ``AssertionError``, a 500 from its server);
- rejects ``(?`` groups (non-capturing, look-arounds, flags);
- copies ``\\d``, ``\\w``, ``\\s`` into the grammar as text, which llama.cpp
  cannot parse ("unknown escape"); its server then dies (seen here: the
  process exited on the first such request).

So :func:`portable_pattern` compiles what the user wrote into the subset they
all take: anchored as a whole-value match, ``\\d``/``\\w``/``\\s`` spelled as
ASCII character classes, and constructs no grammar can express rejected with
a one-line reason. The same compiled text is validated by llmap, so the
server's grammar and llmap's check agree.
"""

from __future__ import annotations

import re

__all__ = ["portable_pattern"]

#: Shorthand classes and the ASCII class each becomes (inside ``[...]``, the part between brackets).
_SHORTHAND = {"d": "0-9", "w": "0-9A-Za-z_", "s": " \\t\\n\\r"}
#: Escapes no grammar converter can express, with a hint.
_UNSUPPORTED = {
    "D": "\\D (write [^0-9])",
    "W": "\\W (write [^0-9A-Za-z_])",
    "S": "\\S (write [^ \\t\\n\\r])",
    "b": "\\b (word boundaries)",
    "B": "\\B (word boundaries)",
    "A": "\\A (the pattern is anchored already)",
    "Z": "\\Z (the pattern is anchored already)",
}


def _escaped(c: str, in_class: bool) -> str:
    """An escaped character ``\\c`` spelled the way llama.cpp's grammar parser reads it.

    The converter keeps ``\\c`` as written except for ``[]()|{}*+?``, and the
    GBNF parser knows only a few escapes (``\\\\ \\" \\[ \\] \\- \\n \\t \\r \\x \\u``):
    ``\\.`` must become ``[.]``, and punctuation that needs no escape loses it.
    """
    if c.isalnum() or c in ("\\", "]", "[", "-", '"'):
        return "\\" + c
    if in_class:
        return c
    if c in "()|{}*+?":
        return "\\" + c
    if c in ".$":
        return f"[{c}]"
    return c


def portable_pattern(pattern: str) -> str:
    """Compile a field's ``pattern`` into the regex sent to servers and used for validation.

    The result matches the *whole* value: ``[A-Z]{2}`` becomes ``^([A-Z]{2})$``
    (JSON Schema's ``pattern`` alone would match anywhere in the value; an
    answer field is meant to be the thing itself, and llama.cpp's grammar
    needs the anchors). A leading ``^`` and trailing ``$`` the user wrote are
    folded into these anchors.

    Args:
        pattern: the regex from ``[output.fields] x = { pattern = "..." }``
            (Python/ECMA-262 syntax).

    Returns:
        The anchored pattern, with ``\\d``, ``\\w`` and ``\\s`` written as
        ``[0-9]``, ``[0-9A-Za-z_]`` and ``[ \\t\\n\\r]``.

    Raises:
        ValueError: the regex does not compile, or uses a construct that
            llama.cpp's grammar cannot express (``(?...)`` groups, lazy
            quantifiers, back-references, ``\\D \\W \\S \\b \\B``); the message
            names it and how to write it instead.
    """
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"pattern {pattern!r} is not a valid regular expression ({exc})") from None
    out: list[str] = []
    in_class = False
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\" and i + 1 < n:
            nxt = pattern[i + 1]
            if nxt in _SHORTHAND:
                out.append(_SHORTHAND[nxt] if in_class else f"[{_SHORTHAND[nxt]}]")
            elif nxt in _UNSUPPORTED or nxt.isdigit() and nxt != "0" or nxt == "^":
                what = _UNSUPPORTED.get(nxt, "a literal ^" if nxt == "^" else f"\\{nxt} (back-references)")
                raise ValueError(f"pattern {pattern!r} uses {what}, which llama.cpp's grammar cannot express; "
                                 "rewrite it with character classes")
            else:
                out.append(_escaped(nxt, in_class))
            i += 2
            continue
        if in_class:
            if c == "]" and not (out and out[-1] in ("[", "[^")):
                in_class = False
            out.append(c)
        elif c == "[":
            in_class = True
            if pattern.startswith("[^", i):
                out.append("[^")
                i += 2
                continue
            out.append(c)
        elif c == "(" and pattern.startswith("(?", i):
            raise ValueError(f"pattern {pattern!r} uses a (?...) group, which llama.cpp's grammar cannot express; "
                             "use a plain (...) group")
        elif c in "*+?}" and i + 1 < n and pattern[i + 1] == "?":
            raise ValueError(f"pattern {pattern!r} uses a lazy quantifier ({c}?), which means nothing for a "
                             "whole-value match; drop the '?'")
        else:
            out.append(c)
        i += 1
    body = "".join(out)
    if body.startswith("^"):
        body = body[1:]
    if body.endswith("$") and not body.endswith("\\$"):
        body = body[:-1]
    return f"^({body})$"
