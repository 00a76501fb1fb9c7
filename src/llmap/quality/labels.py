"""True answers: label files (``llmap label``) and gold columns (``[eval] gold``).

A label file is a CSV or JSONL file holding the job's key column (``_row``, the row number, for a job
without ``[input] key``) and one column per labelled output field, named as the field. Other columns
are ignored (a review file's context: inputs, ``_status``, ``_confidence``). An empty CSV cell, or a
JSONL record without the field, means "no label for this field of this row".

Values are read as the field's type: an enum value must be one of the enum (the case may differ:
``County`` is ``county``); a boolean is ``true``/``false``, ``yes``/``no``, ``1``/``0``; an integer a
whole number (``12`` or ``12.0``); a number any number. In a CSV every cell is text, so an empty cell is
no label; write ``null`` to say the true answer is null (a ``nullable`` field). A value that does not
read is an error naming the line, the column and the fix.

``[eval] gold = { kind = "true_kind" }`` reads the true answers from input columns instead; they are
kept with the rows in the ledger. Where both exist, the label a person gave wins (:func:`truths`).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from llmap import errors as E
from llmap.spec import FieldSpec, JobSpec
from llmap.store.fingerprint import key_text
from llmap.store.labels import Label

__all__ = ["LabelFile", "coerce", "gold_labels", "key_column", "read_label_file", "truths"]

_TRUE = {"true", "yes", "y", "1", "t"}
_FALSE = {"false", "no", "n", "0", "f"}


def key_column(spec: JobSpec) -> str:
    """The column a label file keys rows by: ``[input] key``, or ``_row`` (the row number)."""
    return spec.input.key or "_row"


def coerce(value: Any, f: FieldSpec, *, text: bool = False) -> Any:
    """``value`` as field ``f`` holds it.

    Args:
        value: the cell (text from a CSV, any JSON value from JSONL).
        f: the field.
        text: the value came from a CSV cell (so ``"null"`` means null, and numbers are text).

    Raises:
        ValueError: the value is not one of the enum, not a boolean, not a whole number..., naming what
            is expected.
    """
    if value is None or (text and isinstance(value, str) and value.strip().lower() == "null"):
        return None
    if f.type == "boolean":
        if isinstance(value, bool):
            out: Any = value
        elif isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            out = value.strip().lower() in _TRUE
        elif isinstance(value, int | float) and value in (0, 1):
            out = bool(value)
        else:
            raise ValueError(f"{value!r} is not a boolean (true/false, yes/no, 1/0)")
    elif f.type in ("integer", "number"):
        try:
            num = float(value.strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number") from None
        if isinstance(value, bool) or not math.isfinite(num):
            raise ValueError(f"{value!r} is not a number")
        if f.type == "integer":
            if not num.is_integer():
                raise ValueError(f"{value!r} is not a whole number")
            out = int(num)
        else:
            out = num
    else:
        out = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if f.enum is not None and out not in f.enum:
        folded = [e for e in f.enum
                  if isinstance(e, str) and isinstance(out, str) and e.casefold() == out.strip().casefold()]
        if len(folded) != 1:
            raise ValueError(f"{value!r} is not one of {', '.join(map(repr, f.enum))}")
        out = folded[0]
    return out


class LabelFile:
    """What :func:`read_label_file` found.

    Attributes:
        labels: the labels, in file order.
        fields: the labelled fields (columns named as a field).
        ignored: the other columns.
        rows: data rows read.
    """

    def __init__(self, labels: list[Label], fields: list[str], ignored: list[str], rows: int) -> None:
        self.labels, self.fields, self.ignored, self.rows = labels, fields, ignored, rows


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any], bool]]:
    """``(line number, record, from a CSV)`` of a CSV or JSONL file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        with open(path, encoding="utf-8") as f:
            for no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as exc:
                    raise E.SpecError(f"{path.name}:{no}: not a JSON object ({exc}); one JSON object per "
                                      "line") from None
                if not isinstance(rec, dict):
                    raise E.SpecError(f"{path.name}:{no}: not a JSON object; one JSON object per line")
                yield no, rec, False
        return
    if suffix not in (".csv", ".tsv"):
        raise E.SpecError(f"label file {str(path)!r}: use a .csv or .jsonl file")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
        for no, rec in enumerate(reader, 2):
            yield no, {k: v for k, v in rec.items() if k is not None}, True


