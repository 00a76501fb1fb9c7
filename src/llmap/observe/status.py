"""Reading a job's ledger: status, export, the model report, and ``--if-changed``.

None of these calls a model, takes the job's lock or writes the ledger: each
opens it read-only, so all of them work while a run holds it. Status and export read the latest run's plan;
``--if-changed`` compares fingerprints of the input file, the spec and the
set of done rows with those recorded at the last complete run.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from llmap import errors as E
from llmap.engine import Job, _key_text
from llmap.io.sinks import ResultLayout, export, result_batches
from llmap.spec import JobSpec
from llmap.store.ledger import STATUSES, Ledger

__all__ = ["StatusReport", "input_fingerprint", "job_export", "job_status", "unchanged_since_complete"]


@dataclass
class StatusReport:
    """Rows per status, overall and optionally per group.

    Attributes:
        total: status -> rows, over the latest run's plan.
        by: the grouping column, or None.
        groups: group value -> (status -> rows), sorted by group value.
        ledger_path: the ledger that was read.
    """

    total: dict[str, int]
    by: str | None
    groups: dict[Any, dict[str, int]]
    ledger_path: Path
    #: model -> the structured-output dialect its latest run used, in words (``json_object (auto, refused
    #: json_schema)``); only models with an OpenAI-compatible provider.
    structured: dict[str, str] = field(default_factory=dict)


def _open_ledger(spec: JobSpec) -> tuple[Ledger, int]:
    """The job's ledger, read-only (never written, never locked: works while a run holds it), and its latest plan."""
    path = spec.ledger_path
    if not path.is_file():
        raise E.SpecError(f"job {spec.name!r} has no ledger at {str(path)!r} yet; run `llmap run` on it first")
    try:
        ledger = Ledger(path, readonly=True)
    except sqlite3.Error as exc:
        raise E.SpecError(f"cannot read the ledger {str(path)!r}: {exc}; is it a llmap ledger?") from None
    plan = ledger.latest_plan()
    if plan is None:
        ledger.close()
        raise E.SpecError(f"job {spec.name!r} has no planned rows yet; run `llmap run` on it first")
    return ledger, plan


def job_status(job: Job, by: str | None = None) -> StatusReport:
    """Counts per status from the ledger, optionally grouped by an input column.

    A column the ledger stores (key, template variables, ``keep``) is grouped
    there; any other input column is read from the input (key + column only).

    Raises:
        SpecError: no ledger yet, or ``by`` is not an input column.
    """
    ledger, plan = _open_ledger(job.spec)
    try:
        total = ledger.counts(plan)
        structured = structured_by_model(ledger.connection)
        groups: dict[Any, dict[str, int]] = {}
        if by:
            stored = json.loads(ledger.get_meta("data_columns") or "[]")
            if by in stored:
                for g, status, n in ledger.grouped_counts(plan, by):
                    groups.setdefault(g, dict.fromkeys(STATUSES, 0))[status] = n
            else:
                groups = _group_from_source(job, ledger, plan, by)
    finally:
        ledger.close()
    ordered = dict(sorted(groups.items(), key=lambda kv: (kv[0] is None, str(kv[0]))))
    return StatusReport(total, by, ordered, job.spec.ledger_path, structured)


def structured_by_model(db: sqlite3.Connection, *, runs: int = 50) -> dict[str, str]:
    """Each model's structured-output dialect as its latest run recorded it (``runs.by_model``).

    Args:
        db: the ledger's connection.
        runs: how many recent runs to look through.

    Returns:
        ``provider:name`` -> the dialect in words (see
        :meth:`~llmap.control.dialect.RequestShape.describe`), for models that recorded one.
    """
    found: dict[str, str] = {}
    for (doc,) in db.execute("SELECT by_model FROM runs WHERE by_model IS NOT NULL ORDER BY id DESC LIMIT ?",
                             (runs,)):
        try:
            models = json.loads(doc)
        except ValueError:
            continue
        for model, rec in models.items() if isinstance(models, dict) else ():
            if isinstance(rec, dict) and rec.get("structured") and model not in found:
                found[model] = str(rec.get("structured_how") or rec["structured"])
    return found


