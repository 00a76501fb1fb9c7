"""Structured logs: ``llmap run --log-json PATH`` writes one JSON object per line.

Events (every one has ``t``, POSIX seconds, and ``event``):

- ``request``: ``model``, ``outcome`` (``"200"``, another HTTP status, or an
  error class such as ``RequestTimeout``), ``latency_s``, ``prompt_tokens``,
  ``completion_tokens``, ``pack_size``;
- ``row``: ``key``, ``status``, ``model``, ``source``, ``attempts``,
  ``error_class``, ``error`` and ``latency_s``; with ``--log-prompts`` also
  ``messages`` (the rendered prompt) and ``output`` (the answer);
- ``message``: warnings as printed (breaker changes, budget stops, alerts).

Prompts and answers are left out unless ``log_prompts`` is set. API keys never
reach the log: providers redact them from every error text first.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from llmap.control.alerts import FailureRateAlert
from llmap.errors import SpecError
from llmap.store.ledger import RowResult

if TYPE_CHECKING:
    from collections.abc import Callable

    from llmap.observe.progress import Progress, Tally
    from llmap.prompt.render import Renderer
    from llmap.spec import AlertsSpec

__all__ = ["JsonLog", "LoggedProgress", "settled_hook"]


def settled_hook(alerts: AlertsSpec, log: JsonLog | None, renderer: Renderer,
                 halt: Callable[[str], None]) -> Callable[[list[RowResult], list[str]], None] | None:
    """What runs on every batch of settled rows: ``row`` events in ``log`` (with the rendered prompt when it logs
    prompts) and the ``[alerts]`` failure-rate alert, which calls ``halt(message)`` when it fires.

    Args:
        alerts: the job's ``[alerts]``.
        log: the run's ``--log-json`` log, or None.
        renderer: renders a row's prompt from its input JSON (only for ``log_prompts``).
        halt: stops dispatch with a reason (``DispatchStats.halt``).

    Returns:
        ``hook(results, datas)`` (each row's result and its input as JSON text), or None when there is neither an
        alert nor a log.
    """
    alert = None
    if alerts.max_failure_rate is not None:
        alert = FailureRateAlert(alerts.max_failure_rate, alerts.window)
    if alert is None and log is None:
        return None

    def hook(results: list[RowResult], datas: list[str]) -> None:
        for r, data in zip(results, datas, strict=True):
            if log is not None:
                log.row(r, renderer.messages(json.loads(data)) if log.log_prompts else None)
            if alert is not None and r.status in ("done", "failed") and alert.observe(r.status == "failed"):
                halt(alert.message())

    return hook


class JsonLog:
    """An append-only JSON-lines event log.

    Args:
        path: the log file (appended to; its folder is created).
        log_prompts: include rendered prompts and answers in ``row`` events.

    Raises:
        SpecError: the file cannot be opened for writing.
    """

    def __init__(self, path: Path, *, log_prompts: bool = False) -> None:
        self.path = Path(path)
        self.log_prompts = log_prompts
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f: IO[str] = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise SpecError(f"cannot write --log-json {str(path)!r}: {exc.strerror}; choose a writable path") from None

    def _write(self, doc: dict[str, Any]) -> None:
        self._f.write(json.dumps(doc, ensure_ascii=False, default=str) + "\n")

    def request(self, entry: tuple) -> None:
        """A request log entry ``(t, model, outcome, latency_s, pt, ct, pack_size, cache_read, cache_write, cost_usd,
        path)`` (see :class:`~llmap.run.stats.DispatchStats`)."""
        t, model, outcome, latency, pt, ct, pack, read, write = entry[:9]
        doc = {"t": t, "event": "request", "model": model, "outcome": outcome,
               "latency_s": round(latency, 4) if latency is not None else None,
               "prompt_tokens": pt, "completion_tokens": ct, "pack_size": pack}
        if read or write:
            doc |= {"cache_read_tokens": read, "cache_write_tokens": write}
        if len(entry) > 10 and entry[10]:
            doc["path"] = entry[10]
        self._write(doc)

    def row(self, r: RowResult, messages: list[dict[str, str]] | None = None) -> None:
        """A settled row; ``messages`` is logged only with ``log_prompts``."""
        error_class = r.error.split(":", 1)[0] if r.error else None
        doc: dict[str, Any] = {"t": time.time(), "event": "row", "key": r.key, "status": r.status, "model": r.model,
                               "source": r.source, "attempts": r.attempts, "error_class": error_class,
                               "error": r.error, "latency_s": round(r.latency_s, 4)}
        if self.log_prompts:
            doc["messages"] = messages
            doc["output"] = r.output
        self._write(doc)

    def message(self, text: str) -> None:
        self._write({"t": time.time(), "event": "message", "text": text})

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class LoggedProgress:
    """A progress reporter that also writes its messages to the structured log."""

    def __init__(self, inner: Progress, log: JsonLog) -> None:
        self.inner, self.log = inner, log

    def start(self, tally: Tally) -> None:
        self.inner.start(tally)

    def advance(self, tally: Tally) -> None:
        self.inner.advance(tally)
        self.log.flush()

    def message(self, text: str) -> None:
        self.inner.message(text)
        self.log.message(text)

    def finish(self, tally: Tally) -> None:
        self.inner.finish(tally)
        self.log.flush()
