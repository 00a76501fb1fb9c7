"""Progress behind a small interface: null for the library, rich for the CLI, counting for tests.

The engine calls :meth:`Progress.start` once, :meth:`Progress.advance`
after each committed batch of results (never before: a row counts only once
it is durable), and :meth:`Progress.finish` at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from rich.console import Console
from rich.progress import Progress as RichBar
from rich.progress import ProgressColumn, Task
from rich.text import Text

__all__ = ["CountingProgress", "MessagesOnly", "NullProgress", "Progress", "RichProgress", "Tally", "progress_line"]


@dataclass
class Tally:
    """Running totals of one run, as shown by progress reporters.

    Attributes:
        total: rows in this run's plan.
        done, failed, skipped, fallback: rows settled so far (including earlier runs).
        prompt_tokens, completion_tokens: tokens spent in this run.
        cache_read_tokens: of the prompt tokens, those read from the providers' prompt caches.
        requests: requests sent in this run.
        cost_usd: USD spent in this run; rate_limited: 429 answers in this run.
        cache_hits: rows answered from the cache or an identical request in this run.
        in_flight, concurrency: requests in flight now, and the current limit (AIMD).
        batches: the batch path's state in words (batches by status, rows submitted), or "".
        started: ``time.monotonic()`` when the tally was made (for rates: rows/s since the start).
    """

    total: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    fallback: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read_tokens: int = 0
    requests: int = 0
    cost_usd: float = 0.0
    rate_limited: int = 0
    cache_hits: int = 0
    in_flight: int = 0
    concurrency: int = 0
    batches: str = ""
    started: float = field(default_factory=time.monotonic)

    @property
    def settled(self) -> int:
        """Rows settled: done + failed + skipped + fallback."""
        return self.done + self.failed + self.skipped + self.fallback


class Progress(Protocol):
    """What a progress reporter implements; pass one as ``Job.run(progress=...)`` or ``Job.arun(progress=...)``.

    llmap ships :class:`NullProgress` (the library's default: silent), :class:`MessagesOnly`
    (warnings to stderr, no bar; ``llmap run --quiet``) and :class:`RichProgress` (the CLI's bar).
    A reporter of your own (a notebook widget, a log line every 1,000 rows, a metric) needs only
    these four methods; it does not subclass anything (a structural :class:`typing.Protocol`).

    The engine calls them from the thread that runs the job, inside its event loop:

    - :meth:`start` once, after the plan, with the totals so far (rows done in earlier runs count);
    - :meth:`advance` after each batch of results is committed to the ledger (a row counts once it
      is durable, never before);
    - :meth:`message` at any time, even before :meth:`start`: a one-line notice for a person (a
      circuit breaker opened, a budget cap stopped the run, waiting for another run's lock);
    - :meth:`finish` once at the end, also when the run stops early (Ctrl-C, a fatal error, a cap).

    Every call gets the same live :class:`Tally`, updated in place: read it during the call and copy
    what you keep. Return quickly; a slow reporter slows the run, and an exception raised here ends it.
    """

    def start(self, tally: Tally) -> None:
        """The run begins: ``tally.total`` rows planned, ``tally.settled`` of them already settled."""
        ...

    def advance(self, tally: Tally) -> None:
        """More rows settled and committed; ``tally`` holds the new totals and this run's usage so far."""
        ...

    def message(self, text: str) -> None:
        """A one-line notice for a person, e.g. ``llmap: circuit breaker for openai:gpt-4o-mini opened; ...``."""
        ...

    def finish(self, tally: Tally) -> None:
        """The run is over (complete, stopped or interrupted); ``tally`` holds the final totals."""
        ...


class NullProgress:
    """Reports nothing (the library default)."""

    def start(self, tally: Tally) -> None:
        pass

    def advance(self, tally: Tally) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def finish(self, tally: Tally) -> None:
        pass


class MessagesOnly(NullProgress):
    """No bar, but warnings (breaker changes, budget stops) still reach stderr: for logs and ``--quiet``."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)


class CountingProgress:
    """Records every call; for tests."""

    def __init__(self) -> None:
        self.started: Tally | None = None
        self.advances: list[tuple[int, int, int]] = []  # (done, failed, skipped)
        self.messages: list[str] = []
        self.finished: Tally | None = None

    def start(self, tally: Tally) -> None:
        self.started = Tally(**{k: getattr(tally, k) for k in ("total", "done", "failed", "skipped")})

    def advance(self, tally: Tally) -> None:
        self.advances.append((tally.done, tally.failed, tally.skipped))

    def message(self, text: str) -> None:
        self.messages.append(text)

    def finish(self, tally: Tally) -> None:
        self.finished = tally


def _clock(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _short(n: float) -> str:
    """A count in at most 5 characters: ``950``, ``12.3k``, ``4.1M``."""
    if n < 1000:
        return f"{n:,.0f}"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            v = n / div
            return f"{v:.1f}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return f"{n:,.0f}"  # pragma: no cover


#: The narrowest bar drawn; below it the bar is left out.
MIN_BAR = 8
#: The widest bar drawn.
MAX_BAR = 30


def progress_line(t: Tally, width: int, *, base: int = 0, now: float | None = None) -> Text:
    """One line of progress that fits ``width`` columns: a bar, rows settled of the total, then as many of the
    other figures as fit, most useful first (failed rows, rows/s, ETA, cache hits, 429s, cost, tokens, in
    flight, skipped, fallback, batches, elapsed).

    Args:
        t: the run's tally.
        width: the terminal's columns; the line is at most ``width - 1`` long (a full line wraps on some terminals).
        base: rows settled before this run started (they do not count toward the rate).
        now: ``time.monotonic()`` (injected by tests).
    """
    now = time.monotonic() if now is None else now
    elapsed = max(1e-9, now - t.started)
    settled = t.settled
    rate = max(0, settled - base) / elapsed
    left = max(0, t.total - settled)
    eta = _clock(left / rate) if rate > 0 else "?"
    counts = f"{settled:,}/{t.total:,}"
    # (priority, display order, text, style); lower priority numbers are kept first
    parts: list[tuple[int, int, str, str]] = [(0, 0, counts, "bold")]
    if t.failed:
        parts.append((1, 1, f"{t.failed:,} failed", "red"))
    parts.append((2, 6, f"{rate:,.1f} rows/s", "cyan"))
    parts.append((3, 7, f"ETA {eta}", "cyan"))
    if t.cache_hits:
        parts.append((4, 4, f"{t.cache_hits:,} cached", "cyan"))
    if t.rate_limited:
        parts.append((5, 5, f"{t.rate_limited:,} 429s", "yellow"))
    if t.cost_usd:
        parts.append((6, 8, f"${t.cost_usd:,.4f}", "cyan"))
    tokens = t.prompt_tokens + t.completion_tokens
    if tokens:
        read = f" ({_short(t.cache_read_tokens)} cache reads)" if t.cache_read_tokens else ""
        parts.append((7, 9, f"{_short(tokens)} tokens{read}", "dim"))
    if t.concurrency:
        parts.append((8, 10, f"{t.in_flight}/{t.concurrency} in flight", "dim"))
    if t.skipped:
        parts.append((9, 2, f"{t.skipped:,} skipped", "dim"))
    if t.fallback:
        parts.append((10, 3, f"{t.fallback:,} fallback", "yellow"))
    if t.batches:
        parts.append((11, 11, t.batches, "magenta"))
    parts.append((12, 12, _clock(elapsed), "dim"))
    room = max(1, width - 1)
    kept = sorted(parts)
    while len(kept) > 1 and sum(len(p[2]) + 1 for p in kept) - 1 > room - MIN_BAR - 1:
        kept.pop()
    text_len = sum(len(p[2]) + 1 for p in kept) - 1
    bar = min(MAX_BAR, room - text_len - 1)
    line = Text(no_wrap=True, overflow="ellipsis")
    if bar >= MIN_BAR:
        done = int(bar * settled / t.total) if t.total else bar
        line.append("━" * done, style="green" if not t.failed else "yellow")
        line.append("━" * (bar - done), style="grey23")
        line.append(" ")
    for i, (_prio, _order, text, style) in enumerate(sorted(kept, key=lambda p: p[1])):
        if i:
            line.append(" ")
        line.append(text, style=style)
    line.truncate(room, overflow="ellipsis")
    return line


class _LineColumn(ProgressColumn):
    """The whole progress line in one column, so it is laid out to the terminal's width (never wraps)."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self._console = console

    def render(self, task: Task) -> Text:
        return progress_line(task.fields["tally"], self._console.width, base=task.fields["base"])


class RichProgress:
    """A rich progress bar on one line (:func:`progress_line`): rows settled of the total, failed rows, rows/s,
    ETA, cache hits, 429s, cost, tokens, requests in flight, as many as fit the terminal. Writes to stderr."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._bar = RichBar(
            _LineColumn(self.console),
            console=self.console,
            refresh_per_second=4,
            transient=False,
        )
        self._task = None

    def start(self, tally: Tally) -> None:
        self._bar.start()
        self._task = self._bar.add_task("llmap", total=tally.total, completed=tally.settled, tally=tally,
                                        base=tally.settled)

    def advance(self, tally: Tally) -> None:
        if self._task is not None:
            self._bar.update(self._task, completed=tally.settled, tally=tally)

    def message(self, text: str) -> None:
        self._bar.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def finish(self, tally: Tally) -> None:
        if self._task is not None:
            self._bar.update(self._task, completed=tally.settled, tally=tally)
        self._bar.stop()
