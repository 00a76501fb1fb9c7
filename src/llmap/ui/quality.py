"""Labels, the review sample, eval's figures and rollback for the live page, as far as the ledger has them.

The labels table comes with migration ``007_quality`` (``llmap label``/``review``/``eval``/``rollback``). This
module finds out what a ledger has (:func:`features`: an older ledger has no labels table until its next run)
and the page shows only that. Labels are written as ``llmap label`` writes them
(:func:`llmap.store.labels.write_labels`), intervals are :func:`llmap.quality.metrics.wilson`'s, and rollback is
:func:`llmap.store.history.rollback`. :func:`evaluate` gives the page's figures per field (accuracy over the
labelled rows that are done, with its Wilson 95% interval, and a confusion matrix for enum and boolean fields)
from the labels stored in the ledger; ``[eval] gold`` columns and the number and string figures are
``llmap eval``'s. :func:`review_sample` is seeded and stratified: the sample is shared equally among the answer's
values, so rare classes are reviewed.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llmap.quality.metrics import Z95, wilson
from llmap.quality.review import allocate
from llmap.store.labels import Label, write_labels

__all__ = ["Z95", "allocate", "evaluate", "features", "labels_of", "review_sample", "same_answer", "wilson",
           "write_label"]

#: Statuses of rows a review may show (rows with an outcome).
SETTLED = ("done", "failed", "fallback")


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}


def features(db: sqlite3.Connection) -> dict[str, bool]:
    """What the ledger holds of the quality work: ``labels`` (the labels table), ``confidence`` (rows'
    confidence column), ``raw`` (a failed row's last raw answer) and ``rollback`` (the rows' history that
    :func:`llmap.store.history.rollback` puts back). The page reads a ledger without migrating it: one written
    by an llmap older than the quality work (migration ``007_quality``) has none of them until its next run."""
    rows = _columns(db, "rows")
    return {"labels": {"key", "field", "value", "source", "created_at"} <= _columns(db, "labels"),
            "confidence": "confidence" in rows, "raw": "raw" in rows, "rollback": bool(_columns(db, "row_history"))}


def write_label(ledger_path: Path, key: str, field: str, value: Any, *, source: str = "ui",
                now: float | None = None) -> None:
    """Store the true value of one row's field, as ``llmap label`` does (a label for the same row and field is
    replaced): :func:`llmap.store.labels.write_labels`.

    Args:
        ledger_path: the job's ledger (opened for this write only; a running job's writer waits at most
            for this one short transaction).
        key: the row's key; ``field``: the output field; ``value``: the true value, typed as the field.
        source: where it came from (``ui``: the page's review).
        now: POSIX seconds to stamp (default: now).

    Raises:
        sqlite3.Error: the ledger cannot be written (no labels table: check :func:`features` first).
    """
    db = sqlite3.connect(ledger_path, isolation_level=None, timeout=10.0)
    try:
        write_labels(db, [Label(key, field, value, source)], now=now)
    finally:
        db.close()


def labels_of(db: sqlite3.Connection, keys: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Labels of ``keys``: key -> field -> ``{"value", "source", "created_at"}``."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key, field, value, source, at in db.execute(
            "SELECT key, field, value, source, created_at FROM labels WHERE key IN (SELECT value FROM json_each(?))",
            (json.dumps(list(keys)),)):
        out.setdefault(key, {})[field] = {"value": json.loads(value) if value is not None else None,
                                          "source": source, "created_at": at}
    return out


def same_answer(answer: Any, truth: Any) -> bool:
    """An answer equals its label: as JSON values (2 is 2.0), a boolean only equal to a boolean."""
    if isinstance(answer, bool) or isinstance(truth, bool):
        return answer is truth or (answer == truth and type(answer) is type(truth))
    return answer == truth


def evaluate(db: sqlite3.Connection, plan: int, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Eval's figures from the labels: per field, the answers of the labelled rows that are done against
    their labels.

    Args:
        db: the ledger (read).
        plan: the latest plan.
        fields: field name -> its spec (``type``, ``enum``).

    Returns:
        ``{"labels": n, "fields": {name: {"n", "correct", "accuracy", "low", "high", "classes", "confusion"}}}``:
        ``accuracy`` is ``correct / n`` (None when ``n`` is 0) with its Wilson 95% interval ``low``..``high``;
        for enum and boolean fields ``confusion[true][answered]`` counts rows (``classes`` orders them).
    """
    pairs: dict[str, list[tuple[Any, Any]]] = {name: [] for name in fields}
    total = 0
    for field, value, output in db.execute(
            "SELECT l.field, l.value, r.output FROM labels l JOIN rows r ON r.key = l.key "
            "WHERE r.plan = ? AND r.status = 'done'", (plan,)):
        total += 1
        if field in pairs and output is not None:
            pairs[field].append((json.loads(output).get(field), json.loads(value) if value is not None else None))
    out: dict[str, Any] = {}
    for name, spec in fields.items():
        got = pairs[name]
        n = len(got)
        k = sum(1 for answer, truth in got if same_answer(answer, truth))
        low, high = wilson(k, n)
        fig: dict[str, Any] = {"n": n, "correct": k, "accuracy": k / n if n else None, "low": low, "high": high}
        kind = getattr(spec, "type", None)
        enum = getattr(spec, "enum", None)
        if enum or kind == "boolean":
            classes = list(enum) if enum else [True, False]
            for answer, truth in got:
                for v in (truth, answer):
                    if v not in classes:
                        classes.append(v)
            matrix = Counter((json.dumps(truth), json.dumps(answer)) for answer, truth in got)
            fig["classes"] = classes
            fig["confusion"] = [[matrix.get((json.dumps(t), json.dumps(a)), 0) for a in classes] for t in classes]
        out[name] = fig
    return {"labels": total, "fields": out}


def _draw(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest(), "big")


def review_sample(index_db: sqlite3.Connection, plan: int, n: int, *, seed: int = 0,
                  stratify: str | None = None) -> list[str]:
    """A seeded sample of ``n`` settled rows (done, failed, fallback) of ``plan``, from the page's index.

    The same seed draws the same rows. With ``stratify`` (an index column: ``f0`` for the first field, ``grp``
    for the group), the sample is shared equally among that column's values (:func:`allocate`), so that a rare
    answer is reviewed too.

    Returns:
        The sampled keys, in review order (by their draw, across strata).
    """
    col = stratify or "NULL"
    sizes: dict[Any, int] = {}
    for value, count in index_db.execute(
            f"SELECT {col}, count(*) FROM r WHERE plan = ? AND status IN ('done', 'failed', 'fallback') "
            f"GROUP BY {col}", (plan,)):
        sizes[json.dumps(value)] = count
    alloc = allocate(sizes, n)
    chosen: list[tuple[int, str]] = []
    for value, k in alloc.items():
        if not k:
            continue
        best: list[tuple[int, str]] = []
        for (key,) in index_db.execute(
                f"SELECT key FROM r WHERE plan = ? AND status IN ('done', 'failed', 'fallback') AND {col} IS ?",
                (plan, json.loads(value))):
            best.append((_draw(seed, key), key))
            if len(best) > 4 * k + 1024:
                best.sort()
                del best[k:]
        best.sort()
        chosen.extend(best[:k])
    chosen.sort()
    return [key for _, key in chosen]
