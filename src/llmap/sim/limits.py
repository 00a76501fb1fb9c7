"""Server-side rate limits for the simulator, enforced the way OpenAI does.

Two token buckets, one for requests (RPM) and one for tokens (TPM). Each
refills continuously at ``limit / 60`` per second and starts full. By default
a bucket holds the whole per-minute limit; ``burst_s`` makes it hold only that
many seconds of refill, the way Anthropic says it may enforce a limit ("a rate
of 60 requests per minute (RPM) might be enforced as 1 request per second",
https://platform.claude.com/docs/en/api/rate-limits). A request is admitted
only when both buckets hold its cost (1 request; estimated prompt tokens +
``max_tokens``); then both are charged at once. Otherwise it is refused with
the wait until it would fit. The headers state the per-minute ``limit``, the
``remaining`` level of the (possibly small) bucket and the time until it is
full again, so a client that trusts ``limit`` as its burst over-sends.

The buckets read time from an injected clock (seconds, monotonic), so they
are tested by moving a fake clock instead of sleeping.

:func:`ratelimit_headers` renders a decision as OpenAI ``x-ratelimit-*``
headers (resets as durations like ``6m0s``) or Anthropic
``anthropic-ratelimit-*`` headers (resets as RFC 3339 UTC timestamps).

:class:`MessagesLimiter` limits ``/v1/messages`` the way Anthropic does:
requests (RPM), input tokens (ITPM: uncached input only, cache reads are
free) and output tokens (OTPM: counted as they are produced, as Anthropic's reference says: "OTPM rate
limits are evaluated in real time as output tokens are produced, counting only
the actual tokens generated. The ``max_tokens`` parameter does not factor into
OTPM rate limit calculations"), with
``anthropic-ratelimit-{requests,input-tokens,output-tokens,tokens}-*``
headers (:meth:`MessagesLimiter.headers`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = [
    "Admission",
    "BucketState",
    "Clock",
    "MessagesAdmission",
    "MessagesLimiter",
    "RateLimiter",
    "Sleep",
    "TokenBucket",
    "format_duration",
    "format_rfc3339",
    "per_minute_bucket",
    "ratelimit_headers",
]

Clock = Callable[[], float]
#: An awaitable delay in seconds (``asyncio.sleep``; a test passes one that moves a fake clock).
Sleep = Callable[[float], Awaitable[object]]
"""Returns the current time in seconds (monotonic)."""

# Float round-off a bucket forgives (a refill of 0.02 s x 50/s may come to 0.99999999999999).
_EPS = 1e-9

#: Seconds of refill a limit's bucket holds by default: the whole minute (OpenAI's
#: ``x-ratelimit-reset-*`` is "the time until the rate limit resets to its initial state",
#: https://platform.openai.com/docs/guides/rate-limits, consistent with a bucket of one minute).
FULL_MINUTE_S = 60.0


class TokenBucket:
    """A continuously refilled bucket of ``capacity`` units.

    Args:
        capacity: most units the bucket holds (the per-minute limit, or
            ``burst_s`` seconds of refill).
        refill_per_second: units added per second.
        clock: current time in seconds; :func:`time.monotonic` by default.
        limit: the per-minute limit the headers state; ``capacity`` by default.

    Raises:
        ValueError: ``capacity`` or ``refill_per_second`` is not positive.
    """

    __slots__ = ("_clock", "_level", "_stamp", "capacity", "limit", "rate")

    def __init__(
        self, capacity: float, refill_per_second: float, clock: Clock = time.monotonic, *,
        limit: float | None = None,
    ) -> None:
        if capacity <= 0 or refill_per_second <= 0:
            raise ValueError("capacity and refill_per_second must be positive")
        self.capacity = float(capacity)
        self.limit = self.capacity if limit is None else float(limit)
        self.rate = float(refill_per_second)
        self._clock = clock
        self._level = self.capacity
        self._stamp = clock()

    def level(self) -> float:
        """Units available now (refilled up to the current clock)."""
        now = self._clock()
        if now > self._stamp:
            self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
            self._stamp = now
        return self._level

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` units are available (0 when they are now).

        An ``amount`` above ``capacity`` never fits; the answer is then the
        time until the bucket is full.
        """
        missing = min(amount, self.capacity) - self.level()
        if missing <= _EPS * max(1.0, self.capacity):  # float round-off of the refill: it fits
            return 0.0
        return missing / self.rate

    def take(self, amount: float) -> None:
        """Remove ``amount`` units (the level may not go below zero)."""
        self._level = max(self.level() - amount, 0.0)

    def give(self, amount: float) -> None:
        """Put ``amount`` units back (at most up to ``capacity``)."""
        self._level = min(self.capacity, self.level() + max(0.0, amount))

    def time_to_full(self) -> float:
        """Seconds until the bucket is full again."""
        return (self.capacity - self.level()) / self.rate

    def fill(self) -> None:
        """Refill the bucket completely, now."""
        self._level = self.capacity
        self._stamp = self._clock()


