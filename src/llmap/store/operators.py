"""The ledger's operator tables (migration ``010_operators``): what a crash must not lose mid-operator.

- ``op_steps``: every model step's validated outcome (a window's proposed
  families, a merge or pair verdict, a row's assignment, a chunk's summary),
  keyed by its request's content key (:meth:`~llmap.store.answers.AnswerCache.key`
  of the model, the messages and the schema). A rerun recomputes the same
  steps, finds their outcomes here, and sends none of them again, with or
  without the response cache. Failed steps are not kept: a rerun retries them.
- ``op_vectors``: embeddings of texts, keyed by the embedding model and the text.
- ``op_families``: cluster's families (id, name, description, size, example rows).
- ``op_groups``: reduce's answers, one row per group, exported like rows.
- ``op_chunks``: which rows (level 0) or summaries (higher levels) each of
  reduce's chunks held.
- ``op_runs``: each run's operator summary (the KPIs the summary line and the report show).

Writes go through :meth:`~llmap.store.ledger.Ledger.record` (one transaction,
with the request log of the same event-loop turn), so a step's outcome and
the requests it cost are durable together.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmap.store.ledger import Ledger
from llmap.store.vectors import stored_vectors

__all__ = ["Family", "OperatorBook", "StepRecord", "output_pages"]

_PAGE = 500  # keys per IN (...) list


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One step's committed outcome.

    Attributes:
        key: the step request's content key.
        kind: ``propose``, ``merge``, ``assign``, ``judge``, ``summary`` or ``answer``.
        output: the validated answer (field name -> value).
        model: ``provider:name`` of the model that answered.
        source: ``model`` or ``cache``.
        prompt_tokens, completion_tokens: the step's share of its request's usage.
    """

    key: str
    kind: str
    output: dict[str, Any]
    model: str | None = None
    source: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Family:
    """One of cluster's families.

    Attributes:
        id: ``F1``, ``F2``, ... in order of creation.
        name, description: as the model wrote them (the largest of the merged proposals').
        size: rows in the family now.
        examples: up to 5 member rows' texts.
        sources: the proposals merged into it (``window:index``).
        run: the run that created it.
    """

    id: str
    name: str
    description: str
    size: int = 0
    examples: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    run: int = 0

    @property
    def text(self) -> str:
        """The family as one line: what is embedded and what the model reads."""
        return f"{self.name}: {self.description}"


_STEP = "INSERT OR REPLACE INTO op_steps (key, kind, run, output, model, source, prompt_tokens, completion_tokens, " \
        "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"


