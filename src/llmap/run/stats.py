"""Run accounting: what one run sent, spent and saw, and how it stops.

:class:`DispatchStats` is the run's counters (requests, tokens, cost, 429s,
retries, a per-request log for the ledger and the metrics) and its stop
signal; :class:`Stop` is raised inside a worker when the run is stopping, so
the row stays pending.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from llmap import errors as E

__all__ = ["DispatchStats", "Stop"]


class Stop(Exception):
    """Raised inside a worker when the run is stopping; the row stays pending."""


@dataclass
class DispatchStats:
    """Counters of one run (this run's requests only).

    Attributes:
        requests: requests sent.
        prompt_tokens, completion_tokens: usage reported by the providers.
        cache_read_tokens, cache_write_tokens: of the prompt tokens, those read
            from / written to the providers' prompt caches.
        cost_usd: spend at the models' prices.
        rate_limited: 429 answers.
        retries: attempts after the first, per row and model.
        hedged: attempts that sent a second copy in the run's tail (see ``limits.hedge_tail``).
        stop_reason: why dispatch stopped early (a fatal error or a budget cap), or None.
        fatal: the error every row would hit, when that stopped the run.
    """

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0
    rate_limited: int = 0
    retries: int = 0
    hedged: int = 0
    stop_reason: str | None = None
    fatal: E.FatalProviderError | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    on_halt: Callable[[str], None] | None = None
    #: called with each warning (a condition worth saying once, e.g. a server without usage)
    on_warn: Callable[[str], None] | None = None
    #: request log entries not yet written to the ledger:
    #: (t, model, outcome, latency_s, pt, ct, pack_size, cache_read, cache_write, cost_usd, path); path is
    #: "batch" for a batch API request, None for a real-time one
    request_log: list[tuple] = field(default_factory=list)
    #: model -> {"requests", "prompt_tokens", "completion_tokens", "cost_usd", "cache_read_tokens",
    #: "cache_write_tokens"} (this run)
    by_model: dict[str, dict[str, float]] = field(default_factory=dict)
    #: (model, outcome) -> requests, for metrics; outcome "200", an HTTP status, or an error class
    outcomes: Counter = field(default_factory=Counter)
    #: called with every request log entry (structured logs)
    on_request: Callable[[tuple], None] | None = None

    def log(self, model: str, error: BaseException | str | None, latency_s: float, prompt_tokens: int,
            completion_tokens: int, pack_size: int, cost_usd: float = 0.0, *, cache_read: int = 0,
            cache_write: int = 0, path: str | None = None) -> None:
        """Record one request's outcome: an answer when ``error`` is None, else the error or an outcome name.

        ``cache_read`` and ``cache_write`` are the prompt tokens it read from and wrote to the provider's
        prompt cache (part of ``prompt_tokens``); they are summed into the run's totals here. ``path`` is
        ``"batch"`` for a request that went through a batch API (its model's ``batch_requests`` and
        ``batch_cost_usd`` count it too), None for a real-time one.
        """
        if error is None:
            outcome = "200"
        elif isinstance(error, str):
            outcome = error
        else:
            status = getattr(error, "status", None)
            outcome = str(status) if status else type(error).__name__
        entry = (time.time(), model, outcome, latency_s, prompt_tokens, completion_tokens, pack_size, cache_read,
                 cache_write, cost_usd, path)
        self.request_log.append(entry)
        self.outcomes[(model, outcome)] += 1
        self.cache_read_tokens += cache_read
        self.cache_write_tokens += cache_write
        m = self.by_model.setdefault(model, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                             "cost_usd": 0.0})
        m["requests"] += 1
        m["prompt_tokens"] += prompt_tokens
        m["completion_tokens"] += completion_tokens
        m["cost_usd"] += cost_usd
        m["cache_read_tokens"] = m.get("cache_read_tokens", 0) + cache_read
        m["cache_write_tokens"] = m.get("cache_write_tokens", 0) + cache_write
        if path == "batch":
            m["batch_requests"] = m.get("batch_requests", 0) + 1
            m["batch_cost_usd"] = m.get("batch_cost_usd", 0.0) + cost_usd
        if self.on_request is not None:
            self.on_request(entry)

    def take_request_log(self) -> list[tuple]:
        """The request log entries recorded since the last call (for the ledger); the log starts empty again."""
        log, self.request_log = self.request_log, []
        return log

    def warn(self, message: str) -> None:
        """Say something the user should know about this run (printed even with ``--quiet``)."""
        if self.on_warn is not None:
            self.on_warn(message)

    def halt(self, reason: str) -> None:
        """Stop sending new requests (in-flight ones finish); the first reason is kept and announced."""
        if self.stop_reason is None:
            self.stop_reason = reason
            if self.on_halt is not None:
                self.on_halt(reason)
        self.stop.set()
