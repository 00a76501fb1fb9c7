"""Live Prometheus metrics of one run (``llmap run --metrics-port P``).

:class:`RunMetrics` is a custom collector: each scrape reads the run's live
objects (:class:`~llmap.run.dispatch.DispatchStats`, :class:`~llmap.observe.progress.Tally`
and the dispatcher's :class:`~llmap.control.lanes.Lane` list), so the hot path
increments nothing. :func:`serve_metrics` serves it on ``/metrics`` from a
daemon thread with a registry of its own (never the global one).

Families (every one has a ``job`` label; counters are exposed with ``_total``)::

    llmap_rows{status}                rows by status: done, failed, skipped, fallback, pending (gauge)
    llmap_rows_total                  rows in this run's plan (gauge)
    llmap_requests_total{model,outcome}  requests by outcome: "200", an HTTP status, an error class
    llmap_tokens_total{kind}          usage reported by providers, kind = prompt | completion |
                                      cache_read | cache_write (the prompt tokens read from / written
                                      to the providers' prompt caches, part of prompt)
    llmap_cost_usd_total              USD spent at the models' prices
    llmap_cache_hits_total            rows answered from the cache or an identical request
    llmap_rate_limited_total          429 answers
    llmap_retries_total               attempts after the first
    llmap_hedged_total                hedged copies sent in the run's tail (``[limits] hedge_budget`` bounds them)
    llmap_hedge_cost_usd_total        the estimated cost of hedged copies whose answer was dropped (in cost_usd)
    llmap_in_flight{model}            requests in flight (gauge)
    llmap_concurrency_limit{model}    current adaptive (AIMD) concurrency limit (gauge)
    llmap_rpm_limit{model}            requests per minute in force, when known (gauge)
    llmap_tpm_limit{model}            tokens per minute in force, when known (gauge)
    llmap_itpm_limit{model}           input tokens per minute in force, when known (gauge; Anthropic)
    llmap_otpm_limit{model}           output tokens per minute in force, when known (gauge; Anthropic)
    llmap_breaker_state{model,state}  1 for the breaker's state, 0 for the others (gauge)

Until the engine attaches an object (its function returns None) the families
read from it are exposed without samples.
"""

from __future__ import annotations

import errno
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmap.control.breaker import BreakerState
from llmap.errors import SpecError

if TYPE_CHECKING:
    from llmap.control.lanes import Lane
    from llmap.observe.progress import Tally
    from llmap.run.stats import DispatchStats

__all__ = ["RunMetrics", "serve_metrics"]


def _items(mapping: Any) -> list[tuple[Any, Any]]:
    """Copy a dict another thread may be growing (a resize mid-copy raises RuntimeError: try again)."""
    for _ in range(100):
        try:
            return list(mapping.items())
        except RuntimeError:
            continue
    return []


