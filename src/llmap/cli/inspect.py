"""``llmap status``, ``export``, ``report`` and ``estimate``: read a job's ledger and input, never a model."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmap.cli.common import JobFile, err, fail, load_job, out, paragraphs
from llmap.errors import DiskFull, SpecError
from llmap.io.sinks import export_job
from llmap.observe.report import build_run_summary, model_report, path_split
from llmap.observe.status import job_status
from llmap.store.ledger import STATUSES

__all__ = ["estimate", "export", "report", "status"]


@paragraphs
def status(
    job_file: JobFile,
    by: Annotated[str | None, typer.Option(
        "--by", help="Also count per value of this input column, e.g. state.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show how many rows are pending, done, failed and skipped, read from the job's ledger, and the
    structured-output dialect each model used."""
    job = load_job(job_file)
    try:
        rep = job_status(job.spec, by)
    except SpecError as exc:
        raise fail(exc) from None
    if as_json:
        quota = job.spec.input.per_group
        groups = [{"group": g, **c, **({"quota_met": c["done"] >= quota.n} if quota and by == quota.column else {})}
                  for g, c in rep.groups.items()]
        sys.stdout.write(json.dumps({"job": job.spec.name, "total": rep.total, "by": by, "groups": groups,
                                     "structured": rep.structured, "batches": rep.batches,
                                     "hedged": {"copies": rep.hedged[0], "cost_usd": rep.hedged[1]}},
                                    default=str) + "\n")
        return
    quota = job.spec.input.per_group
    show_quota = quota is not None and by == quota.column
    table = Table(title=f"{job.spec.name}: {sum(rep.total.values()):,} rows", title_justify="left")
    table.add_column(by or "", style="bold")
    for s in STATUSES:
        table.add_column(s, justify="right")
    table.add_column("total", justify="right")
    if show_quota:
        table.add_column(f"quota (n = {quota.n})", justify="right")
    quota_cell = [""] if show_quota else []
    table.add_row("all", *[f"{rep.total[s]:,}" for s in STATUSES], f"{sum(rep.total.values()):,}", *quota_cell,
                  end_section=bool(by))
    for g, counts in rep.groups.items():
        cells = [f"{counts[s]:,}" for s in STATUSES] + [f"{sum(counts.values()):,}"]
        if show_quota:
            met = counts["done"] >= quota.n
            cells.append(f"{min(counts['done'], quota.n)}/{quota.n}" + (" met" if met else ""))
        table.add_row("(null)" if g is None else str(g), *cells)
    console = Console(width=max(100, out.width) if not sys.stdout.isatty() else None)
    console.print(table)
    for model, how in rep.structured.items():
        console.print(f"structured output: {model}: {how}", highlight=False, markup=False)
    if rep.hedged[0]:
        console.print(f"hedged copies in the latest run: {rep.hedged[0]:,} whose answer was dropped "
                      f"(est. ${rep.hedged[1]:,.4f}, in its cost)", highlight=False, markup=False)
    if rep.batches:
        console.print(_batch_table(rep.batches))


def _batch_table(batches: list[dict]) -> Table:
    """The job's latest batches: ids, the provider's status as last polled, requests, rows submitted and done."""
    t = Table(title="batches (newest first; status as last polled)", title_justify="left")
    for col in ("batch", "provider id", "state", "status", "requests", "rows", "done", "polled"):
        t.add_column(col, justify="right" if col in ("requests", "rows", "done") else "left")
    now = time.time()
    for b in batches:
        seen = f"{now - b['seen_at']:,.0f} s ago" if b.get("seen_at") else "-"
        status = (b.get("status") or "-") + (f" (cancel: {b['cancel']})" if b.get("cancel") else "")
        t.add_row(str(b["batch"]), b.get("provider_id") or "-", b["state"], status, f"{b['requests']:,}",
                  f"{b['rows']:,}", f"{b['done']:,}", seen)
    return t


