"""``llmap label``, ``llmap review`` and ``llmap eval``: is it right?

The loop: ``llmap review JOB -n 50`` writes a sample of answers to correct; ``llmap label JOB FILE``
stores the corrected file as labels; ``llmap eval JOB`` compares the answers with the labels (accuracy
with its interval, per-class figures, the confusion matrix, calibration); ``llmap eval JOB --models A,B``
runs the labelled sample through other models to pick one before the full run.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from llmap.cli.common import JobFile, err, fail, load_job, out, paragraphs
from llmap.errors import DiskFull, LedgerLocked, RunInterrupted, SpecError

__all__ = ["eval_job", "label", "review"]


def _console() -> Console:
    return Console(width=max(120, out.width) if not sys.stdout.isatty() else None)


@paragraphs
def label(
    job_file: JobFile,
    file: Annotated[Path, typer.Argument(help="A CSV or JSONL file: the job's key column (_row when the job has "
                                              "no key) and one column per labelled field, named as the field.",
                                         show_default=False)],
    source: Annotated[str | None, typer.Option(help="Where the labels come from, kept with them (default: the "
                                                    "file's name).")] = None,
) -> None:
    """Import true answers (labels) into the job's ledger, for `llmap eval`.

    Other columns are ignored, so a review file from `llmap review` (corrected) reads back as it is. An empty cell is no
    label; write null for a true answer of null. A label for the same row and field replaces the old one.
    """
    from llmap.quality.labels import read_label_file
    from llmap.store.labels import write_labels
    from llmap.store.ledger import Ledger

    job = load_job(job_file)
    spec = job.spec
    try:
        found = read_label_file(file, spec, source=source)
        with Ledger(spec.ledger_path) as ledger:
            n = write_labels(ledger.connection, found.labels)
            keys = {lb.key for lb in found.labels}
            known = sum(1 for _ in _present(ledger.connection, keys))
    except SpecError as exc:
        raise fail(exc) from None
    except DiskFull as exc:
        err.print(f"[bold red]llmap: error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    per_field = {f: sum(1 for lb in found.labels if lb.field == f) for f in found.fields}
    out.print(f"labels: {n:,} values from {found.rows:,} rows of {file.name} ("
              + ", ".join(f"{f}: {k:,}" for f, k in per_field.items()) + ")", highlight=False, soft_wrap=True)
    if len(keys) - known:
        out.print(f"{len(keys) - known:,} of {len(keys):,} keys are not in the ledger's rows yet (kept; they count "
                  "once "
                  "a run plans them)", highlight=False, soft_wrap=True)
    if found.ignored:
        out.print(f"ignored columns: {', '.join(found.ignored)}", highlight=False, soft_wrap=True)


def _present(db, keys: set[str]):
    wanted = list(keys)
    for i in range(0, len(wanted), 500):
        chunk = wanted[i:i + 500]
        yield from db.execute(f"SELECT key FROM rows WHERE key IN ({','.join('?' * len(chunk))})", chunk)


@paragraphs
def review(
    job_file: JobFile,
    n: Annotated[int, typer.Option("-n", min=1, help="Rows to sample.")] = 50,
    stratify: Annotated[str | None, typer.Option(
        "--stratify", help="Share the sample equally among the values of this output field (or stored input "
                           "column), so rare classes are reviewed too.", show_default=False)] = None,
    where: Annotated[str | None, typer.Option(
        "--where", help="DuckDB SQL over the stored input columns, the fields, _status and _confidence, e.g. "
                        "\"_confidence < 0.8\" or \"kind = 'other'\".", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="The review file, .csv or .jsonl (default: <job>.review.csv beside the job file).",
        show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(help="The sample's seed (default: \\[eval] seed, 0): the same seed "
                                                  "draws the same rows.", show_default=False)] = None,
    include_labelled: Annotated[bool, typer.Option(help="Also draw rows that already have a label.")] = False,
    force: Annotated[bool, typer.Option(help="Overwrite the review file if it exists.")] = False,
) -> None:
    """Write a seeded, stratified sample of answers for a person to check and correct; read it back with `llmap label`.

    Rows come from the latest run's settled rows without a label. The file holds the key, the answers (correct them in
    place), _status, _confidence, _error and the input columns.
    """
    from llmap.quality.review import review as draw
    from llmap.quality.review import write_review

    job = load_job(job_file)
    spec = job.spec
    path = output or job_file.resolve().parent / f"{spec.name}.review.csv"
    if path.exists() and not force:
        raise fail(SpecError(f"{str(path)!r} exists (it may hold your corrections); pass --output NEW.csv, or "
                             "--force to overwrite it"))
    try:
        rev = draw(spec, n, stratify=stratify, where=where, seed=spec.eval.seed if seed is None else seed,
                   include_labelled=include_labelled)
        write_review(rev, path)
    except SpecError as exc:
        raise fail(exc) from None
    out.print(f"review: {len(rev.rows):,} of {rev.candidates:,} rows written to {path}", highlight=False,
              soft_wrap=True)
    if rev.strata:
        out.print(f"by {stratify}: " + ", ".join(f"{g}: {k}" for g, k in rev.strata.items()), highlight=False,
                  soft_wrap=True)
    out.print(f"correct the answers in place, then: llmap label {job_file} {path}", highlight=False, soft_wrap=True)


@paragraphs
def eval_job(
    job_file: JobFile,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON: every figure a number, unrounded.")] = False,
    tolerance: Annotated[float | None, typer.Option(
        "--tolerance", min=0, help="For number fields: the absolute difference that still counts as right, for "
                                   "the 'within' share (default: \\[eval] tolerance).", show_default=False)] = None,
    models: Annotated[str | None, typer.Option(
        "--models", help="Compare models on the labelled sample instead: comma-separated names (\\[\\[model]] or "
                         "[\\[eval.models]] names; another name is the first model with that name).",
        show_default=False)] = None,
    sample: Annotated[int | None, typer.Option(
        "--sample", min=1, help="With --models: labelled rows to run (default: \\[eval] sample, else all).",
        show_default=False)] = None,
    seed: Annotated[int | None, typer.Option(help="With --models: the sample's seed (default: \\[eval] seed).",
                                             show_default=False)] = None,
) -> None:
    """Compare the answers with the labels: accuracy, per-class precision/recall/F1 and the confusion matrix (enums,
    booleans), exact match and MAE (numbers), exact and normalized match (strings), each rate with its 95% interval and
    sample size; calibration of _confidence.

    With --models A,B,C --sample N, run the same labelled sample through each model (through the cache) and print
    accuracy, cost, latency and cost per correct answer side by side.
    """
    job = load_job(job_file)
    spec = job.spec
    if models is not None:
        _compare(spec, [m.strip() for m in models.split(",") if m.strip()], sample, seed, as_json)
        return
    if sample is not None:
        raise fail(SpecError("--sample goes with --models (the models to run the sample through)"))
    from llmap.observe.quality import eval_tables
    from llmap.quality.eval import evaluate

    try:
        rep = evaluate(spec, tolerance=tolerance)
    except SpecError as exc:
        raise fail(exc) from None
    if as_json:
        sys.stdout.write(json.dumps(rep.as_dict(), default=str) + "\n")
        return
    _console().print(eval_tables(rep))


def _compare(spec, names: list[str], sample: int | None, seed: int | None, as_json: bool) -> None:
    from llmap.observe.quality import compare_table
    from llmap.quality.compare import compare

    try:
        results, n = asyncio.run(compare(spec, names, sample=sample, seed=seed,
                                         say=lambda line: err.print(line, highlight=False, markup=False)))
    except SpecError as exc:
        raise fail(exc) from None
    except (LedgerLocked, DiskFull) as exc:
        err.print(f"[bold red]llmap: error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except (KeyboardInterrupt, RunInterrupted):
        err.print("llmap: interrupted; answers so far are kept, run the same command again to continue")
        raise typer.Exit(130) from None
    if as_json:
        sys.stdout.write(json.dumps({"job": spec.name, "sample": n, "models": [r.as_dict() for r in results]},
                                    default=str) + "\n")
        return
    _console().print(compare_table(results, n))
    best = results[0]
    cheap = [r for r in results if r.cost_per_correct_usd is not None]
    line = f"most accurate: {best.model} ({best.accuracy.text()})"
    if cheap:
        c = min(cheap, key=lambda r: r.cost_per_correct_usd)
        line += f"; cheapest per correct answer: {c.model} (${c.cost_per_correct_usd:.6f})"
    out.print(line, highlight=False, soft_wrap=True)
