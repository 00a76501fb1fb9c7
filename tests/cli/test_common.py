"""What the commands share: a docstring's paragraphs reflow in ``--help`` however the source wraps them."""

from __future__ import annotations

from typer.testing import CliRunner

from llmap.cli import app
from llmap.cli.common import paragraphs


def test_paragraphs_makes_each_paragraph_one_line():
    def command() -> None:
        """First line
        goes on.

        Second paragraph
            wraps here.
        """

    assert paragraphs(command) is command
    assert command.__doc__ == "First line goes on.\n\nSecond paragraph wraps here."


def test_help_reflows_a_wrapped_docstring_to_the_terminal():
    out = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"}).output
    assert ("Every answer is committed to the job's ledger as it arrives, before it counts, so Ctrl-C, SIGKILL or a "
            "crash loses only the requests in flight: run the same command again and it continues where it "
            "stopped") in out