def export(
    job_file: JobFile,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write here instead of \\[output] path (.parquet, .jsonl or .csv).")] = None,
) -> None:
    """Write the output file again from the ledger (no model calls)."""
    job = load_job(job_file)
    try:
        path, n = export_job(job.spec, output)
    except SpecError as exc:
        raise fail(exc) from None
    except DiskFull as exc:
        err.print(f"[bold red]llmap: error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    out.print(f"output: {path} ({n:,} rows)", highlight=False, soft_wrap=True)


@paragraphs
def report(
    job_file: JobFile,
    html: Annotated[Path | None, typer.Option(
        "--html", show_default=False,
        help="Also write one self-contained HTML file with plots (throughput, latency, errors, "
             "tokens and cost by model, rows by group); it opens offline.")] = None,
    run_no: Annotated[int | None, typer.Option("--run", min=1, show_default=False,
                                               help="Which run to report (default: the latest).")] = None,
    by: Annotated[str | None, typer.Option("--by", show_default=False,
                                           help="Group the HTML's row-status plot by this input column.")] = None,
) -> None:
    """Show how many rows each model settled (a cascade's split), from the cache or not, what it cost, and the
    structured-output dialect each model used.

    Then a summary of one run (the latest, or --run N): rows, requests, 429s, retries, tokens, cost, wall time.
    With --html, the same as a file with plots.
    """
    job = load_job(job_file)
    try:
        lines, counts = model_report(job.spec)
        from llmap.observe.html import write_html_report

        summary = build_run_summary(job.spec.ledger_path, run_no, by)
        if html is not None:
            write_html_report(job.spec.ledger_path, html, run=run_no, group_by=by, title=f"llmap: {job.spec.name}")
    except SpecError as exc:
        raise fail(exc) from None
    table = Table(title=f"{job.spec.name}: rows settled per model", title_justify="left")
    for col in ("model", "settled", "from cache", "stale", "escalated", "prompt tokens", "cache reads",
                "completion tokens", "cost (USD)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for ln in lines:
        table.add_row(ln.model, f"{ln.settled:,}", f"{ln.from_cache:,}", f"{ln.stale:,}", f"{ln.escalated:,}",
                      f"{ln.prompt_tokens:,}", f"{ln.cache_read_tokens:,}", f"{ln.completion_tokens:,}",
                      f"{ln.cost_usd:,.4f}")
    console = Console(width=max(120, out.width) if not sys.stdout.isatty() else None)
    console.print(table)
    for ln in lines:
        if ln.structured:
            console.print(f"structured output: {ln.model}: {ln.structured}", highlight=False, markup=False)
    out.print(", ".join(f"{n:,} {s}" for s, n in counts.items()), highlight=False)
    console.print(_run_table(summary))
    from llmap.operators.runner import operator_report

    for line in operator_report(job.spec, run_no):  # cluster's KPIs and families, resolve's merges, ...
        out.print(line, highlight=False, markup=False, soft_wrap=True)
    if html is not None:
        out.print(f"html report: {html}", highlight=False, soft_wrap=True)


def _run_table(sm) -> Table:
    t = Table(title=f"run {sm.run}: {sm.exit_reason or 'not ended'}", title_justify="left")
    t.add_column("", style="bold")
    t.add_column("", justify="right")
    rows = [("rows done / failed / skipped", f"{sm.done:,} / {sm.failed:,} / {sm.skipped:,}"),
            ("answered from cache", f"{sm.cached:,}"),
            ("requests (429s, retries)", f"{sm.requests:,} ({sm.rate_limited:,}, {sm.retries:,})"),
            ("hedged copies (est. cost, in cost)", f"{sm.hedged:,} (${sm.hedge_cost_usd:,.4f})"),
            ("tokens (prompt + completion)", f"{sm.prompt_tokens:,} + {sm.completion_tokens:,}"),
            ("prompt-cache reads / writes", f"{sm.cache_read_tokens:,} / {sm.cache_write_tokens:,}"),
            ("cost", f"${sm.cost_usd:,.4f}" if sm.cost_usd is not None else "-"),
            *([("requests (cost) by path", path_split(sm))] if sm.by_path else []),
            ("wall time", f"{sm.wall_s:,.1f} s" if sm.wall_s is not None else "-"),
            ("rows/s", f"{sm.rows_per_s:,.1f}" if sm.rows_per_s is not None else "-")]
    for k, v in rows:
        t.add_row(k, v)
    return t


@paragraphs
def estimate(
    job_file: JobFile,
    limit: Annotated[int | None, typer.Option("--limit", min=1, show_default=False,
                                              help="Estimate for at most N rows (as run --limit).")] = None,
) -> None:
    """Estimate a run before paying for it: rows to request, tokens, cost per model, time.

    Calls no model. Rows already done, answered by the response cache, or duplicates of another row are left
    out. Completion tokens come from past runs when the ledger has them, else from max_tokens; the table says
    which.
    """
    from llmap.observe.estimate.rows import estimate as run_estimate
    from llmap.observe.estimate.table import format_estimate

    job = load_job(job_file)
    console = Console(width=max(110, out.width) if not sys.stdout.isatty() else None)
    if job.spec.kind in ("cluster", "resolve", "reduce"):  # the operator's own steps (filter is map's estimate)
        from llmap.operators.estimate import estimate_operator, format_operator_estimate

        try:
            console.print(format_operator_estimate(estimate_operator(job.spec, limit=limit)))
        except SpecError as exc:
            raise fail(exc) from None
        return
    try:
        est = run_estimate(job.spec, limit=limit)
    except SpecError as exc:
        raise fail(exc) from None
    console.print(format_estimate(est))
