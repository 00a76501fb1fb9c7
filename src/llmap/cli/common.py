"""What the job commands share: the consoles, the job-file argument, and the one-line error (exit 2)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from llmap.engine import Job
from llmap.errors import SpecError

__all__ = ["JobFile", "err", "fail", "load_job", "out", "paragraphs"]

#: Progress, warnings and errors (standard error); results (standard output).
err = Console(stderr=True)
out = Console()

F = TypeVar("F", bound=Callable)


def paragraphs(command: F) -> F:
    """Make each paragraph of a command's docstring one line, so ``--help`` reflows it to the terminal.

    Typer's rich help keeps a docstring's line breaks; with this the source can wrap at its line length.
    """
    doc = inspect.cleandoc(command.__doc__ or "")
    command.__doc__ = "\n\n".join(" ".join(line.strip() for line in para.splitlines()) for para in doc.split("\n\n"))
    return command


JobFile = Annotated[Path, typer.Argument(help="The job spec, a TOML file (see README.md: 'The job spec').",
                                         show_default=False)]


def fail(exc: SpecError) -> typer.Exit:
    """Print ``exc`` as one line on standard error; the exit (code 2) to raise."""
    err.print(f"[bold red]llmap: error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def load_job(job_file: Path) -> Job:
    """Load and check a job file, or exit 2 with the one-line error."""
    try:
        return Job.from_toml(job_file)
    except SpecError as exc:
        raise fail(exc) from None
