"""What every operator works with: the job, its ledger, the lanes, the run's counters, progress and rows.

:class:`OpContext` is built by :func:`llmap.operators.runner.run_operator` from
the engine's pieces (the same lanes, stats, response cache and progress a
``map`` run uses) and handed to the operator. :meth:`OpContext.rows` reads the
plan's rows from the ledger with their text (the job's user template rendered
for the row, as the model reads it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from llmap.control.lanes import Lane
from llmap.errors import RenderError
from llmap.observe.progress import Progress, Tally
from llmap.plan import Compiled
from llmap.providers.embeddings import Embedder
from llmap.run.stats import DispatchStats, Stop
from llmap.spec import JobSpec
from llmap.store.answers import AnswerCache
from llmap.store.ledger import Ledger, RowResult
from llmap.store.operators import OperatorBook
from llmap.store.vectors import VectorCache

__all__ = ["OpContext", "OpRow"]

#: Rows committed per transaction when an operator writes its results.
WRITE_ROWS = 2000


@dataclass(slots=True)
class OpRow:
    """One row of the plan, as an operator reads it.

    Attributes:
        key: the row's key; seq: its position in the input.
        data: its columns (the ledger's data).
        status: ``pending``, ``done``, ``failed``, ``skipped`` or ``fallback``.
        output: its answer so far (an earlier run's), or None.
        text: the job's user template rendered for it (what is embedded and shown to the model), or None when
            the template failed on its values (``error`` says why).
    """

    key: str
    seq: int
    data: dict[str, Any]
    status: str
    output: dict[str, Any] | None
    text: str | None
    error: str | None = None


@dataclass
class OpContext:
    """The operator's share of a run (see the module docstring).

    Attributes:
        spec, compiled: the job and its compiled prompt.
        ledger, run_id: where results go, and the plan.
        lanes: one per ``[[model]]`` (limits, breakers), shared by every step kind.
        stats: the run's counters (requests, tokens, cost, the stop signal).
        answers: the response cache and in-run dedup.
        progress, tally: what the user sees.
        embedder: the embedding model (cluster, resolve), or None.
        vectors: the shared embeddings cache (``[cache] enabled``), or None.
        summary: the operator's figures, filled as it goes (the summary line, ``llmap report``).
    """

    spec: JobSpec
    compiled: Compiled
    ledger: Ledger
    run_id: int
    lanes: list[Lane]
    stats: DispatchStats
    answers: AnswerCache
    progress: Progress
    tally: Tally
    embedder: Embedder | None = None
    vectors: VectorCache | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    book: OperatorBook = field(init=False)

    def __post_init__(self) -> None:
        self.book = OperatorBook(self.ledger)

    # -- seeing -------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """One progress line, ``llmap: <kind>: <text>``."""
        self.progress.message(f"llmap: {self.spec.kind}: {text}")

    def advance(self) -> None:
        """Show the run's counters."""
        t, s = self.tally, self.stats
        t.requests, t.prompt_tokens, t.completion_tokens = s.requests, s.prompt_tokens, s.completion_tokens
        t.cache_read_tokens, t.cost_usd, t.rate_limited = s.cache_read_tokens, s.cost_usd, s.rate_limited
        t.cache_hits = self.answers.hits
        t.in_flight = sum(lane.in_flight for lane in self.lanes)
        t.concurrency = sum(lane.limit for lane in self.lanes)
        self.progress.advance(t)

    def check_stop(self) -> None:
        """Raise :class:`~llmap.run.stats.Stop` when the run is stopping (a cap, a fatal error, a full disk)."""
        if self.stats.stop.is_set():
            raise Stop

    # -- rows ---------------------------------------------------------------------------------
    def rows(self) -> list[OpRow]:
        """Every row of the plan, in input order, with its text."""
        renderer = self.compiled.renderer
        out: list[OpRow] = []
        seq = 0
        for page in self.ledger.iter_rows(self.run_id):
            for key, data, status, output, *_ in page:
                row = json.loads(data)
                text = error = None
                if status != "skipped":
                    try:
                        text = renderer.messages(row)[-1]["content"]
                    except RenderError as exc:
                        error = str(exc)
                out.append(OpRow(key, seq, row, status, json.loads(output) if output else None, text, error))
                seq += 1
        return out

    def write_rows(self, results: list[RowResult], *, also: list[tuple[str, tuple]] = ()) -> None:
        """Commit the operator's per-row results (and ``also``, in the last transaction), then count them."""
        for i in range(0, max(len(results), 1), WRITE_ROWS):
            chunk = results[i:i + WRITE_ROWS]
            last = i + WRITE_ROWS >= len(results)
            self.ledger.record(chunk, run_id=self.run_id, requests=self.stats.take_request_log(),
                               also=list(also) if last else [])
        c = self.ledger.counts(self.run_id)
        self.tally.done, self.tally.failed, self.tally.skipped = c["done"], c["failed"], c["skipped"]
        self.advance()
