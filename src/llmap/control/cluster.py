"""The cluster-wide budget: one rate limit, one AIMD limit and one circuit breaker per model,
shared by every worker of a distributed run. Pure: every method takes ``now``.

The Ray executor (:mod:`llmap.run.ray.budget`) keeps one :class:`ClusterBudget`
in a named actor. It is built from the same policy objects a local run uses,
one of each per model: a :class:`~llmap.control.limits.RateLimiter` (RPM/TPM
buckets, Retry-After pauses, limits learned from headers), an
:class:`~llmap.control.concurrency.AIMDConcurrency` and a
:class:`~llmap.control.breaker.CircuitBreaker`. Nothing here is a second
limiter: it only hands those objects' decisions out in chunks.

Workers talk to it in :class:`Report` / :class:`View` pairs, one round trip
per chunk of requests, never one per request:

* **Grants** (chunked reservations). A worker asks for ``want`` requests of
  about ``est_tokens`` tokens each; the budget reserves up to that many from
  the model's :class:`~llmap.control.limits.RateLimiter`, one request at a
  time exactly as a local run would, and grants what was admitted now (maybe
  fewer, maybe none: then ``wait_s`` says when to ask again). A granted
  request is already charged, so the sum of what all workers send never
  exceeds what the one limiter admits: no over-admission. What a worker does
  not use it hands back (``returned_*``) and it is refunded.
* **Settlement.** Each request's real usage is settled against its
  reservation in the limiter's token bucket, in batches (``reserved_tokens``
  and ``actual_tokens`` summed since the last report).
* **Headers and pauses.** The latest rate-limit headers a worker saw update
  the shared limiter (so a header seen by one worker changes everyone's
  budget), and a Retry-After pauses the model for every worker: the pause
  bumps the lane's :attr:`View.version`, which the workers watch.
* **AIMD.** Successes and congestion signals of all workers drive one AIMD
  limit: the cluster's requests in flight. Each worker may keep its share,
  ``ceil(limit / workers)``, in flight.
* **Circuit breaker.** Outage failures and successes of all workers feed one
  breaker. While it is open nobody sends; when its cooldown is over, the
  first worker that asks (``want_probe``) gets the half-open probe and the
  others wait for its verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmap.control.breaker import BreakerState, CircuitBreaker
from llmap.control.concurrency import AIMDConcurrency
from llmap.control.limits import RateLimiter

__all__ = ["ClusterBudget", "LaneLimits", "Report", "View"]


@dataclass(frozen=True, slots=True)
class LaneLimits:
    """One model's limits, as the job gives them.

    Attributes:
        rpm: requests per minute for the whole cluster, or None (learned from headers, else none).
        tpm: tokens per minute for the whole cluster, or None.
        concurrency: the most requests in flight across the cluster (the AIMD ceiling).
        initial: the AIMD limit to start from.
        breaker_cooldown_max_s: the longest breaker cooldown, seconds.
        itpm, otpm: input and output tokens per minute for the whole cluster, or None
            (Anthropic's separate limits; learned from headers too).
    """

    rpm: float | None
    tpm: float | None
    concurrency: int
    initial: int
    breaker_cooldown_max_s: float = 10.0
    itpm: float | None = None
    otpm: float | None = None


@dataclass(slots=True)
class Report:
    """What one worker tells the budget about one model since its last report.

    Attributes:
        worker: the worker's name (any stable string).
        lane: the model's index in the job's ``[[model]]`` list.
        want: requests wanted now (0: no grant asked).
        est_tokens: estimated tokens (prompt + completion) of each wanted request.
        est_output: of ``est_tokens``, the output tokens (for an output-token limit).
        returned_requests, returned_tokens, returned_output: the unused part of earlier
            grants, handed back.
        reserved_tokens, actual_tokens: settlements: the tokens reserved by the requests
            settled since the last report, and the tokens they really used;
            ``reserved_output`` and ``actual_output`` are the output part of each.
        headers: the rate-limit headers of the latest answer, or None.
        headers_age_s: seconds between that request's admission and this report.
        pause_s: a Retry-After seen: admit nothing for this many seconds from now (0: none).
        successes: answers (AIMD additive increase).
        congestions: 429s and overloads (AIMD decrease), with ``in_flight`` the worker's
            requests in flight when the last one came.
        in_flight: the worker's requests in flight now.
        breaker_successes, breaker_failures, breaker_releases: calls the breaker counts as
            healthy, outage failures, and probe slots given back unused.
        want_probe: the breaker's cooldown is over by the worker's reading: it asks for the probe.
        probe_outcome: the verdict of the half-open probe this worker was given (True: an
            answer), or None.
    """

    worker: str
    lane: int
    want: int = 0
    est_tokens: float = 0.0
    est_output: float = 0.0
    returned_requests: int = 0
    returned_tokens: float = 0.0
    returned_output: float = 0.0
    reserved_tokens: float = 0.0
    actual_tokens: float = 0.0
    reserved_output: float = 0.0
    actual_output: float = 0.0
    headers: dict[str, str] | None = None
    headers_age_s: float = 0.0
    pause_s: float = 0.0
    successes: int = 0
    congestions: int = 0
    in_flight: int = 0
    breaker_successes: int = 0
    breaker_failures: int = 0
    breaker_releases: int = 0
    want_probe: bool = False
    probe_outcome: bool | None = None

    def has_news(self) -> bool:
        """True when the report carries anything besides a grant request."""
        return bool(self.returned_requests or self.returned_tokens or self.reserved_tokens or self.actual_tokens
                    or self.returned_output or self.reserved_output or self.actual_output
                    or self.headers or self.pause_s or self.successes or self.congestions
                    or self.breaker_successes or self.breaker_failures or self.breaker_releases or self.want_probe
                    or self.probe_outcome is not None)


@dataclass(slots=True)
class View:
    """What the budget answers a worker about one model.

    Attributes:
        requests: requests granted (each may be sent once; already charged).
        tokens: tokens reserved for them, in all; ``output``: of those, output tokens.
        wait_s: when ``requests`` is 0 and some were wanted: seconds until asking again may succeed.
        limited: an RPM or TPM budget is in force (configured or learned).
        paused_s: seconds from now during which nothing is admitted (Retry-After), 0 when none.
        share: requests this worker may keep in flight: ``ceil(AIMD limit / workers)``.
        breaker: the breaker's state (``closed``, ``open``, ``half_open``).
        probe_in_s: while open, seconds until a probe may go.
        probe_owner: while half-open, the worker whose probe is out, or None.
        version: bumped on every change a worker must hear of at once (pause, breaker, share).
    """

    requests: int = 0
    tokens: float = 0.0
    output: float = 0.0
    wait_s: float = 0.0
    limited: bool = False
    paused_s: float = 0.0
    share: int = 1
    breaker: str = "closed"
    probe_in_s: float = 0.0
    probe_owner: str | None = None
    version: int = 0


@dataclass
class _Lane:
    limits: LaneLimits
    rate: RateLimiter
    aimd: AIMDConcurrency
    breaker: CircuitBreaker
    in_flight: dict[str, int] = field(default_factory=dict)
    probe_owner: str | None = None
    version: int = 0
    granted: bool = False
    headers_seen: bool = False


class ClusterBudget:
    """The shared budget of every model of one job (see the module docstring).

    Args:
        lanes: one :class:`LaneLimits` per model, primary first.
        workers: the workers expected (shares are ``ceil(limit / max(workers, seen))``).
        now: clock seconds.

    Raises:
        ValueError: an rpm or tpm that is not > 0, or an AIMD bound out of range.
    """

    def __init__(self, lanes: Sequence[LaneLimits], *, workers: int = 1, now: float) -> None:
        self.expected = max(1, workers)
        self.seen: set[str] = set()
        self._lanes = [self._lane(limits, now) for limits in lanes]

    @staticmethod
    def _lane(limits: LaneLimits, now: float) -> _Lane:
        cap = max(1, limits.concurrency)
        aimd = AIMDConcurrency(initial=max(1, min(cap, limits.initial)), minimum=1, maximum=cap)
        breaker = CircuitBreaker(cooldown_max_s=limits.breaker_cooldown_max_s, clock=lambda: now)
        return _Lane(limits, _rate(limits, now), aimd, breaker)

    def __len__(self) -> int:
        return len(self._lanes)

    def version(self, lane: int) -> int:
        """The lane's change counter (see :attr:`View.version`)."""
        return self._lanes[lane].version

    def rate(self, lane: int) -> RateLimiter:
        """The lane's rate limiter (for reports and tests; change it only through :meth:`sync`)."""
        return self._lanes[lane].rate

    def workers(self) -> int:
        """The workers shares are counted for: the expected ones, or more if more reported."""
        return max(self.expected, len(self.seen))

    # -- one round trip ---------------------------------------------------------
    def sync(self, r: Report, now: float) -> View:
        """Apply a worker's report and grant what it wants that is admitted now.

        Args:
            r: the report.
            now: clock seconds.

        Returns:
            The lane's :class:`View` for this worker, with the grant.
        """
        lane = self._lanes[r.lane]
        before = (lane.rate.paused_until, lane.breaker.state_at(now), lane.probe_owner, self._share(lane))
        if r.worker not in self.seen:
            self.seen.add(r.worker)
        lane.in_flight[r.worker] = r.in_flight
        self._apply(lane, r, now)
        granted, wait = self._grant(lane, r.want, r.est_tokens, r.est_output, now) if r.want > 0 else (0, 0.0)
        after = (lane.rate.paused_until, lane.breaker.state_at(now), lane.probe_owner, self._share(lane))
        if after != before:
            lane.version += 1
        view = self.view(r.lane, r.worker, now)
        view.requests, view.wait_s = granted, wait
        view.tokens, view.output = granted * r.est_tokens, granted * r.est_output
        return view

    def view(self, lane_index: int, worker: str, now: float) -> View:
        """The lane's state for ``worker`` at ``now``, without a grant."""
        lane = self._lanes[lane_index]
        state = lane.breaker.state_at(now)
        probe_in = lane.breaker.time_until_probe(now) if state is BreakerState.OPEN else 0.0
        return View(limited=lane.rate.limited, paused_s=max(0.0, lane.rate.paused_until - now),
                    share=self._share(lane), breaker=state.value, probe_in_s=probe_in,
                    probe_owner=lane.probe_owner if state is BreakerState.HALF_OPEN else None,
                    version=lane.version)

    # -- the parts ----------------------------------------------------------------
    def _apply(self, lane: _Lane, r: Report, now: float) -> None:
        rate = lane.rate
        if r.returned_requests and rate.requests is not None:
            rate.requests.refund(r.returned_requests, now)
        if r.returned_tokens:
            rate.settle(r.returned_tokens, 0.0, now, reserved_output=r.returned_output, actual_output=0.0)
        if r.reserved_tokens or r.actual_tokens:
            rate.settle(r.reserved_tokens, r.actual_tokens, now, reserved_output=r.reserved_output,
                        actual_output=r.actual_output)
        if r.headers:
            lane.headers_seen = True
            rate.update_from_headers(r.headers, now, sent_at=now - max(0.0, r.headers_age_s))
        if r.pause_s > 0:
            rate.pause_until(now + r.pause_s)
        for _ in range(r.successes):
            lane.aimd.on_success()
        if r.congestions:  # one burst of 429s halves the cluster's limit once (AIMD's holdoff)
            lane.aimd.on_congestion(sum(lane.in_flight.values()))
        self._breaker(lane, r, now)

    def _breaker(self, lane: _Lane, r: Report, now: float) -> None:
        b = lane.breaker
        owner = r.worker == lane.probe_owner
        if r.probe_outcome is not None and owner:
            b.record_success(now) if r.probe_outcome else b.record_failure(now)
            lane.probe_owner = None
        elif r.breaker_releases and owner:
            b.release(now)
            lane.probe_owner = None
        if b.state_at(now) is BreakerState.CLOSED:  # while open or half-open, outcomes of older calls say nothing
            for _ in range(r.breaker_failures):
                b.record_failure(now)
            if b.state_at(now) is BreakerState.CLOSED:
                for _ in range(r.breaker_successes):
                    b.record_success(now)
        if b.state_at(now) is not BreakerState.HALF_OPEN:
            lane.probe_owner = None
        if r.want_probe and lane.probe_owner is None and b.state_at(now) is not BreakerState.CLOSED \
                and b.allow(now):
            lane.probe_owner = r.worker

    def _grant(self, lane: _Lane, want: int, est_tokens: float, est_output: float, now: float) -> tuple[int, float]:
        """Reserve up to ``want`` requests of ``est_tokens`` each, one at a time, as a local run would.
        Returns ``(granted, seconds to wait when none was)``."""
        if not lane.granted:  # the budget's clock starts at the first request: nothing accrues while workers start
            lane.granted = True
            if not lane.headers_seen and lane.rate.paused_until == -math.inf:
                lane.rate = _rate(lane.limits, now)
        rate = lane.rate
        if not rate.limited:
            return want, 0.0
        granted, wait = 0, 0.0
        while granted < want:
            wait = rate.reserve(est_tokens, now, est_output=est_output)
            if wait > 0:
                break
            granted += 1
        return granted, (wait if granted == 0 else 0.0)

    def _share(self, lane: _Lane) -> int:
        return max(1, math.ceil(lane.aimd.limit / self.workers()))


def _rate(limits: LaneLimits, now: float) -> RateLimiter:
    return RateLimiter(limits.rpm, limits.tpm, itpm=limits.itpm, otpm=limits.otpm, now=now)

