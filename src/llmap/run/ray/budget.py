"""The cluster-wide budget on Ray: a named async actor, and each worker's link to it.

* :class:`BudgetService` is the actor's body: a pure
  :class:`~llmap.control.cluster.ClusterBudget` behind two async methods.
  ``sync`` applies a worker's :class:`~llmap.control.cluster.Report` and, when
  the worker wants requests, waits in the actor (first come, first served, per
  model) until at least one is admitted. ``watch`` is a long poll that answers
  as soon as a model's shared state changes (a Retry-After pause, the breaker,
  the AIMD share), so a 429 seen by one worker pauses every worker at once.
* :class:`BudgetLink` is one worker's side of one model. It plugs into the
  worker's :class:`~llmap.control.lanes.Lane` as its limiter
  (:class:`~llmap.control.lanes.LaneLimiter`), its AIMD limit
  (:class:`SharedAIMD`) and its circuit breaker (:class:`SharedBreaker`),
  so llmap's own dispatcher runs unchanged on top. Requests are taken from a
  local grant (no round trip); the link asks for a new chunk when the grant
  is spent or older than :data:`GRANT_TTL_S`, and sends settlements, headers
  and outcomes with it, or every :data:`PUMP_S` seconds.

Neither class imports Ray: the actor is made with :func:`budget_actor`, and
the link takes its two calls as plain awaitables, so both are tested
in-process with a fake clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from llmap.control.breaker import BreakerState
from llmap.control.cluster import ClusterBudget, LaneLimits, Report, View
from llmap.control.lanes import BREAKER_COOLDOWN_MAX_S, INITIAL_CONCURRENCY, MAX_CONCURRENCY
from llmap.control.limits import Permit
from llmap.spec import JobSpec

__all__ = ["BudgetLink", "BudgetService", "SharedAIMD", "SharedBreaker", "budget_actor", "budget_name",
           "lane_limits"]

#: A grant older than this is handed back before more is taken, seconds: every worker hears the
#: shared budget at least this often while it sends.
GRANT_TTL_S = 1.0
#: A chunk covers about this many seconds of the worker's recent request rate.
CHUNK_S = 0.25
#: The most requests one chunk grants.
CHUNK_MAX = 32
#: Settlements, headers and outcomes are sent at least this often when there are any, seconds.
PUMP_S = 0.2
#: A watch answers after this long even when nothing changed, seconds.
WATCH_S = 5.0


def lane_limits(spec: JobSpec) -> list[LaneLimits]:
    """Each ``[[model]]``'s limits for the whole cluster: ``rpm``/``tpm``/``itpm``/``otpm`` (the model's, else
    ``[limits]``'s) and ``[limits] concurrency`` as the cluster's ceiling of requests in flight
    (default: adaptive from 16 up to 256 per worker)."""
    lim = spec.limits
    out = []
    for m in spec.models:
        rpm, tpm = m.rpm or lim.rpm, m.tpm or lim.tpm
        cap = lim.concurrency or MAX_CONCURRENCY
        initial = min(cap, lim.concurrency or INITIAL_CONCURRENCY)
        out.append(LaneLimits(rpm, tpm, cap, initial, BREAKER_COOLDOWN_MAX_S, itpm=m.itpm or lim.itpm,
                              otpm=m.otpm or lim.otpm))
    return out


def budget_name(spec: JobSpec) -> str:
    """The budget actor's name: one per set of models (provider, name, base URL) and their limits,
    so jobs and pipelines that call the same models with the same limits on one cluster share one
    budget, and a job whose limits changed gets a budget of its own."""
    ident = "|".join(f"{m.provider}:{m.name}@{m.base_url or m.model_path or ''}" for m in spec.models)
    ident += repr(lane_limits(spec))
    return "llmap-budget-" + hashlib.sha256(ident.encode()).hexdigest()[:16]


class BudgetService:
    """The budget actor's body (see the module docstring).

    Args:
        lanes: one :class:`~llmap.control.cluster.LaneLimits` per model.
        workers: the workers expected.
        clock: monotonic seconds; ``sleep``: awaitable delay (both injectable).
    """

    def __init__(self, lanes: Sequence[LaneLimits], workers: int = 1, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        self.clock, self.sleep = clock, sleep
        self.budget = ClusterBudget(lanes, workers=workers, now=clock())
        self._locks: list[asyncio.Lock] | None = None
        self._changed: list[asyncio.Event] | None = None

    def _events(self) -> tuple[list[asyncio.Lock], list[asyncio.Event]]:
        if self._locks is None or self._changed is None:  # made in the actor's event loop
            self._locks = [asyncio.Lock() for _ in range(len(self.budget))]
            self._changed = [asyncio.Event() for _ in range(len(self.budget))]
        return self._locks, self._changed

    def expect(self, workers: int) -> None:
        """Count shares for at least ``workers`` workers."""
        self.budget.expected = max(self.budget.expected, workers)

    async def sync(self, report: Report) -> View:
        """Apply ``report``; when it wants requests, wait until at least one is admitted.

        Waiters for one model are served first come, first served, and each
        asks the limiter again after its sleep, so a pause that arrived
        meanwhile is honoured.
        """
        locks, _ = self._events()
        want, report.want = report.want, 0
        version = self.budget.version(report.lane)
        view = self.budget.sync(report, self.clock())
        self._notify(report.lane, version)
        if want <= 0:
            return view
        grant = Report(report.worker, report.lane, want=want, est_tokens=report.est_tokens,
                       est_output=report.est_output, in_flight=report.in_flight)
        async with locks[report.lane]:
            while True:
                version = self.budget.version(report.lane)
                view = self.budget.sync(grant, self.clock())
                self._notify(report.lane, version)
                if view.requests > 0 or math.isinf(view.wait_s):
                    return view
                await self.sleep(view.wait_s)

    async def watch(self, lane: int, worker: str, version: int, timeout_s: float = WATCH_S) -> View:
        """The model's view once its version differs from ``version``, or after ``timeout_s`` seconds."""
        _, changed = self._events()
        if self.budget.version(lane) == version:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed[lane].wait(), timeout_s)
        return self.budget.view(lane, worker, self.clock())

    def _notify(self, lane: int, version: int) -> None:
        if self.budget.version(lane) != version:
            _, changed = self._events()
            changed[lane].set()
            changed[lane] = asyncio.Event()

    async def limits(self, lane: int) -> dict[str, Any]:
        """The model's limits in force (for reports and tests): ``rpm``, ``tpm``, ``paused_s``, ``share``."""
        rate = self.budget.rate(lane)
        view = self.budget.view(lane, "", self.clock())
        return {"rpm": rate.requests.capacity if rate.requests else None,
                "tpm": rate.tokens.capacity if rate.tokens else None,
                "paused_s": view.paused_s, "share": view.share, "breaker": view.breaker}


