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
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import (
    Progress as RichBar,
)
from rich.text import Text

__all__ = ["CountingProgress", "MessagesOnly", "NullProgress", "Progress", "RichProgress", "Tally"]


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


class _RowsColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        t: Tally = task.fields["tally"]
        parts = [(f"{t.done:,} done", "green"), " ", (f"{t.failed:,} failed", "red" if t.failed else "dim"),
                 " ", (f"{t.skipped:,} skipped", "dim")]
        if t.fallback:
            parts += [" ", (f"{t.fallback:,} fallback", "yellow")]
        if t.cache_hits:
            parts += [" ", (f"{t.cache_hits:,} cached", "cyan")]
        if t.rate_limited:
            parts += [" ", (f"{t.rate_limited:,} 429s", "yellow")]
        if t.batches:
            parts += [" ", (t.batches, "magenta")]
        return Text.assemble(*parts)


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        t: Tally = task.fields["tally"]
        el = max(1e-9, time.monotonic() - t.started)
        rate = (task.completed - task.fields["base"]) / el
        tokens = t.prompt_tokens + t.completion_tokens
        read = f" ({t.cache_read_tokens:,} cache reads)" if t.cache_read_tokens else ""
        cost = f"  ${t.cost_usd:,.4f}" if t.cost_usd else ""
        conc = f"  {t.in_flight}/{t.concurrency} in flight" if t.concurrency else ""
        return Text(f"{rate:,.1f} rows/s  {tokens:,} tokens{read}{cost}{conc}", style="cyan")


class RichProgress:
    """A rich progress bar: rows done/failed/total, rows/s, ETA, tokens (and prompt-cache reads). Writes to stderr."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._bar = RichBar(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RowsColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
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
