"""Sinks: export the ledger to Parquet, JSONL or CSV.

The output is built from the ledger, never from in-flight state: it is
streamed page by page into a temp file beside the target, then renamed into
place (``os.replace``), so a crash never leaves a half-written output. The
file gets the mode ``open()`` would give it (``0666`` less the umask).

Columns: the key, the ``keep`` columns, the output fields, then ``_status``,
``_error``, ``_model``, ``_source`` (``model``, ``cache`` or ``stale``),
``_confidence`` (the probability of the values the model chose, or null:
:mod:`llmap.quality.confidence`) and ``_raw`` (a row that did not end done:
the model's last answer).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from llmap.errors import SpecError
from llmap.spec import JobSpec
from llmap.store.diskfull import disk_full, guard, is_disk_full
from llmap.store.ledger import Ledger, RowResult, open_for_reading
from llmap.store.operators import OperatorBook, output_pages

__all__ = ["FIELD_ARROW", "ResultLayout", "answer_columns", "check_writable", "export", "export_families", "export_job",
           "families_path", "result_batches", "stored_layout", "umask"]

#: Arrow type of each output field type.
FIELD_ARROW = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}

_META = [("_status", pa.string()), ("_error", pa.string()), ("_model", pa.string()), ("_source", pa.string()),
         ("_confidence", pa.float64()), ("_raw", pa.string())]


def _portable(t: pa.DataType) -> pa.DataType:
    # The ledger stores values as JSON: keep simple types, render the rest as text.
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_string(t):
        return t
    if pa.types.is_large_string(t):
        return pa.string()
    return pa.string()


class ResultLayout:
    """The output table's shape.

    Args:
        data_schema: Arrow schema of the input columns to copy (key first, then keep).
        fields: output field name -> llmap field type.
    """

    def __init__(self, data_schema: pa.Schema, fields: dict[str, str]) -> None:
        self.data_fields = [pa.field(f.name, _portable(f.type)) for f in data_schema]
        self.fields = dict(fields)
        names = [f.name for f in self.data_fields]
        clash = [n for n in fields if n in names]
        if clash:
            raise SpecError(
                f"output field {clash[0]!r} has the same name as an input column in the output; rename the field "
                "or drop the column from [output] keep"
            )
        self.schema = pa.schema(
            self.data_fields + [pa.field(n, FIELD_ARROW[t]) for n, t in fields.items()]
            + [pa.field(n, t) for n, t in _META]
        )

    @classmethod
    def from_schema(cls, schema: pa.Schema, fields: dict[str, str]) -> ResultLayout:
        """Rebuild a layout from a full output schema (as stored in the ledger's meta)."""
        skip = set(fields) | {n for n, _ in _META}
        return cls(pa.schema([f for f in schema if f.name not in skip]), fields)

    def batch(self, rows: Sequence[tuple]) -> pa.RecordBatch:
        """Build one batch from ledger rows ``(key, data, status, output, error, model, source, confidence, raw)``."""
        cols: dict[str, list] = {f.name: [] for f in self.schema}
        data_names = [f.name for f in self.data_fields]
        field_names = list(self.fields)
        for _key, data, status, output, error, model, source, confidence, raw in rows:
            d = json.loads(data)
            for n in data_names:
                cols[n].append(d.get(n))
            o = json.loads(output) if output else {}
            for n in field_names:
                cols[n].append(o.get(n))
            cols["_status"].append(status)
            cols["_error"].append(error)
            cols["_model"].append(model)
            cols["_source"].append(source)
            cols["_confidence"].append(confidence)
            cols["_raw"].append(raw)
        arrays = []
        for f in self.schema:
            vals = cols[f.name]
            if pa.types.is_string(f.type):
                vals = [v if v is None or isinstance(v, str) else str(v) for v in vals]
            arrays.append(pa.array(vals, type=f.type))
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)


def answer_columns(fields: dict[str, str], results: Sequence[RowResult]) -> list[tuple[str, pa.Array]]:
    """Settled rows' answers as output columns, typed as an export types them: one array per field, then
    ``_status``, ``_error``, ``_model``, ``_source``, ``_confidence``, ``_raw`` (for rows that never reach a
    ledger: Ray Data)."""
    layout = ResultLayout(pa.schema([]), fields)
    batch = layout.batch([(r.key, "{}", r.status, json.dumps(r.output) if r.output else None, r.error, r.model,
                           r.source, r.confidence, r.raw if r.status != "done" else None) for r in results])
    return [(f.name, batch.column(f.name)) for f in layout.schema]


def result_batches(ledger: Ledger, plan: int, layout: ResultLayout, *, page: int = 5000,
                   spec: JobSpec | None = None) -> Iterator[pa.RecordBatch]:
    """Stream the plan's rows, in input order, as Arrow batches of ``layout.schema``.

    With ``spec``, what its kind exports: reduce's groups instead of rows, only the kept rows of a filter
    (:func:`~llmap.store.operators.output_pages`).
    """
    if spec is None or spec.kind not in ("reduce", "filter"):
        for rows in ledger.iter_rows(plan, page=page):
            yield layout.batch(rows)
        return
    keep = spec.filter_field() if spec.kind == "filter" else None
    for rows in output_pages(ledger, plan, kind=spec.kind, keep_field=keep):
        yield layout.batch(rows)


