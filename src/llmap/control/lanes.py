"""Lanes and failover: one lane per ``[[model]]``, tried in order.

A :class:`Lane` bundles what llmap knows about one (provider, model): its
rate limiter (RPM/TPM, Retry-After pauses, budgets learned from headers),
its adaptive concurrency gate (AIMD), its circuit breaker, its adaptive
timeout and its token estimators. :func:`pick_lane` is the failover rule:
the first lane at or after a row's starting lane whose breaker lets a call
through.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from llmap.control.breaker import BreakerState, CircuitBreaker
from llmap.control.concurrency import AIMDConcurrency
from llmap.control.limits import Limiter, Permit, RateLimiter
from llmap.control.timeouts import AdaptiveTimeout
from llmap.control.tokens import CountedShare, OutputTokenEstimator, PromptTokenEstimator
from llmap.pricing import cost_usd
from llmap.providers.base import Provider
from llmap.spec import LimitsSpec, ModelSpec

__all__ = ["Lane", "LaneAIMD", "LaneBreaker", "LaneLimiter", "pick_lane"]

#: Starting in-flight limit when the job sets no ``concurrency`` (AIMD grows it).
INITIAL_CONCURRENCY = 16
#: Ceiling of adaptive concurrency when the job sets no ``concurrency``.
MAX_CONCURRENCY = 256
#: Longest wait between half-open probes of a down model, seconds: the cooldown doubles
#: from 2 s while probes fail, up to this, so traffic returns within ~10 s of a recovery.
BREAKER_COOLDOWN_MAX_S = 10.0


@runtime_checkable
class LaneLimiter(Protocol):
    """What the dispatcher asks of a lane's rate limiter: the local
    :class:`~llmap.control.limits.Limiter`, or a worker's link to a cluster-wide budget
    (:class:`llmap.run.ray.budget.BudgetLink`)."""

    @property
    def limited(self) -> bool: ...

    async def acquire(self, est_tokens: float = 0.0, *, est_output: float = 0.0) -> Permit: ...

    def settle(self, permit: Permit, actual_tokens: float, *, actual_output: float | None = None) -> None: ...

    def pause_for(self, seconds: float) -> None: ...

    def update_from_headers(self, headers: Mapping[str, str], *, sent_at: float | None = None) -> Any: ...


@runtime_checkable
class LaneAIMD(Protocol):
    """What the dispatcher asks of a lane's adaptive concurrency limit: the local
    :class:`~llmap.control.concurrency.AIMDConcurrency`, or a worker's share of the cluster's
    (:class:`llmap.run.ray.budget.SharedAIMD`)."""

    @property
    def limit(self) -> int:
        """Requests allowed in flight now."""
        ...

    @property
    def maximum(self) -> int:
        """The highest :attr:`limit` can go."""
        ...

    def on_success(self) -> bool:
        """Count an answer; True when the limit grew (waiters may go)."""
        ...

    def on_congestion(self, in_flight: int | None = None) -> bool:
        """Count a 429 or an overload, with ``in_flight`` requests out; True when the limit was cut."""
        ...


@runtime_checkable
class LaneBreaker(Protocol):
    """What the dispatcher, failover (:func:`pick_lane`) and the metrics ask of a lane's circuit
    breaker: the local :class:`~llmap.control.breaker.CircuitBreaker`, or a worker's view of the
    cluster's (:class:`llmap.run.ray.budget.SharedBreaker`). ``now`` is clock seconds (None: the
    breaker's clock)."""

    def allow(self, now: float | None = None) -> bool:
        """True when a call may go now (a half-open probe slot is taken)."""
        ...

    def release(self, now: float | None = None) -> None:
        """Give back a probe slot taken by :meth:`allow` whose outcome will not be recorded."""
        ...

    def record_success(self, now: float | None = None) -> None:
        """A call reached a healthy provider."""
        ...

    def record_failure(self, now: float | None = None) -> None:
        """An outage-type failure (timeout, refused connection, 5xx, overload)."""
        ...

    def time_until_probe(self, now: float | None = None) -> float:
        """Seconds until :meth:`allow` may let a call through (``inf``: wait for a probe's outcome)."""
        ...

    def peek(self, now: float | None = None) -> BreakerState:
        """The state a call at ``now`` would see, changing nothing (safe from another thread)."""
        ...


