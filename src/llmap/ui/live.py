"""The live figures of a job: what the page's live view shows, recomputed every tick from the ledger.

A run in another process is read through its ledger (opened read-only: WAL readers never block the writer):
rows by status, model, source, error class and group come from the page's index (:mod:`llmap.ui.index`), the
requests of the latest run from the ledger's request log, read once each (:class:`RequestLog` follows the log's
ids), and the cascade's tiers from its attempts. A run in this process (``llmap run --ui``) adds what only it
knows (:class:`InProcess`): requests in flight, the concurrency limit, each model's circuit breaker and the exact
retry count.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmap.store.ledger import STATUSES

if TYPE_CHECKING:
    from llmap.control.lanes import Lane
    from llmap.observe.progress import Tally
    from llmap.run.stats import DispatchStats
    from llmap.ui.index import UiIndex

__all__ = ["InProcess", "LiveView", "RequestLog", "bucket_width", "percentile"]

#: Requests read from the log per tick at most (a finished run's log is read over several ticks, back to back).
LOG_STEP = 20_000
#: Latencies kept for the percentiles (the most recent).
LATENCY_WINDOW = 10_000
#: Buckets of the errors-over-time chart at most.
TIMELINE_BUCKETS = 120
#: Seconds of settled-row history the rate is measured over.
RATE_WINDOW_S = 15.0
#: Groups listed at most (most rows first).
TOP_GROUPS = 40
_WIDTHS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)


def bucket_width(span_s: float, buckets: int = TIMELINE_BUCKETS) -> int:
    """The smallest round width (seconds) that cuts ``span_s`` into at most ``buckets`` buckets."""
    for w in _WIDTHS:
        if span_s / w <= buckets:
            return w
    return int(math.ceil(span_s / buckets))


def percentile(ordered: Sequence[float], p: float) -> float | None:
    """The ``p`` quantile (0..1) of an ascending sequence, nearest rank; None when empty."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]


