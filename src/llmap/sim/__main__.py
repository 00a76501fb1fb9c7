"""``python -m llmap.sim``: the same command as ``llmap simulate``."""

from __future__ import annotations

import typer

from llmap.cli.simulate import simulate


def main() -> None:
    """Parse the ``llmap simulate`` flags and serve until interrupted."""
    app = typer.Typer(add_completion=False)
    app.command()(simulate)
    app(prog_name="python -m llmap.sim")


if __name__ == "__main__":
    main()
