"""The ledger's record of a cascade with a guarantee (migration ``008_cascade``): what survives the run's life.

``cascade_rows`` holds, per row, the proxy's answer and score (``_confidence``) for the row's current inputs
(``input_hash``: a changed row gets a new one), the decision whose population it belongs to, whether it was
sampled, the oracle's answer once it came (sampled rows, and every row the oracle settled), and whether the
threshold keeps the proxy's answer (``keep``). ``cascade_decisions`` holds each decision: its settings, the
population and sample sizes, its state (``sampling`` until every sampled row has the oracle's answer, then
``decided`` or ``missed``), the threshold and its figures (:class:`~llmap.control.guarantee.Choice`), and the
incremental runs that reused it.

Everything is committed before the run relies on it: the proxy's answers with the request log, the sample
with the decision that drew it (one transaction), the oracle's answers with the rows they settle, and the
threshold with every row's ``keep``. So a run killed at any point resumes without drawing a new sample, and
without asking either model again for an answer the ledger holds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmap.control.guarantee import Choice
from llmap.store.diskfull import guard_writes
from llmap.store.history import snapshot_keys
from llmap.store.ledger import Ledger, RowResult

__all__ = ["NEEDS_PROXY", "CascadeBook", "Decision", "Entry", "PopulationRow"]

#: The pending rows whose current inputs have no proxy answer yet (a condition over ``rows``).
NEEDS_PROXY = ("NOT EXISTS (SELECT 1 FROM cascade_rows c WHERE c.key = rows.key AND c.input_hash = rows.input_hash)")
_CHUNK = 500
_REPLACE = """
INSERT OR REPLACE INTO cascade_rows (key, input_hash, proxy_status, proxy_output, proxy_model, proxy_source,
    proxy_error, score, prompt_tokens, completion_tokens, latency_s, attempts, run, updated_at)
SELECT key, input_hash, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? FROM rows WHERE key = ?
"""
#: The population of a plan: rows not skipped whose current inputs have a proxy answer.
_POPULATION = ("FROM cascade_rows c JOIN rows r ON r.key = c.key AND r.input_hash = c.input_hash "
               "WHERE r.plan = ? AND r.status != 'skipped'")


@dataclass
class Decision:
    """One stored decision (a row of ``cascade_decisions``).

    Attributes:
        id, run: its id, and the run that drew its sample.
        key: what it is valid for (:meth:`~llmap.spec.cascade.CascadeSpec.decision_key`).
        settings: the ``[cascade]`` keys it was made with (and the field).
        population, sample: rows it covers, rows sampled.
        state: ``sampling``, ``decided`` or ``missed``.
        threshold: the score rows must reach to keep the proxy's answer, or None (none kept).
        choice: the figures (:class:`~llmap.control.guarantee.Choice`), once decided.
        reuses: the incremental runs that reused it: ``{"run", "changed", "kept", "bound"}`` each.
    """

    id: int
    run: int
    key: str
    settings: dict[str, Any]
    population: int
    sample: int
    state: str
    threshold: float | None
    choice: Choice | None
    reuses: list[dict[str, Any]] = field(default_factory=list)
    created_at: float = 0.0
    decided_at: float | None = None


@dataclass(frozen=True, slots=True)
class Entry:
    """A row's proxy answer, as kept (see :meth:`CascadeBook.entries`)."""

    key: str
    status: str
    output: dict[str, Any] | None
    model: str | None
    source: str | None
    error: str | None
    score: float | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    attempts: int


@dataclass(frozen=True, slots=True)
class PopulationRow:
    """One row of a population as a decision reads it.

    Attributes:
        key: the row's key.
        score: the proxy's score, None when it has none (or failed).
        proxy: the proxy's value of the field (None when it failed).
        decision, via_reuse, sampled, keep: its place (see the module docstring).
        oracle: the oracle's value of the field, when it answered.
        oracle_status: ``done``, ``failed`` or None (not asked).
        status: the row's status in ``rows``.
    """

    key: str
    score: float | None
    proxy: Any
    decision: int | None
    via_reuse: bool
    sampled: bool
    keep: int | None
    oracle: Any
    oracle_status: str | None
    status: str


