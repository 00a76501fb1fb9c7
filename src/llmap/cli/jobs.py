"""``llmap run``, ``estimate``, ``status``, ``export`` and ``report``: commands over one job file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmap.engine import Job
from llmap.errors import DiskFull, LedgerLocked, RunInterrupted, SpecError
from llmap.logs import JsonLog
from llmap.report import MessagesOnly, RichProgress
from llmap.status import job_export, job_status, model_report, unchanged_since_complete
from llmap.store.ledger import STATUSES

__all__ = ["estimate", "export", "report", "run", "status"]

err = Console(stderr=True)
out = Console()

JobFile = Annotated[Path, typer.Argument(help="The job spec, a TOML file (see README.md: 'The job spec').",
                                         show_default=False)]


def _fail(exc: SpecError) -> typer.Exit:
    err.print(f"[bold red]llmap: error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def _load(job_file: Path) -> Job:
    try:
        return Job.from_toml(job_file)
    except SpecError as exc:
        raise _fail(exc) from None


def run(
    job_file: JobFile,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Process at most N rows (overrides \\[input] limit).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Forget earlier results in the ledger and start over.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar (warnings still print).")] = False,
    if_changed: Annotated[bool, typer.Option(
        "--if-changed", help="Exit 0 at once, touching nothing, when the input files, the spec and the done rows "
        "are unchanged since the last complete run. For cron.")] = False,
    log_json: Annotated[Path | None, typer.Option(
        "--log-json", help="Append structured events (requests, rows, warnings) as JSON lines to this file.",
        show_default=False)] = None,
    log_prompts: Annotated[bool, typer.Option(
        "--log-prompts", help="With --log-json: also log each row's rendered prompt and answer.")] = False,
    metrics_port: Annotated[int | None, typer.Option(
        "--metrics-port", min=0, max=65535, show_default=False,
        help="Serve Prometheus metrics on http://127.0.0.1:PORT/metrics while the run lasts.")] = None,
    wait_lock: Annotated[bool, typer.Option(
        "--wait-lock", help="If another run of this job holds its ledger, wait for it to finish, then run "
        "(default: refuse at once with exit code 75).")] = False,
) -> None:
    """Run a job: read the input, ask the model once per row, write the output.

    Every result is committed to the job's ledger before it counts, so Ctrl-C or a crash loses nothing: run the same command again and it continues where it stopped, sending requests only for rows not yet done.

    One run of a job at a time: a run holds the job's ledger lock for its whole life, and a second run of the same job is refused (or waits, with --wait-lock). status, export, report and estimate work during a run.

    Exit codes: 0 all rows done, skipped or given the fallback, 1 some rows failed or a budget cap or an error every row would hit stopped the run, 2 bad job or input (nothing sent), 75 another run of the job holds its ledger (nothing sent), 130 interrupted.
    """
    job = _load(job_file)
    if if_changed and not fresh:
        unchanged = unchanged_since_complete(job.spec)
        if unchanged:
            err.print(f"llmap: {unchanged}", highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(0)
    progress = MessagesOnly(err) if quiet or not err.is_terminal else RichProgress(err)
    if log_prompts and log_json is None:
        raise _fail(SpecError("--log-prompts needs --log-json PATH: prompts go to the structured log only"))
    log = None
    stop_metrics = None

    def on_start(stats, tally, lanes) -> None:
        nonlocal stop_metrics
        if metrics_port is None:
            return
        from llmap.metrics import RunMetrics, serve_metrics

        metrics = RunMetrics(job=job.spec.name, stats_fn=lambda: stats, tally_fn=lambda: tally,
                             lanes_fn=lambda: lanes)
        port, stop_metrics = serve_metrics(metrics, metrics_port)
        err.print(f"llmap: metrics on http://127.0.0.1:{port}/metrics", highlight=False, soft_wrap=True)

    try:
        if log_json is not None:
            log = JsonLog(log_json, log_prompts=log_prompts)
        result = job.run(limit=limit, fresh=fresh, progress=progress, log=log, on_start=on_start,
                         wait_lock=wait_lock)
    except SpecError as exc:
        raise _fail(exc) from None
    except (LedgerLocked, DiskFull) as exc:
        err.print(f"[bold red]llmap: error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except (RunInterrupted, KeyboardInterrupt) as exc:
        msg = str(exc) if isinstance(exc, RunInterrupted) else "interrupted; finished rows are kept"
        err.print(f"[yellow]llmap: {escape(msg)}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    finally:
        if log is not None:
            log.close()
        if stop_metrics is not None:
            stop_metrics()
    c = result.counts
    tokens = result.prompt_tokens + result.completion_tokens
    rate = (c["done"] + c["failed"] + c["fallback"]) / result.elapsed_s if result.elapsed_s > 0 else 0.0
    fallback = f", {c['fallback']:,} fallback" if c["fallback"] else ""
    cost = f", ${result.cost_usd:,.4f}" if result.cost_usd else ""
    err.print(
        f"llmap: {c['done']:,} done, {c['failed']:,} failed, {c['skipped']:,} skipped{fallback}, {c['pending']:,} "
        f"pending of {sum(c.values()):,} rows; {result.requests:,} requests ({result.retries:,} retries, "
        f"{result.rate_limited:,} rate-limited), {tokens:,} tokens{cost}, "
        f"{result.elapsed_s:.1f} s ({rate:,.1f} rows/s)",
        highlight=False,
        soft_wrap=True,
    )
    if result.stop_reason:
        err.print(f"[bold red]llmap: run stopped:[/] {escape(result.stop_reason)}", highlight=False, soft_wrap=True)
    if c["failed"]:
        err.print(f"llmap: see failed rows with: llmap status {job_file}; errors are in the output's _error column",
                  highlight=False, soft_wrap=True)
    if result.output_path is not None:
        out.print(f"output: {result.output_path}", highlight=False, soft_wrap=True)
    raise typer.Exit(result.exit_code)


def status(
    job_file: JobFile,
    by: Annotated[str | None, typer.Option("--by", help="Also count per value of this input column, e.g. state.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show how many rows are pending, done, failed and skipped, read from the job's ledger, and the structured-output dialect each model used."""
    job = _load(job_file)
    try:
        rep = job_status(job, by)
    except SpecError as exc:
        raise _fail(exc) from None
    if as_json:
        quota = job.spec.input.per_group
        groups = [{"group": g, **c, **({"quota_met": c["done"] >= quota.n} if quota and by == quota.column else {})}
                  for g, c in rep.groups.items()]
        sys.stdout.write(json.dumps({"job": job.spec.name, "total": rep.total, "by": by, "groups": groups,
                                     "structured": rep.structured}, default=str) + "\n")
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


