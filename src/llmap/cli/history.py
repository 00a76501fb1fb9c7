"""``llmap runs`` and ``llmap rollback``: a job's runs, and the way back from a bad one."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from llmap.cli.common import JobFile, err, fail, load_job, out, paragraphs
from llmap.errors import DiskFull, LedgerLocked, SpecError

__all__ = ["rollback", "runs"]


@paragraphs
def runs(
    job_file: JobFile,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list, oldest run first; items carry "
                                                         "run_id.")] = False,
) -> None:
    """List the job's runs, oldest first: time, rows settled, cost, models, the hash of prompt and fields, rows changed
    (kept in the ledger's history) and rollbacks."""
    from llmap.observe.quality import runs_table
    from llmap.store.history import list_runs
    from llmap.store.ledger import open_for_reading

    job = load_job(job_file)
    try:
        ledger, _ = open_for_reading(job.spec.ledger_path, job=job.spec.name)
    except SpecError as exc:
        raise fail(exc) from None
    try:
        found = list_runs(ledger.connection)
    finally:
        ledger.close()
    if as_json:
        sys.stdout.write(json.dumps([r.as_dict() for r in found]) + "\n")
        return
    Console(width=max(140, out.width) if not sys.stdout.isatty() else None).print(runs_table(found))


@paragraphs
def rollback(
    job_file: JobFile,
    run_id: Annotated[int, typer.Argument(help="The run to undo (see `llmap runs`); later runs are undone too.",
                                          show_default=False)],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask (it never asks when standard input is not "
                                                          "a terminal).")] = False,
) -> None:
    """Put every row a run changed back to its state before it, with no request, and write the output again.

    The run's cost and request log stay as they were (money spent stays spent); `llmap runs` marks it rolled back. Runs
    after it are rolled back too, newest first. Refused (exit 75) while a run holds the job's ledger.
    """
    from llmap.io.sinks import export_job
    from llmap.store.batches import BatchBook
    from llmap.store.history import list_runs
    from llmap.store.history import rollback as undo
    from llmap.store.ledger import Ledger
    from llmap.store.lock import LedgerLock

    job = load_job(job_file)
    spec = job.spec
    if not spec.ledger_path.is_file():
        raise fail(SpecError(f"job {spec.name!r} has no ledger at {str(spec.ledger_path)!r} yet; nothing to roll back"))
    lock = LedgerLock(spec.ledger_path, job=spec.name)
    try:
        if not lock.try_acquire():
            holder = lock.holder()
            who = holder.describe() if holder else "a process that has not said who it is yet"
            exc = LedgerLocked(f"a run of job {spec.name!r} holds its ledger ({who}); rollback changes nothing while "
                               "a run is going: wait for it to finish, then roll back", holder=holder,
                               lock_path=lock.path)
            err.print(f"[bold red]llmap: error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code)
        with Ledger(spec.ledger_path) as ledger:
            held = BatchBook(ledger).held()
            if held:  # their answers would settle the rolled-back rows again
                raise fail(SpecError(f"{len(held)} provider batch{'es' if len(held) > 1 else ''} of job {spec.name!r} "
                                     "may still answer rows; let `llmap run` collect them, or stop them with `llmap "
                                     "batch cancel`, then roll back"))
            found = {r.run_id: r for r in list_runs(ledger.connection)}
            if run_id not in found:
                ids = sorted(found)
                raise fail(SpecError(f"run {run_id} not found; " + (f"runs are {ids[0]}..{ids[-1]}" if ids else
                                     "the ledger has no runs") + " (see `llmap runs`)"))
            later = [r for r in found.values() if r.run_id >= run_id and r.rolled_back_at is None]
            if not later:
                raise fail(SpecError(f"run {run_id} was rolled back already; see `llmap runs`"))
            what = ", ".join(f"run {r.run_id} ({r.changed:,} rows kept, {r.settled or 0:,} settled)"
                             for r in sorted(later, key=lambda r: -r.run_id))
            if not yes and sys.stdin.isatty() and not typer.confirm(f"roll back {what}?", default=False):
                raise typer.Exit(1)
            try:
                done = undo(ledger.connection, run_id)
            except SpecError as exc:
                raise fail(exc) from None
            left = ledger.latest_plan()
        out.print(f"rolled back run{'s' if len(done) > 1 else ''} {', '.join(map(str, done))}: 0 requests; the "
                  "cost history is unchanged", highlight=False, soft_wrap=True)
        if left is None:
            out.print("the ledger has no row left (the first run was rolled back): the output was not written",
                      highlight=False, soft_wrap=True)
            return
        path, n = export_job(spec)
        out.print(f"output: {path} ({n:,} rows)", highlight=False, soft_wrap=True)
    except DiskFull as exc:
        err.print(f"[bold red]llmap: error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    finally:
        lock.release()