class RunMetrics(Collector):
    """A Prometheus collector that reads a run's live counters at scrape time.

    Args:
        job: value of the ``job`` label on every sample (the job's name).
        stats_fn: returns the run's :class:`~llmap.run.dispatch.DispatchStats`, or None before it exists.
        tally_fn: returns the run's :class:`~llmap.observe.progress.Tally`, or None before it exists.
        lanes_fn: returns the dispatcher's lanes (one per model), empty before dispatch starts.
    """

    def __init__(self, *, job: str, stats_fn: Callable[[], DispatchStats | None],
                 tally_fn: Callable[[], Tally | None], lanes_fn: Callable[[], Sequence[Lane]]) -> None:
        self.job = job
        self.stats_fn = stats_fn
        self.tally_fn = tally_fn
        self.lanes_fn = lanes_fn

    def collect(self) -> Iterator[Metric]:
        """Yield every family, read from the objects the functions return now."""
        yield from self._rows(self.tally_fn())
        yield from self._dispatch(self.stats_fn(), self.tally_fn())
        yield from self._lanes(list(self.lanes_fn() or ()))

    # -- families -------------------------------------------------------------
    def _gauge(self, name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, labels=["job", *labels])

    def _counter(self, name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, labels=["job", *labels])

    def _rows(self, tally: Tally | None) -> Iterator[Metric]:
        rows = self._gauge("llmap_rows", "Rows of the run's plan by status.", ["status"])
        total = self._gauge("llmap_rows_total", "Rows in the run's plan.")
        if tally is not None:
            settled = {"done": tally.done, "failed": tally.failed, "skipped": tally.skipped,
                       "fallback": tally.fallback}
            for status, n in settled.items():
                rows.add_metric([self.job, status], n)
            rows.add_metric([self.job, "pending"], max(0, tally.total - sum(settled.values())))
            total.add_metric([self.job], tally.total)
        yield rows
        yield total

    def _dispatch(self, stats: DispatchStats | None, tally: Tally | None) -> Iterator[Metric]:
        requests = self._counter("llmap_requests", "Requests sent, by model and outcome "
                                 "(\"200\", an HTTP status, or an error class).", ["model", "outcome"])
        tokens = self._counter("llmap_tokens", "Tokens reported by the providers.", ["kind"])
        cost = self._counter("llmap_cost_usd", "USD spent at the models' prices.")
        rate_limited = self._counter("llmap_rate_limited", "429 answers.")
        retries = self._counter("llmap_retries", "Attempts after the first, per row and model.")
        hedged = self._counter("llmap_hedged", "Hedged copies sent in the run's tail.")
        hedge_cost = self._counter("llmap_hedge_cost_usd", "Estimated USD of hedged copies that lost the race.")
        cache_hits = self._counter("llmap_cache_hits", "Rows answered from the cache or an identical request.")
        if stats is not None:
            for (model, outcome), n in sorted(_items(stats.outcomes)):
                requests.add_metric([self.job, model, outcome], n)
            tokens.add_metric([self.job, "prompt"], stats.prompt_tokens)
            tokens.add_metric([self.job, "completion"], stats.completion_tokens)
            tokens.add_metric([self.job, "cache_read"], stats.cache_read_tokens)
            tokens.add_metric([self.job, "cache_write"], stats.cache_write_tokens)
            cost.add_metric([self.job], stats.cost_usd)
            rate_limited.add_metric([self.job], stats.rate_limited)
            retries.add_metric([self.job], stats.retries)
            hedged.add_metric([self.job], stats.hedged)
            hedge_cost.add_metric([self.job], stats.hedge_cost_usd)
        if tally is not None:
            cache_hits.add_metric([self.job], tally.cache_hits)
        yield from (requests, tokens, cost, cache_hits, rate_limited, retries, hedged, hedge_cost)

    def _lanes(self, lanes: list[Lane]) -> Iterator[Metric]:
        in_flight = self._gauge("llmap_in_flight", "Requests in flight.", ["model"])
        limit = self._gauge("llmap_concurrency_limit", "Current adaptive concurrency limit.", ["model"])
        rpm = self._gauge("llmap_rpm_limit", "Requests per minute in force (configured or learned).", ["model"])
        tpm = self._gauge("llmap_tpm_limit", "Tokens per minute in force (configured or learned).", ["model"])
        itpm = self._gauge("llmap_itpm_limit", "Input tokens per minute in force (configured or learned).",
                           ["model"])
        otpm = self._gauge("llmap_otpm_limit", "Output tokens per minute in force (configured or learned).",
                           ["model"])
        breaker = self._gauge("llmap_breaker_state", "Circuit breaker state: 1 for the current one.",
                              ["model", "state"])
        for lane in lanes:
            labels = [self.job, lane.label]
            in_flight.add_metric(labels, lane.in_flight)
            limit.add_metric(labels, lane.limit)
            rate = lane.limiter.rate
            if rate.requests is not None:
                rpm.add_metric(labels, rate.requests.capacity)
            if rate.tokens is not None:
                tpm.add_metric(labels, rate.tokens.capacity)
            if rate.input_tokens is not None:
                itpm.add_metric(labels, rate.input_tokens.capacity)
            if rate.output_tokens is not None:
                otpm.add_metric(labels, rate.output_tokens.capacity)
            current = lane.breaker.peek()  # a scrape must not move the breaker
            for state in BreakerState:
                breaker.add_metric([*labels, state.value], 1 if state is current else 0)
        yield from (in_flight, limit, rpm, tpm, itpm, otpm, breaker)


def _version(dist: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in re.findall(r"\d+", metadata.version(dist))[:2])
    except metadata.PackageNotFoundError:
        return (0,)


#: ``start_http_server`` returns ``(server, thread)`` from prometheus-client 0.17 on.
_RETURNS_SERVER = _version("prometheus-client") >= (0, 17)


def _free_port(host: str) -> int:
    """A port the OS says is free on ``host`` now (for servers that cannot report the one they bound)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def serve_metrics(metrics: RunMetrics, port: int, host: str = "127.0.0.1") -> tuple[int, Callable[[], None]]:
    """Serve ``metrics`` on ``http://host:port/metrics`` from a daemon thread.

    Args:
        metrics: the run's collector; it is the only one in the served registry.
        port: TCP port; 0 lets the OS pick a free one.
        host: address to bind (loopback by default: the metrics are not for the network).

    Returns:
        ``(port, stop)``: the port actually bound, and a function that shuts the
        server down and frees the port (calling it again does nothing).

    Raises:
        SpecError: the port is in use or cannot be bound (one line naming the fix).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    if port == 0 and not _RETURNS_SERVER:
        port = _free_port(host)  # the server will not tell which port the OS picked
    try:
        started = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise SpecError(f"--metrics-port {port} is in use; choose another port") from exc
        reason = exc.strerror or str(exc)
        raise SpecError(f"--metrics-port {port} cannot be opened on {host} ({reason}); "
                        "choose another port") from exc
    if not isinstance(started, tuple):  # prometheus-client < 0.17: no handle to stop it
        return port, lambda: None
    server, thread = started
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return int(server.server_port), stop