def per_minute_bucket(limit: float, clock: Clock, burst_s: float = FULL_MINUTE_S) -> TokenBucket:
    """A full bucket for a per-minute ``limit`` that holds ``burst_s`` seconds of refill (at least 1 unit).

    Args:
        limit: units per minute (requests or tokens), > 0.
        clock: current time in seconds.
        burst_s: seconds of refill the bucket holds (60: the whole minute; 1: one second's worth).

    Raises:
        ValueError: ``limit`` or ``burst_s`` is not positive.
    """
    if burst_s <= 0:
        raise ValueError(f"burst_s must be positive, got {burst_s!r}")
    return TokenBucket(max(1.0, limit * min(burst_s, FULL_MINUTE_S) / 60), limit / 60, clock, limit=limit)


@dataclass(frozen=True, slots=True)
class BucketState:
    """One limit as a client sees it in headers.

    Attributes:
        limit: the per-minute limit (requests or tokens).
        remaining: whole units left after this request.
        reset: seconds until the bucket is full again.
    """

    limit: int
    remaining: int
    reset: float


@dataclass(frozen=True, slots=True)
class Admission:
    """The rate limiter's decision about one request.

    Attributes:
        allowed: whether the request was admitted (and charged).
        limited_by: ``"requests"`` or ``"tokens"`` when refused, else ``None``.
        retry_after: seconds to wait before the request would fit (0 when
            admitted).
        too_large: the request costs more tokens than the TPM limit: it can
            never be admitted.
        requested: the token cost of the request.
        requests: the RPM bucket's state, or ``None`` when RPM is unlimited.
        tokens: the TPM bucket's state, or ``None`` when TPM is unlimited.
    """

    allowed: bool
    limited_by: str | None
    retry_after: float
    too_large: bool
    requested: int
    requests: BucketState | None
    tokens: BucketState | None


class RateLimiter:
    """Admits requests against an RPM and a TPM bucket, charging both at once.

    Args:
        rpm: requests per minute (``None`` = unlimited).
        tpm: tokens per minute (``None`` = unlimited).
        clock: current time in seconds; :func:`time.monotonic` by default.
        burst_s: seconds of refill each bucket holds (:func:`per_minute_bucket`); the whole minute by default.
    """

    def __init__(
        self, rpm: int | None = None, tpm: int | None = None, clock: Clock = time.monotonic, *,
        burst_s: float = FULL_MINUTE_S,
    ) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.requests = per_minute_bucket(rpm, clock, burst_s) if rpm else None
        self.tokens = per_minute_bucket(tpm, clock, burst_s) if tpm else None

    @property
    def active(self) -> bool:
        """Whether any limit is configured."""
        return self.requests is not None or self.tokens is not None

    def admit(self, tokens: int) -> Admission:
        """Admit one request costing ``tokens`` tokens, or say how long to wait.

        Args:
            tokens: estimated prompt tokens + ``max_tokens``.

        Returns:
            The :class:`Admission`; when allowed, both buckets were charged.
        """
        wait_r = self.requests.wait_for(1) if self.requests else 0.0
        wait_t = self.tokens.wait_for(tokens) if self.tokens else 0.0
        too_large = self.tokens is not None and tokens > self.tokens.capacity
        allowed = wait_r == 0.0 and wait_t == 0.0 and not too_large
        if allowed:
            if self.requests:
                self.requests.take(1)
            if self.tokens:
                self.tokens.take(tokens)
        limited_by = None
        if not allowed:
            limited_by = (
                "requests" if wait_r > 0 and wait_r >= wait_t and not too_large else "tokens"
            )
        return Admission(
            allowed=allowed,
            limited_by=limited_by,
            retry_after=max(wait_r, wait_t),
            too_large=too_large,
            requested=tokens,
            requests=_state(self.requests),
            tokens=_state(self.tokens),
        )

    def reset(self) -> None:
        """Fill both buckets."""
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.fill()