def budget_actor(spec: JobSpec, *, workers: int, name: str | None = None) -> Any:
    """The job's budget actor on the connected Ray cluster: found by name, else created.

    The first job to create the actor for a set of models sets its limits; later
    ones join it. This process keeps a handle, so the actor lives as long as the
    process (Ray ends an actor once every handle to it is gone).
    """
    import ray

    name = name or budget_name(spec)
    held = (name, ray.get_runtime_context().get_node_id())  # a new cluster has new node ids
    actor = _HELD.get(held)
    if actor is None:
        actor = _HELD[held] = ray.remote(BudgetService).options(
            name=name, namespace="llmap", get_if_exists=True, num_cpus=0, max_concurrency=10_000,
        ).remote(lane_limits(spec), workers)
    actor.expect.remote(workers)
    return actor


#: Budget actors this process made or joined, by (name, node id): held so that they live on.
_HELD: dict[tuple[str, str], Any] = {}


class BudgetLink:
    """One worker's link to one model's shared budget; the lane's limiter.

    Args:
        worker: this worker's name.
        lane: the model's index.
        sync: sends a :class:`~llmap.control.cluster.Report`, returns the
            :class:`~llmap.control.cluster.View` (``actor.sync.remote``).
        watch: ``(lane, worker, version) -> View`` long poll (``actor.watch.remote``).
        cap: this worker's own ceiling of requests in flight (its provider's).
        clock: monotonic seconds; ``sleep``: awaitable delay (both injectable).
    """

    def __init__(self, worker: str, lane: int, *, sync: Callable[[Report], Awaitable[View]],
                 watch: Callable[[int, str, int], Awaitable[View]], cap: int = MAX_CONCURRENCY,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        self.worker, self.lane, self.cap = worker, lane, cap
        self._sync, self._watch = sync, watch
        self.clock, self.sleep = clock, sleep
        self.view = View()
        self._report = Report(worker, lane)
        self._headers_at: float | None = None
        self._grant_requests, self._grant_tokens, self._grant_output, self._granted_at = 0, 0.0, 0.0, -math.inf
        self._paused_until = -math.inf
        self._probe_at = -math.inf
        self._rate = 0.0  # EWMA of requests per second taken from grants
        self._taken = 0
        self._lock = asyncio.Lock()
        self._kick = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.in_flight: Callable[[], int] = lambda: 0
        self.aimd = SharedAIMD(self)
        self.breaker = SharedBreaker(self)

    # -- life -------------------------------------------------------------------
    async def start(self) -> None:
        """Learn the model's shared state, then keep up with it (a pump and a watch task)."""
        self._apply(await self._sync(self._take_report()))
        self._tasks = [asyncio.create_task(self._pump(), name="llmap-budget-pump"),
                       asyncio.create_task(self._follow(), name="llmap-budget-watch")]

    async def aclose(self) -> None:
        """Hand back the unused grant, send what is pending, stop the tasks."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        r = self._take_report()
        r.returned_requests, r.returned_tokens, r.returned_output = (self._grant_requests, self._grant_tokens,
                                                                     self._grant_output)
        self._grant_requests, self._grant_tokens, self._grant_output = 0, 0.0, 0.0
        if r.has_news():
            with contextlib.suppress(Exception):
                await self._sync(r)

    async def _pump(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), PUMP_S)
            self._kick.clear()
            if self._report.has_news():
                self._apply(await self._sync(self._take_report()))

    async def _follow(self) -> None:
        while True:
            self._apply(await self._watch(self.lane, self.worker, self.view.version))

    def _apply(self, view: View) -> None:
        if view.version < self.view.version:
            return  # an older answer than one already applied
        now = self.clock()
        if view.paused_s > 0:
            self._paused_until = max(self._paused_until, now + view.paused_s)
        if view.breaker == BreakerState.OPEN.value:
            self._probe_at = now + view.probe_in_s
        self.view = view

    def _take_report(self) -> Report:
        r, self._report = self._report, Report(self.worker, self.lane)
        r.in_flight = self.in_flight()
        if self._headers_at is not None:
            r.headers_age_s = max(0.0, self.clock() - self._headers_at)
            self._headers_at = None
        return r

    # -- what the lane's AIMD and breaker views report (sent with the next report) ----
    @property
    def probe_due_at(self) -> float:
        """Clock time the shared breaker's cooldown ends (``-inf`` until it has opened), seconds."""
        return self._probe_at

    def report_success(self) -> None:
        """An answer came back: counts toward the shared AIMD limit's growth."""
        self._report.successes += 1

    def report_congestion(self) -> None:
        """A 429 or an overload: sent at once, so the budget cuts the cluster's limit (once per burst)."""
        self._report.congestions += 1
        self._kick.set()

    def report_call(self, failed: bool) -> None:
        """A call's outcome for the shared breaker's window (not a probe); a failure is sent at once."""
        if failed:
            self._report.breaker_failures += 1
            self._kick.set()
        else:
            self._report.breaker_successes += 1

    def ask_probe(self) -> None:
        """Ask the budget for the half-open probe (sent at once)."""
        self._report.want_probe = True
        self._kick.set()

    def report_probe(self, succeeded: bool) -> None:
        """The outcome of the half-open probe this worker was given (sent at once)."""
        self._report.probe_outcome = succeeded
        self._kick.set()

    def release_probe(self) -> None:
        """Give back the half-open probe unused (sent at once), so another worker may take it."""
        self._report.breaker_releases += 1
        self._kick.set()

    # -- the limiter (llmap.control.lanes.LaneLimiter) ----------------------------------
    @property
    def limited(self) -> bool:
        """True when the shared budget has an RPM or TPM limit (configured or learned)."""
        return self.view.limited

    async def acquire(self, est_tokens: float = 0.0, *, est_output: float = 0.0) -> Permit:
        """Wait until a request of ``est_tokens`` tokens (``est_output`` of them output) may go, and
        take it from the local grant.

        Raises:
            asyncio.CancelledError: when cancelled while waiting; nothing is taken.
        """
        start = self.clock()
        async with self._lock:
            while True:
                now = self.clock()
                if now < self._paused_until:
                    await self.sleep(self._paused_until - now)
                    continue
                if not self.view.limited:
                    return Permit(tokens=est_tokens, sent_at=now, waited_s=now - start, output=est_output)
                if (self._grant_requests >= 1 and self._grant_tokens + 1e-9 >= est_tokens
                        and self._grant_output + 1e-9 >= est_output and now - self._granted_at <= GRANT_TTL_S):
                    self._grant_requests -= 1
                    self._grant_tokens -= est_tokens
                    self._grant_output -= est_output
                    self._taken += 1
                    return Permit(tokens=est_tokens, sent_at=now, waited_s=now - start, output=est_output)
                await self._refill(est_tokens, est_output)

    async def _refill(self, est_tokens: float, est_output: float) -> None:
        """Hand back what is left of the grant and ask for a chunk sized to the recent rate."""
        now = self.clock()
        if self._granted_at > -math.inf and now > self._granted_at:
            rate = self._taken / max(now - self._granted_at, 1e-3)
            self._rate = rate if self._rate == 0 else 0.7 * self._rate + 0.3 * rate
        r = self._take_report()
        r.returned_requests, r.returned_tokens, r.returned_output = (self._grant_requests, self._grant_tokens,
                                                                     self._grant_output)
        r.want = max(1, min(CHUNK_MAX, math.ceil(self._rate * CHUNK_S)))
        r.est_tokens, r.est_output = est_tokens, est_output
        self._grant_requests, self._grant_tokens, self._grant_output, self._taken = 0, 0.0, 0.0, 0
        view = await self._sync(r)
        self._apply(view)
        self._grant_requests, self._grant_tokens, self._grant_output = view.requests, view.tokens, view.output
        self._granted_at = self.clock()
        if view.requests == 0 and view.limited:
            await self.sleep(max(view.wait_s, 0.01) if not math.isinf(view.wait_s) else 1.0)

    def settle(self, permit: Permit, actual_tokens: float, *, actual_output: float | None = None) -> None:
        """Settle a request's real usage against its reservation (sent with the next report);
        ``actual_output`` as for :meth:`~llmap.control.limits.Limiter.settle`."""
        self._report.reserved_tokens += permit.tokens
        self._report.actual_tokens += actual_tokens
        self._report.reserved_output += permit.output
        self._report.actual_output += min(permit.output, actual_tokens) if actual_output is None else actual_output

    def pause_for(self, seconds: float) -> None:
        """A Retry-After: pause here at once, and every worker within one round trip."""
        self._paused_until = max(self._paused_until, self.clock() + seconds)
        self._report.pause_s = max(self._report.pause_s, seconds)
        self._kick.set()

    def update_from_headers(self, headers: Mapping[str, str], *, sent_at: float | None = None) -> None:
        """Share the latest answer's rate-limit headers with the budget (the newest wins)."""
        self._report.headers = dict(headers)
        self._headers_at = sent_at if sent_at is not None else self.clock()
        if any(k.lower() in ("retry-after", "retry-after-ms") for k in headers):
            self._kick.set()


class SharedAIMD:
    """A worker's view of the cluster's AIMD limit: its share of the requests in flight.

    It is a :class:`~llmap.control.lanes.LaneAIMD` (``limit``, ``maximum``, ``on_success``,
    ``on_congestion``), as :class:`~llmap.control.concurrency.AIMDConcurrency` is; the outcomes go to
    the budget.
    """

    def __init__(self, link: BudgetLink) -> None:
        self.link = link
        self._seen = 1

    @property
    def limit(self) -> int:
        """Requests this worker may keep in flight: its share of the cluster's limit, within its own cap."""
        return max(1, min(self.link.view.share, self.link.cap))

    @property
    def maximum(self) -> int:
        """This worker's own ceiling of requests in flight (its provider's)."""
        return self.link.cap

    def on_success(self) -> bool:
        """Count an answer; True when this worker's share grew since last asked."""
        self.link.report_success()
        grew, self._seen = self.limit > self._seen, self.limit
        return grew

    def on_congestion(self, in_flight: int | None = None) -> bool:
        """Count a 429 or an overload; the budget cuts the cluster's limit (once per burst)."""
        self.link.report_congestion()
        return False


class SharedBreaker:
    """A worker's view of the cluster's circuit breaker for one model.

    It is a :class:`~llmap.control.lanes.LaneBreaker`, as
    :class:`~llmap.control.breaker.CircuitBreaker` is. The budget's breaker decides; while it is open,
    nobody sends, and once its cooldown is over the first worker to ask gets
    the one half-open probe.
    """

    def __init__(self, link: BudgetLink) -> None:
        self.link = link
        self._probing = False

    def state_at(self, now: float | None = None) -> BreakerState:
        """The shared breaker's state as the budget last reported it (``now`` is not used)."""
        return BreakerState(self.link.view.breaker)

    def peek(self, now: float | None = None) -> BreakerState:
        """The same as :meth:`state_at`: reading the view changes nothing."""
        return self.state_at(now)

    @property
    def state(self) -> BreakerState:
        """The shared breaker's state as the budget last reported it."""
        return self.state_at()

    def allow(self, now: float | None = None) -> bool:
        """True when a call may go: closed, or the half-open probe is this worker's."""
        v, now = self.link.view, self.link.clock() if now is None else now
        if v.breaker == BreakerState.CLOSED.value:
            return True
        if v.breaker == BreakerState.HALF_OPEN.value and v.probe_owner == self.link.worker and not self._probing:
            self._probing = True
            return True
        if (v.breaker == BreakerState.OPEN.value and now >= self.link.probe_due_at) or \
                (v.breaker == BreakerState.HALF_OPEN.value and v.probe_owner is None):
            self.link.ask_probe()
        return False

    def release(self, now: float | None = None) -> None:
        """Give back the half-open probe this worker holds, unused."""
        if self._probing:
            self._probing = False
            self.link.release_probe()

    def record_success(self, now: float | None = None) -> None:
        """A call reached a healthy provider: the probe's outcome when this worker holds it."""
        if self._probing:
            self._probing = False
            self.link.report_probe(True)
        else:
            self.link.report_call(failed=False)

    def record_failure(self, now: float | None = None) -> None:
        """An outage-type failure: the probe's outcome when this worker holds it (sent at once)."""
        if self._probing:
            self._probing = False
            self.link.report_probe(False)
        else:
            self.link.report_call(failed=True)

    def time_until_probe(self, now: float | None = None) -> float:
        """Seconds until :meth:`allow` may let a call through (``inf``: wait for another worker's probe)."""
        v, now = self.link.view, self.link.clock() if now is None else now
        if v.breaker == BreakerState.CLOSED.value:
            return 0.0
        if v.breaker == BreakerState.OPEN.value:  # once due, the probe is asked for: look again soon
            return max(0.05, self.link.probe_due_at - now)
        return 0.0 if v.probe_owner == self.link.worker and not self._probing else math.inf