def _group_from_source(job: Job, ledger: Ledger, plan: int, by: str) -> dict[Any, dict[str, int]]:
    spec = job.spec
    source = job._build_source(None)
    key = spec.input.key
    source.require_columns([(by, "--by")] + ([(key, "[input] key")] if key else []))
    status_of = dict(ledger.statuses(plan))
    groups: dict[Any, dict[str, int]] = {}
    seq = -1
    cols = [key, by] if key else [by]
    for batch in source.batches(cols):
        for row in batch.to_pylist():
            seq += 1
            k = _key_text(row[key]) if key else str(seq)
            st = status_of.get(k)
            if st is not None:
                groups.setdefault(row[by], dict.fromkeys(STATUSES, 0))[st] += 1
    return groups


def job_export(job: Job, path: Path | None = None) -> tuple[Path, int]:
    """Export the latest run's rows from the ledger to ``path`` (default ``[output] path``).

    Returns:
        (the written path, rows written).

    Raises:
        SpecError: no ledger yet, or an unsupported extension.
    """
    ledger, plan = _open_ledger(job.spec)
    try:
        schema = pa.ipc.read_schema(pa.py_buffer(ledger.get_meta("output_schema")))
        layout = ResultLayout.from_schema(schema, {n: f.type for n, f in job.spec.output.fields.items()})
        out = path or job.spec.output_path
        n = export(result_batches(ledger, plan, layout), layout.schema, out)
    finally:
        ledger.close()
    return out, n


# -- --if-changed -----------------------------------------------------------------

_SQL_FILE = re.compile(r"'([^']+\.(?:csv|tsv|parquet|jsonl|ndjson|json)(?:\.gz)?)'", re.IGNORECASE)


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
    """What ``--if-changed`` compares: input files, the spec, and the set of done rows."""
    return json.dumps({"input": input_fingerprint(spec), "spec": _spec_hash(spec), "done": _done_state(db)})


def unchanged_since_complete(spec: JobSpec) -> str | None:
    """A message when nothing changed since the last complete run, else None.

    Reads the ledger read-only and touches nothing: meant for ``llmap run
    --if-changed`` from cron.
    """
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


# -- llmap report -------------------------------------------------------------------


@dataclass
class ModelLine:
    """One model's share of the latest run's plan.

    Attributes:
        model: ``provider:name``, or ``(none)`` for rows no model settled.
        settled: rows whose final answer came from this model (any source).
        from_cache: of those, answered from the cache or an identical request.
        stale: of those, an expired cache entry served because every model failed.
        escalated: answers of this model passed on to the next model (cascade), latest run.
        prompt_tokens, completion_tokens: tokens spent on this model's answers, latest run.
        cost_usd: those tokens at the model's ``price_in`` / ``price_out``.
        structured: the structured-output dialect the model's latest run used, in words; "" if none.
    """

    model: str
    settled: int = 0
    from_cache: int = 0
    stale: int = 0
    escalated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    structured: str = ""


def model_report(job: Job) -> tuple[list[ModelLine], dict[str, int]]:
    """How many rows each model settled, what it cost, and the row counts.

    Returns:
        (one line per model in ``[[model]]`` order, then any other; status -> rows).

    Raises:
        SpecError: no ledger yet.
    """
    ledger, plan = _open_ledger(job.spec)
    try:
        prices = {m.label: (m.price_in, m.price_out) for m in job.spec.models}
        lines: dict[str, ModelLine] = {label: ModelLine(label) for label in prices}
        for model, status, source, n, _pt, _ct in ledger.settled_by_model(plan):
            if status not in ("done",):
                continue
            line = lines.setdefault(model or "(none)", ModelLine(model or "(none)"))
            line.settled += n
            line.from_cache += n if source == "cache" else 0
            line.stale += n if source == "stale" else 0
        for model, outcome, n, pt, ct in ledger.attempts_by_model(plan):
            line = lines.setdefault(model, ModelLine(model))
            line.escalated += n if outcome == "escalated" else 0
            if outcome != "cache":
                line.prompt_tokens += pt
                line.completion_tokens += ct
        for model, how in structured_by_model(ledger.connection).items():
            lines.setdefault(model, ModelLine(model)).structured = how
        for line in lines.values():
            p_in, p_out = prices.get(line.model, (0.0, 0.0))
            line.cost_usd = (line.prompt_tokens * p_in + line.completion_tokens * p_out) / 1e6
        return list(lines.values()), ledger.counts(plan)
    finally:
        ledger.close()
