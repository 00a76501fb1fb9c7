"""Fingerprints: what makes a row's answer stale, and what ``--if-changed`` compares.

- :func:`key_text`: a row's key as the ledger stores it (``3.0`` reads as ``"3"``).
- :func:`input_hash`: a row's inputs (the columns its templates read) plus the
  job's request fingerprint (:meth:`~llmap.spec.JobSpec.request_fingerprint`).
  A ``done`` row whose hash is unchanged is not requested again. A document
  column counts by its document's content hash
  (:meth:`~llmap.io.documents.Documents.identities`), not its path or URL.
- :func:`completion_fingerprint`: the input files (path, size, mtime), the
  whole spec and the set of done rows; recorded at the end of a complete run.
  :func:`unchanged_since_complete` compares it, read-only, for ``llmap run
  --if-changed``.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmap.spec import JobSpec

__all__ = ["completion_fingerprint", "input_fingerprint", "input_hash", "key_text", "unchanged_since_complete"]

_SQL_FILE = re.compile(r"'([^']+\.(?:csv|tsv|parquet|jsonl|ndjson|json)(?:\.gz)?)'", re.IGNORECASE)
_ENCODE = json.JSONEncoder(sort_keys=True, default=str).encode  # json.dumps(..., sort_keys=True, default=str)


def key_text(value: Any) -> str:
    """A key column's value as the ledger's text key (a float that is a whole number loses its ``.0``)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def input_hash(request_fingerprint: bytes, inputs: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the job's request fingerprint and a row's template inputs (column -> value)."""
    return hashlib.sha256(request_fingerprint + _ENCODE(inputs).encode()).hexdigest()


def input_fingerprint(spec: JobSpec) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` of every input file (for ``[input] sql``, the files it names).

    Globs in an SQL file name (``'data/*.parquet'``) are expanded. A missing
    file is listed with size -1, so its appearance counts as a change.
    """
    names = [spec.input.path] if spec.input.path else _SQL_FILE.findall(spec.input.sql or "")
    files: list[Path] = []
    for name in names:
        p = spec.resolve(name)
        files += sorted(p.parent.glob(p.name)) if any(c in p.name for c in "*?[") else [p]
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append([str(f), st.st_size, st.st_mtime_ns])
        except OSError:
            out.append([str(f), -1, 0])
    return out


def _spec_hash(spec: JobSpec) -> str:
    return hashlib.sha256(spec.model_dump_json(exclude={"base_dir"}).encode()).hexdigest()


def _done_state(db: sqlite3.Connection) -> list[Any]:
    plan = db.execute("SELECT max(plan) FROM rows").fetchone()[0]
    done = db.execute("SELECT count(*) FROM rows WHERE plan = ? AND status = 'done'", (plan,)).fetchone()[0]
    last = db.execute("SELECT max(updated_at) FROM rows").fetchone()[0]
    return [plan, done, last]


def completion_fingerprint(spec: JobSpec, db: sqlite3.Connection) -> str:
    """What ``--if-changed`` compares: input files, the spec, and the set of done rows (JSON text)."""
    return json.dumps({"input": input_fingerprint(spec), "spec": _spec_hash(spec), "done": _done_state(db)})


def unchanged_since_complete(spec: JobSpec) -> str | None:
    """A message when nothing changed since the last complete run, else None.

    Reads the ledger read-only and touches nothing: meant for ``llmap run
    --if-changed`` from cron. A job with document columns (``[input.documents]``)
    is never unchanged here: its documents may have changed under the same
    input; the run's planning finds out which (by content, see
    :mod:`llmap.io.documents`) and asks only those rows again.
    """
    if spec.input.documents:
        return None
    path = spec.ledger_path
    if not path.is_file():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT v FROM meta WHERE k = 'complete'").fetchone()
            if row is None:
                return None
            recorded = json.loads(row[0])
            if recorded.get("fingerprint") != completion_fingerprint(spec, db):
                return None
        finally:
            db.close()
    except (sqlite3.Error, ValueError):
        return None
    return (f"nothing changed since the last complete run ({recorded.get('at', '?')}): same input files, "
            f"same spec, same done rows; nothing to do")
