"""Parse rate-limit headers from OpenAI-style and Anthropic-style responses.

Two header families are read, case-insensitively:

* OpenAI (and most OpenAI-compatible servers: Groq, Together, vLLM proxies)::

      x-ratelimit-limit-requests: 500          requests per minute
      x-ratelimit-remaining-requests: 499
      x-ratelimit-reset-requests: 120ms        Go-style duration until full
      x-ratelimit-limit-tokens: 30000          tokens per minute
      x-ratelimit-remaining-tokens: 29000
      x-ratelimit-reset-tokens: 2s

* Anthropic::

      anthropic-ratelimit-requests-limit: 50
      anthropic-ratelimit-requests-remaining: 49
      anthropic-ratelimit-requests-reset: 2024-08-01T12:00:01Z   RFC 3339 instant
      anthropic-ratelimit-tokens-limit / -remaining / -reset
      anthropic-ratelimit-input-tokens-limit / -remaining / -reset    input tokens per minute (ITPM)
      anthropic-ratelimit-output-tokens-limit / -remaining / -reset   output tokens per minute (OTPM)

  Anthropic limits input and output tokens separately; its ``tokens-*``
  headers describe whichever limit is most restrictive at the moment, so a
  client that knows the separate ones should pace by those.

and the back-off headers ``retry-after-ms`` (milliseconds, preferred because
it is more precise, as the OpenAI SDK does) and ``retry-after`` (seconds, or
an HTTP-date).

Parsing never raises on a malformed header: a value that cannot be read is
treated as absent, because a proxy's odd header must not stop a run.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

__all__ = [
    "Budget",
    "RateLimitInfo",
    "parse_duration",
    "parse_rate_limit_headers",
    "parse_reset",
    "parse_retry_after",
]

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # micro sign
    "μs": 1e-6,  # greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
# Longest units first so that "ms" is not read as "m" followed by junk.
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h|d)")


@dataclass(frozen=True, slots=True)
class Budget:
    """One server-advertised budget (requests or tokens).

    Attributes:
        limit: the budget per window (OpenAI and Anthropic: per minute), or None.
        remaining: what is left right now, or None.
        reset_s: seconds until the budget is full again, or None: from the
            response, or from ``reset_from`` for an instant (see
            :func:`parse_rate_limit_headers`).
    """

    limit: float | None = None
    remaining: float | None = None
    reset_s: float | None = None

    def __bool__(self) -> bool:
        return self.limit is not None or self.remaining is not None or self.reset_s is not None


@dataclass(frozen=True, slots=True)
class RateLimitInfo:
    """What one response's headers say about rate limits.

    Attributes:
        requests: the request budget (requests per minute).
        tokens: the token budget (tokens per minute).
        retry_after_s: seconds the server asked us to wait, or None.
        input_tokens: the input-token budget (Anthropic's ITPM), or empty.
        output_tokens: the output-token budget (Anthropic's OTPM), or empty.
    """

    requests: Budget = Budget()
    tokens: Budget = Budget()
    retry_after_s: float | None = None
    input_tokens: Budget = Budget()
    output_tokens: Budget = Budget()


def parse_duration(value: str) -> float:
    """Parse a duration into seconds.

    Accepts the Go-style durations OpenAI sends (``"1s"``, ``"6m0s"``,
    ``"12ms"``, ``"1m30.5s"``, ``"1h2m3s"``, ``"0s"``; units ns, us/µs, ms, s,
    m, h and d) and bare numbers, which are read as seconds (``"1.5"``).

    Args:
        value: the header value; surrounding white space is ignored.

    Returns:
        The duration in seconds (>= 0).

    Raises:
        ValueError: the value is empty, negative, or not a duration.
    """
    text = value.strip()
    if not text:
        raise ValueError("empty duration")
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"invalid duration: {value!r}")
        return seconds
    total = 0.0
    pos = 0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise ValueError(f"invalid duration: {value!r}")
    return total


def _parse_instant(value: str) -> float:
    """Parse an RFC 3339 timestamp into POSIX seconds (naive means UTC)."""
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC).timestamp()
    return moment.timestamp()


def parse_reset(value: str, *, wall_now: float) -> float:
    """Parse a reset header into seconds from now.

    Tries, in order: a duration (OpenAI, ``"6m0s"``), a bare number of seconds,
    and an RFC 3339 instant (Anthropic, ``"2024-08-01T12:00:01Z"``), which is
    converted with ``wall_now``. An instant in the past gives 0.

    Args:
        value: the header value.
        wall_now: the current wall-clock time, POSIX seconds (``time.time()``).

    Returns:
        Seconds until the reset, >= 0.

    Raises:
        ValueError: the value is none of the accepted forms.
    """
    try:
        return parse_duration(value)
    except ValueError:
        pass
    return max(0.0, _parse_instant(value) - wall_now)


def parse_retry_after(value: str, *, wall_now: float) -> float:
    """Parse a ``Retry-After`` value into seconds.

    Args:
        value: delta-seconds (``"20"``, ``"1.5"``) or an HTTP-date
            (``"Wed, 21 Oct 2015 07:28:00 GMT"``); an RFC 3339 instant is also read.
        wall_now: the current wall-clock time, POSIX seconds, used for dates.

    Returns:
        Seconds to wait, >= 0 (a date in the past gives 0).

    Raises:
        ValueError: the value is not a number or a date.
    """
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise ValueError(f"invalid Retry-After: {value!r}")
        return max(0.0, seconds)
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return max(0.0, _parse_instant(text) - wall_now)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, moment.timestamp() - wall_now)


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _reset(value: str | None, wall_now: float) -> float | None:
    if value is None:
        return None
    try:
        return parse_reset(value, wall_now=wall_now)
    except ValueError:
        return None


def _anthropic_budget(lower: Mapping[str, str], kind: str, wall_now: float) -> Budget:
    return Budget(
        limit=_number(lower.get(f"anthropic-ratelimit-{kind}-limit")),
        remaining=_number(lower.get(f"anthropic-ratelimit-{kind}-remaining")),
        reset_s=_reset(lower.get(f"anthropic-ratelimit-{kind}-reset"), wall_now),
    )


def _budget(lower: Mapping[str, str], kind: str, wall_now: float) -> Budget:
    openai = Budget(
        limit=_number(lower.get(f"x-ratelimit-limit-{kind}")),
        remaining=_number(lower.get(f"x-ratelimit-remaining-{kind}")),
        reset_s=_reset(lower.get(f"x-ratelimit-reset-{kind}"), wall_now),
    )
    if openai:
        return openai
    return _anthropic_budget(lower, kind, wall_now)


def parse_rate_limit_headers(
    headers: Mapping[str, str], *, wall_now: float | None = None, reset_from: float | None = None
) -> RateLimitInfo:
    """Read rate-limit and back-off headers from one response.

    OpenAI-style headers win over Anthropic-style ones when a response has
    both. ``retry-after-ms`` wins over ``retry-after``. Malformed values are
    ignored (read as absent), never raised.

    Args:
        headers: the response headers; any mapping (key case does not matter).
        wall_now: the current wall-clock time in POSIX seconds, used to turn
            absolute instants into durations. Defaults to ``time.time()``.
        reset_from: the wall-clock time (POSIX seconds) a reset given as an
            instant is measured from; defaults to ``wall_now``. Pass the time
            the request was sent to read every reset in one frame: a duration
            (OpenAI) counts from when the server handled the request, and so
            does ``instant - reset_from``.

    Returns:
        The parsed :class:`RateLimitInfo`; fields are None when absent.
    """
    if wall_now is None:
        wall_now = time.time()
    since = wall_now if reset_from is None else reset_from
    lower = {str(k).lower(): str(v) for k, v in headers.items()}
    retry_after: float | None = None
    ms = _number(lower.get("retry-after-ms"))
    if ms is not None:
        retry_after = ms / 1000.0
    elif "retry-after" in lower:
        try:
            retry_after = parse_retry_after(lower["retry-after"], wall_now=wall_now)
        except ValueError:
            retry_after = None
    return RateLimitInfo(
        requests=_budget(lower, "requests", since),
        tokens=_budget(lower, "tokens", since),
        retry_after_s=retry_after,
        input_tokens=_anthropic_budget(lower, "input-tokens", since),
        output_tokens=_anthropic_budget(lower, "output-tokens", since),
    )
