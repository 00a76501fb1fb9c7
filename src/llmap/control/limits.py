"""Rate limits (RPM / TPM token buckets) and adaptive concurrency.

The pieces, from the inside out:

* :class:`TokenBucket` (defined in :mod:`llmap.control.bucket`, re-exported
  here) — one continuously refilled budget whose burst is what the server
  shows. Pure: every method takes ``now`` (clock seconds).
* :class:`RateLimiter` — a requests-per-minute bucket and a tokens-per-minute
  bucket (or separate input- and output-token buckets, as Anthropic limits
  them), a server-imposed pause (``Retry-After``), and header sync. Pure.
* :class:`Limiter` — the async wrapper the dispatcher awaits. It owns the
  injected ``clock`` and ``sleep`` and serves waiters in FIFO order.
* :class:`AIMDConcurrency` (defined in :mod:`llmap.control.concurrency`,
  re-exported here) — the in-flight request limit used when neither the job
  nor the provider gives a rate limit.

Time is in seconds of a monotonic clock (``time.monotonic`` by default);
budgets are per ``window_s`` (60 s: "per minute") as the providers state them.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from llmap.control.bucket import ARRIVAL_SLACK_S, TokenBucket
from llmap.control.concurrency import AIMDConcurrency
from llmap.control.headers import Budget, RateLimitInfo, parse_rate_limit_headers

__all__ = ["BURST_S", "LEARNED_CREDIT_MAX_S", "AIMDConcurrency", "Limiter", "Permit", "RateLimiter", "TokenBucket"]

#: A budget learned from headers starts with one second's worth plus what it would have earned
#: while llmap waited for that first answer (the probe), up to this many seconds' worth, seconds.
#: The server's ``remaining`` and reset time still cap it (:meth:`TokenBucket.set_remaining`).
LEARNED_CREDIT_MAX_S = 5.0
#: Seconds of refill a budget may send at once until the server shows it holds more (its ``remaining``):
#: a per-minute limit may be enforced over one second (Anthropic: "a rate of 60 requests per minute
#: (RPM) might be enforced as 1 request per second", https://platform.claude.com/docs/en/api/rate-limits).
BURST_S = 1.0


class RateLimiter:
    """Requests-per-minute and tokens-per-minute budgets, plus server pauses. Pure.

    Each request costs 1 from the request bucket and its estimated tokens
    (prompt + completion) from the token bucket. Providers that limit input
    and output tokens separately (Anthropic's ITPM and OTPM) get two more
    buckets: the request's input tokens (only those the provider counts:
    Anthropic does not count prompt-cache reads) from the input bucket and its
    output tokens from the output bucket. Any bucket may be None (unlimited).
    Limits learned from response headers apply even when the job configured
    none; when both exist the lower one wins (the job may share its key with
    others). Every bucket refills at ``limit / window_s`` per second; the
    request bucket starts with at least one request so the first request is
    never delayed.

    Args:
        rpm: requests per ``window_s`` configured by the job, or None.
        tpm: tokens per ``window_s`` configured by the job, or None.
        itpm: input tokens per ``window_s`` configured by the job, or None.
        otpm: output tokens per ``window_s`` configured by the job, or None.
        now: the current clock time in seconds.
        window_s: the period the limits are stated for (60 s: per minute).

    Raises:
        ValueError: a limit or window_s is not > 0.
    """

    def __init__(
        self,
        rpm: float | None = None,
        tpm: float | None = None,
        *,
        itpm: float | None = None,
        otpm: float | None = None,
        now: float,
        window_s: float = 60.0,
    ) -> None:
        for name, value in (("rpm", rpm), ("tpm", tpm), ("itpm", itpm), ("otpm", otpm), ("window_s", window_s)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.window_s = float(window_s)
        self._born = now
        self.configured_rpm = rpm
        self.configured_tpm = tpm
        self.configured_itpm = itpm
        self.configured_otpm = otpm
        self.requests: TokenBucket | None = None if rpm is None else self._bucket(rpm, 1.0, now)
        self.tokens: TokenBucket | None = None if tpm is None else self._bucket(tpm, 0.0, now)
        self.input_tokens: TokenBucket | None = None if itpm is None else self._bucket(itpm, 0.0, now)
        self.output_tokens: TokenBucket | None = None if otpm is None else self._bucket(otpm, 0.0, now)
        #: Clock time before which nothing is admitted (from Retry-After); -inf when none.
        self.paused_until = -math.inf

    def _bucket(self, limit: float, floor: float, now: float, *, idle_s: float = 0.0) -> TokenBucket:
        rate = limit / self.window_s
        level = rate * (1.0 + min(max(0.0, idle_s), LEARNED_CREDIT_MAX_S))
        burst = min(limit, max(floor, rate * BURST_S))
        return TokenBucket(limit, rate, level=min(limit, max(floor, level)), now=now, burst=burst,
                           slack_s=ARRIVAL_SLACK_S)

    @property
    def limited(self) -> bool:
        """True when a request or token budget is in force (else use AIMD concurrency)."""
        return any(b is not None for b in (self.requests, self.tokens, self.input_tokens, self.output_tokens))

    def time_until(self, est_tokens: float, now: float, *, est_output: float = 0.0) -> float:
        """Return seconds until a request of ``est_tokens`` would be admitted; no state change.

        ``est_output`` is the part of ``est_tokens`` that is output (completion) tokens: it
        is what the output bucket is charged, and the rest is what the input bucket is.
        """
        wait = max(0.0, self.paused_until - now)
        if self.requests is not None:
            wait = max(wait, self.requests.time_until(1.0, now))
        if self.tokens is not None:
            wait = max(wait, self.tokens.time_until(est_tokens, now))
        if self.input_tokens is not None:
            wait = max(wait, self.input_tokens.time_until(max(0.0, est_tokens - est_output), now))
        if self.output_tokens is not None:
            wait = max(wait, self.output_tokens.time_until(est_output, now))
        return wait

    def reserve(self, est_tokens: float, now: float, *, est_output: float = 0.0) -> float:
        """Admit one request of ``est_tokens`` tokens, or say how long to wait.

        Args:
            est_tokens: estimated input (prompt) + output (completion) tokens of the request.
            now: the current clock time in seconds.
            est_output: of ``est_tokens``, the estimated output tokens (for the OTPM bucket).

        Returns:
            0.0 when admitted: 1 request and ``est_tokens`` tokens are taken
            (settle later with :meth:`settle`). Otherwise the seconds to wait
            before asking again; nothing is taken.
        """
        wait = self.time_until(est_tokens, now, est_output=est_output)
        if wait > 0:
            return wait
        if self.requests is not None:
            self.requests.take(1.0, now)
        if self.tokens is not None:
            self.tokens.take(est_tokens, now)
        if self.input_tokens is not None:
            self.input_tokens.take(max(0.0, est_tokens - est_output), now)
        if self.output_tokens is not None:
            self.output_tokens.take(est_output, now)
        return 0.0

    def settle(self, reserved_tokens: float, actual_tokens: float, now: float, *, reserved_output: float = 0.0,
               actual_output: float | None = None) -> None:
        """Correct a reservation with the real usage: refund or owe the difference.

        Args:
            reserved_tokens: the ``est_tokens`` passed to :meth:`reserve`.
            actual_tokens: the tokens the answer counts against the limits
                (input the provider counts + output). For a failed request the
                server may still have charged it; pass ``reserved_tokens`` to
                keep the reservation (conservative).
            now: the current clock time in seconds.
            reserved_output: the ``est_output`` passed to :meth:`reserve`.
            actual_output: of ``actual_tokens``, the output tokens; by default
                ``min(reserved_output, actual_tokens)`` (0 for a refund, the
                reservation for a kept one).
        """
        if actual_output is None:
            actual_output = min(reserved_output, actual_tokens)
        for bucket, reserved, actual in (
            (self.tokens, reserved_tokens, actual_tokens),
            (self.input_tokens, reserved_tokens - reserved_output, actual_tokens - actual_output),
            (self.output_tokens, reserved_output, actual_output),
        ):
            if bucket is None:
                continue
            difference = max(0.0, actual) - max(0.0, reserved)
            if difference > 0:
                bucket.owe(difference, now)
            elif difference < 0:
                bucket.refund(-difference, now)

    def pause_until(self, until: float) -> None:
        """Admit nothing before clock time ``until`` (a Retry-After). Pauses only extend."""
        self.paused_until = max(self.paused_until, until)

    def update_from_headers(
        self,
        headers: Mapping[str, str],
        now: float,
        *,
        sent_at: float | None = None,
        wall_now: float | None = None,
    ) -> RateLimitInfo:
        """Learn limits, remaining budget and pauses from one response's headers.

        Reads OpenAI ``x-ratelimit-*`` and Anthropic ``anthropic-ratelimit-*``
        headers (see :mod:`llmap.control.headers`); Anthropic's separate
        ``input-tokens`` and ``output-tokens`` budgets feed the input and
        output buckets, and then its combined ``tokens`` budget is not
        learned (it is whichever of the two binds). A ``limit`` creates the
        bucket if the job set none (with one second's worth plus what it
        would have earned since this limiter was made, i.e. while the first
        request was out, at most :data:`LEARNED_CREDIT_MAX_S` seconds' worth),
        or lowers/raises it to ``min(configured, limit)``. ``limit`` sets only
        the refill rate: a ``remaining`` and its reset time set the burst and
        lower the level to what the server holds now, less what was admitted
        since the request was sent (see :meth:`TokenBucket.set_remaining`);
        ``retry-after(-ms)`` pauses all reservations until ``now + retry_after``.

        Args:
            headers: the response headers (any case).
            now: the current clock time in seconds.
            sent_at: clock time the request was sent, if known: the figures
                describe the server then, and resets given as instants
                (Anthropic's RFC 3339) are read as seconds from then, as
                durations (OpenAI's) are.
            wall_now: wall-clock POSIX seconds now, for absolute instants;
                defaults to ``time.time()``.

        Returns:
            The parsed headers (resets in seconds from ``sent_at``).
        """
        wall = time.time() if wall_now is None else wall_now
        sent_wall = wall - (now - sent_at) if sent_at is not None and sent_at < now else wall
        info = parse_rate_limit_headers(headers, wall_now=wall, reset_from=sent_wall)
        self.requests = self._sync(
            self.requests, info.requests, self.configured_rpm, 1.0, now, sent_at
        )
        split = bool(info.input_tokens) or bool(info.output_tokens)
        if not split or self.tokens is not None:
            # Anthropic's tokens-* headers describe whichever of its input and output limits binds
            # now: pace by the separate ones, and never learn a combined bucket from them.
            self.tokens = self._sync(self.tokens, Budget() if split else info.tokens, self.configured_tpm, 0.0,
                                     now, sent_at)
        self.input_tokens = self._sync(self.input_tokens, info.input_tokens, self.configured_itpm, 0.0, now, sent_at)
        self.output_tokens = self._sync(self.output_tokens, info.output_tokens, self.configured_otpm, 0.0, now,
                                        sent_at)
        if info.retry_after_s is not None:
            self.pause_until(now + info.retry_after_s)
        return info

    def _sync(
        self,
        bucket: TokenBucket | None,
        budget: Budget,
        configured: float | None,
        unit: float,
        now: float,
        sent_at: float | None,
    ) -> TokenBucket | None:
        """Learn one budget from its header figures. ``unit`` is 1 for the request budget (the
        least it starts with, and what the request carrying the figures took from it), else 0."""
        if budget.limit is not None and budget.limit > 0:
            limit = budget.limit if configured is None else min(configured, budget.limit)
            if bucket is None:  # learned now: credit the time spent waiting for this first answer
                bucket = self._bucket(limit, unit, now, idle_s=now - self._born)
            elif bucket.capacity != limit:
                bucket.set_limit(limit, now, refill_per_s=limit / self.window_s)
        if bucket is not None and budget.remaining is not None:
            bucket.set_remaining(budget.remaining, budget.reset_s, now, as_of=sent_at, cost=unit)
        return bucket


@dataclass(frozen=True, slots=True)
class Permit:
    """An admitted request: what it reserved and how long it waited.

    Attributes:
        tokens: the tokens reserved (pass back to :meth:`Limiter.settle`).
        sent_at: clock time of admission, in seconds.
        waited_s: seconds spent waiting in :meth:`Limiter.acquire`.
        output: of ``tokens``, the output tokens reserved.
    """

    tokens: float
    sent_at: float
    waited_s: float
    output: float = 0.0


class Limiter:
    """Async front of a :class:`RateLimiter`: waits until a request is admitted.

    Waiters are served first come, first served: one waiter at a time holds an
    ``asyncio.Lock`` (FIFO) while it sleeps for its admission, so a large
    request is not starved by a stream of small ones. After each sleep it asks
    again, so a Retry-After that arrived meanwhile is honoured.

    Args:
        rate: the policy to apply; by default a new ``RateLimiter(rpm, tpm)``.
        rpm: requests per minute, when ``rate`` is not given.
        tpm: tokens per minute, when ``rate`` is not given.
        clock: returns the current time in seconds (default ``time.monotonic``).
        sleep: awaits a number of seconds (default ``asyncio.sleep``). Tests
            pass a fake that advances a fake clock.
    """

    def __init__(
        self,
        rate: RateLimiter | None = None,
        *,
        rpm: float | None = None,
        tpm: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self.clock = clock
        self.sleep = sleep
        self.rate = rate if rate is not None else RateLimiter(rpm, tpm, now=clock())
        self._lock = asyncio.Lock()

    @property
    def limited(self) -> bool:
        """True when a request or token budget is in force (see :attr:`RateLimiter.limited`)."""
        return self.rate.limited

    async def acquire(self, est_tokens: float = 0.0, *, est_output: float = 0.0) -> Permit:
        """Wait until a request of ``est_tokens`` tokens (``est_output`` of them output) is admitted and reserve it.

        Raises:
            asyncio.CancelledError: when cancelled while waiting; nothing is reserved.
        """
        start = self.clock()
        async with self._lock:
            while True:
                now = self.clock()
                wait = self.rate.reserve(est_tokens, now, est_output=est_output)
                if wait <= 0:
                    return Permit(tokens=est_tokens, sent_at=now, waited_s=now - start, output=est_output)
                await self.sleep(wait)

    def settle(self, permit: Permit, actual_tokens: float, *, actual_output: float | None = None) -> None:
        """Refund or owe the difference between the permit's reservation and real usage
        (see :meth:`RateLimiter.settle`)."""
        self.rate.settle(permit.tokens, actual_tokens, self.clock(), reserved_output=permit.output,
                         actual_output=actual_output)

    def pause_for(self, seconds: float) -> None:
        """Admit nothing for ``seconds`` from now (a Retry-After)."""
        self.rate.pause_until(self.clock() + seconds)

    def update_from_headers(
        self, headers: Mapping[str, str], *, sent_at: float | None = None
    ) -> RateLimitInfo:
        """Apply one response's rate-limit headers (see :meth:`RateLimiter.update_from_headers`)."""
        return self.rate.update_from_headers(headers, self.clock(), sent_at=sent_at)
