"""``llmap status``: rows per status, overall and per group, read from the job's ledger.

It calls no model, takes no lock and never writes the ledger (it opens it
read-only), so it works while a run holds the job. Counts are over the
latest run's plan; a group column the ledger does not store is read from the
input (key and that column only).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmap.observe.cascade import CascadeSummary, cascade_summary
from llmap.plan import build_source, row_key
from llmap.spec import JobSpec
from llmap.store.batches import BatchBook
from llmap.store.ledger import STATUSES, Ledger, open_for_reading

__all__ = ["FailedRow", "StatusReport", "failed_rows", "job_status", "structured_by_model"]


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
    #: the job's latest provider batches, newest first (:meth:`~llmap.store.batches.BatchBook.summary`): ids,
    #: state, the provider's status as last polled, requests, rows submitted and done
    batches: list[dict[str, Any]] = field(default_factory=list)
    #: the latest run's hedged copies whose answer was dropped, and their estimated cost in USD (in its cost)
    hedged: tuple[int, float] = (0, 0.0)
    #: a cascade with a guarantee: its threshold, bound, rows and cost (:mod:`llmap.observe.cascade`), or None
    cascade: CascadeSummary | None = None


def job_status(spec: JobSpec, by: str | None = None) -> StatusReport:
    """Counts per status from the ledger, optionally grouped by an input column.

    A column the ledger stores (key, template variables, ``keep``) is grouped
    there; any other input column is read from the input (key + column only).

    Raises:
        SpecError: no ledger yet, or ``by`` is not an input column.
    """
    ledger, plan = open_for_reading(spec.ledger_path, job=spec.name)
    try:
        total = ledger.counts(plan)
        structured = structured_by_model(ledger.connection)
        batches = BatchBook(ledger).summary(plan)
        cascade = cascade_summary(ledger, plan)
        hedged = ledger.connection.execute(
            "SELECT count(*), coalesce(sum(cost_usd), 0) FROM requests WHERE outcome = 'hedged' "
            "AND run = (SELECT max(id) FROM runs)").fetchone()
        groups: dict[Any, dict[str, int]] = {}
        if by:
            stored = json.loads(ledger.get_meta("data_columns") or "[]")
            if by in stored:
                for g, status, n in ledger.grouped_counts(plan, by):
                    groups.setdefault(g, dict.fromkeys(STATUSES, 0))[status] = n
            else:
                groups = _group_from_source(spec, ledger, plan, by)
    finally:
        ledger.close()
    ordered = dict(sorted(groups.items(), key=lambda kv: (kv[0] is None, str(kv[0]))))
    return StatusReport(total, by, ordered, spec.ledger_path, structured, batches, (int(hedged[0]), float(hedged[1])),
                        cascade)


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


@dataclass
class FailedRow:
    """One failed row of the latest run's plan.

    Attributes:
        key: the row's key as the ledger stores it (the row number without ``[input] key``).
        error: why it failed (the output's ``_error``).
        model: the last model that answered it, or None.
        attempts: attempts spent on it, over every run.
        data: the columns the ledger keeps of it (key, template variables, ``keep``).
    """

    key: str
    error: str | None
    model: str | None
    attempts: int
    data: dict[str, Any]


def failed_rows(spec: JobSpec, limit: int | None = None) -> tuple[list[FailedRow], int]:
    """The latest run's failed rows with their errors, in input order, read-only.

    Args:
        spec: the job.
        limit: at most this many rows; None for all.

    Returns:
        (the rows, how many failed in all).

    Raises:
        SpecError: no ledger yet.
    """
    ledger, plan = open_for_reading(spec.ledger_path, job=spec.name)
    try:
        db = ledger.connection
        total = db.execute("SELECT count(*) FROM rows WHERE plan = ? AND status = 'failed'", (plan,)).fetchone()[0]
        rows = db.execute("SELECT key, error, model, attempts, data FROM rows WHERE plan = ? AND status = 'failed' "
                          "ORDER BY seq LIMIT ?", (plan, -1 if limit is None else limit)).fetchall()
    finally:
        ledger.close()
    return [FailedRow(k, e, m, int(a or 0), json.loads(d) if d else {}) for k, e, m, a, d in rows], int(total)


def _group_from_source(spec: JobSpec, ledger: Ledger, plan: int, by: str) -> dict[Any, dict[str, int]]:
    source = build_source(spec)
    keys = spec.input.key_columns
    source.require_columns([(by, "--by")] + [(k, "[input] key") for k in keys])
    status_of = dict(ledger.statuses(plan))
    groups: dict[Any, dict[str, int]] = {}
    seq = -1
    cols = list(dict.fromkeys([*keys, by]))
    for batch in source.batches(cols):
        for row in batch.to_pylist():
            seq += 1
            k = row_key(row, keys) if keys else str(seq)
            st = status_of.get(k)
            if st is not None:
                groups.setdefault(row[by], dict.fromkeys(STATUSES, 0))[st] += 1
    return groups
