"""``llmap status``, ``export``, ``report`` and ``estimate``: read a job's ledger and input, never a model."""

from __future__ import annotations

import json
import os
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
from llmap.observe.cascade import cascade_html, cascade_lines, cascade_summary
from llmap.observe.report import build_run_summary, model_report, path_split
from llmap.observe.status import failed_rows, job_status
from llmap.store.ledger import STATUSES

__all__ = ["estimate", "export", "report", "status"]


@paragraphs
def status(
    job_file: JobFile,
    by: Annotated[str | None, typer.Option("--by", metavar="COLUMN", show_default=False,
                                           help="Also count per value of this input column, e.g. state.")] = None,
    failed: Annotated[bool, typer.Option("--failed", metavar="", help="List the failed rows with their errors "
                                                                     "(key, model, error), in input order.")] = False,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show how many rows are pending, done, failed and skipped, read from the job's ledger, the
    structured-output dialect each model used, a \\[cascade]'s decision and open provider batches.

    With --failed, list each failed row and its error instead: the rows a rerun will retry.
    """
    job = load_job(job_file)
    if failed:
        _failed(job.spec, as_json)
        return
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
                                     "hedged": {"copies": rep.hedged[0], "cost_usd": rep.hedged[1]},
                                     "cascade": rep.cascade.as_dict() if rep.cascade is not None else None},
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
    for line in cascade_lines(rep.cascade) if rep.cascade is not None else ():
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    if rep.total.get("failed"):
        console.print(f"see the failed rows and their errors with: llmap status {job_file} --failed",
                      highlight=False, markup=False, soft_wrap=True)


def _failed(spec, as_json: bool) -> None:
    """``llmap status --failed``: each failed row of the latest run, its model and its error."""
    try:
        rows, total = failed_rows(spec)
    except SpecError as exc:
        raise fail(exc) from None
    if as_json:
        sys.stdout.write(json.dumps({"job": spec.name, "failed": total, "rows": [
            {"key": r.key, "model": r.model, "attempts": r.attempts, "error": r.error, "data": r.data}
            for r in rows]}, default=str) + "\n")
        return
    console = Console(width=max(120, out.width) if not sys.stdout.isatty() else None)
    if not rows:
        console.print(f"{spec.name}: no failed rows", highlight=False, markup=False)
        return
    table = Table(title=f"{spec.name}: {total:,} failed row{'s' if total != 1 else ''} (a rerun retries "
                        f"{'them' if total != 1 else 'it'})", title_justify="left")
    table.add_column("key", no_wrap=True)
    table.add_column("model", no_wrap=True)
    table.add_column("attempts", justify="right")
    table.add_column("error", overflow="fold")
    for r in rows:
        table.add_row(escape(r.key), escape(r.model or "-"), f"{r.attempts:,}", escape(r.error or "-"))
    console.print(table)


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
    out.print(f"output: {os.path.normpath(path)} ({n:,} rows)", highlight=False, soft_wrap=True)


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
    """Show how many rows each model settled (a cascade's split), from the cache or not, what it cost, the
    structured-output dialect each model used, and how many rows have a _confidence (and why the others have
    none).

    Then a summary of one run (the latest, or --run N): rows, requests, 429s, retries, tokens, cost, wall time;
    and, when the job has labels, the evaluation (as `llmap eval`). With --html, the same as a file with plots.
    """
    job = load_job(job_file)
    try:
        lines, counts = model_report(job.spec)
        from llmap.observe.html import write_html_report
        from llmap.observe.quality import confidence_lines, eval_html, eval_tables
        from llmap.quality.eval import evaluate

        summary = build_run_summary(job.spec.ledger_path, run_no, by)
        confidence = confidence_lines(job.spec)
        cascade = _cascade(job.spec)
        try:
            evaluation = evaluate(job.spec)
        except SpecError:  # no labels: no evaluation section
            evaluation = None
        if html is not None:
            write_html_report(job.spec.ledger_path, html, run=run_no, group_by=by, title=f"llmap: {job.spec.name}",
                              quality_html=eval_html(evaluation) if evaluation is not None else None,
                              cascade_html=cascade_html(cascade) if cascade is not None else None)
    except SpecError as exc:
        raise fail(exc) from None
    console = Console(width=max(120, out.width) if not sys.stdout.isatty() else None)
    console.print(model_table(lines, title=f"{job.spec.name}: rows settled per model", width=console.width))
    for ln in lines:
        if ln.structured:
            console.print(f"structured output: {ln.model}: {ln.structured}", highlight=False, markup=False)
    out.print(", ".join(f"{n:,} {s}" for s, n in counts.items()), highlight=False)
    for c in confidence:
        console.print(f"_confidence: {c.model}: {c.with_confidence:,} of {c.done:,} done rows"
                      + (f"; none for the others: {c.why}" if c.why else ""), highlight=False, markup=False,
                      soft_wrap=True)
    for line in cascade_lines(cascade) if cascade is not None else ():
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    console.print(_run_table(summary))
    if evaluation is not None:
        console.print(eval_tables(evaluation))
    from llmap.operators.runner import operator_report

    for line in operator_report(job.spec, run_no):  # cluster's KPIs and families, resolve's merges, ...
        out.print(line, highlight=False, markup=False, soft_wrap=True)
    if html is not None:
        out.print(f"html report: {os.path.normpath(html)}", highlight=False, soft_wrap=True)


def _cascade(spec):
    """The job's guaranteed cascade (:func:`~llmap.observe.cascade.cascade_summary`), or None."""
    from llmap.store.ledger import open_for_reading

    ledger, plan = open_for_reading(spec.ledger_path, job=spec.name)
    try:
        return cascade_summary(ledger, plan)
    finally:
        ledger.close()


_MODEL_COLUMNS = ("settled", "from cache", "stale", "escalated", "prompt tokens", "cache reads", "completion tokens",
                  "cost (USD)")
_TWO_LINE = {"from cache": "from\ncache", "prompt tokens": "prompt\ntokens", "cache reads": "cache\nreads",
             "completion tokens": "completion\ntokens", "cost (USD)": "cost\n(USD)"}


def model_table(lines, *, title: str, width: int | None = None) -> Table:
    """``llmap report``'s rows per model, one model per row; when that would not fit ``width`` columns, one model
    per column. Nothing is cut: not a model's name (``openai:gpt-4o`` beside ``openai:gpt-4o-mini``), not a figure."""
    cells = [[f"{ln.settled:,}", f"{ln.from_cache:,}", f"{ln.stale:,}", f"{ln.escalated:,}", f"{ln.prompt_tokens:,}",
              f"{ln.cache_read_tokens:,}", f"{ln.completion_tokens:,}", f"{ln.cost_usd:,.4f}"] for ln in lines]
    names = [ln.model for ln in lines]
    widths = [max([len(n) for n in names] + [5])]
    widths += [max([max(len(w) for w in _TWO_LINE.get(head, head).splitlines())] + [len(c[i]) for c in cells])
               for i, head in enumerate(_MODEL_COLUMNS)]
    wide = sum(widths) + 3 * len(widths) + 1
    if width is None or wide <= width or not lines:
        table = Table(title=title, title_justify="left")
        table.add_column("model", no_wrap=True, min_width=widths[0])
        for head, w in zip(_MODEL_COLUMNS, widths[1:], strict=True):
            table.add_column(_TWO_LINE.get(head, head), justify="right", no_wrap=True, min_width=w)
        for name, row in zip(names, cells, strict=True):
            table.add_row(escape(name), *row)
        return table
    table = Table(title=title, title_justify="left")
    table.add_column("", style="bold", no_wrap=True)
    for name in names:
        table.add_column(escape(name), justify="right", no_wrap=True, min_width=len(name))
    for i, head in enumerate(_MODEL_COLUMNS):
        table.add_row(head, *(row[i] for row in cells))
    return table


def _run_table(sm) -> Table:
    t = Table(title=f"run {sm.run}: {sm.exit_reason or 'not ended'}", title_justify="left")
    t.add_column("", style="bold")
    t.add_column("", justify="right")
    here = sm.settled
    rows = [*([("settled in this run: done / failed", f"{here['done'] + here['fallback']:,} / {here['failed']:,}")]
              if here is not None else []),
            ("rows of the job: done / failed / skipped", f"{sm.done:,} / {sm.failed:,} / {sm.skipped:,}"),
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
