"""The ``llmap`` command line: ``run``, ``status``, ``export``, ``report``, ``estimate``, ``ui``, ``cache``,
``batch``, ``simulate``.

Exit codes: 0 every row done or skipped; 1 some rows failed or the run
stopped on a provider error; 2 bad job or input (nothing sent); 75 another
run of the job holds its ledger (nothing sent; EX_TEMPFAIL); 130
interrupted (progress kept).
"""

from __future__ import annotations

import typer

from llmap.cli.batch import batch_app
from llmap.cli.cache import cache_app
from llmap.cli.inspect import estimate, export, report, status
from llmap.cli.run import run
from llmap.cli.ui import ui

__all__ = ["app", "main"]

app = typer.Typer(
    name="llmap",
    help=(
        "Map an LLM prompt over every row of a dataset and write one structured result per row: "
        "fast, cheap, resumable.\n\n"
        "Start with: llmap run examples/districts.toml"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.command("run")(run)
app.command("estimate")(estimate)
app.command("status")(status)
app.command("export")(export)
app.command("report")(report)
app.command("ui")(ui)
app.add_typer(cache_app, name="cache")
app.add_typer(batch_app, name="batch")


def _register_simulate() -> None:
    try:
        from llmap.cli.simulate import simulate
    except ImportError:  # pragma: no cover - the simulator ships with llmap
        return
    app.command("simulate")(simulate)


_register_simulate()


def main() -> None:
    """Entry point of the ``llmap`` console script."""
    app()
