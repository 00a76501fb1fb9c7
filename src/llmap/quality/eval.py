"""``llmap eval``: the answers of a job's latest run against its labels, field by field.

The rows compared are the latest run's (the rows the export holds) that have a true answer: a label
(``llmap label``) or an ``[eval] gold`` column. Per field:

- enum and boolean: accuracy, per-class precision, recall and F1, and the confusion matrix;
- integer and number: exact match, MAE, and the share within a tolerance (``--tolerance`` or
  ``[eval] tolerance``);
- string: exact and normalized match (:func:`~llmap.quality.metrics.normalize_text`).

Every rate is over the labelled rows that are ``done`` and carries its 95% Wilson interval and its
sample size; labelled rows that failed (or got the fallback, or are still pending) are counted apart,
never as right or wrong. With ``_confidence`` on labelled rows, a reliability table and the expected
calibration error (ECE) compare the confidence with being right (a row is right when every field the
confidence covers equals its label).

:func:`evaluate` reads the ledger read-only (it works while a run holds the job); :meth:`EvalReport.as_dict`
is ``llmap eval --json``: every figure a number, unrounded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llmap import errors as E
from llmap.quality.confidence import covered_fields
from llmap.quality.labels import gold_labels, truths
from llmap.quality.metrics import (
    Calibration,
    Classification,
    NumberFigures,
    Rate,
    StringFigures,
    calibration,
    classification,
    numbers,
    strings,
)
from llmap.spec import JobSpec
from llmap.store.labels import Label, read_labels
from llmap.store.ledger import open_for_reading

__all__ = ["EvalReport", "FieldReport", "evaluate", "field_kind", "labelled_keys", "latest_rows", "stored_labels"]


def field_kind(f: Any) -> str:
    """How a field is evaluated: ``enum`` (an enum, or a boolean), ``number`` or ``string``."""
    if f.enum is not None or f.type == "boolean":
        return "enum"
    if f.type in ("integer", "number"):
        return "number"
    return "string"


@dataclass
class FieldReport:
    """One field's figures.

    Attributes:
        name: the field.
        kind: ``enum``, ``number`` or ``string`` (:func:`field_kind`).
        type: its llmap type.
        labelled: rows of the latest run with a true answer for it.
        done: of those, rows done (the ones compared).
        failed: of those, rows failed or given the fallback (not compared).
        pending: of those, rows pending or skipped (not compared).
        figures: :class:`~llmap.quality.metrics.Classification`, :class:`~llmap.quality.metrics.NumberFigures`
            or :class:`~llmap.quality.metrics.StringFigures`.
        sources: where the true answers came from (source -> rows).
    """

    name: str
    kind: str
    type: str
    labelled: int = 0
    done: int = 0
    failed: int = 0
    pending: int = 0
    figures: Classification | NumberFigures | StringFigures | None = None
    sources: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The field for ``--json``: counts, then its figures as unrounded numbers."""
        out: dict[str, Any] = {"kind": self.kind, "type": self.type, "labelled": self.labelled, "done": self.done,
                               "failed": self.failed, "pending": self.pending, "sources": self.sources}
        f = self.figures
        if isinstance(f, Classification):
            out.update(f.accuracy.as_dict("accuracy"))
            out["macro_f1"] = f.macro_f1
            out["classes"] = [{"class": c.label, "support": c.support, **c.precision.as_dict("precision"),
                               **c.recall.as_dict("recall"), "f1": c.f1} for c in f.classes]
            out["confusion"] = {"labels": f.labels, "rows": "label", "columns": "answer", "matrix": f.matrix}
        elif isinstance(f, NumberFigures):
            out.update(f.exact.as_dict("exact"))
            out.update({"mae": f.mae, "mae_low": f.mae_low, "mae_high": f.mae_high, "tolerance": f.tolerance})
            if f.within is not None:
                out.update(f.within.as_dict("within"))
        elif isinstance(f, StringFigures):
            out.update(f.exact.as_dict("exact"))
            out.update(f.normalized.as_dict("normalized"))
        return out


@dataclass
class EvalReport:
    """``llmap eval``'s figures.

    Attributes:
        job: the job's name.
        run: the plan compared (the latest run's).
        rows: rows of that plan.
        labelled_rows: rows of it with at least one true answer.
        labels_elsewhere: labelled keys not in that plan (other inputs, or not planned yet).
        fields: per labelled field, in spec order.
        confidence_fields: the fields ``_confidence`` covers.
        calibration: confidence against being right, or None when no labelled done row has a confidence.
        without_confidence: labelled done rows with no ``_confidence``.
    """

    job: str
    run: int
    rows: int
    labelled_rows: int
    labels_elsewhere: int
    fields: list[FieldReport]
    confidence_fields: tuple[str, ...] = ()
    calibration: Calibration | None = None
    without_confidence: int = 0

    def as_dict(self) -> dict[str, Any]:
        """``llmap eval --json``: every figure a number, unrounded; fields keyed by name."""
        cal = None
        if self.calibration is not None:
            c = self.calibration
            cal = {"fields": list(self.confidence_fields), "n": c.n, "ece": c.ece, "right": c.right,
                   "wrong": c.wrong, "mean_confidence_right": c.mean_right, "mean_confidence_wrong": c.mean_wrong,
                   "bins": [{"low": b.low, "high": b.high, "n": b.n, "confidence": b.confidence,
                             **b.accuracy.as_dict("accuracy")} for b in c.bins]}
        return {"job": self.job, "run": self.run, "rows": self.rows, "labelled_rows": self.labelled_rows,
                "labels_elsewhere": self.labels_elsewhere,
                "fields": {f.name: f.as_dict() for f in self.fields},
                "calibration": cal, "without_confidence": self.without_confidence}


