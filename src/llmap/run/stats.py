"""Run accounting: what one run sent, spent and saw, and how it stops.

:class:`DispatchStats` is the run's counters (requests, tokens, cost, 429s,
retries, a per-request log for the ledger and the metrics) and its stop
signal; :class:`Stop` is raised inside a worker when the run is stopping, so
the row stays pending. It is the one home of billing (:meth:`DispatchStats.bill`:
an answer's tokens and cost, real time or batch) and of merging counters
from elsewhere (:meth:`DispatchStats.take_delta` in a Ray worker,
:meth:`DispatchStats.merge` in the driver).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmap import errors as E

if TYPE_CHECKING:
    from llmap.control.lanes import Lane
    from llmap.providers.base import Completion, Provider

__all__ = ["COUNTERS", "DispatchStats", "Stop", "StatsDelta", "model_stats"]

#: The run counters a remote worker reports as deltas (:meth:`DispatchStats.take_delta`).
COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "cache_read_tokens", "cache_write_tokens", "cost_usd",
            "rate_limited", "retries", "hedged", "hedge_cost_usd")


def model_stats() -> dict[str, float]:
    """One model's usage in a run, all zero: the shape of :attr:`DispatchStats.by_model`'s values
    (and of the ledger's ``runs.by_model``)."""
    return {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "cache_read_tokens": 0,
            "cache_write_tokens": 0}


@dataclass
class StatsDelta:
    """What a run's counters gained since the last :meth:`DispatchStats.take_delta` (a Ray worker's report).

    Attributes:
        counters: :data:`COUNTERS` name -> increase.
        request_log: request log entries since then.
        by_model: per model, the increase of each usage figure.
        outcomes: ``(model, outcome) -> requests`` since then.
    """

    counters: dict[str, float] = field(default_factory=dict)
    request_log: list[tuple] = field(default_factory=list)
    by_model: dict[str, dict[str, float]] = field(default_factory=dict)
    outcomes: Counter = field(default_factory=Counter)


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
        hedged: second copies sent in the run's tail (``[limits] hedge_tail``, within ``hedge_budget``).
        hedge_cost_usd: of ``cost_usd``, the estimated cost of the copies that lost a hedge race
            (their tokens at the model's prices: the provider bills them, the answer was dropped).
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
    hedge_cost_usd: float = 0.0
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
    #: what :meth:`take_delta` reported last
    _sent: StatsDelta = field(default_factory=StatsDelta, repr=False)

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
        m = self.by_model.get(model)
        if m is None:
            m = self.by_model[model] = model_stats()
        m["requests"] += 1
        m["prompt_tokens"] += prompt_tokens
        m["completion_tokens"] += completion_tokens
        m["cost_usd"] += cost_usd
        m["cache_read_tokens"] += cache_read
        m["cache_write_tokens"] += cache_write
        if path == "batch":
            m["batch_requests"] = m.get("batch_requests", 0) + 1
            m["batch_cost_usd"] = m.get("batch_cost_usd", 0.0) + cost_usd
        if self.on_request is not None:
            self.on_request(entry)

    def bill(self, lane: Lane, comp: Completion, pack_size: int, *, path: str | None = None) -> float:
        """Count one answer: its tokens, its cost at the model's prices, and its request log entry.

        The one place an answer is billed, in real time or from a batch. A provider bills the tokens
        it processed, so every answer counts here once, whether or not it validates.

        Args:
            lane: the model that answered (its prices).
            comp: the answer (its usage; estimated by the caller when the server reported none).
            pack_size: rows the request carried.
            path: ``"batch"`` for a batch API answer (priced at ``[model] price_batch_factor``, no
                latency), None for a real-time one.

        Returns:
            The answer's cost in USD.
        """
        cost = lane.cost_usd(comp.prompt_tokens, comp.completion_tokens, comp.cache_read_tokens,
                             comp.cache_write_tokens)
        if path == "batch":
            cost *= lane.model.price_batch_factor
        self.prompt_tokens += comp.prompt_tokens
        self.completion_tokens += comp.completion_tokens
        self.cost_usd += cost
        self.log(lane.label, None, None if path == "batch" else comp.latency_s, comp.prompt_tokens,
                 comp.completion_tokens, pack_size, cost, cache_read=comp.cache_read_tokens,
                 cache_write=comp.cache_write_tokens, path=path)
        return cost

    def take_delta(self) -> StatsDelta:
        """What the counters gained since the last call (the first call: since the start); for a remote
        worker to report to the driver, which :meth:`merge` s it. Takes the request log too."""
        sent = self._sent
        now = {k: getattr(self, k) for k in COUNTERS}
        counters = {k: now[k] - sent.counters.get(k, 0) for k in COUNTERS}
        by_model: dict[str, dict[str, float]] = {}
        for model, m in self.by_model.items():
            before = sent.by_model.get(model, {})
            d = {k: v - before.get(k, 0) for k, v in m.items() if isinstance(v, int | float)}
            if any(d.values()):
                by_model[model] = d
        outcomes = self.outcomes - sent.outcomes
        self._sent = StatsDelta(now, [], {m: dict(v) for m, v in self.by_model.items()}, Counter(self.outcomes))
        return StatsDelta(counters, self.take_request_log(), by_model, outcomes)

    def merge(self, delta: StatsDelta) -> None:
        """Add a remote worker's :meth:`take_delta` to these counters (the Ray driver's run totals)."""
        for k in COUNTERS:
            setattr(self, k, getattr(self, k) + type(getattr(self, k))(delta.counters.get(k, 0)))
        self.request_log.extend(delta.request_log)
        for model, d in delta.by_model.items():
            m = self.by_model.get(model)
            if m is None:
                m = self.by_model[model] = model_stats()
            for k, v in d.items():
                m[k] = m.get(k, 0) + v
        self.outcomes.update(delta.outcomes)

    def note_dialects(self, providers: Sequence[Provider]) -> None:
        """Put each model's structured-output dialect into its per-model record (the ledger's ``runs.by_model``),
        for ``llmap status`` and ``llmap report``."""
        for p in providers:
            if p.structured is None:
                continue
            m = self.by_model.setdefault(p.label, model_stats())
            m["structured"] = p.structured.split(" ", 1)[0]
            m["structured_how"] = p.structured

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
