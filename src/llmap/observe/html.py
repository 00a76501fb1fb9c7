"""One run of a job as a self-contained HTML page: a summary table and five plots.

``llmap report --html PATH`` writes a single file that opens offline: no
script, no stylesheet or font from elsewhere, every plot an inline ``<svg>``
drawn here. The figures come from the job's ledger, opened read-only:

- the ``runs`` record: row counts, usage, cost, 429s, retries, exit reason;
- the ``requests`` log: throughput, latency and errors over time;
- ``runs.by_model``: tokens and cost per model (the request log when missing);
- the ``rows`` of the run's plan: rows per status, grouped by a stored column.
"""

from __future__ import annotations

import bisect
import contextlib
import html
import json
import math
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmap import errors as E
from llmap.store.ledger import STATUSES

__all__ = ["ModelUsage", "RunSummary", "build_run_summary", "render_html", "write_html_report"]

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
    """

    model: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = 0.0


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
        prompt_tokens, completion_tokens, cost_usd: usage (tokens, USD).
        wall_s: ``ended_at - started_at``, or up to the last logged request
            when the run never ended; None when unknown.
        rows_per_s: settled rows (done + failed + fallback) per wall second.
            On a resumed run it includes rows settled by earlier runs.
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
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    wall_s: float | None = None
    rows_per_s: float | None = None
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
              "rate_limited", "retries", "prompt_tokens", "completion_tokens"):
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
    settled = s.done + s.failed + s.fallback
    s.rows_per_s = settled / s.wall_s if s.wall_s else None
    _read_models(db, s, get.get("by_model"), bool(has_log))
    if group_by:
        _read_groups(db, s, group_by)
    return s


def _read_request_log(db: sqlite3.Connection, s: RunSummary) -> None:
    start = s.started_at
    n, last = db.execute("SELECT count(*), max(t) FROM requests WHERE run = ?", (s.run,)).fetchone()
    s.logged_requests = int(n)
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
        if outcome != "200":
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
                         int(u.get("completion_tokens") or 0), float(u.get("cost_usd") or 0.0))
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


# -- formatting -----------------------------------------------------------------------


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _int(n: int) -> str:
    return f"{n:,}"


def _usd(x: float | None) -> str:
    if x is None:
        return "?"
    return f"${x:,.2f}" if x >= 1 else f"${x:.4f}"


def _dur(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 60:
        return f"{s:.2f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _lat(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def _si(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}" if x != int(x) else str(int(x))


def _when(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _nice(hi: float, n: int = 5) -> tuple[float, list[float]]:
    """A round axis top >= ``hi`` and its ticks, about ``n`` of them."""
    if hi <= 0:
        return 1.0, [0.0, 0.5, 1.0]
    raw = hi / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    k = math.ceil(hi / step - 1e-9)
    return k * step, [i * step for i in range(k + 1)]


# -- SVG ------------------------------------------------------------------------------

W, H = 760, 300
_STATUS_COLORS = {"done": "#2e7d32", "failed": "#c62828", "fallback": "#ef6c00", "skipped": "#9e9e9e",
                  "pending": "#90caf9"}
_STACK = ("done", "fallback", "failed", "skipped", "pending")
_PALETTE = ("#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#7f7f7f",
            "#1f77b4", "#2ca02c")


def _a(**attrs: Any) -> str:
    return "".join(f' {k.rstrip("_").replace("_", "-")}="{_esc(v)}"' for k, v in attrs.items() if v is not None)


def _f(x: float) -> str:
    return f"{x:.1f}"


def _text(x: float, y: float, s: str, **attrs: Any) -> str:
    return f'<text{_a(x=_f(x), y=_f(y), **attrs)}>{_esc(s)}</text>'


def _rect(x: float, y: float, w: float, h: float, fill: str, tip: str | None = None, cls: str = "mark") -> str:
    inner = f"<title>{_esc(tip)}</title>" if tip else ""
    return f'<rect{_a(class_=cls, x=_f(x), y=_f(y), width=_f(max(w, 0.5)), height=_f(max(h, 0)), fill=fill)}>{inner}</rect>'


class _Plot:
    """A plot area inside an ``<svg class="plot">``, with pixel mapping and axis helpers."""

    def __init__(self, kind: str, title: str, *, height: int = H, left: int = 64, right: int = 20,
                 top: int = 60, bottom: int = 48) -> None:
        self.kind, self.title, self.height = kind, title, height
        self.x0, self.x1, self.y0, self.y1 = left, W - right, top, height - bottom
        self.parts: list[str] = [_text(12, 22, title, class_="title")]

    def svg(self) -> str:
        return (f'<svg{_a(class_="plot", data_plot=self.kind, viewBox=f"0 0 {W} {self.height}", width=W, height=self.height, role="img", aria_label=self.title)}>'
                f"<title>{_esc(self.title)}</title>{''.join(self.parts)}</svg>")

    def no_data(self, why: str = "no data") -> str:
        mx, my = (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2
        self.parts.append(_rect(self.x0, self.y0, self.x1 - self.x0, self.y1 - self.y0, "none", cls="frame"))
        self.parts.append(_text(mx, my, why, class_="nodata", text_anchor="middle"))
        return self.svg()

    def y_axis(self, top: float, ticks: list[float], label: str) -> None:
        for v in ticks:
            y = self.y(v, top)
            self.parts.append(f'<line{_a(class_="grid", x1=self.x0, x2=self.x1, y1=_f(y), y2=_f(y))}/>')
            self.parts.append(_text(self.x0 - 6, y + 4, _si(v), text_anchor="end"))
        cy = (self.y0 + self.y1) / 2
        self.parts.append(_text(14, cy, label, class_="axlabel", text_anchor="middle",
                                transform=f"rotate(-90 14 {_f(cy)})"))

    def x_axis(self, ticks: list[tuple[float, str]], label: str) -> None:
        self.parts.append(f'<line{_a(class_="axis", x1=self.x0, x2=self.x1, y1=self.y1, y2=self.y1)}/>')
        for x, s in ticks:
            anchor = "end" if x > W - 30 else "middle"
            self.parts.append(f'<line{_a(class_="axis", x1=_f(x), x2=_f(x), y1=self.y1, y2=self.y1 + 4)}/>')
            self.parts.append(_text(x, self.y1 + 16, s, text_anchor=anchor))
        self.parts.append(_text((self.x0 + self.x1) / 2, self.height - 8, label, class_="axlabel",
                                text_anchor="middle"))

    def legend(self, items: list[tuple[str, str]], y: float = 42) -> None:
        x = float(self.x0)
        for color, label in items:
            if x + 20 + 6.5 * len(label) > self.x1:
                break
            self.parts.append(_rect(x, y - 9, 10, 10, color, cls="key"))
            self.parts.append(_text(x + 14, y, label, class_="legend"))
            x += 28 + 6.5 * len(label)

    def y(self, v: float, top: float) -> float:
        return self.y1 - (v / top) * (self.y1 - self.y0) if top else self.y1


def _time_axis(p: _Plot, span_s: float) -> None:
    unit, div = ("s", 1.0) if span_s <= 600 else ("min", 60.0) if span_s <= 3 * 3600 else ("h", 3600.0)
    _, ticks = _nice(span_s / div, 6)
    px = [(p.x0 + (t * div / span_s) * (p.x1 - p.x0), _si(t)) for t in ticks if t * div <= span_s * 1.0001]
    p.x_axis(px, {"s": "seconds", "min": "minutes", "h": "hours"}[unit] + " since the run started")


def _plot_throughput(s: RunSummary) -> str:
    p = _Plot("throughput", "Throughput: rows answered per second")
    if not any(s.throughput):
        return p.no_data()
    w = s.throughput_bucket_s
    span = s.span_s or w
    top, ticks = _nice(max(s.throughput))
    p.y_axis(top, ticks, "rows / s")
    _time_axis(p, span)

    def x(t: float) -> float:
        return p.x0 + t / span * (p.x1 - p.x0)

    d = [f"M{_f(x(0))},{_f(p.y(s.throughput[0], top))}"]
    for i, v in enumerate(s.throughput):
        if i:
            d.append(f"V{_f(p.y(v, top))}")
        d.append(f"H{_f(x(min((i + 1) * w, span)))}")
    line = "".join(d)
    p.parts.append(f'<path{_a(class_="mark area", d=f"{line}V{_f(p.y1)}H{_f(x(0))}Z", fill="#1f77b4", fill_opacity="0.15")}/>')
    p.parts.append(f'<path{_a(class_="mark line", d=line, fill="none", stroke="#1f77b4", stroke_width=2)}>'
                   f"<title>{_esc(f'mean {sum(s.throughput) / len(s.throughput):.3g} rows/s over {len(s.throughput)} buckets of {w:g} s')}</title></path>")
    return p.svg()


def _plot_latency(s: RunSummary) -> str:
    q = s.latency_quantiles
    sub = f" (p50 {_lat(q['p50'])}, p90 {_lat(q['p90'])}, p99 {_lat(q['p99'])})" if q else ""
    p = _Plot("latency", "Latency of answered requests" + sub)
    if not s.latency_bins:
        return p.no_data()
    top, ticks = _nice(max(c for _, _, c in s.latency_bins))
    p.y_axis(top, ticks, "requests")
    n = len(s.latency_bins)
    bw = (p.x1 - p.x0) / n
    for i, (lo, hi, c) in enumerate(s.latency_bins):
        if c:
            y = p.y(c, top)
            p.parts.append(_rect(p.x0 + i * bw + 1, y, bw - 2, p.y1 - y, "#1f77b4", f"{_lat(lo)} – {_lat(hi)}: {c} requests"))
    step = max(1, n // 5)
    edges = [(i, s.latency_bins[i][0]) for i in range(0, n, step)] + [(n, s.latency_bins[-1][1])]
    p.x_axis([(p.x0 + i * bw, _lat(v)) for i, v in edges], "latency (log scale)")
    return p.svg()


def _plot_errors(s: RunSummary) -> str:
    p = _Plot("errors", f"Errors by class over time ({_int(s.errors_total)} of {_int(s.logged_requests)} requests)")
    if not s.errors_total:
        return p.no_data("no data: no errors")
    series = list(s.errors.items())
    colors = {k: _PALETTE[i % len(_PALETTE)] for i, (k, _) in enumerate(series)}
    n = len(series[0][1])
    totals = [sum(v[i] for _, v in series) for i in range(n)]
    top, ticks = _nice(max(totals))
    p.y_axis(top, ticks, "requests")
    w = s.error_bucket_s
    _time_axis(p, n * w)
    bw = (p.x1 - p.x0) / n
    gap = 1 if bw > 4 else 0
    for i in range(n):
        base = 0
        for k, v in series:
            if v[i]:
                ya, yb = p.y(base + v[i], top), p.y(base, top)
                p.parts.append(_rect(p.x0 + i * bw + gap, ya, bw - 2 * gap, yb - ya, colors[k],
                                     f"{k}: {v[i]} at {i * w:g}–{(i + 1) * w:g} s"))
                base += v[i]
    p.legend([(colors[k], f"{k} ({sum(v)})") for k, v in series])
    return p.svg()


def _plot_models(s: RunSummary) -> str:
    p = _Plot("models", "Tokens and cost by model")
    if not s.models or not any(m.prompt_tokens or m.completion_tokens for m in s.models):
        return p.no_data()
    top, ticks = _nice(max(max(m.prompt_tokens, m.completion_tokens) for m in s.models) * 1.1)
    p.y_axis(top, ticks, "tokens")
    gw = (p.x1 - p.x0) / len(s.models)
    bw = min(60.0, gw * 0.35)
    labels = []
    for i, m in enumerate(s.models):
        cx = p.x0 + (i + 0.5) * gw
        for j, (v, color, what) in enumerate(((m.prompt_tokens, "#1f77b4", "prompt"),
                                              (m.completion_tokens, "#ff7f0e", "completion"))):
            y = p.y(v, top)
            p.parts.append(_rect(cx - bw + j * bw, y, bw - 2, p.y1 - y, color, f"{m.model}: {_int(v)} {what} tokens"))
        p.parts.append(_text(cx, p.y(max(m.prompt_tokens, m.completion_tokens), top) - 6, _usd(m.cost_usd),
                             text_anchor="middle", class_="value"))
        name = m.model if len(m.model) <= gw / 6.5 else m.model[: max(4, int(gw / 6.5) - 1)] + "…"
        labels.append((cx, name))
    p.x_axis(labels, "model (label above the bars: cost in USD)")
    p.legend([("#1f77b4", "prompt tokens"), ("#ff7f0e", "completion tokens")])
    return p.svg()


def _plot_groups(s: RunSummary) -> str:
    shown = s.groups[:TOP_GROUPS]
    title = f"Rows by status, grouped by {s.group_by!r}" if s.group_by else "Rows by status per group"
    if len(s.groups) > TOP_GROUPS:
        title += f" (top {TOP_GROUPS} of {len(s.groups)} groups)"
    p = _Plot("groups", title, height=max(180, 60 + 48 + 24 * len(shown)), left=170)
    if not shown:
        return p.no_data("no data: pass a stored column to group by" if not s.group_by else "no data")
    top, ticks = _nice(max(sum(c.values()) for _, c in shown))
    for v in ticks:
        x = p.x0 + v / top * (p.x1 - p.x0)
        p.parts.append(f'<line{_a(class_="grid", x1=_f(x), x2=_f(x), y1=p.y0, y2=p.y1)}/>')
    p.x_axis([(p.x0 + v / top * (p.x1 - p.x0), _si(v)) for v in ticks], "rows")
    rh = (p.y1 - p.y0) / len(shown)
    for i, (g, counts) in enumerate(shown):
        y = p.y0 + i * rh
        label = "(null)" if g is None else str(g)
        p.parts.append(_text(p.x0 - 6, y + rh / 2 + 4, label if len(label) <= 24 else label[:23] + "…",
                             text_anchor="end"))
        x = float(p.x0)
        for st in _STACK:
            if counts.get(st):
                w = counts[st] / top * (p.x1 - p.x0)
                p.parts.append(_rect(x, y + 3, w, rh - 6, _STATUS_COLORS[st], f"{label}: {counts[st]} {st}"))
                x += w
    present = [st for st in _STACK if any(c.get(st) for _, c in shown)]
    p.legend([(_STATUS_COLORS[st], st) for st in present])
    return p.svg()


# -- the page -------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #222;
       background: #f6f7f9; margin: 0; padding: 24px; }
main { max-width: 800px; margin: 0 auto; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 28px 0 8px; }
p.meta { color: #666; margin: 0 0 16px; font-size: 13px; }
table { border-collapse: collapse; background: #fff; font-size: 13px; }
table.summary { width: 100%; }
th, td { border: 1px solid #e1e4e8; padding: 5px 10px; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f0f2f5; font-weight: 600; }
ul.notes { color: #8a5a00; font-size: 13px; }
svg.plot { display: block; background: #fff; border: 1px solid #e1e4e8; border-radius: 6px; margin: 8px 0;
           max-width: 100%; height: auto; font-size: 11px; }
svg.plot text { fill: #333; }
svg.plot text.title { font-size: 14px; font-weight: 600; }
svg.plot text.axlabel { fill: #666; }
svg.plot text.nodata { fill: #999; font-size: 16px; }
svg.plot text.value { fill: #444; font-size: 10px; }
svg.plot line.grid { stroke: #eceef1; }
svg.plot line.axis { stroke: #888; }
svg.plot rect.frame { stroke: #eceef1; }
"""