class RequestLog:
    """The latest run's request log, taken in once: counts by outcome and per second, cost, tokens, packs and
    recent latencies.

    Args:
        run: the run whose requests are counted.
    """

    def __init__(self, run: int) -> None:
        self.run = run
        self.last_id = 0
        self.requests = 0
        self.outcomes: Counter = Counter()
        self.per_second: dict[int, Counter] = {}
        self.cost_usd = 0.0
        self.tokens = 0
        self.packs = 0
        self.packed_rows = 0
        self.batch = 0
        self.first_t: float | None = None
        self.last_t: float | None = None
        self.latencies: deque = deque(maxlen=LATENCY_WINDOW)

    def add(self, entries: Iterable[tuple]) -> None:
        """Take in log entries ``(id, t, model, outcome, latency_s, prompt_tokens, completion_tokens, pack_size,
        cost_usd, path)``, in id order."""
        for _id, t, _model, outcome, latency, pt, ct, pack, cost, path in entries:
            self.last_id = _id
            self.requests += 1
            self.outcomes[outcome] += 1
            sec = int(t)
            bucket = self.per_second.get(sec)
            if bucket is None:
                bucket = self.per_second[sec] = Counter()
            bucket["200" if outcome == "200" else outcome] += 1
            self.cost_usd += cost or 0.0
            self.tokens += (pt or 0) + (ct or 0)
            if pack and pack > 1:
                self.packs += 1
                self.packed_rows += pack if outcome == "200" else 0
            if path == "batch":
                self.batch += 1
            if outcome == "200" and latency is not None:
                self.latencies.append(latency)
            self.first_t = t if self.first_t is None else min(self.first_t, t)
            self.last_t = t if self.last_t is None else max(self.last_t, t)

    def read(self, db: sqlite3.Connection, limit: int = LOG_STEP) -> int:
        """Take in up to ``limit`` entries of the ledger's log past the last one read. Returns how many."""
        before = self.requests
        self.add(db.execute(
            "SELECT id, t, model, outcome, latency_s, prompt_tokens, completion_tokens, pack_size, cost_usd, path "
            "FROM requests WHERE run = ? AND id > ? ORDER BY id LIMIT ?", (self.run, self.last_id, limit)))
        return self.requests - before

    def figures(self, now: float) -> dict[str, Any]:
        """The request figures the page shows (counts, cost, latency percentiles, errors over time)."""
        lat = sorted(self.latencies)
        errors = {o: n for o, n in self.outcomes.items() if o not in ("200", "hedged")}
        timeline: dict[str, Any] = {"bucket_s": 1, "start": None, "ok": [], "errors": {}}
        if self.first_t is not None:
            start = int(self.first_t)
            span = max(1.0, max(now, self.last_t or now) - start)
            w = bucket_width(span)
            n = int(span // w) + 1
            ok = [0] * n
            errs: dict[str, list[int]] = {}
            for sec, c in self.per_second.items():
                i = min(n - 1, (sec - start) // w)
                for outcome, k in c.items():
                    if outcome == "200":
                        ok[i] += k
                    elif outcome != "hedged":
                        errs.setdefault(outcome, [0] * n)[i] += k
            timeline = {"bucket_s": w, "start": start, "ok": ok,
                        "errors": dict(sorted(errs.items(), key=lambda kv: -sum(kv[1])))}
        return {
            "requests": self.requests, "rate_limited": self.outcomes.get("429", 0),
            "errors": sum(errors.values()), "by_outcome": dict(self.outcomes.most_common()),
            "hedged": self.outcomes.get("hedged", 0), "cost_usd": self.cost_usd, "tokens": self.tokens,
            "packs": self.packs, "packed_rows": self.packed_rows, "batch_requests": self.batch,
            "latency": {"n": len(lat), "p50": percentile(lat, 0.5), "p90": percentile(lat, 0.9),
                        "p99": percentile(lat, 0.99), "max": lat[-1] if lat else None},
            "timeline": timeline,
        }


@dataclass
class InProcess:
    """What a run in this process (``llmap run --ui``) shows beyond its ledger: functions returning its live
    counters (None or empty before dispatch starts), as :class:`~llmap.observe.metrics.RunMetrics` reads them."""

    stats_fn: Callable[[], DispatchStats | None]
    tally_fn: Callable[[], Tally | None]
    lanes_fn: Callable[[], Sequence[Lane]]

    def figures(self) -> dict[str, Any]:
        stats, tally = self.stats_fn(), self.tally_fn()
        lanes = list(self.lanes_fn() or ())
        out: dict[str, Any] = {"models": [
            {"model": lane.label, "in_flight": lane.in_flight, "limit": lane.limit,
             "breaker": lane.breaker.peek().value} for lane in lanes]}
        if stats is not None:
            out.update(retries=stats.retries, rate_limited=stats.rate_limited, cost_usd=stats.cost_usd,
                       requests=stats.requests, stop_reason=stats.stop_reason)
        if tally is not None:
            out.update(cache_hits=tally.cache_hits, in_flight=tally.in_flight, concurrency=tally.concurrency)
        return out


class LiveView:
    """The live figures of one job, recomputed by :meth:`tick` (one thread) and read by :meth:`summary`.

    Args:
        ledger: a read-only connection to the job's ledger, owned by the ticking thread.
        index: the page's index of the rows (its counts), or None to count in the ledger.
        job: the job's name; ``cap_usd``, ``cap_tokens``: ``[limits] max_cost_usd`` and ``max_tokens``;
            ``pack``: ``[prompt] pack``; ``group``: the ``--by`` column.
        running: returns a description of the process running the job (``"pid 42 on host 'etl1'"``), or None.
        in_process: the live counters of a run in this process, or None.
        clock: POSIX seconds.
    """

    def __init__(self, ledger: sqlite3.Connection, index: UiIndex | None, *, job: str,
                 cap_usd: float | None = None, cap_tokens: int | None = None, pack: Any = 1,
                 group: str | None = None, running: Callable[[], str | None] = lambda: None,
                 in_process: InProcess | None = None, clock: Callable[[], float] = time.time) -> None:
        self.db = ledger
        self.index = index
        self.job = job
        self.cap_usd, self.cap_tokens, self.pack, self.group = cap_usd, cap_tokens, pack, group
        self.running = running
        self.in_process = in_process
        self.clock = clock
        self.log: RequestLog | None = None
        self.tiers: Counter = Counter()
        self._attempt_id = 0
        self._settled: deque = deque()
        self._ledger_counts: tuple[float, dict[str, int]] | None = None
        self.version = 0
        self.behind = False
        self._summary: dict[str, Any] = {}

    # -- ticking ------------------------------------------------------------------------------------------------
    def tick(self) -> dict[str, Any]:
        """Read what changed and recompute the summary (the new one is also what :meth:`summary` returns)."""
        now = self.clock()
        run = self.db.execute("SELECT id, started_at, ended_at, exit_reason, retries FROM runs "
                              "ORDER BY id DESC LIMIT 1").fetchone()
        plan = self.db.execute("SELECT max(plan) FROM rows").fetchone()[0]
        if run is not None and (self.log is None or self.log.run != run[0]):
            self.log, self.tiers, self._attempt_id = RequestLog(run[0]), Counter(), 0
            self._settled.clear()
        self.behind = False
        if self.log is not None:
            for _ in range(5):  # a long log in steps of LOG_STEP (each streamed: memory stays flat)
                self.behind = self.log.read(self.db) >= LOG_STEP  # more to read: the follower ticks again at once
                if not self.behind:
                    break
            for aid, model, outcome in self.db.execute(
                    "SELECT id, model, outcome FROM attempts WHERE run = ? AND id > ? ORDER BY id LIMIT ?",
                    (self.log.run, self._attempt_id, LOG_STEP)):
                self._attempt_id = aid
                self.tiers[(model, outcome)] += 1
        rows = self._rows(plan, now) if plan is not None else _empty_rows()
        settled = sum(v for k, v in rows["counts"].items() if k != "pending")
        self._settled.append((now, settled))
        while len(self._settled) > 2 and self._settled[1][0] < now - RATE_WINDOW_S:
            self._settled.popleft()
        t0, s0 = self._settled[0]
        rate = (settled - s0) / (now - t0) if now - t0 >= 1.0 and settled >= s0 else None
        pending = rows["counts"].get("pending", 0)
        holder = self.running()
        if not rate and holder is None and self.in_process is None:
            rate = None  # nothing runs: no rate to show
        req = self.log.figures(now) if self.log is not None else RequestLog(0).figures(now)
        summary = {
            "t": now, "job": self.job, "plan": plan, "group_by": self.group,
            "run": {"id": run[0], "started_at": run[1], "ended_at": run[2], "exit_reason": run[3],
                    "retries": run[4], "running": holder is not None or self.in_process is not None,
                    "holder": holder} if run else None,
            **rows,
            "rate_rows_s": rate, "eta_s": pending / rate if rate and pending else None,
            "requests": {**req, "complete": not self.behind},
            "cost": {"usd": req["cost_usd"], "cap_usd": self.cap_usd, "tokens": req["tokens"],
                     "cap_tokens": self.cap_tokens},
            "pack": self.pack,
            "tiers": [{"model": m, "outcome": o, "n": n} for (m, o), n in sorted(self.tiers.items())],
            "batches": self._batches(),
            "in_process": self.in_process.figures() if self.in_process is not None else None,
            "index": {"ready": bool(self.index and self.index.ready), "indexed": self.index.indexed if self.index
                      else 0, "behind": bool(self.index and self.index.behind)},
        }
        self._summary = summary
        self.version += 1
        return summary

    def summary(self) -> dict[str, Any]:
        """The figures of the last :meth:`tick` (empty before the first)."""
        return self._summary

    def _rows(self, plan: int, now: float) -> dict[str, Any]:
        """Rows by status, model, source, error class and group, from the index or (while it builds) the
        ledger's status counts."""
        if self.index is None or not self.index.ready or self.index.behind:
            if self._ledger_counts is None or now - self._ledger_counts[0] >= 2.0:  # a count over the ledger
                counts = dict.fromkeys(STATUSES, 0)
                for status, n in self.db.execute("SELECT status, count(*) FROM rows WHERE plan = ? GROUP BY status",
                                                 (plan,)):
                    counts[status] = n
                self._ledger_counts = (now, counts)
            out = _empty_rows()
            out["counts"] = dict(self._ledger_counts[1])
            out["total"] = sum(out["counts"].values())
            return out
        counts: Counter = Counter()
        models: Counter = Counter()
        sources: Counter = Counter()
        errors: Counter = Counter()
        groups: dict[Any, Counter] = {}
        for (p, status, model, source, err, grp), n in self.index.counts().items():
            if p != plan:
                continue
            counts[status] += n
            if model is not None:
                models[model] += n
            if source is not None:
                sources[source] += n
            if err is not None and status == "failed":
                errors[err] += n
            if self.group:
                groups.setdefault(json.dumps(grp), Counter())[status] += n
        top = sorted(groups.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:TOP_GROUPS]
        return {"counts": {s: counts.get(s, 0) for s in STATUSES}, "total": sum(counts.values()),
                "by_model": dict(models.most_common()), "by_source": dict(sources.most_common()),
                "failed_by_error": dict(errors.most_common()),
                "groups": [{"value": json.loads(g), "json": g, "counts": {s: c.get(s, 0) for s in STATUSES}}
                           for g, c in top],
                "groups_total": len(groups)}

    def _batches(self) -> list[dict[str, Any]]:
        return [{"state": state, "status": status, "batches": n, "requests": r or 0}
                for state, status, n, r in self.db.execute(
                    "SELECT state, status, count(*), sum(requests) FROM batches GROUP BY state, status "
                    "ORDER BY state, status")]


def _empty_rows() -> dict[str, Any]:
    return {"counts": dict.fromkeys(STATUSES, 0), "total": 0, "by_model": {}, "by_source": {},
            "failed_by_error": {}, "groups": [], "groups_total": 0}
