"""``llmap report``: what a job's models settled and cost, and what one run did.

Two readings of the job's ledger, opened read-only (they work while a run
holds the job):

- :func:`model_report`: rows each model settled in the latest plan (from the
  model, the cache or a stale entry), answers it escalated, tokens and cost,
  and the structured-output dialect it used;
- :func:`build_run_summary`: one run's record (rows, requests, 429s, retries,
  tokens, cost, exit reason) and its request log binned over time, for the
  terminal table and the HTML report (:mod:`llmap.observe.html`).
"""

from __future__ import annotations

import bisect
import json
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmap import errors as E
from llmap.observe.status import structured_by_model
from llmap.pricing import cost_usd
from llmap.spec import JobSpec
from llmap.store.ledger import STATUSES, open_for_reading

__all__ = ["ModelLine", "ModelUsage", "RunSummary", "build_run_summary", "model_report", "path_split"]

#: Most buckets on the throughput line and on the error bars.
THROUGHPUT_BUCKETS = 600
ERROR_BUCKETS = 120
LATENCY_BINS = 20
#: Groups drawn in the status-by-group plot (the summary keeps them all).
TOP_GROUPS = 30
_WIDTHS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


@dataclass
class ModelUsage:
    """One model's usage in a run (from ``runs.by_model``).

    Attributes:
        model: ``provider:name``.
        requests: requests sent to it.
        prompt_tokens, completion_tokens: tokens spent on it.
        cost_usd: those tokens at its prices, USD; None when unknown.
        cache_read_tokens: of the prompt tokens, those read from its prompt cache.
    """

    model: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = 0.0
    cache_read_tokens: int = 0


