"""``llmap ui``: the job's live page in the browser; and what ``llmap run --ui`` starts beside its run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from llmap.cli.common import JobFile, err, fail, load_job, out, paragraphs
from llmap.errors import SpecError

__all__ = ["start_beside_run", "ui"]


@paragraphs
def ui(
    job_file: JobFile,
    port: Annotated[int, typer.Option(
        "--port", "-p", min=0, max=65535, help="TCP port to serve on; 0 picks a free one.")] = 0,
    host: Annotated[str, typer.Option(
        "--host", help="Address to bind. The default serves this computer only; another address (0.0.0.0) "
        "needs --allow-remote.")] = "127.0.0.1",
    allow_remote: Annotated[bool, typer.Option(
        "--allow-remote", help="Let --host open the page to the network: whoever has the URL can read every row, "
        "label, re-queue and stop the run, over plain HTTP.")] = False,
    by: Annotated[str | None, typer.Option(
        "--by", help="Show rows per value of this input column (one the ledger keeps: the key, a template "
        "variable or a \\[output] keep column); default: \\[input] per_group's column.", show_default=False)] = None,
) -> None:
    """Serve a live page for one job: watch, review and steer it in the browser.

    The page reads the job's ledger, so it works while a run goes (in another terminal, or with llmap run --ui)
    and on a finished job: rows by status and group, rows/s and ETA, cost against the cap, 429s, retries,
    latency and errors over time, cache hits, packs and the cascade's tiers, batches by state; a table of every
    row with filters, sorting and search; a row's prompt, attempts and labels; a review sample with keyboard
    shortcuts; buttons to stop the run, re-queue rows and roll back a run.

    It prints its URL, which carries a random token: every request without it is refused (403). It binds
    127.0.0.1 unless --host and --allow-remote say otherwise, needs no internet, and runs until Ctrl-C or
    SIGTERM. Filters and search use an index it builds beside the ledger (<ledger>.ui-index; safe to delete).
    """
    from llmap.ui.server import UiOptions, UiState, check_host, serve_forever

    job = load_job(job_file)
    try:
        check_host(host, allow_remote)
        state = UiState(job.spec, UiOptions(host=host, port=port, allow_remote=allow_remote, by=by))
    except SpecError as exc:
        raise fail(exc) from None

    def ready(url: str) -> None:
        if allow_remote and host not in ("127.0.0.1", "localhost", "::1"):
            err.print(f"llmap: the page is open to the network on {host}:{state.port}: anyone with its URL can read "
                      "the rows and act on the run", highlight=False, soft_wrap=True)
        out.print(f"llmap ui: {url}", highlight=False, soft_wrap=True)
        err.print("llmap: serving the page until Ctrl-C", highlight=False, soft_wrap=True)

    try:
        serve_forever(state, ready)
    except SpecError as exc:
        raise fail(exc) from None


def start_beside_run(spec: Any, port: int, stats: Any, tally: Any, lanes: Any) -> tuple[str, Callable[[], None]]:
    """Serve the page for a run in this process (``llmap run --ui``), with its live counters.

    Returns:
        ``(url, stop)``.

    Raises:
        SpecError: the port cannot be opened.
    """
    from llmap.ui.live import InProcess
    from llmap.ui.server import UiOptions, UiState, UiThread

    state = UiState(spec, UiOptions(port=port), in_process=InProcess(lambda: stats, lambda: tally, lambda: lanes))
    thread = UiThread(state)
    return thread.start(), thread.stop
