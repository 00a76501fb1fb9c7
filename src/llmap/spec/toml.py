"""A job document written back as TOML: the job files ``llmap init`` and ``llmap run ... --save`` write.

:func:`dumps` writes the subset of TOML a job uses (strings, numbers,
booleans, lists, tables) so that :func:`tomllib.loads` reads back the same
document; ``None`` values are left out (TOML has no null: a ``nullable``
field left out of a few-shot example means null, see :mod:`llmap.spec.job`).
Comments go before a table or after a key, from a ``comments`` mapping.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["TABLE_ORDER", "dumps", "key", "value"]

#: Top-level tables in the order a job file lists them.
TABLE_ORDER = ("input", "prompt", "output", "model", "limits", "cache", "alerts", "batch")

_BARE = re.compile(r"[A-Za-z0-9_-]+")


def key(k: str) -> str:
    """A TOML key: bare when it can be, else quoted."""
    return k if _BARE.fullmatch(k) else json.dumps(k, ensure_ascii=False)


def _string(s: str) -> str:
    plain = all(c in "\n\t" or ord(c) >= 0x20 for c in s) and "\x7f" not in s
    if "\n" in s and plain and '"""' not in s and not s.endswith('"'):
        body = s.replace("\\", "\\\\")
        return f'"""\n{body}"""' if s.endswith("\n") else f'"""\n{body}\\\n"""'
    return json.dumps(s, ensure_ascii=False)  # JSON's escapes are TOML basic-string escapes


def value(v: Any) -> str:
    """One TOML value, inline (tables as ``{ k = v }``, lists as ``[a, b]``).

    Raises:
        ValueError: a value TOML cannot hold (NaN, infinity, an unknown type).
    """
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{v!r} cannot be written in a job file")
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, Mapping):
        items = [f"{key(k)} = {value(x)}" for k, x in v.items() if x is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    if isinstance(v, Sequence):
        return "[" + ", ".join(value(x) for x in v) + "]"
    raise ValueError(f"{type(v).__name__} cannot be written in a job file")


def _table(name: str, doc: Mapping[str, Any], comments: Mapping[str, str], out: list[str]) -> None:
    scalars = {k: v for k, v in doc.items() if v is not None and not (isinstance(v, Mapping) and k == "fields")}
    for k, v in scalars.items():
        note = comments.get(f"{name}.{k}")
        if isinstance(v, Sequence) and not isinstance(v, str) and v and all(isinstance(x, Mapping) for x in v):
            out.append(f"{key(k)} = [")  # a list of tables (few-shot examples): one per line
            out += [f"  {value(x)}," for x in v]
            out.append("]" + (f"  # {note}" if note else ""))
            continue
        out.append(f"{key(k)} = {value(v)}" + (f"  # {note}" if note else ""))
        out += [f"# {ln}".rstrip() for ln in comments.get(f"{name}.{k}+", "").splitlines()]
    fields = doc.get("fields")
    if isinstance(fields, Mapping):
        out.append("")
        if comments.get(f"{name}.fields"):
            out += [f"# {ln}" for ln in comments[f"{name}.fields"].splitlines()]
        out.append(f"[{name}.fields]")
        for k, v in fields.items():
            note = comments.get(f"{name}.fields.{k}")
            out.append(f"{key(k)} = {value(v)}" + (f"  # {note}" if note else ""))


def dumps(doc: Mapping[str, Any], *, comments: Mapping[str, str] | None = None, header: str = "") -> str:
    """A job document as TOML text.

    Args:
        doc: the job: top-level keys (``name``, ``ledger``), then tables
            (``input``, ``prompt``, ``output`` with ``fields``, ``model`` as a
            table or a list of tables, ``limits``, ...).
        comments: ``"table"`` -> comment lines before ``[table]``;
            ``"table.key"`` (or ``"output.fields.NAME"``) -> a comment after that key;
            ``"table.key+"`` -> comment lines below that key.
        header: comment lines at the top of the file (without ``#``).

    Returns:
        TOML text that :func:`tomllib.loads` reads back as ``doc`` without its ``None`` values.

    Raises:
        ValueError: a value TOML cannot hold.
    """
    comments = dict(comments or {})
    out: list[str] = [f"# {ln}".rstrip() for ln in header.splitlines()]
    top = {k: v for k, v in doc.items() if not isinstance(v, Mapping | list) or k not in (*TABLE_ORDER, "model")}
    if out and top:
        out.append("")
    for k, v in top.items():
        if v is not None:
            note = comments.get(k)
            out.append(f"{key(k)} = {value(v)}" + (f"  # {note}" if note else ""))
    names = [t for t in TABLE_ORDER if t in doc] + [t for t in doc if t not in TABLE_ORDER and t not in top]
    for t in names:
        body = doc[t]
        tables = body if isinstance(body, list) else [body]
        for table in tables:
            if not isinstance(table, Mapping):
                continue
            out.append("")
            if comments.get(t):
                out += [f"# {ln}".rstrip() for ln in comments[t].splitlines()]
            out.append(f"[[{t}]]" if isinstance(body, list) else f"[{t}]")
            _table(t, table, comments, out)
    return "\n".join(out).lstrip("\n") + "\n"
