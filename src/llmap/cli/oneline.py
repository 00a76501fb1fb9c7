"""The one-line run: ``llmap run DATA --prompt ... --field name=type ...`` without a job file.

The options become a job document (:func:`oneline_job`), checked and run
exactly as a job file is: the same ledger, resume, response cache and
checks. The job is named after its data file and a hash of what shapes its
answers (the data file's path, the prompt, the fields, the model, ``where``,
an explicit key), so the same line run again finds the same ledger,
``.llmap/<name>.ledger.sqlite`` in the working directory, and continues
where it stopped. ``--limit`` and ``--output`` are not part of the name:
``--limit 10`` first, then the whole file, is one job. ``--save`` writes the
equivalent job file (:func:`saved_toml`).

``--field`` syntax: ``name=TYPE`` where TYPE is ``string``, ``integer``,
``number``, ``boolean`` (or ``str``, ``int``, ``float``, ``bool``),
``enum:a,b,c`` (a string out of a list), or ``TYPE:v1,v2`` (an enum of that
type); a trailing ``?`` makes the field nullable (``minutes=integer?``); a
bare ``name`` is a string.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmap.api import model_table
from llmap.draft import guess_key, profile, relative
from llmap.errors import SpecError
from llmap.io.diagnose import missing_file
from llmap.io.sources import Source
from llmap.spec import FIELD_TYPES
from llmap.spec.toml import dumps

__all__ = ["OneLine", "oneline_job", "parse_field", "saved_toml"]

_ALIASES = {"str": "string", "text": "string", "int": "integer", "float": "number", "bool": "boolean"}
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def parse_field(text: str) -> tuple[str, dict[str, Any]]:
    """One ``--field`` option as ``(name, [output.fields] entry)`` (syntax: the module docstring).

    Raises:
        SpecError: the option does not parse; the message shows the syntax.
    """
    name, _, spec = text.partition("=")
    name, spec = name.strip(), spec.strip() or "string"
    syntax = "write NAME=TYPE: string, integer, number, boolean, or enum:a,b,c; add ? for nullable (minutes=integer?)"
    if not _NAME.fullmatch(name):
        raise SpecError(f"--field {text!r}: {name!r} is not a field name (letters, digits, _); {syntax}")
    nullable = spec.endswith("?")
    kind, _, values = spec.removesuffix("?").partition(":")
    kind = _ALIASES.get(kind.strip().lower(), kind.strip().lower())
    if kind == "enum":
        kind = "string"
        if not values.strip():
            raise SpecError(f"--field {text!r}: enum needs values; {syntax}")
    if kind not in FIELD_TYPES:
        raise SpecError(f"--field {text!r}: unknown type {kind!r}; {syntax}")
    entry: dict[str, Any] = {"type": kind}
    if values.strip():
        entry["enum"] = [_cast(v.strip(), kind, text) for v in values.split(",") if v.strip()]
    if nullable:
        entry["nullable"] = True
    return name, entry


def _cast(v: str, kind: str, text: str) -> Any:
    try:
        if kind == "integer":
            return int(v)
        if kind == "number":
            return float(v)
        if kind == "boolean":
            if v.lower() not in ("true", "false"):
                raise ValueError(v)
            return v.lower() == "true"
    except ValueError:
        raise SpecError(f"--field {text!r}: enum value {v!r} is not a {kind}") from None
    return v


@dataclass
class OneLine:
    """A one-line run's job.

    Attributes:
        doc: the job document (paths relative to ``base_dir``).
        base_dir: the working directory: the ledger goes in its ``.llmap/``.
        name: the job's name, from the data file and the hash of the line.
        key_why: how the key was chosen (guessed, given, or the row number).
    """

    doc: dict[str, Any]
    base_dir: Path
    name: str
    key_why: str


def oneline_job(data: Path, *, prompt: str, fields: list[str], system: str | None = None, model: str | None = None,
                base_url: str | None = None, api_key_env: str | None = None, key: list[str] | None = None,
                where: str | None = None, limit: int | None = None, output: Path | None = None,
                cwd: Path | None = None) -> OneLine:
    """The job a one-line run stands for (see the module docstring).

    Args:
        data: the CSV, Parquet or JSONL file.
        prompt, system: the user and system templates.
        fields: the ``--field`` options.
        model: ``--model`` (default: the embedded model), with ``base_url`` / ``api_key_env``.
        key: ``--key`` columns; default guessed as ``llmap init`` does.
        where, limit: ``[input] where`` and ``limit``.
        output: ``--output``; default ``out/<name>.csv`` in ``cwd``.
        cwd: the working directory (default the process's).

    Raises:
        SpecError: a bad option, or a data file that is missing or unreadable (the checks on the whole
            job come when it is loaded, as for a job file).
    """
    cwd = Path(os.path.abspath(cwd or Path.cwd()))
    data = Path(os.path.abspath(data))
    if not data.is_file():
        raise SpecError(missing_file("data file", data, "check the path (or give a job file, JOB.toml)"))
    if not fields:
        raise SpecError("a one-line run needs at least one --field NAME=TYPE (the answer's fields), e.g. "
                        "--field kind=enum:city,county,other")
    parsed: dict[str, dict[str, Any]] = {}
    for f in fields:
        name, entry = parse_field(f)
        if name in parsed:
            raise SpecError(f"--field {name!r} is given twice; give each field once")
        parsed[name] = entry
    table = model_table(model or "local", base_url, api_key_env)
    if table.get("provider") == "openai" and not base_url and not api_key_env:
        table["api_key_env"] = "OPENAI_API_KEY"  # the official API (no base_url) always needs a key
    if key:
        key_cols, why = list(key), "given with --key"
    else:
        src = Source.from_path(data, where=where)
        try:
            key_cols, why = guess_key(src, profile(src))
        finally:
            src.close()
    shaped = {"data": str(data), "prompt": prompt, "system": system, "fields": parsed, "model": table,
              "where": where, "key": list(key) if key else None}
    digest = hashlib.sha256(json.dumps(shaped, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:10]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", data.stem).strip("-") or "data"
    name = f"{stem}-{digest}"
    inp: dict[str, Any] = {"path": relative(data, cwd)}
    if key_cols:
        inp["key"] = key_cols[0] if len(key_cols) == 1 else key_cols
    if where:
        inp["where"] = where
    if limit:
        inp["limit"] = limit
    out_path = relative(output, cwd) if output is not None else f"out/{name}.csv"
    doc: dict[str, Any] = {
        "name": name,
        "input": inp,
        "prompt": {**({"system": system} if system else {}), "user": prompt},
        "output": {"path": out_path, "fields": parsed},
        "model": table,
    }
    return OneLine(doc, cwd, name, why)


def saved_toml(line: OneLine, path: Path) -> str:
    """The job file equivalent to ``line``, to be written at ``path``: paths made relative to its folder, the same
    name (so the job's ledger is ``.llmap/<name>.ledger.sqlite`` beside it: the same ledger when it is saved in the
    working directory)."""
    folder = Path(os.path.abspath(path)).parent
    doc = json.loads(json.dumps(line.doc))
    doc["input"]["path"] = relative(line.base_dir / doc["input"]["path"], folder)
    doc["output"]["path"] = relative(line.base_dir / doc["output"]["path"], folder)
    header = ("Written by llmap run ... --save: the same job as the one-line run.\n"
              f"Run it with: llmap run {path.name}    Every key: docs/job-spec.md")
    comments = {"input.key": line.key_why} if "key" in doc["input"] else {}
    return dumps(doc, comments=comments, header=header)