def latest_rows(spec: JobSpec) -> tuple[int, list[tuple[str, dict[str, Any], str, dict[str, Any] | None,
                                                          float | None]]]:
    """The latest plan and its rows: ``(key, data, status, output, confidence)``, read-only.

    Raises:
        SpecError: no ledger or no run yet.
    """
    ledger, plan = open_for_reading(spec.ledger_path, job=spec.name)
    try:
        rows = [(key, json.loads(data), status, json.loads(output) if output else None, conf)
                for page in ledger.iter_rows(plan) for key, data, status, output, _e, _m, _s, conf, _r in page]
    finally:
        ledger.close()
    return plan, rows


def stored_labels(spec: JobSpec) -> list[Label]:
    """The labels stored in the job's ledger (none when there is no ledger yet)."""
    if not spec.ledger_path.is_file():
        return []
    ledger, _ = open_for_reading(spec.ledger_path, job=spec.name)
    try:
        return read_labels(ledger.connection)
    finally:
        ledger.close()


def evaluate(spec: JobSpec, *, tolerance: float | None = None) -> EvalReport:
    """Compare the latest run's answers with the labels (see the module docstring).

    Args:
        spec: the job.
        tolerance: for every number field, the absolute difference that counts as "within"; default
            ``[eval] tolerance`` per field (none: no "within" share).

    Raises:
        SpecError: no ledger or run yet, or no true answer at all (one line naming how to add labels).
    """
    plan, rows = latest_rows(spec)
    true = truths(stored_labels(spec), gold_labels(spec, [(k, d) for k, d, *_ in rows]))
    if not true:
        raise E.SpecError(f"job {spec.name!r} has no labels: import true answers with `llmap label JOB FILE`, "
                          "write a review file with `llmap review JOB -n 50` and label it, or set "
                          "[eval] gold = { FIELD = \"COLUMN\" }")
    keys = {k for k, *_ in rows}
    labelled_keys = {k for k, _ in true}
    fields = spec.output.fields
    reports = []
    for name, f in fields.items():
        rep = FieldReport(name, field_kind(f), f.type)
        pairs = []
        for key, _data, status, output, _conf in rows:
            lb = true.get((key, name))
            if lb is None:
                continue
            rep.labelled += 1
            rep.sources[lb.source] = rep.sources.get(lb.source, 0) + 1
            if status == "done" and output is not None:
                rep.done += 1
                pairs.append((lb.value, output.get(name)))
            elif status in ("failed", "fallback"):
                rep.failed += 1
            else:
                rep.pending += 1
        if not rep.labelled:
            continue
        rep.figures = _figures(f, pairs, tolerance if tolerance is not None else spec.eval.tolerance.get(name))
        reports.append(rep)
    covered = covered_fields(fields, spec.output.confidence)
    cal_pairs, without = [], 0
    for key, _data, status, output, conf in rows:
        if status != "done" or output is None or not covered:
            continue
        marks = [true.get((key, n)) for n in covered]
        if any(m is None for m in marks):
            continue
        if conf is None:
            without += 1
            continue
        cal_pairs.append((float(conf), all(m.value == output.get(n) for m, n in zip(marks, covered, strict=True))))
    return EvalReport(spec.name, plan, len(rows), len(labelled_keys & keys), len(labelled_keys - keys), reports,
                      covered, calibration(cal_pairs) if cal_pairs else None, without)


def _figures(f: Any, pairs: list[tuple[Any, Any]], tolerance: float | None
             ) -> Classification | NumberFigures | StringFigures:
    kind = field_kind(f)
    if kind == "enum":
        classes = list(f.enum) if f.enum is not None else [True, False]
        return classification(pairs, classes)
    if kind == "number":
        both = [(t, a) for t, a in pairs if t is not None and a is not None]
        figures = numbers(both, tolerance)
        if len(both) == len(pairs):
            return figures
        # a null on one side only is a miss; on both sides a match (a nullable field said "not stated")
        nulls = [(t, a) for t, a in pairs if t is None or a is None]
        same = sum(1 for t, a in nulls if t is None and a is None)
        exact = Rate(figures.exact.k + same, figures.exact.n + len(nulls))
        within = None if figures.within is None else Rate(figures.within.k + same, figures.within.n + len(nulls))
        return NumberFigures(exact, figures.mae, figures.mae_low, figures.mae_high, tolerance, within, figures.n)
    return strings([("" if t is None else str(t), "" if a is None else str(a)) for t, a in pairs])


def labelled_keys(spec: JobSpec, rows: list[tuple[str, Mapping[str, Any], Any, Any, Any]]) -> dict[str, dict[str, Any]]:
    """Key -> field -> true value, for the rows of ``rows`` with any true answer."""
    true = truths(stored_labels(spec), gold_labels(spec, [(r[0], r[1]) for r in rows]))
    out: dict[str, dict[str, Any]] = {}
    for (key, name), lb in true.items():
        out.setdefault(key, {})[name] = lb.value
    return out