def _value(kind: str | None, value: Any) -> Any:
    """A JSON value read with SQLite's ``json_type`` and ``json_extract`` back as Python's."""
    if kind == "true":
        return True
    if kind == "false":
        return False
    if kind in (None, "null"):
        return None
    if kind in ("object", "array"):
        return json.loads(value)
    return value


def _path(field_name: str) -> str:
    return '$."' + field_name.replace('"', '\\"') + '"'


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i:i + _CHUNK]


class CascadeBook:
    """Reads and writes a job's cascade tables (see the module docstring).

    Args:
        ledger: the job's ledger (open for writing, or read-only for the readers).
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.db = ledger.connection
        self.path = ledger.path  # a full disk names the ledger

    # -- conditions over ``rows`` (the phases' rows) ----------------------------------------
    @staticmethod
    def sampled_sql(decision: int) -> str:
        """The rows a decision sampled."""
        return f"key IN (SELECT key FROM cascade_rows WHERE decision = {int(decision)} AND sampled = 1)"

    @staticmethod
    def kept_sql(decision: int, keep: bool) -> str:
        """The rows a decision keeps (``keep``) or sends to the oracle."""
        return f"key IN (SELECT key FROM cascade_rows WHERE decision = {int(decision)} AND keep = {int(keep)})"

    def pending(self, plan: int, only: str, *, after_seq: int, limit: int, hashes: bool = False) -> list[tuple]:
        """Up to ``limit`` pending rows of ``plan`` after ``after_seq`` meeting ``only``: ``(seq, key, data)``, with
        ``hashes`` ``(seq, key, data, input hash)`` (as :meth:`llmap.store.ledger.Ledger.pending`)."""
        return self.db.execute(
            f"SELECT seq, key, data{', input_hash' if hashes else ''} FROM rows WHERE plan = ? AND status = 'pending' "
            f"AND seq > ? AND ({only}) ORDER BY seq LIMIT ?", (plan, after_seq, limit)).fetchall()

    def count_pending(self, plan: int, only: str) -> int:
        """Pending rows of ``plan`` meeting ``only``."""
        return int(self.db.execute(f"SELECT count(*) FROM rows WHERE plan = ? AND status = 'pending' AND ({only})",
                                   (plan,)).fetchone()[0])

    # -- the proxy's answers ---------------------------------------------------------------
    @staticmethod
    def proxy_sql(results: Sequence[RowResult], run: int) -> list[tuple[str, tuple]]:
        """Statements keeping the proxy's answers (``Ledger.record``'s ``also``): one per row, replacing an older one
        (the row's current input hash is read from ``rows``)."""
        now = time.time()
        out = []
        for r in results:
            done = r.status == "done"
            out.append((_REPLACE, ("done" if done else "failed",
                                   json.dumps(r.output, ensure_ascii=False) if done and r.output is not None else None,
                                   r.model, r.source, None if done else r.error, r.confidence if done else None,
                                   r.prompt_tokens, r.completion_tokens, r.latency_s, r.attempts, run, now, r.key)))
        return out

    def entries(self, keys: Sequence[str]) -> dict[str, Entry]:
        """The proxy's answers of ``keys`` (those that have one)."""
        out: dict[str, Entry] = {}
        for chunk in _chunks(list(keys)):
            marks = ",".join("?" * len(chunk))
            for k, st, o, m, src, err, sc, pt, ct, lat, att in self.db.execute(
                    f"SELECT key, proxy_status, proxy_output, proxy_model, proxy_source, proxy_error, score, "
                    f"prompt_tokens, completion_tokens, latency_s, attempts FROM cascade_rows WHERE key IN ({marks})",
                    list(chunk)):
                out[k] = Entry(k, st, json.loads(o) if o else None, m, src, err, sc, pt or 0, ct or 0, lat or 0.0,
                               att or 0)
        return out

    @staticmethod
    def oracle_sql(results: Sequence[RowResult]) -> list[tuple[str, tuple]]:
        """Statements keeping the oracle's answers of rows it settled (``Ledger.record``'s ``also``)."""
        now = time.time()
        return [("UPDATE cascade_rows SET oracle_status = ?, oracle_output = ?, updated_at = ? WHERE key = ?",
                 ("done" if r.status == "done" else "failed",
                  json.dumps(r.output, ensure_ascii=False) if r.status == "done" and r.output is not None else None,
                  now, r.key)) for r in results]

    # -- decisions ---------------------------------------------------------------------------
    def _decision(self, row: tuple) -> Decision:
        (did, run, key, settings, population, sample, state, threshold, choice, reuses, created, decided) = row
        return Decision(did, run, key, json.loads(settings), population, sample, state, threshold,
                        Choice.from_dict(json.loads(choice)) if choice else None, json.loads(reuses or "[]"),
                        created, decided)

    _COLUMNS = ("id, run, decision_key, settings, population, sample, state, threshold, choice, reuses, created_at, "
                "decided_at")

    def latest(self, key: str | None = None) -> Decision | None:
        """The newest decision (with ``key``: the newest valid for it), or None."""
        if key is None:
            row = self.db.execute(f"SELECT {self._COLUMNS} FROM cascade_decisions ORDER BY id DESC LIMIT 1").fetchone()
        else:
            row = self.db.execute(f"SELECT {self._COLUMNS} FROM cascade_decisions WHERE decision_key = ? "
                                  "ORDER BY id DESC LIMIT 1", (key,)).fetchone()
        return self._decision(row) if row else None

    def population(self, plan: int, field_name: str, *, decision: int | None = None) -> list[PopulationRow]:
        """Every row of ``plan``'s population (with ``decision``: only the rows assigned to it), in input order."""
        path = _path(field_name)
        cond, args = ("AND c.decision = ?", (decision,)) if decision is not None else ("", ())
        rows = self.db.execute(
            "SELECT c.key, c.score, c.proxy_status, json_type(c.proxy_output, ?), json_extract(c.proxy_output, ?), "
            "c.decision, c.via_reuse, c.sampled, c.keep, c.oracle_status, json_type(c.oracle_output, ?), "
            f"json_extract(c.oracle_output, ?), r.status {_POPULATION} {cond} ORDER BY r.seq",
            (path, path, path, path, plan, *args)).fetchall()
        out = []
        for k, score, pst, pt, pv, dec, reused, sampled, keep, ost, ot, ov, status in rows:
            done = pst == "done"
            out.append(PopulationRow(k, score if done else None, _value(pt, pv) if done else None, dec, bool(reused),
                                     bool(sampled), keep, _value(ot, ov) if ost == "done" else None, ost, status))
        return out

    @guard_writes("ledger")
    def start(self, *, run: int, key: str, settings: dict[str, Any], plan: int, sample: Sequence[str]) -> Decision:
        """Record a new decision over ``plan``'s population with its sample, in one transaction; rows of the sample
        that hold the proxy's answer as their result (kept by an earlier decision) become pending again, kept in
        the run's history (``llmap rollback``).

        Returns:
            The decision, in state ``sampling``.
        """
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            population = int(self.db.execute(f"SELECT count(*) {_POPULATION}", (plan,)).fetchone()[0])
            did = int(self.db.execute(
                "INSERT INTO cascade_decisions (run, decision_key, settings, population, sample, state, created_at) "
                "VALUES (?, ?, ?, ?, ?, 'sampling', ?)",
                (run, key, json.dumps(settings), population, len(sample), now)).lastrowid)
            self.db.execute(f"UPDATE cascade_rows SET decision = ?, via_reuse = 0, sampled = 0, keep = NULL, "
                            f"updated_at = ? WHERE key IN (SELECT c.key {_POPULATION})", (did, now, plan))
            for chunk in _chunks(list(sample)):
                marks = ",".join("?" * len(chunk))
                self.db.execute(f"UPDATE cascade_rows SET sampled = 1, keep = 0 WHERE key IN ({marks})", list(chunk))
            self._reopen(run, f"c.decision = {did} AND c.sampled = 1")
        decision = self.latest(key)
        assert decision is not None
        return decision

    def _reopen(self, run: int, cond: str) -> int:
        """Rows meeting ``cond`` (over ``cascade_rows c``) whose result is the proxy's answer: pending again, their
        state kept in ``row_history`` under ``run`` (inside the caller's transaction)."""
        keys = [k for (k,) in self.db.execute(
            f"SELECT c.key FROM cascade_rows c JOIN rows r ON r.key = c.key AND r.input_hash = c.input_hash "
            f"WHERE {cond} AND r.status = 'done' AND (c.oracle_status IS NULL OR c.oracle_status != 'done')")]
        if not keys:
            return 0
        snapshot_keys(self.db, run, keys)
        for chunk in _chunks(keys):
            marks = ",".join("?" * len(chunk))
            self.db.execute(f"UPDATE rows SET status = 'pending', output = NULL, error = NULL, model = NULL, "
                            f"source = NULL, confidence = NULL, raw = NULL, updated_at = ? WHERE key IN ({marks})",
                            [time.time(), *chunk])
        return len(keys)

    @guard_writes("ledger")
    def decide(self, decision: Decision, choice: Choice, *, run: int) -> int:
        """Record the threshold and every population row's ``keep`` in one transaction; rows the new threshold no
        longer keeps but whose result is the proxy's answer (kept by an earlier decision) become pending again.

        Returns:
            How many rows became pending again.
        """
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("UPDATE cascade_decisions SET state = ?, threshold = ?, choice = ?, decided_at = ? "
                            "WHERE id = ?", ("decided" if choice.met else "missed", choice.threshold,
                                             json.dumps(choice.as_dict()), now, decision.id))
            if choice.threshold is None:
                self.db.execute("UPDATE cascade_rows SET keep = 0 WHERE decision = ?", (decision.id,))
            else:
                self.db.execute("UPDATE cascade_rows SET keep = CASE WHEN sampled = 0 AND proxy_status = 'done' AND "
                                "score IS NOT NULL AND score >= ? THEN 1 ELSE 0 END WHERE decision = ?",
                                (choice.threshold, decision.id))
            return self._reopen(run, f"c.decision = {decision.id} AND c.keep = 0")

    @guard_writes("ledger")
    def adopt(self, decision: Decision, keys: Sequence[str], *, run: int, event: dict[str, Any]) -> None:
        """An incremental run reuses ``decision`` for the changed rows ``keys``: they join it (each kept when it
        scores at least the threshold), and the reuse is recorded, in one transaction."""
        now = time.time()
        t = decision.threshold
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            for chunk in _chunks(list(keys)):
                marks = ",".join("?" * len(chunk))
                self.db.execute(
                    f"UPDATE cascade_rows SET decision = ?, via_reuse = 1, sampled = 0, updated_at = ?, keep = CASE "
                    f"WHEN ? IS NOT NULL AND proxy_status = 'done' AND score IS NOT NULL AND score >= ? THEN 1 "
                    f"ELSE 0 END WHERE key IN ({marks})", [decision.id, now, t, t, *chunk])
            self.db.execute("UPDATE cascade_decisions SET reuses = ? WHERE id = ?",
                            (json.dumps([*decision.reuses, event]), decision.id))
        decision.reuses.append(event)