def read_label_file(path: Path, spec: JobSpec, *, source: str | None = None) -> LabelFile:
    """Read a label file for ``spec`` (see the module docstring).

    Args:
        path: a .csv, .tsv or .jsonl file.
        spec: the job (its key and fields).
        source: the labels' source; default the file's name.

    Raises:
        SpecError: the file is missing or unreadable, lacks the key column or any field column, has a row
            without a key or a key twice, or a value that does not read as its field (naming the line).
    """
    if not path.is_file():
        raise E.SpecError(f"label file {str(path)!r} does not exist; check the path")
    key = key_column(spec)
    fields = spec.output.fields
    src = source or path.name
    labels: list[Label] = []
    seen: dict[str, int] = {}
    columns: list[str] | None = None
    n = 0
    try:
        for no, rec, text in _records(path):
            if columns is None:
                columns = list(rec)
                if key not in rec:
                    what = "the job's key" if spec.input.key else "the job's key: the row number"
                    raise E.SpecError(f"{path.name}: no column {key!r} ({what}); columns: {', '.join(columns[:15])}")
                if not any(c in fields for c in columns):
                    raise E.SpecError(f"{path.name}: no column is named as an output field ({', '.join(fields)}); "
                                      "name each labelled column as its field")
            n += 1
            raw_key = rec.get(key)
            if raw_key is None or (isinstance(raw_key, str) and not raw_key.strip()):
                raise E.SpecError(f"{path.name}:{no}: the key column {key!r} is empty; every row needs its key")
            k = key_text(raw_key.strip() if isinstance(raw_key, str) else raw_key)
            if k in seen:
                raise E.SpecError(f"{path.name}:{no}: key {k!r} appears twice (first on line {seen[k]}); keep one")
            seen[k] = no
            for name, f in fields.items():
                if name not in rec:
                    continue
                cell = rec[name]
                if text and isinstance(cell, str) and not cell.strip():
                    continue  # an empty cell: no label
                try:
                    labels.append(Label(k, name, coerce(cell, f, text=text), src))
                except ValueError as exc:
                    raise E.SpecError(f"{path.name}:{no}: column {name!r}: {exc}; fix the value or empty the "
                                      "cell") from None
    except UnicodeDecodeError as exc:
        raise E.SpecError(f"label file {str(path)!r} is not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    except OSError as exc:
        raise E.SpecError(f"cannot read label file {str(path)!r}: {exc.strerror or exc}") from None
    if columns is None:
        raise E.SpecError(f"label file {str(path)!r} has no rows")
    return LabelFile(labels, [c for c in columns if c in fields],
                     [c for c in columns if c not in fields and c != key], n)


def gold_labels(spec: JobSpec, rows: Sequence[tuple[str, Mapping[str, Any]]]) -> list[Label]:
    """The true answers ``[eval] gold`` reads from the rows' input columns (skipping empty ones).

    Args:
        spec: the job.
        rows: ``(key, row data)`` as the ledger keeps them.

    Raises:
        SpecError: a gold value does not read as its field, naming the row and the column.
    """
    out = []
    for field_name, column in spec.eval.gold.items():
        f = spec.output.fields[field_name]
        for key, data in rows:
            if column not in data:
                continue
            value = data[column]
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            if isinstance(value, float) and math.isnan(value):
                continue
            try:
                out.append(Label(key, field_name, coerce(value, f, text=isinstance(value, str)), f"gold:{column}"))
            except ValueError as exc:
                raise E.SpecError(f"[eval] gold: row {key!r}, column {column!r}: {exc}") from None
    return out


def truths(stored: Sequence[Label], gold: Sequence[Label]) -> dict[tuple[str, str], Label]:
    """``(key, field)`` -> the true answer: a stored label (a person's) wins over a gold column."""
    out = {(lb.key, lb.field): lb for lb in gold}
    out.update({(lb.key, lb.field): lb for lb in stored})
    return out
