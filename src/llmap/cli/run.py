"""``llmap run``: run (or continue) a job."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from llmap.cli.common import JobFile, err, fail, load_job, out, paragraphs
from llmap.errors import DiskFull, LedgerLocked, RunInterrupted, SpecError
from llmap.observe.logs import JsonLog
from llmap.observe.progress import MessagesOnly, RichProgress
from llmap.store.fingerprint import unchanged_since_complete

__all__ = ["run"]


@paragraphs
def run(
    job_file: JobFile,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, help="Process at most N rows (overrides \\[input] limit).")] = None,
    fresh: Annotated[bool, typer.Option(
        "--fresh", help="Forget earlier results in the ledger and start over.")] = False,
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
    executor: Annotated[str, typer.Option(
        "--executor", help="local: this process sends every request. ray: this process keeps the ledger and the "
        "cache, and Ray workers send the requests under one rate limit for the whole cluster "
        "(pip install 'llmap[ray]').")] = "local",
    ray_address: Annotated[str, typer.Option(
        "--ray-address", help="With --executor ray: the Ray cluster to join; auto joins a running one, else "
        "starts one on this machine.")] = "auto",
    workers: Annotated[int | None, typer.Option(
        "--workers", min=1, show_default=False,
        help="With --executor ray: how many Ray workers send requests (default: one per CPU of the cluster).")] = None,
    wait_lock: Annotated[bool, typer.Option(
        "--wait-lock", help="If another run of this job holds its ledger, wait for it to finish, then run "
        "(default: refuse at once with exit code 75).")] = False,
    ui: Annotated[bool, typer.Option(
        "--ui", help="Serve the job's live page (llmap ui) while the run lasts; its URL, with its token, is "
        "printed when dispatch starts.")] = False,
    ui_port: Annotated[int, typer.Option(
        "--ui-port", min=0, max=65535, help="With --ui: the page's port on 127.0.0.1 (0 picks a free one).")] = 0,
    detach: Annotated[bool, typer.Option(
        "--detach", help="With \\[model] batch = true: submit the batches, print their ids and exit 0 without "
        "waiting; run again later (without --detach) to collect them.")] = False,
) -> None:
    """Run a job: read the input, ask the model once per row, write the output.

    Every result is committed to the job's ledger before it counts, so Ctrl-C or a crash loses nothing: run the
    same command again and it continues where it stopped, sending requests only for rows not yet done.

    One run of a job at a time: a run holds the job's ledger lock for its whole life, and a second run of the
    same job is refused (or waits, with --wait-lock). status, export, report and estimate work during a run.

    With \\[model] batch = true the first model's requests go through its provider's batch API (half price,
    within 24 hours): the run submits, then polls every \\[batch] poll_s seconds. Ctrl-C or a crash leaves the
    batches running and recorded in the ledger: the next run collects them and submits none of their rows again.

    Exit codes: 0 all rows done, skipped or given the fallback, 1 some rows failed or a budget cap or an error
    every row would hit stopped the run, 2 bad job or input (nothing sent), 75 another run of the job holds its
    ledger (nothing sent), 130 interrupted.
    """
    job = load_job(job_file)
    if if_changed and not fresh:
        unchanged = unchanged_since_complete(job.spec)
        if unchanged:
            err.print(f"llmap: {unchanged}", highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(0)
    progress = MessagesOnly(err) if quiet or not err.is_terminal else RichProgress(err)
    if log_prompts and log_json is None:
        raise fail(SpecError("--log-prompts needs --log-json PATH: prompts go to the structured log only"))
    log = None
    stop_metrics = stop_ui = None

    def on_start(stats, tally, lanes) -> None:
        nonlocal stop_metrics, stop_ui
        if ui and stop_ui is None:
            from llmap.cli.ui import start_beside_run

            url, stop_ui = start_beside_run(job.spec, ui_port, stats, tally, lanes)
            out.print(f"llmap ui: {url}", highlight=False, soft_wrap=True)
        if metrics_port is None:
            return
        from llmap.observe.metrics import RunMetrics, serve_metrics

        metrics = RunMetrics(job=job.spec.name, stats_fn=lambda: stats, tally_fn=lambda: tally,
                             lanes_fn=lambda: lanes)
        port, stop_metrics = serve_metrics(metrics, metrics_port)
        err.print(f"llmap: metrics on http://127.0.0.1:{port}/metrics", highlight=False, soft_wrap=True)

    try:
        if log_json is not None:
            log = JsonLog(log_json, log_prompts=log_prompts)
        result = job.run(limit=limit, fresh=fresh, progress=progress, log=log, on_start=on_start,
                         wait_lock=wait_lock, detach=detach, executor=executor, workers=workers,
                         ray_address=ray_address)
    except SpecError as exc:
        raise fail(exc) from None
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
        if stop_ui is not None:
            stop_ui()
    c = result.counts
    tokens = result.prompt_tokens + result.completion_tokens
    rate = (c["done"] + c["failed"] + c["fallback"]) / result.elapsed_s if result.elapsed_s > 0 else 0.0
    fallback = f", {c['fallback']:,} fallback" if c["fallback"] else ""
    cost = f", ${result.cost_usd:,.4f}" if result.cost_usd else ""
    if result.cache_read_tokens:
        cost = f" ({result.cache_read_tokens:,} read from the prompt cache){cost}"
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
    if result.batches:
        err.print(f"llmap: {len(result.batches)} batch{'es' if len(result.batches) != 1 else ''} running at the "
                  f"provider; run the same command again to collect them (llmap status {job_file} shows them)",
                  highlight=False, soft_wrap=True)
        for bid in result.batches:
            out.print(f"batch: {bid}", highlight=False, soft_wrap=True)
    if result.output_path is not None:
        out.print(f"output: {result.output_path}", highlight=False, soft_wrap=True)
    raise typer.Exit(result.exit_code)
