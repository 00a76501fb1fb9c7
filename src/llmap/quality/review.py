"""``llmap review``: a seeded, stratified sample of a job's answers, written for a person to correct.

The sample is drawn from the latest run's settled rows (``done``, ``failed``, ``fallback``) that have no
label yet (``include_labelled`` keeps them), optionally filtered by ``--where`` (DuckDB SQL over the
stored input columns, the fields, ``_status`` and ``_confidence``). It is seeded (the same seed draws the
same rows) and, with ``--stratify FIELD``, stratified: the rows are grouped by the field's answer (or an
input column's value) and the sample is shared equally among the groups, a group smaller than its share
giving the rest to the others, so that rare classes are reviewed too (a uniform sample of 50 from 61 rows
where one class has 2 would often miss it).

The review file (CSV, or JSONL by its extension) holds the key column, the answer's fields (to correct in
place), then ``_status``, ``_confidence``, ``_error`` and the input columns for context. ``llmap label JOB
FILE`` reads it back: the key and the field columns, every other column ignored. A field cell left empty
(a failed row not filled in) is no label; a row left as it is labels the model's answer as right.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from llmap import errors as E
from llmap.io.sinks import FIELD_ARROW
from llmap.quality.eval import latest_rows, stored_labels
from llmap.quality.labels import key_column
from llmap.spec import JobSpec

__all__ = ["Review", "allocate", "review", "write_review"]

_SETTLED = ("done", "failed", "fallback")


def allocate(sizes: dict[Any, int], n: int) -> dict[Any, int]:
    """Share ``n`` rows among groups of ``sizes`` as equally as their sizes allow (larger groups first
    for the remainder); a group never gets more than it has."""
    alloc = dict.fromkeys(sizes, 0)
    active = sorted((g for g in sizes if sizes[g] > 0), key=lambda g: (-sizes[g], str(g)))
    left = min(n, sum(sizes.values()))
    while left > 0 and active:
        share = max(1, left // len(active))
        for g in list(active):
            take = min(share, sizes[g] - alloc[g], left)
            alloc[g] += take
            left -= take
            if alloc[g] >= sizes[g]:
                active.remove(g)
            if left == 0:
                break
    return alloc


@dataclass
class Review:
    """A drawn sample.

    Attributes:
        columns: the review file's columns, in order.
        fields: the output fields among them.
        rows: the sampled rows (column -> value), in input order.
        candidates: rows the sample was drawn from.
        strata: stratum value -> rows drawn (with ``stratify``), else {}.
    """

    columns: list[str]
    fields: list[str]
    rows: list[dict[str, Any]]
    candidates: int
    strata: dict[Any, int]


def review(spec: JobSpec, n: int, *, stratify: str | None = None, where: str | None = None, seed: int = 0,
           include_labelled: bool = False) -> Review:
    """Draw the sample (see the module docstring).

    Raises:
        SpecError: no run yet, ``stratify`` is neither a field nor a stored column, ``where`` fails, or no
            row is left to draw from.
    """
    _, rows = latest_rows(spec)
    fields = list(spec.output.fields)
    key = key_column(spec)
    labelled = set() if include_labelled else {lb.key for lb in stored_labels(spec)}
    stored: list[str] = []
    for _, data, *_ in rows:
        stored += [c for c in data if c not in stored]
    context = [c for c in stored if c != key and c not in fields]
    records = []
    for seq, (k, data, status, output, conf) in enumerate(rows):
        if status not in _SETTLED or k in labelled:
            continue
        rec = {key: data.get(key, k), **{f: (output or {}).get(f) for f in fields}, "_status": status,
               "_confidence": conf, "_error": None, **{c: data.get(c) for c in context}, "__seq": seq, "__key": k}
        records.append(rec)
    _errors(spec, records)
    if where:
        records = _filter(records, spec, key, context, where)
    if stratify is not None and stratify not in fields and stratify not in context:
        raise E.SpecError(f"--stratify {stratify!r} is neither an output field ({', '.join(fields)}) nor a stored "
                          f"input column ({', '.join(context) or 'none'})")
    if not records:
        raise E.SpecError("no row to review: the latest run has no settled row"
                          + ("" if include_labelled else " without a label (add --include-labelled)")
                          + (f" matching --where {where!r}" if where else ""))
    rng = random.Random(seed)
    strata: dict[Any, int] = {}
    if stratify is None:
        picked = rng.sample(records, min(n, len(records)))
    else:
        groups: dict[Any, list[dict[str, Any]]] = {}
        for r in records:
            groups.setdefault(_hashable(r[stratify]), []).append(r)
        for g in groups.values():
            rng.shuffle(g)
        alloc = allocate({g: len(v) for g, v in groups.items()}, n)
        picked = [r for g, v in groups.items() for r in v[:alloc[g]]]
        strata = {g: alloc[g] for g in sorted(groups, key=lambda g: (-alloc[g], str(g)))}
    picked.sort(key=lambda r: r["__seq"])
    for r in picked:
        del r["__seq"], r["__key"]
    columns = [key, *fields, "_status", "_confidence", "_error", *context]
    return Review(columns, fields, picked, len(records), strata)


def _hashable(v: Any) -> Any:
    return json.dumps(v, sort_keys=True) if isinstance(v, list | dict) else v


def _errors(spec: JobSpec, records: list[dict[str, Any]]) -> None:
    """Fill ``_error`` of failed rows from the ledger (the sample shows why a row failed)."""
    if not any(r["_status"] != "done" for r in records):
        return
    from llmap.store.ledger import open_for_reading

    ledger, plan = open_for_reading(spec.ledger_path, job=spec.name)
    try:
        errors = dict(ledger.connection.execute("SELECT key, error FROM rows WHERE plan = ? AND error IS NOT NULL",
                                                (plan,)))
    finally:
        ledger.close()
    for r in records:
        r["_error"] = errors.get(r["__key"])


def _filter(records: list[dict[str, Any]], spec: JobSpec, key: str, context: Sequence[str],
            where: str) -> list[dict[str, Any]]:
    """The records ``where`` (DuckDB SQL) keeps."""
    names = [key, *spec.output.fields, "_status", "_confidence", *context]
    types = {n: FIELD_ARROW[f.type] for n, f in spec.output.fields.items()}
    types.update({"_status": pa.string(), "_confidence": pa.float64()})
    cols = {n: [r.get(n) for r in records] for n in names}
    arrays = []
    for n in names:
        try:
            arrays.append(pa.array(cols[n], type=types.get(n)))
        except (pa.ArrowException, TypeError, ValueError):
            arrays.append(pa.array([None if v is None else str(v) for v in cols[n]], type=pa.string()))
    table = pa.Table.from_arrays([*arrays, pa.array(range(len(records)), pa.int64())], names=[*names, "__i"])
    con = duckdb.connect()
    try:
        con.execute("SET enable_external_access = false")
        con.register("answers", table)
        try:
            keep = [i for (i,) in con.execute(f"SELECT __i FROM answers WHERE ({where})").fetchall()]
        except duckdb.Error as exc:
            first = str(exc).strip().splitlines()[0]
            raise E.SpecError(f"--where {where!r}: {first}; columns: {', '.join(names)}") from None
    finally:
        con.close()
    return [records[i] for i in sorted(keep)]


def write_review(rev: Review, path: Path) -> Path:
    """Write the sample to ``path``: CSV (booleans ``true``/``false``, a null answer ``null``, nothing empty
    but what is unknown) or JSONL, by its extension.

    Raises:
        SpecError: the extension is neither .csv nor .jsonl.
    """
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise E.SpecError(f"review file {str(path)!r}: use a .csv or .jsonl file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        if suffix == ".jsonl":
            for r in rev.rows:
                f.write(json.dumps({c: r.get(c) for c in rev.columns}, ensure_ascii=False, default=str) + "\n")
        else:
            w = csv.writer(f)
            w.writerow(rev.columns)
            for r in rev.rows:
                w.writerow([_cell(r, c, rev.fields) for c in rev.columns])
    tmp.replace(path)
    return path


def _cell(r: dict[str, Any], column: str, fields: Sequence[str]) -> str:
    v = r.get(column)
    if v is None:  # a done row's null answer is a value ("null"); an unknown one is empty (no label)
        return "null" if r.get("_status") == "done" and column in fields else ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | dict):
        return json.dumps(v, ensure_ascii=False)
    return str(v)