@dataclass
class RunSummary:
    """What the HTML report shows about one run.

    Times are POSIX seconds; durations seconds. Buckets on the time axis are
    seconds since ``started_at``: bucket ``i`` covers ``[i*w, (i+1)*w)``.

    Attributes:
        ledger_path: the ledger that was read.
        run: the run's id (also its plan id).
        run_ids: every run id in the ledger, ascending.
        started_at, ended_at: the run's start and end; ``ended_at`` is None
            when the run never ended (still running, or the process was killed).
        exit_reason: ``complete``, ``interrupted``, ``stopped: ...`` or None.
        rows_total, done, failed, skipped, pending, fallback: rows of the
            run's plan per status, as recorded at its end.
        cached: rows answered from the cache or an identical request.
        requests, rate_limited, retries: requests sent, 429 answers, retried attempts.
        hedged, hedge_cost_usd: hedged copies whose answer was dropped (they lost the race to the first
            copy, ``[limits] hedge_tail``) and their estimated cost, included in ``cost_usd``.
        prompt_tokens, completion_tokens, cost_usd: usage (tokens, USD).
        cache_read_tokens, cache_write_tokens: of the prompt tokens, those read
            from / written to the providers' prompt caches.
        wall_s: ``ended_at - started_at``, or up to the last logged request
            when the run never ended; None when unknown.
        rows_per_s: rows this run settled (``settled``: done + failed +
            fallback) per wall second; when unknown, the plan's settled rows.
        settled: rows this run settled, per status (``done``, ``failed``,
            ``fallback``): after a resume, less than the plan's counts, which
            include rows settled by earlier runs. None for a ledger without
            the ``attempts`` table. A done row counts for the last run that
            answered it (from the model or the cache); a failed row for the run
            whose plan it is in.
        logged_requests: entries of the request log for this run.
        errors_total: of those, the ones not answered 200.
        error_rate: ``errors_total / logged_requests`` (0 when none).
        span_s: seconds from the start to the run's end or its last logged
            request, whichever is later: the time axis of the plots.
        throughput_bucket_s: bucket width of ``throughput``, seconds (>= 1).
        throughput: rows answered per second (200 answers times their pack
            size) in each bucket; the last bucket ends with the run, so its
            rate is over the part of it the run covered.
        latency_bins: ``(low, high, requests)`` of successful requests'
            latency, seconds; bins are equal on a log scale.
        latency_quantiles: ``{"p50", "p90", "p99", "max"}`` of that latency, seconds.
        error_bucket_s: bucket width of ``errors``, seconds (>= 1).
        errors: outcome (``"503"``, ``"RequestTimeout"``) -> requests per
            bucket, most frequent outcome first.
        models: usage per model, most requests first.
        by_path: ``"batch"`` / ``"realtime"`` -> (requests, cost in USD or None when unrecorded), from the request
            log; only when the run sent batch requests (``[model] batch``).
        group_by: the grouping column, or None.
        groups: ``(value, {status: rows})`` for the run's plan, most rows first.
        notes: one-line remarks on what could not be shown and why.
    """

    ledger_path: Path
    run: int
    run_ids: list[int]
    started_at: float
    ended_at: float | None
    exit_reason: str | None
    rows_total: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    pending: int = 0
    fallback: int = 0
    cached: int = 0
    requests: int = 0
    rate_limited: int = 0
    retries: int = 0
    hedged: int = 0
    hedge_cost_usd: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    wall_s: float | None = None
    rows_per_s: float | None = None
    settled: dict[str, int] | None = None
    logged_requests: int = 0
    errors_total: int = 0
    error_rate: float = 0.0
    span_s: float = 0.0
    throughput_bucket_s: float = 1.0
    throughput: list[float] = field(default_factory=list)
    latency_bins: list[tuple[float, float, int]] = field(default_factory=list)
    latency_quantiles: dict[str, float] = field(default_factory=dict)
    error_bucket_s: float = 1.0
    errors: dict[str, list[int]] = field(default_factory=dict)
    models: list[ModelUsage] = field(default_factory=list)
    by_path: dict[str, tuple[int, float | None]] = field(default_factory=dict)
    group_by: str | None = None
    groups: list[tuple[Any, dict[str, int]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# -- reading the ledger ---------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise E.SpecError(f"no ledger at {str(path)!r}; run `llmap run` on the job first, or pass its "
                          f".llmap/<job>.ledger.sqlite")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as exc:
        raise E.SpecError(f"cannot read {str(path)!r} as an llmap ledger ({exc}); pass the job's "
                          f".llmap/<job>.ledger.sqlite") from exc
    if not {"rows", "runs"} <= tables:
        db.close()
        raise E.SpecError(f"{str(path)!r} is not an llmap ledger (no rows/runs tables); pass the job's "
                          f".llmap/<job>.ledger.sqlite")
    return db


def _width(span_s: float, most: int) -> int:
    """The smallest bucket width (seconds, from a list of round figures) giving at most ``most`` buckets."""
    for w in _WIDTHS:
        if span_s / w <= most:
            return w
    return math.ceil(span_s / most)


def _n_buckets(span_s: float, width: float) -> int:
    return max(1, math.ceil(span_s / width))


def build_run_summary(ledger_path: Path, run: int | None = None, group_by: str | None = None) -> RunSummary:
    """Read one run's figures from a ledger, read-only.

    Args:
        ledger_path: the job's ledger (``.llmap/<job>.ledger.sqlite``).
        run: the run id; None for the latest run.
        group_by: an input column stored in the rows' data (key, template
            variables, ``keep``) to count row statuses by; None for no grouping.

    Returns:
        The summary. A ``group_by`` column the ledger does not store gives no
        groups and a note.

    Raises:
        SpecError: no ledger at the path, not a ledger, no runs yet, or no such run.
    """
    path = Path(ledger_path)
    db = _connect(path)
    try:
        return _summarize(db, path, run, group_by)
    except sqlite3.Error as exc:
        raise E.SpecError(f"cannot read {str(path)!r} as an llmap ledger ({exc}); pass the job's "
                          f".llmap/<job>.ledger.sqlite") from exc
    finally:
        db.close()


def _summarize(db: sqlite3.Connection, path: Path, run: int | None, group_by: str | None) -> RunSummary:
    ids = [r[0] for r in db.execute("SELECT id FROM runs ORDER BY id")]
    if not ids:
        raise E.SpecError(f"ledger {str(path)!r} has no runs yet; run `llmap run` on the job first")
    if run is None:
        run = ids[-1]
    if run not in ids:
        raise E.SpecError(f"run {run} not found in {str(path)!r}; runs are {ids[0]}..{ids[-1]}")
    rec = db.execute("SELECT * FROM runs WHERE id = ?", (run,)).fetchone()
    get = dict(zip(rec.keys(), rec, strict=True))

    def num(k: str, cast: type = int) -> Any:
        return cast(get.get(k) or 0)

    s = RunSummary(path, run, ids, float(get["started_at"]), get.get("ended_at"), get.get("exit_reason"))
    for k in ("rows_total", "done", "failed", "skipped", "pending", "fallback", "cached", "requests",
              "rate_limited", "retries", "prompt_tokens", "completion_tokens", "cache_read_tokens",
              "cache_write_tokens"):
        setattr(s, k, num(k))
    s.cost_usd = num("cost_usd", float)
    has_log = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'requests'").fetchone()
    if has_log:
        _read_request_log(db, s)
    else:
        s.notes.append("this ledger has no request log (written by an older llmap): no throughput, latency "
                       "or error plots")
    if s.ended_at is not None:
        s.wall_s = max(0.0, float(s.ended_at) - s.started_at)
    elif s.wall_s is not None:
        s.notes.append(f"run {run} has no end time (still running, or the process was killed): wall time "
                       f"is counted up to its last request")
    else:
        s.notes.append(f"run {run} has no end time (still running, or the process was killed)")
    if _has_table(db, "attempts"):
        s.settled = _settled_in_run(db, run)
    settled = sum(s.settled.values()) if s.settled is not None else s.done + s.failed + s.fallback
    s.rows_per_s = settled / s.wall_s if s.wall_s else None
    _read_models(db, s, get.get("by_model"), bool(has_log))
    if group_by:
        _read_groups(db, s, group_by)
    return s


def _settled_in_run(db: sqlite3.Connection, run: int) -> dict[str, int]:
    """Rows run ``run`` settled, per status (see :attr:`RunSummary.settled`)."""
    out = {"done": 0, "failed": 0, "fallback": 0}
    for status, n in db.execute(
            "SELECT status, count(*) FROM rows r WHERE status IN ('done', 'fallback') "
            "AND (SELECT max(a.run) FROM attempts a WHERE a.key = r.key) = ? GROUP BY status", (run,)):
        out[status] = int(n)
    out["failed"] = int(db.execute("SELECT count(*) FROM rows WHERE plan = ? AND status = 'failed'",
                                   (run,)).fetchone()[0])
    return out


def path_split(s: RunSummary) -> str:
    """Requests and cost by path, in words (``batch 120 ($0.0123), real time 6 ($0.0020)``), or ``""``."""
    names = {"batch": "batch", "realtime": "real time"}
    return ", ".join(f"{names.get(p, p)} {n:,}" + (f" (${c:,.4f})" if c is not None else "")
                     for p, (n, c) in sorted(s.by_path.items()))


def _read_request_log(db: sqlite3.Connection, s: RunSummary) -> None:
    start = s.started_at
    n, last = db.execute("SELECT count(*), max(t) FROM requests WHERE run = ?", (s.run,)).fetchone()
    s.logged_requests = int(n)
    hedged, hedge_cost = db.execute("SELECT count(*), coalesce(sum(cost_usd), 0) FROM requests WHERE run = ? "
                                    "AND outcome = 'hedged'", (s.run,)).fetchone()
    s.hedged, s.hedge_cost_usd = int(hedged), float(hedge_cost)
    if s.ended_at is None and last is not None:
        s.wall_s = max(0.0, float(last) - start)
    span = max(float(s.ended_at) - start if s.ended_at is not None else 0.0,
               float(last) - start if last is not None else 0.0)
    s.span_s = span
    tw = s.throughput_bucket_s = _width(span, THROUGHPUT_BUCKETS)
    ew = s.error_bucket_s = _width(span, ERROR_BUCKETS)
    s.throughput = [0.0] * _n_buckets(span, tw)
    n_err = _n_buckets(span, ew)
    per_bucket = ("SELECT CAST(max(0.0, t - ?) / ? AS INTEGER) AS b, outcome, count(*), "
                  "coalesce(sum(pack_size), count(*)) FROM requests WHERE run = ? GROUP BY b, outcome")
    last_b = len(s.throughput) - 1
    for b, outcome, _count, rows in db.execute(per_bucket, (start, tw, s.run)):
        if outcome == "200":
            s.throughput[min(int(b), last_b)] += rows
    covered = span - last_b * tw  # the last bucket ends with the run
    for i in range(len(s.throughput)):
        s.throughput[i] /= covered if i == last_b and covered > 0 else tw
    errors: dict[str, list[int]] = {}
    for b, outcome, count, _rows in db.execute(per_bucket, (start, ew, s.run)):
        if outcome not in ("200", "hedged"):  # a hedged copy that lost is no error
            errors.setdefault(str(outcome), [0] * n_err)[min(int(b), n_err - 1)] += count
    s.errors = dict(sorted(errors.items(), key=lambda kv: (-sum(kv[1]), kv[0])))
    s.errors_total = sum(sum(v) for v in errors.values())
    s.error_rate = s.errors_total / s.logged_requests if s.logged_requests else 0.0
    if s.requests > s.logged_requests:
        s.notes.append(f"{s.requests - s.logged_requests} of {s.requests} requests sent have no outcome in the "
                       f"request log (cancelled before an answer, such as a hedged copy that lost the race)")
    lat = [r[0] for r in db.execute("SELECT latency_s FROM requests WHERE run = ? AND outcome = '200' "
                                    "AND latency_s IS NOT NULL ORDER BY latency_s", (s.run,))]
    s.latency_bins = _log_bins(lat, LATENCY_BINS)
    paths = {str(p): (int(n), c) for p, n, c in db.execute(
        "SELECT coalesce(path, 'realtime'), count(*), sum(cost_usd) FROM requests WHERE run = ? GROUP BY 1", (s.run,))}
    if "batch" in paths:
        s.by_path = paths
    if lat:
        def q(p: float) -> float:
            return float(lat[min(len(lat) - 1, int(p * len(lat)))])
        s.latency_quantiles = {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": float(lat[-1])}


def _log_bins(values: list[float], n: int) -> list[tuple[float, float, int]]:
    """``n`` bins equal on a log scale over sorted ``values`` (seconds): ``(low, high, count)``."""
    if not values:
        return []
    lo = max(values[0], 1e-4)
    hi = max(values[-1], lo * 1.001)
    ratio = (hi / lo) ** (1 / n)
    edges = [lo * ratio**i for i in range(n)] + [hi]
    counts = [0] * n
    for v in values:
        counts[min(n - 1, max(0, bisect.bisect_right(edges, v) - 1))] += 1
    return [(edges[i], edges[i + 1], counts[i]) for i in range(n)]


def _read_models(db: sqlite3.Connection, s: RunSummary, by_model: str | None, has_log: bool) -> None:
    try:
        recorded = json.loads(by_model) if by_model else {}
    except ValueError:
        recorded = {}
    models = [ModelUsage(m, int(u.get("requests") or 0), int(u.get("prompt_tokens") or 0),
                         int(u.get("completion_tokens") or 0), float(u.get("cost_usd") or 0.0),
                         int(u.get("cache_read_tokens") or 0))
              for m, u in recorded.items() if isinstance(u, dict)]
    if not models and has_log:
        models = [ModelUsage(m, n, pt, ct, None) for m, n, pt, ct in db.execute(
            "SELECT model, count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0) "
            "FROM requests WHERE run = ? GROUP BY model", (s.run,))]
        if models:
            s.notes.append(f"run {s.run} recorded no usage per model at its end: tokens per model are summed "
                           f"from the request log; cost per model is unknown")
    s.models = sorted(models, key=lambda m: (-m.requests, m.model))


def _read_groups(db: sqlite3.Connection, s: RunSummary, col: str) -> None:
    s.group_by = col
    first = db.execute("SELECT data FROM rows WHERE plan = ? LIMIT 1", (s.run,)).fetchone()
    if first is None:
        s.notes.append(f"no rows of the ledger belong to run {s.run} any more (a later run planned them "
                       f"again, or it planned none): no groups to show")
        return
    meta = db.execute("SELECT v FROM meta WHERE k = 'data_columns'").fetchone() if _has_table(db, "meta") else None
    stored = list(json.loads(meta[0] if meta else first[0]))
    if col not in stored:
        s.notes.append(f"column {col!r} is not stored in the ledger's rows (stored: {', '.join(stored) or 'none'}); "
                       f"group by one of those")
        return
    jpath = '$."' + col.replace('"', '\\"') + '"'
    groups: dict[Any, dict[str, int]] = {}
    for g, status, n in db.execute("SELECT json_extract(data, ?) AS g, status, count(*) FROM rows WHERE plan = ? "
                                   "GROUP BY g, status", (jpath, s.run)):
        groups.setdefault(g, dict.fromkeys(STATUSES, 0))[status] = int(n)
    s.groups = sorted(groups.items(), key=lambda kv: (-sum(kv[1].values()), kv[0] is None, str(kv[0])))


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


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
        cache_read_tokens, cache_write_tokens: of the prompt tokens, those its requests read from /
            wrote to the prompt cache, latest run (from the request log).
        cost_usd: those tokens at the model's prices (``price_in``, ``price_out``, and the cache
            prices: :func:`llmap.pricing.cost_usd`); batch requests at what the request log recorded
            (``price_batch_factor`` of them).
        structured: the structured-output dialect the model's latest run used, in words; "" if none.
    """

    model: str
    settled: int = 0
    from_cache: int = 0
    stale: int = 0
    escalated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0
    structured: str = ""


def model_report(spec: JobSpec) -> tuple[list[ModelLine], dict[str, int]]:
    """How many rows each model settled, what it cost, and the row counts.

    Returns:
        (one line per model in ``[[model]]`` order, then any other; status -> rows).

    Raises:
        SpecError: no ledger yet.
    """
    ledger, plan = open_for_reading(spec.ledger_path, job=spec.name)
    try:
        specs = {m.label: m for m in spec.models}
        lines: dict[str, ModelLine] = {label: ModelLine(label) for label in specs}
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
        for model, read, write in ledger.cache_by_model(plan):
            line = lines.setdefault(model, ModelLine(model))
            line.cache_read_tokens, line.cache_write_tokens = read, write
        batch = {m: rest for m, *rest in ledger.connection.execute(  # requests of batch APIs: their own prices
            "SELECT model, sum(prompt_tokens), sum(completion_tokens), sum(cache_read_tokens), "
            "sum(cache_write_tokens), sum(cost_usd) FROM requests WHERE run = ? AND path = 'batch' GROUP BY model",
            (plan,))}
        for line in lines.values():
            m = specs.get(line.model)
            pt, ct, rd, wr, paid = batch.get(line.model) or (0, 0, 0, 0, 0.0)
            line.cost_usd = 0.0 if m is None else cost_usd(
                m, max(0, line.prompt_tokens - pt), max(0, line.completion_tokens - ct),
                max(0, line.cache_read_tokens - rd), max(0, line.cache_write_tokens - wr)) + (paid or 0.0)
        return list(lines.values()), ledger.counts(plan)
    finally:
        ledger.close()
