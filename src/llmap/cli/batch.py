"""``llmap batch cancel``: cancel a job's open batches at the provider."""

from __future__ import annotations

import asyncio
import contextlib

import typer
from rich.markup import escape

from llmap.cli.common import JobFile, err, fail, load_job, out, paragraphs
from llmap.errors import ProviderError, SpecError

__all__ = ["batch_app"]

batch_app = typer.Typer(
    help="A job's provider batches (\\[model] batch = true). llmap status shows them; llmap run collects them.",
    no_args_is_help=True,
)


@batch_app.command("cancel")
@paragraphs
def cancel(job_file: JobFile) -> None:
    """Cancel the job's open batches at the provider.

    What they finished is kept (and billed): the next llmap run collects it and submits the job's other rows
    again. A run in progress stops once the cancelled batches have ended. Exit 0 when every open batch was
    asked to cancel, 1 when the provider refused one.
    """
    job = load_job(job_file)
    if not job.spec.model.batch:
        raise fail(SpecError(f"{job_file}: the first [model] has no batch = true, so the job has no batches"))
    try:
        asked = asyncio.run(_cancel(job.spec))
    except SpecError as exc:
        raise fail(exc) from None
    except ProviderError as exc:
        err.print(f"[bold red]llmap: error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    if not asked:
        out.print(f"{job.spec.name}: no open batch to cancel", highlight=False)
    for local, provider_id, status in asked:
        out.print(f"batch {local} ({provider_id}): {status}", highlight=False, soft_wrap=True)


async def _cancel(spec) -> list[tuple[int, str, str]]:
    from llmap.providers.factory import make_provider
    from llmap.run.batch.runner import cancel_batches
    from llmap.store.ledger import Ledger

    if not spec.ledger_path.is_file():
        raise SpecError(f"job {spec.name!r} has no ledger at {str(spec.ledger_path)!r} yet; it has no batches")
    provider = make_provider(spec.model, concurrency=None)
    ledger = Ledger(spec.ledger_path)
    try:
        return await cancel_batches(ledger, provider)
    finally:
        ledger.close()
        with contextlib.suppress(Exception):
            await provider.aclose()