def _state(bucket: TokenBucket | None) -> BucketState | None:
    if bucket is None:
        return None
    return BucketState(int(bucket.limit), int(bucket.level()), bucket.time_to_full())


def format_duration(seconds: float) -> str:
    """Format seconds the way OpenAI's ``x-ratelimit-reset-*`` headers do.

    Go-style durations at millisecond precision: ``12ms``, ``1s``, ``1.5s``,
    ``6m0s``, ``1h2m3s``; zero or less is ``0s``.

    Args:
        seconds: a duration in seconds.

    Returns:
        The duration text.
    """
    ms = round(seconds * 1000)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = str(rest // 1000) if rest % 1000 == 0 else f"{rest / 1000:.3f}".rstrip("0")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def format_rfc3339(epoch_seconds: float) -> str:
    """An RFC 3339 UTC timestamp, whole seconds rounded up: ``2024-05-01T12:00:03Z``."""
    moment = datetime.fromtimestamp(math.ceil(epoch_seconds), UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def ratelimit_headers(
    admission: Admission, style: str = "openai", wall_now: float | None = None
) -> dict[str, str]:
    """The rate-limit headers for a decision.

    Args:
        admission: the limiter's decision.
        style: ``"openai"``: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``
            with duration resets, and on refusal ``retry-after`` (seconds, may be
            fractional) and ``retry-after-ms``. ``"anthropic"``:
            ``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}``
            with RFC 3339 resets, and on refusal ``retry-after`` in whole
            seconds (rounded up).
        wall_now: current Unix time in seconds for Anthropic timestamps;
            :func:`time.time` when ``None``.

    Returns:
        Header names (lowercase) to values; only configured limits appear.
    """
    headers: dict[str, str] = {}
    pairs = (("requests", admission.requests), ("tokens", admission.tokens))
    if style == "anthropic":
        now = time.time() if wall_now is None else wall_now
        for kind, state in pairs:
            if state is not None:
                headers[f"anthropic-ratelimit-{kind}-limit"] = str(state.limit)
                headers[f"anthropic-ratelimit-{kind}-remaining"] = str(state.remaining)
                headers[f"anthropic-ratelimit-{kind}-reset"] = format_rfc3339(now + state.reset)
        if not admission.allowed:
            headers["retry-after"] = str(max(1, math.ceil(admission.retry_after)))
        return headers
    for kind, state in pairs:
        if state is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(state.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(state.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = format_duration(state.reset)
    if not admission.allowed:
        retry_ms = max(1, math.ceil(admission.retry_after * 1000))
        headers["retry-after"] = f"{retry_ms / 1000:.3f}".rstrip("0").rstrip(".")
        headers["retry-after-ms"] = str(retry_ms)
    return headers


@dataclass(frozen=True, slots=True)
class MessagesAdmission:
    """:class:`MessagesLimiter`'s decision about one ``/v1/messages`` request.

    Attributes:
        allowed: admitted (and charged).
        limited_by: ``"requests"``, ``"input tokens"`` or ``"output tokens"`` when refused.
        limit: the per-minute limit that refused it (0 when admitted).
        retry_after: seconds until the request would fit (0 when admitted).
        requests, input_tokens, output_tokens: each configured bucket's state, or None.
    """

    allowed: bool
    limited_by: str | None
    limit: int
    retry_after: float
    requests: BucketState | None
    input_tokens: BucketState | None
    output_tokens: BucketState | None


class MessagesLimiter:
    """Anthropic's limits on ``/v1/messages``: RPM, ITPM and OTPM buckets, each full at start.

    Written from Anthropic's rate-limit reference
    (https://platform.claude.com/docs/en/api/rate-limits): a token bucket per
    limit, "continuously replenished up to your maximum limit"; only uncached
    input counts against ITPM; OTPM counts the output tokens actually produced
    (``max_tokens`` is not reserved): a request is admitted while the output
    bucket is not empty, and its output is charged when it is made
    (:meth:`settle`).

    Args:
        rpm: requests per minute (``None`` = unlimited).
        itpm: input tokens per minute; only uncached input counts (``None`` = unlimited).
        otpm: output tokens per minute (``None`` = unlimited).
        clock: current time in seconds; :func:`time.monotonic` by default.
        burst_s: seconds of refill each bucket holds (:func:`per_minute_bucket`); the whole minute by default.
    """

    def __init__(self, rpm: int | None = None, itpm: int | None = None, otpm: int | None = None,
                 clock: Clock = time.monotonic, *, burst_s: float = FULL_MINUTE_S) -> None:
        self.requests = per_minute_bucket(rpm, clock, burst_s) if rpm else None
        self.input_tokens = per_minute_bucket(itpm, clock, burst_s) if itpm else None
        self.output_tokens = per_minute_bucket(otpm, clock, burst_s) if otpm else None

    @property
    def active(self) -> bool:
        """Whether any limit is configured."""
        return any(b is not None for b in (self.requests, self.input_tokens, self.output_tokens))

    def admit(self, input_tokens: int) -> MessagesAdmission:
        """Admit a request whose uncached input is ``input_tokens``.

        Returns:
            The decision; when allowed, the request and input buckets were
            charged. The output bucket is only checked (it must hold at least
            one token); the output is charged by :meth:`settle`.
        """
        checks = [("requests", self.requests, 1), ("input tokens", self.input_tokens, input_tokens),
                  ("output tokens", self.output_tokens, 1)]
        waits = [(b.wait_for(cost), name, b) for name, b, cost in checks if b is not None]
        wait, name, bucket = max(waits, key=lambda w: w[0]) if waits else (0.0, None, None)
        allowed = wait == 0.0
        if allowed:
            for _, b, cost in checks[:2]:
                if b is not None:
                    b.take(cost)
        return MessagesAdmission(allowed, None if allowed else name,
                                 0 if allowed or bucket is None else int(bucket.limit), wait,
                                 _state(self.requests), _state(self.input_tokens), _state(self.output_tokens))

    def settle(self, output_tokens: int) -> None:
        """Charge the output tokens an answer produced to the OTPM bucket (it stops at empty)."""
        if self.output_tokens is not None:
            self.output_tokens.take(output_tokens)

    def reset(self) -> None:
        """Fill every bucket."""
        for bucket in (self.requests, self.input_tokens, self.output_tokens):
            if bucket is not None:
                bucket.fill()

    @staticmethod
    def headers(admission: MessagesAdmission, wall_now: float) -> dict[str, str]:
        """``anthropic-ratelimit-*`` headers (RFC 3339 resets), and on refusal ``retry-after`` in whole seconds.

        As Anthropic's reference describes them (https://platform.claude.com/docs/en/api/rate-limits,
        "Response headers"): ``limit`` is "the maximum number of requests [tokens] allowed within any
        rate limit period" (the per-minute limit, not the bucket's burst), ``remaining`` is "the
        number remaining before being rate limited" (the bucket's level: with ``burst_s = 1`` never
        more than a second's worth), token figures "rounded to the nearest thousand", and ``reset``
        is "the time when the rate limit will be fully replenished, provided in RFC 3339 format".
        ``tokens-*`` is the input and output budgets together: "If Workspace limits do not apply,
        the headers will return the total tokens remaining, where total is the sum of input and
        output tokens".
        """
        out: dict[str, str] = {}
        states = (("requests", admission.requests, False), ("input-tokens", admission.input_tokens, True),
                  ("output-tokens", admission.output_tokens, True))
        for kind, state, tokens in states:
            if state is not None:
                out[f"anthropic-ratelimit-{kind}-limit"] = str(state.limit)
                out[f"anthropic-ratelimit-{kind}-remaining"] = str(_thousands(state.remaining) if tokens
                                                                    else state.remaining)
                out[f"anthropic-ratelimit-{kind}-reset"] = format_rfc3339(wall_now + state.reset)
        tokens = [st for st in (admission.input_tokens, admission.output_tokens) if st is not None]
        if tokens:
            out["anthropic-ratelimit-tokens-limit"] = str(sum(st.limit for st in tokens))
            out["anthropic-ratelimit-tokens-remaining"] = str(_thousands(sum(st.remaining for st in tokens)))
            out["anthropic-ratelimit-tokens-reset"] = format_rfc3339(wall_now + max(st.reset for st in tokens))
        if not admission.allowed:
            out["retry-after"] = str(max(1, math.ceil(admission.retry_after)))
        return out


def _thousands(tokens: int) -> int:
    """Round to the nearest thousand, as Anthropic's token ``remaining`` headers are (half up)."""
    return (tokens + 500) // 1000 * 1000
