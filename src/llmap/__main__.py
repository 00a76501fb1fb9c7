"""``python -m llmap`` runs the CLI."""

from llmap.cli import main

main()