class OperatorBook:
    """Reads and writes a ledger's operator tables.

    Args:
        ledger: the job's ledger (opened for writing by the run, read-only by ``status``/``report``).
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.db = ledger.connection

    # -- steps ---------------------------------------------------------------------------------
    def steps(self, keys: Iterable[str]) -> dict[str, StepRecord]:
        """The committed outcomes among ``keys``."""
        keys = list(dict.fromkeys(keys))
        out: dict[str, StepRecord] = {}
        for i in range(0, len(keys), _PAGE):
            chunk = keys[i:i + _PAGE]
            q = f"SELECT key, kind, output, model, source, prompt_tokens, completion_tokens FROM op_steps " \
                f"WHERE key IN ({','.join('?' * len(chunk))})"
            for k, kind, output, model, source, pt, ct in self.db.execute(q, chunk):
                out[k] = StepRecord(k, kind, json.loads(output), model, source, pt, ct)
        return out

    @staticmethod
    def step_statements(run_id: int, records: Sequence[StepRecord]) -> list[tuple[str, tuple]]:
        """``(sql, params)`` that commit ``records`` (for :meth:`~llmap.store.ledger.Ledger.record`'s ``also``)."""
        now = time.time()
        return [(_STEP, (r.key, r.kind, run_id, json.dumps(r.output, ensure_ascii=False), r.model, r.source,
                         r.prompt_tokens, r.completion_tokens, now)) for r in records]

    def step_counts(self) -> dict[str, int]:
        """Committed steps per kind (all runs)."""
        return dict(self.db.execute("SELECT kind, count(*) FROM op_steps GROUP BY kind").fetchall())

    # -- vectors -------------------------------------------------------------------------------
    def vectors(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Stored embeddings among ``keys`` (float32 vectors)."""
        return stored_vectors(self.db, "op_vectors", keys)

    def put_vectors(self, model: str, items: Sequence[tuple[str, np.ndarray]]) -> None:
        """Commit embeddings ``(key, vector)`` of ``model`` (one transaction)."""
        rows = [("INSERT OR REPLACE INTO op_vectors (key, model, dim, vec) VALUES (?, ?, ?, ?)",
                 (k, model, int(v.shape[0]), np.asarray(v, dtype=np.float32).tobytes())) for k, v in items]
        if rows:
            self.ledger.record([], also=rows)

    # -- families ------------------------------------------------------------------------------
    def families(self) -> list[Family]:
        """Cluster's families, in order of creation."""
        rows = self.db.execute("SELECT id, name, description, size, examples, sources, run FROM op_families").fetchall()
        fams = [Family(i, n, d, s, tuple(json.loads(e)), tuple(json.loads(src)), r) for i, n, d, s, e, src, r in rows]
        return sorted(fams, key=lambda f: _family_number(f.id))

    @staticmethod
    def family_statements(families: Sequence[Family], *, replace_all: bool = True) -> list[tuple[str, tuple]]:
        """``(sql, params)`` that write ``families`` (after deleting the old ones when ``replace_all``)."""
        now = time.time()
        out: list[tuple[str, tuple]] = [("DELETE FROM op_families", ())] if replace_all else []
        out += [("INSERT OR REPLACE INTO op_families (id, run, name, description, size, examples, sources, created_at) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (f.id, f.run, f.name, f.description, f.size, json.dumps(list(f.examples), ensure_ascii=False),
                  json.dumps(list(f.sources)), now)) for f in families]
        return out

    # -- reduce's groups and chunks ------------------------------------------------------------
    def group_fingerprints(self) -> dict[str, tuple[str, str]]:
        """Group key -> (status, fingerprint) of every group answered before."""
        return {k: (s, f) for k, s, f in self.db.execute("SELECT key, status, fingerprint FROM op_groups")}

    @staticmethod
    def group_statements(plan: int, groups: Sequence[tuple]) -> list[tuple[str, tuple]]:
        """``(sql, params)`` that write groups ``(key, seq, data, status, output, error, model, source,
        fingerprint)`` into plan ``plan``."""
        sql = ("INSERT OR REPLACE INTO op_groups (key, seq, plan, data, status, output, error, model, source, "
               "fingerprint) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
        return [(sql, (k, seq, plan, data, status, output, error, model, source, fp))
                for k, seq, data, status, output, error, model, source, fp in groups]

    def iter_groups(self, plan: int, *, page: int = 5000) -> Iterator[list[tuple]]:
        """Pages of ``(key, data, status, output, error, model, source, confidence, raw)`` of plan ``plan``'s
        groups, in order (the shape :meth:`~llmap.store.ledger.Ledger.iter_rows` gives, so the sinks export
        either; a group has no confidence or raw answer: None)."""
        last = -1
        while True:
            rows = self.db.execute(
                "SELECT seq, key, data, status, output, error, model, source, NULL, NULL FROM op_groups "
                "WHERE plan = ? AND seq > ? "
                "ORDER BY seq LIMIT ?", (plan, last, page)).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield [r[1:] for r in rows]

    @staticmethod
    def chunk_statements(group: str, chunks: Sequence[tuple[int, int, str, list[str]]]) -> list[tuple[str, tuple]]:
        """``(sql, params)`` that replace a group's chunks ``(level, index, step key, members)``."""
        out: list[tuple[str, tuple]] = [("DELETE FROM op_chunks WHERE grp = ?", (group,))]
        out += [("INSERT INTO op_chunks (grp, level, idx, step, members) VALUES (?, ?, ?, ?, ?)",
                 (group, level, idx, step, json.dumps(members, ensure_ascii=False)))
                for level, idx, step, members in chunks]
        return out

    def chunks(self, group: str) -> list[tuple[int, int, str, list[str]]]:
        """A group's chunks: ``(level, index, step key, members)`` in order."""
        return [(lv, i, st, json.loads(m)) for lv, i, st, m in self.db.execute(
            "SELECT level, idx, step, members FROM op_chunks WHERE grp = ? ORDER BY level, idx", (group,))]

    # -- summaries -----------------------------------------------------------------------------
    @staticmethod
    def summary_statement(run_id: int, kind: str, summary: dict[str, Any]) -> tuple[str, tuple]:
        """``(sql, params)`` that record a run's operator summary."""
        return ("INSERT OR REPLACE INTO op_runs (run, kind, summary) VALUES (?, ?, ?)",
                (run_id, kind, json.dumps(summary, ensure_ascii=False, default=str)))

    def summary(self, run_id: int | None = None) -> tuple[int, str, dict[str, Any]] | None:
        """``(run, kind, summary)`` of run ``run_id`` (default: the latest run that has one), or None."""
        if run_id is None:
            row = self.db.execute("SELECT run, kind, summary FROM op_runs ORDER BY run DESC LIMIT 1").fetchone()
        else:
            row = self.db.execute("SELECT run, kind, summary FROM op_runs WHERE run = ?", (run_id,)).fetchone()
        return None if row is None else (row[0], row[1], json.loads(row[2]))


def _family_number(fid: str) -> int:
    digits = "".join(c for c in fid if c.isdigit())
    return int(digits) if digits else 0


def output_pages(ledger: Ledger, plan: int, *, kind: str = "map", keep_field: str | None = None
                 ) -> Iterator[list[tuple]]:
    """The pages an export writes: the plan's rows, or reduce's groups (``kind = "reduce"``); with
    ``keep_field`` (``kind = "filter"``) only the settled rows whose field is true. Each row is
    ``(key, data, status, output, error, model, source, confidence, raw)``."""
    pages = OperatorBook(ledger).iter_groups(plan) if kind == "reduce" else ledger.iter_rows(plan)
    for rows in pages:
        if keep_field is not None:
            rows = [r for r in rows
                    if r[2] in ("done", "fallback") and r[3] and json.loads(r[3]).get(keep_field) is True]
        if rows:
            yield rows
