"""``llmap run``: run (or continue) a job file, a one-line job over a data file, or a preview of either."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from llmap.cli.common import err, fail, load_job, out, paragraphs, say
from llmap.engine import Job
from llmap.errors import DiskFull, LedgerLocked, RunInterrupted, SpecError
from llmap.observe.logs import JsonLog
from llmap.observe.progress import MessagesOnly, RichProgress
from llmap.operators.runner import summary_line
from llmap.spec import CacheSpec
from llmap.store.fingerprint import unchanged_since_complete

__all__ = ["run"]

_LINE = "One-line run (a data file instead of a job file)"
_PREVIEW = "Preview"
_RAY = "Ray"
#: What a data file ends in (what llmap.io.sources reads); any other path is a job file, as before one-line runs.
_DATA_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl", ".ndjson", ".json")


def _one_line_given(**opts: object) -> list[str]:
    return [f"--{k.replace('_', '-')}" for k, v in opts.items() if v]


def _load(target: Path, *, prompt: str | None, fields: list[str], system: str | None, model: str | None,
          base_url: str | None, api_key_env: str | None, key: list[str], where: str | None, limit: int | None,
          output: Path | None, save: Path | None) -> tuple[Job, str | None]:
    """The job to run: a job file, or the one-line job over a data file; and its job file, if any."""
    given = _one_line_given(prompt=prompt, field=fields, system=system, model=model, base_url=base_url,
                            api_key_env=api_key_env, key=key, where=where, save=save)
    if target.suffix.lower() not in _DATA_SUFFIXES:
        if given:
            raise fail(f"{given[0]} applies to a data file (llmap run DATA --prompt ... --field ...); {target.name} "
                       "is a job file: set it there")
        job = load_job(target)
        if output is not None:
            job = Job(job.spec.model_copy(update={"output": job.spec.output.model_copy(
                update={"path": os.path.abspath(output)})}))
        return job, str(target)
    if prompt is None:
        raise fail(f"{target.name} is a data file, not a job file: to run a prompt over it, add --prompt TEMPLATE "
                   f"and --field NAME=TYPE, or write a job file with: llmap init {target}")
    from llmap.cli.oneline import oneline_job, saved_toml
    from llmap.plan import spec_from_dict

    try:
        line = oneline_job(target, prompt=prompt, fields=fields, system=system, model=model, base_url=base_url,
                           api_key_env=api_key_env, key=key, where=where, limit=limit, output=output)
        spec = spec_from_dict(line.doc, base_dir=line.base_dir, name=line.name, source="llmap run")
    except SpecError as exc:
        raise fail(exc) from None
    if save is not None:
        if save.exists():
            raise fail(f"--save {save}: the file exists; choose another name, or delete it first")
        try:
            save.parent.mkdir(parents=True, exist_ok=True)
            save.write_text(saved_toml(line, save), encoding="utf-8")
        except OSError as exc:
            raise fail(f"--save {save}: cannot write it: {exc.strerror or exc}") from None
        say(f"llmap: saved the job as {os.path.normpath(save)} (llmap run {save} runs it; same ledger when it "
            "is in this folder)")
    return Job(spec), (str(save) if save is not None else None)


@paragraphs
def run(
    target: Annotated[Path, typer.Argument(
        metavar="JOB|DATA", show_default=False,
        help="A job file (.toml; every key: docs/job-spec.md), or a data file (.csv, .parquet, .jsonl) with "
             "--prompt and --field.")],
    prompt: Annotated[str | None, typer.Option(
        "--prompt", "-p", metavar="TEMPLATE", show_default=False, rich_help_panel=_LINE,
        help="The user message for each row, a Jinja2 template over its columns: 'Classify {{ name }}'.")] = None,
    fields: Annotated[list[str] | None, typer.Option(
        "--field", "-f", metavar="NAME=TYPE", show_default=False, rich_help_panel=_LINE,
        help="An answer field; repeat for several. TYPE: string, integer, number, boolean, enum:a,b,c; "
             "a trailing ? allows null (minutes=integer?).")] = None,
    system: Annotated[str | None, typer.Option(
        "--system", metavar="TEMPLATE", show_default=False, rich_help_panel=_LINE,
        help="A system message (a template too).")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", metavar="NAME", show_default=False, rich_help_panel=_LINE,
        help="local (the embedded Gemma 3 270M, the default), a Claude model (claude-haiku-4-5: "
             "ANTHROPIC_API_KEY), or any other name for an OpenAI-compatible API (gpt-4o-mini: OPENAI_API_KEY, "
             "or --base-url).")] = None,
    base_url: Annotated[str | None, typer.Option(
        "--base-url", metavar="URL", show_default=False, rich_help_panel=_LINE,
        help="The server for --model (e.g. http://127.0.0.1:8000/v1).")] = None,
    api_key_env: Annotated[str | None, typer.Option(
        "--api-key-env", metavar="VAR", show_default=False, rich_help_panel=_LINE,
        help="The environment variable holding the API key.")] = None,
    key: Annotated[list[str] | None, typer.Option(
        "--key", metavar="COLUMN", show_default=False, rich_help_panel=_LINE,
        help="The column identifying a row (repeat for a composite key); default guessed, as llmap init does.")]
        = None,
    where: Annotated[str | None, typer.Option(
        "--where", metavar="SQL", show_default=False, rich_help_panel=_LINE,
        help="Only rows where this DuckDB SQL condition holds: \"state = 'WY'\".")] = None,
    save: Annotated[Path | None, typer.Option(
        "--save", metavar="JOB.toml", show_default=False, rich_help_panel=_LINE,
        help="Also write the equivalent job file, to edit and run later.")] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="PATH", show_default=False,
        help="Write the output here (.csv, .parquet or .jsonl) instead of \\[output] path; for a data file, "
             "default out/NAME.csv.")] = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, metavar="N", show_default=False,
        help="Process at most N rows (overrides \\[input] limit).")] = None,
    preview: Annotated[int | None, typer.Option(
        "--preview", min=1, metavar="N", show_default=False, rich_help_panel=_PREVIEW,
        help="Answer N rows drawn at random (not the first N) and show each row's inputs and answer. Writes "
             "nothing into the job's ledger or folder; answers come from the response cache when it has them.")]
        = None,
    seed: Annotated[int, typer.Option(
        "--seed", metavar="S", rich_help_panel=_PREVIEW,
        help="With --preview: which rows are drawn (the same seed draws the same rows).")] = 0,
    fresh: Annotated[bool, typer.Option(
        "--fresh", help="Forget the ledger's rows and start over. Answers still come from the response cache "
                        "(0 requests for rows asked before): add --no-cache to ask the model again.")] = False,
    no_cache: Annotated[bool, typer.Option(
        "--no-cache", help="Do not use the response cache in this run: every row still to do is asked again "
                           "(identical rows are still asked once), and the answers are not stored in it.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar (warnings still print).")] = False,
    if_changed: Annotated[bool, typer.Option(
        "--if-changed", help="Exit 0 at once, touching nothing, when the input files, the spec and the done rows "
        "are unchanged since the last complete run. For cron.")] = False,
    log_json: Annotated[Path | None, typer.Option(
        "--log-json", metavar="PATH", show_default=False,
        help="Append structured events (requests, rows, warnings) as JSON lines to this file.")] = None,
    log_prompts: Annotated[bool, typer.Option(
        "--log-prompts", help="With --log-json: also log each row's rendered prompt and answer.")] = False,
    metrics_port: Annotated[int | None, typer.Option(
        "--metrics-port", min=0, max=65535, metavar="PORT", show_default=False,
        help="Serve Prometheus metrics on http://127.0.0.1:PORT/metrics while the run lasts.")] = None,
    executor: Annotated[str, typer.Option(
        "--executor", metavar="local|ray", rich_help_panel=_RAY,
        help="local: this process sends every request. ray: this process keeps the ledger; Ray workers render the "
             "rows, look up the response cache and send the requests under one rate limit for the whole cluster "
             "(pip install 'llmap\\[ray]').")]
        = "local",
    ray_address: Annotated[str, typer.Option(
        "--ray-address", metavar="ADDRESS", rich_help_panel=_RAY,
        help="With --executor ray: the Ray cluster to join; auto joins a running one, else starts one on this "
             "machine.")] = "auto",
    workers: Annotated[int | None, typer.Option(
        "--workers", min=1, metavar="N", show_default=False, rich_help_panel=_RAY,
        help="With --executor ray: how many Ray workers send requests (default: one per CPU of the cluster).")]
        = None,
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

    Three ways to start: llmap run job.toml (a job file; llmap init DATA writes one),
    llmap run DATA --prompt '...' --field name=type (no job file), and either with --preview 5 to look at a
    few answers first.

    Every answer is committed to the job's ledger as it arrives, before it counts, so Ctrl-C, SIGKILL or a
    crash loses only the requests in flight: run the same command again and it continues where it stopped,
    sending requests only for rows not yet done. A one-line run keeps its ledger in .llmap/ of the working
    directory, named after the data file and the line, so the same line continues too.

    One run of a job at a time: a run holds the job's ledger lock for its whole life, and a second run of the
    same job is refused (or waits, with --wait-lock). status, export, report and estimate work during a run.

    With \\[model] batch = true the first model's requests go through its provider's batch API (half price,
    within 24 hours): the run submits, then polls every \\[batch] poll_s seconds. Ctrl-C or a crash leaves the
    batches running and recorded in the ledger: the next run collects them and submits none of their rows again.

    Exit codes: 0 all rows done, skipped or given the fallback, 1 some rows failed or a budget cap or an error
    every row would hit stopped the run, 2 bad job or input (nothing sent), 75 another run of the job holds its
    ledger (nothing sent), 130 interrupted.
    """
    job, job_file = _load(target, prompt=prompt, fields=fields or [], system=system, model=model, base_url=base_url,
                          api_key_env=api_key_env, key=key or [], where=where, limit=limit, output=output, save=save)
    if no_cache:
        job = Job(job.spec.model_copy(update={"cache": CacheSpec(enabled=False, ttl=job.spec.cache.ttl)}))
    progress = MessagesOnly(err) if quiet or not err.is_terminal else RichProgress(err)
    if preview is not None:
        clash = _one_line_given(fresh=fresh, if_changed=if_changed, detach=detach, log_json=log_json,
                                metrics_port=metrics_port is not None, wait_lock=wait_lock)
        if clash or executor != "local":
            raise fail(f"{clash[0] if clash else '--executor'} does not apply to --preview, which answers a sample "
                       "here and keeps no ledger; drop one of them")
        _preview(job, preview, seed, progress, limit)
        return
    if if_changed and not fresh:
        unchanged = unchanged_since_complete(job.spec)
        if unchanged:
            say(f"llmap: {unchanged}")
            raise typer.Exit(0)
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
        say(f"llmap: metrics on http://127.0.0.1:{port}/metrics")

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
    _summary(result, job_file, job.spec.kind)
    raise typer.Exit(result.exit_code)