def _summary_table(s: RunSummary) -> str:
    items = [
        ("Run", f"{s.run} (runs {s.run_ids[0]}..{s.run_ids[-1]})"), ("Exit reason", s.exit_reason or "-"),
        ("Started", _when(s.started_at)), ("Ended", _when(s.ended_at)),
        ("Wall time", _dur(s.wall_s)), ("Rows / s", "?" if s.rows_per_s is None else f"{s.rows_per_s:,.2f}"),
        ("Rows", _int(s.rows_total)), ("Done", _int(s.done)),
        ("Failed", _int(s.failed)), ("Fallback", _int(s.fallback)),
        ("Skipped", _int(s.skipped)), ("Pending", _int(s.pending)),
        ("Cached", _int(s.cached)), ("Requests", _int(s.requests)),
        ("Errors (non-200)", f"{_int(s.errors_total)} ({s.error_rate:.1%})"), ("429s", _int(s.rate_limited)),
        ("Retries", _int(s.retries)), ("Cost", _usd(s.cost_usd)),
        ("Prompt tokens", _int(s.prompt_tokens)), ("Completion tokens", _int(s.completion_tokens)),
    ]
    rows = []
    for i in range(0, len(items), 2):
        cells = "".join(f"<th>{_esc(k)}</th><td class=\"n\">{_esc(v)}</td>" for k, v in items[i:i + 2])
        rows.append(f"<tr>{cells}</tr>")
    return f'<table class="summary">{"".join(rows)}</table>'


