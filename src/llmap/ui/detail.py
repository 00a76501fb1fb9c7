"""One row, whole: what the page's row detail shows.

Its input values as the ledger keeps them, the prompt rendered with the job's own templates from those values (what
was sent, few-shot turns included), its answer or error, every model answer on the way (the ledger's ``attempts``:
model, outcome, answer, tokens and their cost at that model's prices), whether it came from the response cache,
whether the job packs rows into requests, and its labels when the ledger has a labels table.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from typing import Any

from llmap.errors import RenderError
from llmap.pricing import cost_usd
from llmap.prompt.render import Renderer
from llmap.spec import ModelSpec
from llmap.ui.quality import labels_of

__all__ = ["row_detail"]

_SOURCES = {
    "model": "answered by the model",
    "cache": "answered from the response cache (or an identical row's request in the same run): no request sent",
    "stale": "an expired cache entry, served because every model failed (stale-if-error)",
}


def row_detail(db: sqlite3.Connection, key: str, *, renderer: Renderer | None, models: Mapping[str, ModelSpec],
               pack: Any = 1, features: Mapping[str, bool] | None = None) -> dict[str, Any] | None:
    """Everything the ledger knows of one row.

    Args:
        db: the ledger (read).
        key: the row's key.
        renderer: the job's templates (None: the prompt is not shown).
        models: ``provider:name`` -> the model's spec (for each answer's cost).
        pack: ``[prompt] pack`` (rows per request: 1, N or ``"auto"``).
        features: what the ledger holds of the quality work (:func:`~llmap.ui.quality.features`).

    Returns:
        The row as JSON-ready data, or None when the ledger has no such key.
    """
    features = features or {}
    extra = "".join(f", {c}" for c in ("confidence", "raw") if features.get(c))
    row = db.execute(
        "SELECT key, seq, plan, status, attempts, data, output, prompt_tokens, completion_tokens, latency_s, model, "
        f"error, source, truncated, created_at, updated_at{extra} FROM rows WHERE key = ?", (key,)).fetchone()
    if row is None:
        return None
    (key, seq, plan, status, attempts, data, output, pt, ct, latency, model, error, source, truncated, created,
     updated, *more) = row
    values = json.loads(data or "{}")
    out: dict[str, Any] = {
        "key": key, "seq": seq, "plan": plan, "status": status, "attempts": attempts, "data": values,
        "output": json.loads(output) if output else None, "prompt_tokens": pt, "completion_tokens": ct,
        "latency_s": latency, "model": model, "error": error, "source": source,
        "source_text": _SOURCES.get(source or ""), "truncated": json.loads(truncated) if truncated else [],
        "created_at": created, "updated_at": updated,
        "cost_usd": cost_usd(models[model], pt or 0, ct or 0) if model in models else None,
    }
    for name, value in zip([c for c in ("confidence", "raw") if features.get(c)], more, strict=True):
        out[name] = value
    out["messages"], out["render_error"] = None, None
    if renderer is not None:
        try:
            out["messages"] = renderer.messages(values)
        except RenderError as exc:
            out["render_error"] = str(exc)
        except Exception as exc:  # a template the job's own run would refuse: say so, never a 500
            out["render_error"] = f"{type(exc).__name__}: {exc}"
    out["answers"] = [
        {"run": run, "model": m, "outcome": outcome, "output": json.loads(o) if o else None, "prompt_tokens": p,
         "completion_tokens": c, "cost_usd": cost_usd(models[m], p or 0, c or 0) if m in models else None,
         "at": at}
        for run, m, outcome, o, p, c, at in db.execute(
            "SELECT run, model, outcome, output, prompt_tokens, completion_tokens, created_at FROM attempts "
            "WHERE key = ? ORDER BY id", (key,))]
    out["pack"] = pack
    if pack != 1 and source == "model":
        size = "a size chosen from the item failure rate" if pack == "auto" else f"up to {pack} rows"
        out["pack_text"] = (f"this job packs rows into requests ([prompt] pack: {size}); an answer's tokens are "
                            "its share of its pack's")
    else:
        out["pack_text"] = None
    out["labels"] = labels_of(db, [key]).get(key, {}) if features.get("labels") else None
    return out
