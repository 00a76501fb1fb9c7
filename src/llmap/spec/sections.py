"""The ``[input]``, ``[prompt]`` and ``[output]`` tables (see :mod:`llmap.spec`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from llmap.io.encoding import canonical
from llmap.spec.base import FIELD_TYPES, StrictModel
from llmap.spec.documents import DocumentSpec
from llmap.spec.quality import CheckSpec, ConfidenceSetting


class PerGroup(StrictModel):
    """``[input] per_group``: take at most ``n`` done rows per value of ``column``."""

    column: str
    n: int = Field(gt=0)


class InputSpec(StrictModel):
    """``[input]``: where rows come from.

    Exactly one of ``path`` (a .csv, .parquet or .jsonl file, relative to the
    job file) or ``sql`` (a DuckDB query; relative file names in it resolve
    against the job file's folder) is required.

    ``key`` names the column whose value identifies a row (unique, never
    empty), or a list of columns whose values together do (a composite key,
    ``["district_id", "grade_level"]``); default: the row number.

    ``order_by`` (DuckDB SQL) sets which rows go first. ``per_group`` stops
    taking rows from a group once it has ``n`` done rows, across runs.
    ``max_chars`` maps a column to the most characters of it a prompt gets;
    longer values are cut with a visible marker, and the ledger records it.
    ``encoding`` is a CSV or JSON file's text encoding, a Python codec name
    (``"latin-1"``, ``"cp1252"``, ``"utf-16"``); default UTF-8.
    ``documents`` maps a column holding a path or URL to how its document is
    read (:class:`~llmap.spec.documents.DocumentSpec`); ``document_dirs`` are
    folders such paths may point into besides the job file's own.
    """

    path: str | None = None
    sql: str | None = None
    key: str | list[str] | None = None
    where: str | None = None
    order_by: str | None = None
    limit: int | None = Field(default=None, gt=0)
    per_group: PerGroup | None = None
    max_chars: dict[str, int] = {}
    encoding: str | None = None
    documents: dict[str, DocumentSpec] = {}
    document_dirs: list[str] = []

    @field_validator("key")
    @classmethod
    def _key_columns(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list):
            if not v:
                raise ValueError("key = [] names no column; name one or more columns, or drop key to use the row "
                                 "number")
            dup = [c for i, c in enumerate(v) if c in v[:i]]
            if dup:
                raise ValueError(f"key names column {dup[0]!r} twice; name each column once")
        elif v == "":
            raise ValueError("key is empty; name a column, or drop key to use the row number")
        return v

    @property
    def key_columns(self) -> list[str]:
        """The key's columns: ``[key]``, the listed columns of a composite key, or ``[]`` (the row number)."""
        if self.key is None:
            return []
        return [self.key] if isinstance(self.key, str) else list(self.key)

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str | None) -> str | None:
        if v is not None:
            canonical(v)  # ValueError names the fix
        return v

    @field_validator("max_chars")
    @classmethod
    def _positive(cls, v: dict[str, int]) -> dict[str, int]:
        bad = [k for k, n in v.items() if n < 1]
        if bad:
            raise ValueError(f"max_chars for {bad[0]!r} must be at least 1")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> InputSpec:
        if (self.path is None) == (self.sql is None):
            raise ValueError("give exactly one of [input] path or [input] sql")
        if self.sql is not None and self.encoding is not None:
            raise ValueError("encoding applies to [input] path; in [input] sql pass it to the reader, e.g. "
                             "read_csv('f.csv', encoding = 'latin-1')")
        return self


class Example(StrictModel):
    """One few-shot example: the ``input`` columns and the expected ``output`` fields."""

    input: dict[str, Any]
    output: dict[str, Any]


