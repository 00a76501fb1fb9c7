"""A row's result as it travels to the ledger: what was planned (:class:`PlannedRow`), what settled
(:class:`RowResult`), and the one encoding of settled rows into the ledger's columns (:class:`Encoded`,
written by :meth:`~llmap.store.ledger.Ledger.record`; a Ray worker encodes its results so the driver only
writes them)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Encoded", "PlannedRow", "RowResult"]


@dataclass(frozen=True, slots=True)
class PlannedRow:
    """A row as the planner hands it to the ledger.

    Attributes:
        key: the row's key as text.
        seq: position in the input (0-based), for export order.
        input_hash: hash of the row's inputs and the request fingerprint.
        data: JSON text of the row's projected columns.
        status: ``pending`` or ``skipped``.
        error: the skip reason, for ``skipped`` rows.
        truncated: JSON list of the columns cut to ``[input] max_chars``, or None.
    """

    key: str
    seq: int
    input_hash: str
    data: str
    status: str = "pending"
    error: str | None = None
    truncated: str | None = None


@dataclass(slots=True)
class RowResult:
    """The outcome of one row, as the dispatcher reports it.

    Attributes:
        key: the row's key.
        status: ``done``, ``failed`` or ``fallback``.
        output: field name -> value for ``done`` rows.
        error: the error text for ``failed`` rows.
        attempts: requests spent on this row in this run (re-asks and retries count).
        prompt_tokens, completion_tokens: usage summed over those requests.
        latency_s: seconds spent waiting for answers, summed over this row's
            requests (queueing for a rate limit not included).
        model: ``provider:name`` of the model that settled the row.
        source: where the answer came from: ``model``, ``cache`` (the response
            cache or an identical request in this run) or ``stale`` (an expired
            cache entry served because every model failed).
        tried: every model answer on the way (cascade, re-asks):
            ``(model, outcome, output or None, prompt tokens, completion tokens)``.
        confidence: for ``done`` rows, the probability of the values the model chose, from its
            log-probabilities (:mod:`llmap.quality.confidence`); None when unknown.
        raw: for rows that did not end ``done``, the model's last answer text (``_raw``), or None.
        input_hash: the row's input hash as learned on its path (a document fetched then, see
            :mod:`llmap.io.documents`), recorded in place of the planned one; None keeps the planned one.
    """

    key: str
    status: str
    output: dict[str, Any] | None = None
    error: str | None = None
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    model: str | None = None
    source: str | None = None
    tried: list[tuple[str, str, dict[str, Any] | None, int, int]] | None = None
    confidence: float | None = None
    raw: str | None = None
    input_hash: str | None = None


@dataclass(slots=True)
class Encoded:
    """Settled rows in the ledger's column shapes: what :meth:`Ledger.record` writes.

    Encoded where the rows settled (a Ray worker encodes its results, so the driver's commit is
    mostly ``executemany``); :meth:`of` is the one encoding, which :meth:`Ledger.record` uses too.

    Attributes:
        rows: per row, its update: ``(status, output JSON or None, error, attempts, prompt_tokens,
            completion_tokens, latency_s, model, source, updated_at, confidence, raw, input_hash, key)``
            (``updated_at`` in POSIX seconds; ``confidence`` only for a done row, ``raw`` only for one that
            is not; ``input_hash`` None keeps the planned one; the key last).
        attempts: per model answer on the way (:attr:`RowResult.tried`): ``(key, model, outcome,
            output JSON or None, prompt_tokens, completion_tokens, created_at)``.
    """

    rows: list[tuple] = field(default_factory=list)
    attempts: list[tuple] = field(default_factory=list)

    @classmethod
    def of(cls, results: Iterable[RowResult], now: float | None = None) -> Encoded:
        """``results`` encoded, stamped ``now`` (POSIX seconds; default: the time of the call)."""
        now = time.time() if now is None else now
        dumps = _dumps
        rows, attempts = [], []
        for r in results:
            output = r.output
            text = dumps(output) if output is not None else None
            done = r.status == "done"
            rows.append((r.status, text, r.error, r.attempts, r.prompt_tokens, r.completion_tokens, r.latency_s,
                         r.model, r.source, now, r.confidence if done else None, None if done else r.raw,
                         r.input_hash, r.key))
            if r.tried:  # the answer that settled the row is its last one: its JSON text is encoded once
                attempts += [(r.key, model, outcome, text if out is output else dumps(out) if out is not None
                              else None, pt, ct, now) for model, outcome, out, pt, ct in r.tried]
        return cls(rows, attempts)

    def __len__(self) -> int:
        """Rows held."""
        return len(self.rows)

    def extend(self, other: Encoded) -> None:
        """Add ``other``'s rows and attempts."""
        self.rows += other.rows
        self.attempts += other.attempts

    def clear(self) -> None:
        """Forget every row and attempt (they were committed)."""
        self.rows.clear()
        self.attempts.clear()

    def decode(self) -> list[RowResult]:
        """The rows as :class:`RowResult` (``tried`` rebuilt from the attempts), for hooks that read them."""
        tried: dict[str, list] = {}
        for key, model, outcome, out, pt, ct, _ in self.attempts:
            tried.setdefault(key, []).append((model, outcome, json.loads(out) if out is not None else None, pt, ct))
        return [RowResult(key, status, json.loads(out) if out is not None else None, error, attempts, pt, ct, lat,
                          model, source, tried.get(key), confidence, raw, input_hash)
                for status, out, error, attempts, pt, ct, lat, model, source, _, confidence, raw, input_hash, key
                in self.rows]


_dumps = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(value, ensure_ascii=False), without its checks
