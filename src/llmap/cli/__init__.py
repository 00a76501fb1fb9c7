"""The ``llmap`` command line: ``init``, ``run``, ``status``, ``export``, ``report``, ``estimate``, ``label``,
``review``, ``eval``, ``runs``, ``rollback``, ``ui``, ``cache``, ``batch``, ``simulate``.

Exit codes: 0 every row done or skipped; 1 some rows failed or the run
stopped on a provider error; 2 bad job or input (nothing sent); 75 another
run of the job holds its ledger (nothing sent; EX_TEMPFAIL); 130
interrupted (progress kept).
"""

from __future__ import annotations

from typing import Annotated

import typer

from llmap.cli.batch import batch_app
from llmap.cli.cache import cache_app
from llmap.cli.common import clean_help
from llmap.cli.history import rollback, runs
from llmap.cli.init import init
from llmap.cli.inspect import estimate, export, report, status
from llmap.cli.quality import eval_job, label, review
from llmap.cli.run import run
from llmap.cli.ui import ui

__all__ = ["app", "main"]

app = typer.Typer(
    name="llmap",
    help=(
        "Map an LLM prompt over every row of a dataset and write one structured result per row: "
        "fast, cheap, resumable.\n\n"
        "Start with:\n\n"
        "llmap init data.csv    write job.toml for your file (the embedded model: offline, free)\n\n"
        "llmap run job.toml --preview 5    look at five answers; writes nothing\n\n"
        "llmap run job.toml    every row; Ctrl-C and run again to continue\n\n"
        "Or without a job file: llmap run data.csv --prompt 'Classify {{ name }}' --field kind=enum:a,b,other"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        from llmap import __version__

        typer.echo(f"llmap {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print llmap's version and exit.")] = False,
) -> None:
    """Map an LLM prompt over every row of a dataset."""


app.command("init")(init)
app.command("run")(run)
app.command("estimate")(estimate)
app.command("status")(status)
app.command("export")(export)
app.command("report")(report)
app.command("label")(label)
app.command("review")(review)
app.command("eval")(eval_job)
app.command("runs")(runs)
app.command("rollback")(rollback)
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
clean_help(app)


def main() -> None:
    """Entry point of the ``llmap`` console script."""
    app()