def _models_table(s: RunSummary) -> str:
    if not s.models:
        return ""
    head = "<tr><th>Model</th><th>Requests</th><th>Prompt tokens</th><th>Completion tokens</th><th>Cost</th></tr>"
    body = "".join(f"<tr><td>{_esc(m.model)}</td><td class=\"n\">{_int(m.requests)}</td>"
                   f"<td class=\"n\">{_int(m.prompt_tokens)}</td><td class=\"n\">{_int(m.completion_tokens)}</td>"
                   f"<td class=\"n\">{_esc(_usd(m.cost_usd))}</td></tr>" for m in s.models)
    return f'<table class="models">{head}{body}</table>'


def render_html(summary: RunSummary, *, title: str) -> str:
    """The report as one self-contained HTML page (no script, nothing fetched).

    Args:
        summary: from :func:`build_run_summary`.
        title: the page's heading and ``<title>``.

    Returns:
        The HTML text. Each plot is an ``<svg class="plot" data-plot="...">``
        (``throughput``, ``latency``, ``errors``, ``models``, ``groups``).
    """
    s = summary
    notes = "".join(f"<li>{_esc(n)}</li>" for n in s.notes)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="meta">Ledger {_esc(s.ledger_path)} · run {s.run} · generated {_esc(_when(time.time()))}</p>',
        _summary_table(s),
        f'<ul class="notes">{notes}</ul>' if notes else "",
        "<h2>Throughput</h2>", _plot_throughput(s),
        "<h2>Latency</h2>", _plot_latency(s),
        "<h2>Errors</h2>", _plot_errors(s),
        "<h2>Models</h2>", _plot_models(s), _models_table(s),
        "<h2>Rows by group</h2>", _plot_groups(s),
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def write_html_report(ledger_path: Path, out_path: Path, *, run: int | None = None, group_by: str | None = None,
                      title: str | None = None) -> Path:
    """Build the summary of ``run`` and write it as HTML to ``out_path``, atomically.

    Args:
        ledger_path: the job's ledger.
        out_path: the HTML file to write; its folder is created if missing.
        run: the run id; None for the latest run.
        group_by: a stored input column to count row statuses by, or None.
        title: the page title; default ``llmap report: <job> run <n>``.

    Returns:
        ``out_path``.

    Raises:
        SpecError: see :func:`build_run_summary`.
        OSError: the file cannot be written.
    """
    summary = build_run_summary(Path(ledger_path), run, group_by)
    job = Path(ledger_path).name.removesuffix(".sqlite").removesuffix(".ledger")
    page = render_html(summary, title=title or f"llmap report: {job} run {summary.run}")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out