class Lane:
    """Everything the dispatcher tracks for one model.

    Args:
        index: position in the job's ``[[model]]`` list (0 = primary).
        provider: the provider (see :class:`llmap.providers.base.Provider`).
        model: the ``[model]`` spec (prices, max_tokens, timeout, rpm/tpm overrides).
        limits: the ``[limits]`` spec (rpm, tpm, concurrency).
        clock: monotonic seconds (the rate limiter, the breaker); ``sleep``: awaits seconds while the
            rate limiter paces requests (default ``asyncio.sleep``). Tests pass fakes that move time.
        on_breaker: called ``(lane, old_state, new_state)`` when the breaker changes.
    """

    def __init__(self, index: int, provider: Provider, model: ModelSpec, limits: LimitsSpec, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                 on_breaker: Callable[[Lane, BreakerState, BreakerState], None] | None = None) -> None:
        self.index = index
        self.provider = provider
        self.model = model
        self.label: str = provider.label
        rpm = model.rpm or limits.rpm
        tpm = model.tpm or limits.tpm
        itpm = model.itpm or limits.itpm
        otpm = model.otpm or limits.otpm
        self.limiter: LaneLimiter = Limiter(RateLimiter(rpm, tpm, itpm=itpm, otpm=otpm, now=clock()), clock=clock,
                                            sleep=sleep)
        self._sleep = sleep
        #: the provider sizes its own concurrency (the embedded model: processes x sequences, where [limits]
        #: concurrency counts processes): filled at once, no probe, no shared AIMD gate, no hedged copies
        self.own_concurrency = own = bool(getattr(provider, "own_concurrency", False))
        cap = provider.max_concurrency if own else min(limits.concurrency or MAX_CONCURRENCY, provider.max_concurrency)
        initial = cap if own else min(cap, limits.concurrency or INITIAL_CONCURRENCY)
        self.aimd: LaneAIMD = AIMDConcurrency(initial=initial, minimum=1, maximum=cap)
        self.breaker: LaneBreaker = CircuitBreaker(
            cooldown_max_s=BREAKER_COOLDOWN_MAX_S,
            clock=clock,
            on_change=(lambda old, new: on_breaker(self, old, new)) if on_breaker else None,
        )
        #: Nothing is known of this model's limits (none configured), or its provider still learns what
        #: the server takes (``discovering``): one request goes first, and the rest wait for its answer,
        #: which may carry rate-limit headers (see :meth:`on_success`); with known limits, at most the
        #: provider's ``discovery_grace_s`` (see :meth:`_grace`).
        self.probing = self._probes(self.limiter)
        self._grace_task: asyncio.Task | None = None
        self._cap = cap
        self.timeout = AdaptiveTimeout(model.timeout_s)
        self.output_tokens = OutputTokenEstimator(model.max_tokens)
        self.prompt_tokens = PromptTokenEstimator()
        #: the share of prompt tokens that count against the input-token limit (cache reads do not)
        self.counted = CountedShare()
        self.in_flight = 0
        #: Why this model is left out of the run (it refused every request the same way), or None.
        self.disabled: str | None = None
        self._waiters: deque[asyncio.Future] = deque()
        #: requests in flight: id -> (loop start time, asyncio.Timeout), for the timeout watchdog
        self.deadlines: dict[int, tuple[float, asyncio.Timeout]] = {}

    def plug(self, limiter: LaneLimiter, aimd: LaneAIMD, breaker: LaneBreaker) -> None:
        """Use a rate limiter, AIMD limit and circuit breaker shared with other processes
        (the Ray executor's cluster-wide budget, :mod:`llmap.run.ray.budget`: a
        :class:`~llmap.run.ray.budget.BudgetLink` and its ``aimd`` and ``breaker`` views)
        instead of this lane's own. A provider that sizes its own concurrency (the embedded model: each Ray
        worker runs its own model processes) keeps its own AIMD gate: there is no shared budget to split."""
        self.limiter, self.breaker = limiter, breaker
        if not self.own_concurrency:
            self.aimd = aimd
        self.probing = self._probes(limiter)

    def _probes(self, limiter: LaneLimiter) -> bool:
        if self.own_concurrency:
            return False
        return not limiter.limited or bool(getattr(self.provider, "discovering", False))

    @property
    def max_in_flight(self) -> int:
        """The ceiling of this lane's concurrency."""
        return self.aimd.maximum

    # -- concurrency gate -----------------------------------------------------
    @property
    def limit(self) -> int:
        """Requests allowed in flight now: 1 while probing, else the AIMD limit."""
        return 1 if self.probing else self.aimd.limit

    async def enter(self) -> None:
        """Wait for a free slot under the current limit (:attr:`limit`), then take it."""
        while self.in_flight >= self.limit:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._wake()  # pass the wake-up on
                raise
        self.in_flight += 1
        if self.probing and self._grace_task is None and self.limiter.limited:
            grace = getattr(self.provider, "discovery_grace_s", None)  # read now: the preflight may have set it
            if grace is not None:
                self._grace_task = asyncio.ensure_future(self._grace(grace))

    async def _grace(self, seconds: float) -> None:
        """End the probe ``seconds`` after its request went, if no answer has ended it sooner.

        Only when the limits are known (told, or read from headers) and the provider
        says what it is still learning shows itself *at once* (``discovery_grace_s``:
        an OpenAI-compatible server refuses a request shape on arrival, before any
        generation, so a refusal comes back within a round trip, long before an
        answer). Waiting for the whole answer would leave the server's bucket full
        and idle for a generation's time (B17: 0.98 s of a 30 s job). A refusal
        that comes later than the grace costs one refused request per row sent
        meanwhile; each is sent again at once in the next shape (see
        :mod:`llmap.providers.openai`).
        """
        await self._sleep(seconds)
        if self.probing:
            self.probing = False
            self._wake()

    def leave(self) -> None:
        """Free a slot taken by :meth:`enter`."""
        self.in_flight -= 1
        if self._grace_task is not None and (self.probing or self._grace_task.done()):
            self._grace_task.cancel()  # the probe ended without an answer: the next request probes, with its own grace
            self._grace_task = None
        self._wake()

    def _wake(self) -> None:
        free = self.limit - self.in_flight
        while free > 0 and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                free -= 1

    # -- outcomes -------------------------------------------------------------
    def on_success(self) -> None:
        """An answer came back (its headers already applied to the limiter).

        The first answer ends the probe: with rate-limit headers the limiter
        now paces requests and the AIMD limit applies as configured; without
        them nothing bounds a burst, so concurrency slow-starts from 2 (it
        doubles every round trip up to the ceiling) instead of sending the
        whole first wave at once.
        """
        if self._grace_task is not None:
            self._grace_task.cancel()
            self._grace_task = None
        if self.probing:
            self.probing = False
            if not self.limiter.limited and isinstance(self.aimd, AIMDConcurrency):  # a plugged one keeps its state
                self.aimd = AIMDConcurrency(initial=min(2, self._cap), minimum=1, maximum=self._cap)
            self._wake()
        elif self.aimd.on_success():
            self._wake()

    def on_congestion(self) -> None:
        self.aimd.on_congestion(self.in_flight)

    def reservation(self, prompt_chars: int, items: int = 1) -> tuple[float, float]:
        """Tokens to reserve for a request of ``prompt_chars`` characters answering ``items`` rows.

        Returns:
            ``(tokens, output)``: the prompt tokens expected to count against
            the input limit (the estimate times :attr:`counted`'s share) plus the
            output estimate, and the output estimate alone (for the OTPM bucket).
        """
        output = float(self.output_tokens.estimate() * items)
        return self.prompt_tokens.estimate(prompt_chars) * self.counted.share + output, output

    def cost_usd(self, prompt_tokens: int, completion_tokens: int, cache_read_tokens: int = 0,
                 cache_write_tokens: int = 0) -> float:
        """USD for this usage at the model's prices (see :func:`llmap.pricing.cost_usd`)."""
        return cost_usd(self.model, prompt_tokens, completion_tokens, cache_read_tokens, cache_write_tokens)


def pick_lane(lanes: Sequence[Lane], start: int, now: float) -> tuple[Lane | None, float]:
    """The failover rule.

    Args:
        lanes: every lane, primary first.
        start: the first lane this row may use (a row that spent its retries
            on lane ``i`` starts at ``i + 1``).
        now: monotonic seconds.

    Returns:
        ``(lane, 0.0)`` for the first lane from ``start`` whose breaker allows
        a call (a half-open breaker's probe slot is taken), else ``(None,
        seconds until the soonest breaker will let a probe through)``;
        ``inf`` when every lane from ``start`` is disabled. Disabled lanes
        (:attr:`Lane.disabled`) are skipped.
    """
    wait = math.inf
    for lane in lanes[start:]:
        if lane.disabled is not None:  # misconfigured: never comes back in this run
            continue
        if lane.breaker.allow(now):
            return lane, 0.0
        wait = min(wait, lane.breaker.time_until_probe(now))
    return None, wait