def export(
    job_file: JobFile,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of \\[output] path (.parquet, .jsonl or .csv).")] = None,
) -> None:
    """Write the output file again from the ledger (no model calls)."""
    job = _load(job_file)
    try:
        path, n = job_export(job, output)
    except SpecError as exc:
        raise _fail(exc) from None
    except DiskFull as exc:
        err.print(f"[bold red]llmap: error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    out.print(f"output: {path} ({n:,} rows)", highlight=False, soft_wrap=True)


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
    """Show how many rows each model settled (a cascade's split), from the cache or not, what it cost, and the structured-output dialect each model used.

    Then a summary of one run (the latest, or --run N): rows, requests, 429s, retries, tokens, cost, wall time. With --html, the same as a file with plots.
    """
    job = _load(job_file)
    try:
        lines, counts = model_report(job)
        from llmap.htmlreport import build_run_summary, write_html_report

        summary = build_run_summary(job.spec.ledger_path, run_no, by)
        if html is not None:
            write_html_report(job.spec.ledger_path, html, run=run_no, group_by=by, title=f"llmap: {job.spec.name}")
    except SpecError as exc:
        raise _fail(exc) from None
    table = Table(title=f"{job.spec.name}: rows settled per model", title_justify="left")
    for col in ("model", "settled", "from cache", "stale", "escalated", "prompt tokens", "completion tokens",
                "cost (USD)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for ln in lines:
        table.add_row(ln.model, f"{ln.settled:,}", f"{ln.from_cache:,}", f"{ln.stale:,}", f"{ln.escalated:,}",
                      f"{ln.prompt_tokens:,}", f"{ln.completion_tokens:,}", f"{ln.cost_usd:,.4f}")
    console = Console(width=max(120, out.width) if not sys.stdout.isatty() else None)
    console.print(table)
    for ln in lines:
        if ln.structured:
            console.print(f"structured output: {ln.model}: {ln.structured}", highlight=False, markup=False)
    out.print(", ".join(f"{n:,} {s}" for s, n in counts.items()), highlight=False)
    console.print(_run_table(summary))
    if html is not None:
        out.print(f"html report: {html}", highlight=False, soft_wrap=True)


def _run_table(sm) -> Table:
    t = Table(title=f"run {sm.run}: {sm.exit_reason or 'not ended'}", title_justify="left")
    t.add_column("", style="bold")
    t.add_column("", justify="right")
    rows = [("rows done / failed / skipped", f"{sm.done:,} / {sm.failed:,} / {sm.skipped:,}"),
            ("answered from cache", f"{sm.cached:,}"),
            ("requests (429s, retries)", f"{sm.requests:,} ({sm.rate_limited:,}, {sm.retries:,})"),
            ("tokens (prompt + completion)", f"{sm.prompt_tokens:,} + {sm.completion_tokens:,}"),
            ("cost", f"${sm.cost_usd:,.4f}" if sm.cost_usd is not None else "-"),
            ("wall time", f"{sm.wall_s:,.1f} s" if sm.wall_s is not None else "-"),
            ("rows/s", f"{sm.rows_per_s:,.1f}" if sm.rows_per_s is not None else "-")]
    for k, v in rows:
        t.add_row(k, v)
    return t


def estimate(
    job_file: JobFile,
    limit: Annotated[int | None, typer.Option("--limit", min=1, show_default=False,
                                              help="Estimate for at most N rows (as run --limit).")] = None,
) -> None:
    """Estimate a run before paying for it: rows to request, tokens, cost per model, time.

    Calls no model. Rows already done, answered by the response cache, or duplicates of another row are left out. Completion tokens come from past runs when the ledger has them, else from max_tokens; the table says which.
    """
    from llmap.estimate import estimate as run_estimate
    from llmap.estimate import format_estimate

    job = _load(job_file)
    try:
        est = run_estimate(job, limit=limit)
    except SpecError as exc:
        raise _fail(exc) from None
    Console(width=max(110, out.width) if not sys.stdout.isatty() else None).print(format_estimate(est))