def families_path(spec: JobSpec) -> Path:
    """Where cluster's families table goes: ``[cluster] families_path``, else ``<output stem>.families<ext>``."""
    if spec.cluster.families_path:
        return spec.resolve(spec.cluster.families_path)
    out = spec.output_path
    return out.with_name(f"{out.stem}.families{out.suffix}")


def export_families(spec: JobSpec, ledger: Ledger) -> Path:
    """Write cluster's families table (id, name, description, size, examples) beside the output, atomically.

    ``examples`` is a list of up to 5 member rows' texts (joined by `` | `` in a CSV file).

    Raises:
        DiskFull: the disk filled while writing; the old file is untouched.
    """
    path = families_path(spec)
    fams = OperatorBook(ledger).families()
    csv = path.suffix.lower() == ".csv"
    ex_type = pa.string() if csv else pa.list_(pa.string())
    schema = pa.schema([("id", pa.string()), ("name", pa.string()), ("description", pa.string()),
                        ("size", pa.int64()), ("examples", ex_type)])
    table = pa.table({"id": [f.id for f in fams], "name": [f.name for f in fams],
                      "description": [f.description for f in fams], "size": [f.size for f in fams],
                      "examples": [" | ".join(f.examples) if csv else list(f.examples) for f in fams]}, schema=schema)
    export(iter(table.to_batches()), schema, path)
    return path


def check_writable(path: Path) -> None:
    """Make sure ``path`` can be written: its folder exists (or is created) and accepts a file.

    Raises:
        SpecError: naming the path and the fix.
    """
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise SpecError(
                    f"cannot write output {str(path)!r}: {str(parent)!r} is a file, not a folder; "
                    "choose another [output] path"
                )
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".llmap-check-", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise SpecError(
            f"cannot write output {str(path)!r}: {exc.strerror or exc}; choose a writable [output] path"
        ) from None
    if path.is_dir():
        raise SpecError(f"output {str(path)!r} is a folder; give [output] path a file name")


def umask() -> int:
    """This process's umask (``0o022`` on most systems), read without changing it where the OS allows.

    Linux shows it in ``/proc/self/status``; elsewhere it is set and put back
    at once (``os.umask`` has no read-only form).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def export(batches: Iterator[pa.RecordBatch], schema: pa.Schema, path: Path) -> int:
    """Write batches to ``path`` (format by extension) atomically.

    Args:
        batches: record batches of ``schema``.
        schema: the output schema.
        path: target file; ``.parquet``, ``.jsonl`` or ``.csv``.

    Returns:
        the number of rows written.

    Raises:
        SpecError: the extension is not one llmap writes.
        DiskFull: the disk filled up; the temp file is removed, ``path`` is untouched.
        OSError: the file cannot be written.
    """
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".jsonl", ".csv"):
        raise SpecError(f"cannot export to {str(path)!r}: use a .parquet, .jsonl or .csv file name")
    with guard(path, "output"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    tmp = Path(tmp_name)
    n = 0
    try:
        if suffix == ".parquet":
            with pq.ParquetWriter(tmp, schema) as w:
                for b in batches:
                    w.write_batch(b)
                    n += b.num_rows
        elif suffix == ".csv":
            with pacsv.CSVWriter(tmp, schema) as w:
                for b in batches:
                    w.write_batch(b)
                    n += b.num_rows
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for b in batches:
                    for row in b.to_pylist():
                        f.write(json.dumps(row, ensure_ascii=False, default=str))
                        f.write("\n")
                    n += b.num_rows
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; the output is an ordinary file, as open() makes it
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_disk_full(exc):
            raise disk_full(path, "output") from exc
        raise
    return n


def stored_layout(ledger: Ledger, spec: JobSpec) -> ResultLayout:
    """The output layout the ledger's last run recorded (its ``output_schema``), for ``spec``'s fields."""
    schema = pa.ipc.read_schema(pa.py_buffer(ledger.get_meta("output_schema")))
    return ResultLayout.from_schema(schema, spec.result_fields())


def export_job(spec: JobSpec, path: Path | None = None) -> tuple[Path, int]:
    """Export the latest run's rows from the ledger (read-only) to ``path`` (default ``[output] path``).

    Returns:
        (the written path, rows written).

    Raises:
        SpecError: no ledger yet, or an unsupported extension.
        DiskFull: the disk filled while writing; the old output is untouched.
    """
    ledger, plan = open_for_reading(spec.ledger_path, job=spec.name)
    try:
        layout = stored_layout(ledger, spec)
        out = path or spec.output_path
        n = export(result_batches(ledger, plan, layout, spec=spec), layout.schema, out)
        if spec.kind == "cluster" and path is None:
            export_families(spec, ledger)
    finally:
        ledger.close()
    return out, n