def _summary(result, job_file: str | None, kind: str = "map") -> None:
    c = result.counts
    tokens = result.prompt_tokens + result.completion_tokens
    rate = (c["done"] + c["failed"] + c["fallback"]) / result.elapsed_s if result.elapsed_s > 0 else 0.0
    fallback = f", {c['fallback']:,} fallback" if c["fallback"] else ""
    cost = f", ${result.cost_usd:,.4f}" if result.cost_usd else ""
    if result.cache_read_tokens:
        cost = f" ({result.cache_read_tokens:,} read from the prompt cache){cost}"
    say(f"llmap: {c['done']:,} done, {c['failed']:,} failed, {c['skipped']:,} skipped{fallback}, {c['pending']:,} "
        f"pending of {sum(c.values()):,} rows; {result.requests:,} requests ({result.retries:,} retries, "
        f"{result.rate_limited:,} rate-limited), {tokens:,} tokens{cost}, "
        f"{result.elapsed_s:.1f} s ({rate:,.1f} rows/s)")
    if result.operator:  # the operator's own figures (cluster's KPIs, filter's kept and dropped rows, ...)
        say(f"llmap: {summary_line(kind, result.operator)}")
    if result.stop_reason:
        err.print(f"[bold red]llmap: run stopped:[/] {escape(result.stop_reason)}", highlight=False, soft_wrap=True)
    if c["failed"]:
        if job_file is not None:
            say(f"llmap: see the failed rows and their errors with: llmap status {job_file} --failed "
                "(a rerun retries them)")
        else:
            say("llmap: each failed row's error is in the output's _error column; run the same line again to retry "
                "them, or add --save job.toml to keep the job and list them with llmap status job.toml --failed")
    if result.batches:
        shown = job_file or "JOB"
        say(f"llmap: {len(result.batches)} batch{'es' if len(result.batches) != 1 else ''} running at the "
            f"provider; run the same command again to collect them (llmap status {shown} shows them)")
        for bid in result.batches:
            out.print(f"batch: {bid}", highlight=False, soft_wrap=True)
    if result.output_path is not None:
        out.print(f"output: {os.path.normpath(result.output_path)}", highlight=False, soft_wrap=True)


def _preview(job: Job, n: int, seed: int, progress, limit: int | None) -> None:
    from llmap.cli.preview import preview_summary, preview_table
    from llmap.preview import preview

    spec = job.spec
    if limit is not None:
        spec = spec.model_copy(update={"input": spec.input.model_copy(update={"limit": limit})})
    try:
        p = preview(spec, n, seed=seed, progress=progress)
    except SpecError as exc:
        raise fail(exc) from None
    except (RunInterrupted, KeyboardInterrupt):
        err.print("[yellow]llmap: interrupted[/]", highlight=False)
        raise typer.Exit(130) from None
    console = Console(width=max(120, out.width) if not out.is_terminal else None)
    console.print(preview_table(p, title=f"{spec.name}: {len(p.rows)} sampled rows"))
    for note in p.notes:
        say(f"llmap: {note}")
    say(preview_summary(p))
    bad = sum(1 for r in p.rows if r.status == "failed")
    raise typer.Exit(1 if bad else 0)
