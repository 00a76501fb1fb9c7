"""What the commands share: the consoles, the job-file argument, the one-line error (exit 2), and clean help.

Typer (0.2x) shows a flag's type as ``<bool>`` in ``--help``, as though it
took a value: :func:`clean_help` gives every command and group of the app a
command class that shows flags bare (``--fresh``, not ``--fresh <bool>``).
Help texts are Rich markup: write a literal ``[`` as ``\\[`` (``'llmap\\[ray]'``)
or Rich takes ``[ray]`` for a style and drops it; ``tests/cli`` checks every
bracket survives.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from llmap.engine import Job
from llmap.errors import SpecError
from llmap.spec.job import SPEC_DOCS

__all__ = ["JobFile", "clean_help", "err", "fail", "load_job", "out", "paragraphs", "say"]

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


JobFile = Annotated[Path, typer.Argument(metavar="JOB", show_default=False,
                                         help=f"The job file, TOML (every key: {SPEC_DOCS}).")]


def fail(exc: SpecError | str) -> typer.Exit:
    """Print ``exc`` as one line on standard error; the exit (code 2) to raise."""
    err.print(f"[bold red]llmap: error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def say(text: str) -> None:
    """One line of plain text on standard error (no markup, never wrapped)."""
    err.print(text, highlight=False, markup=False, soft_wrap=True)


def load_job(job_file: Path) -> Job:
    """Load and check a job file, or exit 2 with the one-line error."""
    try:
        return Job.from_toml(job_file)
    except SpecError as exc:
        raise fail(exc) from None


def _bare_flags(params: list[Any]) -> list[Any]:
    for p in params:
        if getattr(p, "is_flag", False) and not getattr(p, "count", False):
            p.metavar = ""  # typer shows a flag's metavar in its type column: "<bool>" otherwise
    return params


class Command(TyperCommand):
    """A command whose flags show no value in ``--help``."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _bare_flags(super().get_params(ctx))


class Group(TyperGroup):
    """A command group whose flags (``--help``, ``--version``) show no value in ``--help``."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _bare_flags(super().get_params(ctx))


def clean_help(app: typer.Typer) -> typer.Typer:
    """Give ``app``, its commands and its sub-apps the command classes above; returns ``app``."""
    app.info.cls = Group
    for cmd in app.registered_commands:
        if cmd.cls is None or cmd.cls is TyperCommand:
            cmd.cls = Command
    for group in app.registered_groups:
        if group.typer_instance is not None:
            clean_help(group.typer_instance)
    return app
