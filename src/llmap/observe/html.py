"""One run of a job as a self-contained HTML page: a summary table and five plots.

``llmap report --html PATH`` writes a single file that opens offline: no
script, no stylesheet or font from elsewhere, every plot an inline ``<svg>``
drawn with :mod:`llmap.observe.svg`. The figures are a
:class:`~llmap.observe.report.RunSummary` read from the job's ledger
(read-only): throughput, latency and errors over time, tokens and cost per
model, and rows per status by a group column.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

from llmap.io.sinks import umask
from llmap.observe import svg
from llmap.observe.report import TOP_GROUPS, RunSummary, build_run_summary, path_split

__all__ = ["render_html", "write_html_report"]


def _plot_throughput(s: RunSummary) -> str:
    p = svg.Plot("throughput", "Throughput: rows answered per second")
    if not any(s.throughput):
        return p.no_data()
    w = s.throughput_bucket_s
    span = s.span_s or w
    top, ticks = svg.nice(max(s.throughput))
    p.y_axis(top, ticks, "rows / s")
    svg.time_axis(p, span)

    def x(t: float) -> float:
        return p.x0 + t / span * (p.x1 - p.x0)

    d = [f"M{svg.num(x(0))},{svg.num(p.y(s.throughput[0], top))}"]
    for i, v in enumerate(s.throughput):
        if i:
            d.append(f"V{svg.num(p.y(v, top))}")
        d.append(f"H{svg.num(x(min((i + 1) * w, span)))}")
    line = "".join(d)
    area = svg.attributes(class_="mark area", d=f"{line}V{svg.num(p.y1)}H{svg.num(x(0))}Z", fill="#1f77b4",
                          fill_opacity="0.15")
    p.parts.append(f"<path{area}/>")
    mean = f"mean {sum(s.throughput) / len(s.throughput):.3g} rows/s over {len(s.throughput)} buckets of {w:g} s"
    p.parts.append(f'<path{svg.attributes(class_="mark line", d=line, fill="none", stroke="#1f77b4", stroke_width=2)}>'
                   f"<title>{svg.esc(mean)}</title></path>")
    return p.svg()


def _plot_latency(s: RunSummary) -> str:
    q = s.latency_quantiles
    sub = f" (p50 {svg.latency(q['p50'])}, p90 {svg.latency(q['p90'])}, p99 {svg.latency(q['p99'])})" if q else ""
    p = svg.Plot("latency", "Latency of answered requests" + sub)
    if not s.latency_bins:
        return p.no_data()
    top, ticks = svg.nice(max(c for _, _, c in s.latency_bins))
    p.y_axis(top, ticks, "requests")
    n = len(s.latency_bins)
    bw = (p.x1 - p.x0) / n
    for i, (lo, hi, c) in enumerate(s.latency_bins):
        if c:
            y = p.y(c, top)
            p.parts.append(svg.rect(p.x0 + i * bw + 1, y, bw - 2, p.y1 - y, "#1f77b4",
                                    f"{svg.latency(lo)} – {svg.latency(hi)}: {c} requests"))
    step = max(1, n // 5)
    edges = [(i, s.latency_bins[i][0]) for i in range(0, n, step)] + [(n, s.latency_bins[-1][1])]
    p.x_axis([(p.x0 + i * bw, svg.latency(v)) for i, v in edges], "latency (log scale)")
    return p.svg()


def _plot_errors(s: RunSummary) -> str:
    p = svg.Plot("errors", f"Errors by class over time ({svg.count(s.errors_total)} of "
                           f"{svg.count(s.logged_requests)} requests)")
    if not s.errors_total:
        return p.no_data("no data: no errors")
    series = list(s.errors.items())
    colors = {k: svg.PALETTE[i % len(svg.PALETTE)] for i, (k, _) in enumerate(series)}
    n = len(series[0][1])
    totals = [sum(v[i] for _, v in series) for i in range(n)]
    top, ticks = svg.nice(max(totals))
    p.y_axis(top, ticks, "requests")
    w = s.error_bucket_s
    svg.time_axis(p, n * w)
    bw = (p.x1 - p.x0) / n
    gap = 1 if bw > 4 else 0
    for i in range(n):
        base = 0
        for k, v in series:
            if v[i]:
                ya, yb = p.y(base + v[i], top), p.y(base, top)
                p.parts.append(svg.rect(p.x0 + i * bw + gap, ya, bw - 2 * gap, yb - ya, colors[k],
                                     f"{k}: {v[i]} at {i * w:g}–{(i + 1) * w:g} s"))
                base += v[i]
    p.legend([(colors[k], f"{k} ({sum(v)})") for k, v in series])
    return p.svg()


def _plot_models(s: RunSummary) -> str:
    p = svg.Plot("models", "Tokens and cost by model")
    if not s.models or not any(m.prompt_tokens or m.completion_tokens for m in s.models):
        return p.no_data()
    top, ticks = svg.nice(max(max(m.prompt_tokens, m.completion_tokens) for m in s.models) * 1.1)
    p.y_axis(top, ticks, "tokens")
    gw = (p.x1 - p.x0) / len(s.models)
    bw = min(60.0, gw * 0.35)
    labels = []
    for i, m in enumerate(s.models):
        cx = p.x0 + (i + 0.5) * gw
        for j, (v, color, what) in enumerate(((m.prompt_tokens, "#1f77b4", "prompt"),
                                              (m.completion_tokens, "#ff7f0e", "completion"))):
            y = p.y(v, top)
            p.parts.append(svg.rect(cx - bw + j * bw, y, bw - 2, p.y1 - y, color,
                                    f"{m.model}: {svg.count(v)} {what} tokens"))
        p.parts.append(svg.text(cx, p.y(max(m.prompt_tokens, m.completion_tokens), top) - 6, svg.usd(m.cost_usd),
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
    p = svg.Plot("groups", title, height=max(180, 60 + 48 + 24 * len(shown)), left=170)
    if not shown:
        return p.no_data("no data: pass --by COLUMN (a column the ledger stores: the key, a template variable "
                         "or a keep column)" if not s.group_by else "no data")
    top, ticks = svg.nice(max(sum(c.values()) for _, c in shown))
    for v in ticks:
        x = p.x0 + v / top * (p.x1 - p.x0)
        p.parts.append(f'<line{svg.attributes(class_="grid", x1=svg.num(x), x2=svg.num(x), y1=p.y0, y2=p.y1)}/>')
    p.x_axis([(p.x0 + v / top * (p.x1 - p.x0), svg.si(v)) for v in ticks], "rows")
    rh = (p.y1 - p.y0) / len(shown)
    for i, (g, counts) in enumerate(shown):
        y = p.y0 + i * rh
        label = "(null)" if g is None else str(g)
        p.parts.append(svg.text(p.x0 - 6, y + rh / 2 + 4, label if len(label) <= 24 else label[:23] + "…",
                             text_anchor="end"))
        x = float(p.x0)
        for st in svg.STACK:
            if counts.get(st):
                w = counts[st] / top * (p.x1 - p.x0)
                p.parts.append(svg.rect(x, y + 3, w, rh - 6, svg.STATUS_COLORS[st], f"{label}: {counts[st]} {st}"))
                x += w
    present = [st for st in svg.STACK if any(c.get(st) for _, c in shown)]
    p.legend([(svg.STATUS_COLORS[st], st) for st in present])
    return p.svg()


# -- the page -------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: #222;
       background: #f6f7f9; margin: 0; padding: 24px; }
main { max-width: 800px; margin: 0 auto; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 28px 0 8px; }
p.meta { color: #666; margin: 0 0 16px; font-size: 13px; }
table { border-collapse: collapse; background: #fff; font-size: 13px; margin: 6px 0; }
h3 { font-size: 14px; margin: 18px 0 4px; }
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
        ("Started", svg.when(s.started_at)), ("Ended", svg.when(s.ended_at)),
        ("Wall time", svg.duration(s.wall_s)), ("Rows / s", "?" if s.rows_per_s is None else f"{s.rows_per_s:,.2f}"),
        *([("Settled in this run", " / ".join(f"{svg.count(n)} {k}" for k, n in s.settled.items()))]
          if s.settled is not None else []),
        ("Rows", svg.count(s.rows_total)), ("Done", svg.count(s.done)),
        ("Failed", svg.count(s.failed)), ("Fallback", svg.count(s.fallback)),
        ("Skipped", svg.count(s.skipped)), ("Pending", svg.count(s.pending)),
        ("Cached", svg.count(s.cached)), ("Requests", svg.count(s.requests)),
        ("Errors (non-200)", f"{svg.count(s.errors_total)} ({s.error_rate:.1%})"), ("429s", svg.count(s.rate_limited)),
        ("Retries", svg.count(s.retries)),
        ("Hedged copies (est. cost)", f"{svg.count(s.hedged)} ({svg.usd(s.hedge_cost_usd)})"),
        ("Cost", svg.usd(s.cost_usd)),
        ("Prompt tokens", svg.count(s.prompt_tokens)), ("Completion tokens", svg.count(s.completion_tokens)),
        ("Prompt-cache reads", svg.count(s.cache_read_tokens)),
        ("Prompt-cache writes", svg.count(s.cache_write_tokens)),
    ]
    if s.by_path:  # batch API requests (at price_batch_factor) beside real-time ones
        items.append(("Requests (cost) by path", path_split(s)))
    rows = []
    for i in range(0, len(items), 2):
        cells = "".join(f"<th>{svg.esc(k)}</th><td class=\"n\">{svg.esc(v)}</td>" for k, v in items[i:i + 2])
        rows.append(f"<tr>{cells}</tr>")
    return f'<table class="summary">{"".join(rows)}</table>'


def _models_table(s: RunSummary) -> str:
    if not s.models:
        return ""
    head = ("<tr><th>Model</th><th>Requests</th><th>Prompt tokens</th><th>of them cache reads</th>"
            "<th>Completion tokens</th><th>Cost</th></tr>")
    body = "".join(f"<tr><td>{svg.esc(m.model)}</td><td class=\"n\">{svg.count(m.requests)}</td>"
                   f"<td class=\"n\">{svg.count(m.prompt_tokens)}</td>"
                   f"<td class=\"n\">{svg.count(m.cache_read_tokens)}</td>"
                   f"<td class=\"n\">{svg.count(m.completion_tokens)}</td>"
                   f"<td class=\"n\">{svg.esc(svg.usd(m.cost_usd))}</td></tr>" for m in s.models)
    return f'<table class="models">{head}{body}</table>'


def render_html(summary: RunSummary, *, title: str, quality_html: str | None = None,
                cascade_html: str | None = None) -> str:
    """The report as one self-contained HTML page (no script, nothing fetched).

    Args:
        summary: from :func:`build_run_summary`.
        title: the page's heading and ``<title>``.
        quality_html: the evaluation section (:func:`llmap.observe.quality.eval_html`), or None when the job
            has no labels.
        cascade_html: the guaranteed cascade's section (:func:`llmap.observe.cascade.cascade_html`), or None.

    Returns:
        The HTML text. Each plot is an ``<svg class="plot" data-plot="...">``
        (``throughput``, ``latency``, ``errors``, ``models``, ``groups``).
    """
    s = summary
    notes = "".join(f"<li>{svg.esc(n)}</li>" for n in s.notes)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{svg.esc(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{svg.esc(title)}</h1>",
        f'<p class="meta">Ledger {svg.esc(s.ledger_path)} · run {s.run} · '
        f"generated {svg.esc(svg.when(time.time()))}</p>",
        _summary_table(s),
        f'<ul class="notes">{notes}</ul>' if notes else "",
        "<h2>Throughput</h2>", _plot_throughput(s),
        "<h2>Latency</h2>", _plot_latency(s),
        "<h2>Errors</h2>", _plot_errors(s),
        "<h2>Models</h2>", _plot_models(s), _models_table(s),
        f"<h2>Rows by group{' (--by ' + svg.esc(s.group_by) + ')' if s.group_by else ''}</h2>", _plot_groups(s),
        *(['<h2 id="cascade">Cascade with a guarantee</h2>', cascade_html] if cascade_html else []),
        *(['<h2 id="eval">Is it right? (labels against answers)</h2>', quality_html] if quality_html else []),
        "</main></body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def write_html_report(ledger_path: Path, out_path: Path, *, run: int | None = None, group_by: str | None = None,
                      title: str | None = None, quality_html: str | None = None,
                      cascade_html: str | None = None) -> Path:
    """Build the summary of ``run`` and write it as HTML to ``out_path``, atomically.

    Args:
        ledger_path: the job's ledger.
        out_path: the HTML file to write; its folder is created if missing.
        run: the run id; None for the latest run.
        group_by: a stored input column to count row statuses by, or None.
        title: the page title; default ``llmap report: <job> run <n>``.
        quality_html: the evaluation section, or None.
        cascade_html: the guaranteed cascade's section, or None.

    Returns:
        ``out_path``.

    Raises:
        SpecError: see :func:`build_run_summary`.
        OSError: the file cannot be written.
    """
    summary = build_run_summary(Path(ledger_path), run, group_by)
    job = Path(ledger_path).name.removesuffix(".sqlite").removesuffix(".ledger")
    page = render_html(summary, title=title or f"llmap report: {job} run {summary.run}", quality_html=quality_html,
                       cascade_html=cascade_html)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out
