"""``llmap cache stats | prune | clear``: look after the shared response cache."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmap.durations import parse_duration
from llmap.store.cache import FILE_NAME, ResponseCache, default_cache_dir

__all__ = ["cache_app", "clear", "prune", "stats"]

out = Console()

cache_app = typer.Typer(
    help=(
        "Inspect and trim the response cache (answers reused when the same request comes again).\n\n"
        "A request is the same when model, parameters, messages and schema all match, in any "
        "job. The cache is one SQLite file, responses.sqlite, in $LLMAP_CACHE_DIR or else the "
        "user cache folder (e.g. ~/.cache/llmap on Linux).\n\n"
        "Examples:\n"
        "  llmap cache stats                      what is cached, per model\n"
        "  llmap cache prune --older-than 30d     drop answers older than 30 days\n"
        "  llmap cache clear --yes                drop everything, no question asked"
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
)

CacheDir = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        metavar="PATH",
        show_default=False,
        help="Folder holding responses.sqlite. Default: $LLMAP_CACHE_DIR, else the user "
        "cache folder (e.g. ~/.cache/llmap).",
    ),
]


def _path(cache_dir: Path | None) -> Path:
    return (cache_dir if cache_dir is not None else default_cache_dir()) / FILE_NAME


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    age = max(0.0, time.time() - ts)
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
        if age >= seconds:
            ago = f"{age / seconds:.0f}{unit} ago"
            break
    else:
        ago = f"{age:.0f}s ago"
    return f"{datetime.fromtimestamp(ts).isoformat(sep=' ', timespec='seconds')} ({ago})"


def _missing(path: Path) -> bool:
    if path.exists():
        return False
    out.print(f"No response cache at {escape(str(path))} (nothing cached yet).", highlight=False)
    return True


def stats(cache_dir: CacheDir = None) -> None:
    """Show what the response cache holds: entries, size on disk, hits, age, entries per model.

    A hit is an answer served from the cache instead of a new request.

    Examples:
      llmap cache stats
      llmap cache stats --cache-dir /tmp/llmap-cache
    """
    path = _path(cache_dir)
    if _missing(path):
        return
    with ResponseCache(path) as cache:
        s = cache.stats()
    table = Table(title="llmap response cache", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("file", escape(str(s.path)))
    table.add_row("entries", f"{s.entries:,}")
    table.add_row("size", _size(s.size_bytes))
    table.add_row("hits", f"{s.hits:,}")
    table.add_row("oldest", _when(s.oldest_created_at))
    table.add_row("newest", _when(s.newest_created_at))
    out.print(table)
    if s.by_model:
        models = Table(title="entries per model", title_justify="left")
        models.add_column("model")
        models.add_column("entries", justify="right")
        for model, n in s.by_model.items():
            models.add_row(escape(model), f"{n:,}")
        out.print(models)


def prune(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            metavar="DURATION",
            show_default=False,
            help="Remove answers stored longer ago than this: a number and a unit "
            "(s, m, h, d, w), combinable: 45s, 90m, 12h, 30d, 1w, 1d12h.",
        ),
    ],
    cache_dir: CacheDir = None,
) -> None:
    """Remove cached answers older than a duration, and free their disk space.

    The next request for a removed answer goes to the model again.

    Examples:
      llmap cache prune --older-than 30d      answers stored more than 30 days ago
      llmap cache prune --older-than 1w2d     more than 9 days ago
      llmap cache prune --older-than 12h
    """
    try:
        seconds = parse_duration(older_than)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--older-than") from None
    path = _path(cache_dir)
    if _missing(path):
        return
    with ResponseCache(path) as cache:
        removed = cache.prune(seconds)
        if removed:
            cache.vacuum()
    out.print(f"Removed {removed:,} cached answers older than {escape(older_than)}.", highlight=False)


def clear(
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask for confirmation (for scripts).")
    ] = False,
    cache_dir: CacheDir = None,
) -> None:
    """Remove every cached answer (asks first unless --yes).

    Job ledgers and finished results are not touched; only future runs send
    requests again instead of reusing answers.

    Examples:
      llmap cache clear           asks before removing
      llmap cache clear --yes     for scripts
    """
    path = _path(cache_dir)
    if _missing(path):
        return
    with ResponseCache(path) as cache:
        n = cache.stats().entries
        if not yes and n:
            typer.confirm(f"Remove all {n:,} cached answers in {path}?", abort=True)
        removed = cache.clear()
        if removed:
            cache.vacuum()
    out.print(f"Removed {removed:,} cached answers.", highlight=False)


cache_app.command("stats")(stats)
cache_app.command("prune")(prune)
cache_app.command("clear")(clear)