class PromptSpec(StrictModel):
    """``[prompt]``: Jinja2 templates (StrictUndefined) rendered per row.

    ``pack = N`` sends N rows per request (a JSON array of items, answered by
    id); ``"auto"`` picks N from a target prompt size and the observed item
    failure rate. Default 1: one row per request.
    """

    system: str | None = None
    user: str
    examples: list[Example] = []
    pack: int | Literal["auto"] = 1

    @field_validator("pack")
    @classmethod
    def _pack_size(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 200:
            raise ValueError("pack must be 1 (no packing) to 200 rows per request, or \"auto\"")
        return v


class FieldSpec(StrictModel):
    """One output field: ``type`` in :data:`FIELD_TYPES`, optional ``enum``, ``description`` and constraints.

    Constraints use JSON Schema's words; they are compiled into the schema
    sent with each request (so servers and llama.cpp's grammar can enforce
    them) and checked by llmap's validation (a violation is re-asked):

    - ``minimum``, ``maximum``: inclusive bounds of an ``integer`` or ``number``;
    - ``min_length``, ``max_length``: bounds of a ``string``'s length, in characters;
    - ``pattern``: a regex the whole ``string`` must match (see :mod:`llmap.prompt.pattern`);
    - ``nullable``: the answer may be ``null`` ("not stated in the text").

    They are checked when the job is loaded (:func:`llmap.prompt.schema.check_fields`).
    """

    type: str
    enum: list[Any] | None = None
    description: str | None = None
    minimum: int | float | None = None
    maximum: int | float | None = None
    min_length: int | None = Field(default=None, ge=0)
    max_length: int | None = Field(default=None, ge=0)
    pattern: str | None = None
    nullable: bool = False

    @field_validator("type")
    @classmethod
    def _known_type(cls, v: str) -> str:
        if v not in FIELD_TYPES:
            raise ValueError(
                f"unknown field type {v!r}; use one of {', '.join(FIELD_TYPES)}"
            )
        return v

    @field_validator("enum")
    @classmethod
    def _nonempty_enum(cls, v: list[Any] | None) -> list[Any] | None:
        if v is not None and not v:
            raise ValueError("enum is empty; list at least one allowed value or drop enum")
        return v


class OutputSpec(StrictModel):
    """``[output]``: where results go and what each row's answer holds.

    ``path`` is relative to the job file; its extension (.parquet, .jsonl,
    .csv) picks the format. ``keep`` copies input columns into the output.
    ``max_reask`` (default 2) is how many times an invalid answer is re-asked
    with the validation error appended before the row fails. ``fallback``
    is an optional static answer (validated against the fields) given to rows
    no model could answer; they are marked ``_status = "fallback"``.
    ``checks`` are rules across fields (DuckDB SQL over the input columns and the
    answer, :class:`~llmap.spec.quality.CheckSpec`): an answer that breaks one is
    re-asked with its message, then the row fails naming it. ``confidence``
    (default ``"auto"``) says which fields the per-row ``_confidence`` covers
    (:mod:`llmap.quality.confidence`): ``"auto"`` the enum, boolean, integer and
    short string fields, ``true`` the same but an error when there is none,
    ``false`` none (no log-probabilities are asked for), or a list of field names.
    """

    path: str
    keep: list[str] = []
    max_reask: int = Field(default=2, ge=0)
    fields: dict[str, FieldSpec] = {}  # required for kind = "map" (checked in llmap.spec.job)
    fallback: dict[str, Any] | None = None
    checks: list[CheckSpec] = []
    confidence: ConfidenceSetting = "auto"

    @field_validator("fields")
    @classmethod
    def _some_fields(cls, v: dict[str, FieldSpec]) -> dict[str, FieldSpec]:
        if not v:
            raise ValueError("add at least one field under [output.fields]")
        reserved = [k for k in v if k.startswith("_")]
        if reserved:
            raise ValueError(f"field name {reserved[0]!r} starts with '_', which llmap reserves; rename it")
        return v

    @field_validator("path")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if Path(v).suffix.lower() not in (".parquet", ".jsonl", ".csv"):
            raise ValueError(f"output path {v!r} must end in .parquet, .jsonl or .csv")
        return v
