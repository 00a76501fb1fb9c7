"""The ``[limits]``, ``[cache]``, ``[batch]`` and ``[alerts]`` tables (see :mod:`llmap.spec`)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from llmap.durations import parse_duration
from llmap.spec.base import StrictModel


class LimitsSpec(StrictModel):
    """``[limits]``: how hard llmap may push a provider, and when to stop.

    Args (TOML keys):
        concurrency: the most requests in flight per model. Default: adaptive
            (AIMD), starting at 16 and growing to 256 while answers come back
            without 429s; set it to fix the ceiling.
        rpm: requests per minute; default: learned from the provider's
            rate-limit headers, else unlimited.
        tpm: tokens (prompt + completion) per minute; as ``rpm``.
        itpm, otpm: input (prompt) and output (completion) tokens per minute,
            for providers that limit them separately (Anthropic); learned from
            ``anthropic-ratelimit-input-tokens-*`` / ``-output-tokens-*``
            headers when not given. Prompt-cache reads do not count.
        retry_budget_s: seconds a row may spend on retries before it fails
            over or fails (default 300).
        max_attempts: attempts per row and model, the first included (default 10).
        backoff_base_s: the backoff ceiling after a row's first failed attempt,
            seconds (default 0.5); it doubles with each further attempt up to
            ``backoff_cap_s``, and the wait is drawn from [0, ceiling] (full
            jitter). 0 retries at once (a Retry-After still applies).
        backoff_cap_s: the longest backoff between attempts, seconds (default 8).
            A Retry-After is always honoured in full, and outages are handled by
            the circuit breaker.
        hedge_tail: in the run's tail (every row handed out, spare capacity),
            a request still unanswered after the p95 latency gets a second copy
            and the first answer wins, so stragglers do not set the run's end
            (default true). Never for a row that got a 429 (a copy would only
            add load), and within ``hedge_budget``.
        hedge_budget: the most hedged copies a run may send, as a fraction of
            its requests (default 0.02: 2 per 100). A provider bills the tokens a
            copy processed though its answer is dropped: each copy that loses
            the race is priced at the request's estimated tokens and counted in
            ``cost_usd`` (``llmap status``, ``report``, ``/metrics`` show them).
        max_cost_usd: stop sending new requests once this much is spent (USD,
            from ``[model] price_in`` / ``price_out``); in-flight requests finish.
            Every ``openai`` and ``anthropic`` model must then set both prices (0 for a free
            server), else :func:`spec_from_dict` raises ``SpecError``.
        max_tokens: the same, counted in tokens (prompt + completion).
    """

    concurrency: int | None = Field(default=None, gt=0, le=1024)
    rpm: float | None = Field(default=None, gt=0)
    tpm: float | None = Field(default=None, gt=0)
    itpm: float | None = Field(default=None, gt=0)
    otpm: float | None = Field(default=None, gt=0)
    retry_budget_s: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=10, ge=1)
    backoff_base_s: float = Field(default=0.5, ge=0)
    backoff_cap_s: float = Field(default=8.0, gt=0)
    hedge_tail: bool = True
    hedge_budget: float = Field(default=0.02, ge=0, le=1)
    max_cost_usd: float | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _backoff(self) -> LimitsSpec:
        if self.backoff_base_s > self.backoff_cap_s:
            raise ValueError(f"backoff_base_s = {self.backoff_base_s:g} is over backoff_cap_s = "
                             f"{self.backoff_cap_s:g}; lower backoff_base_s or raise backoff_cap_s")
        return self


class CacheSpec(StrictModel):
    """``[cache]``: the response cache shared across jobs and runs.

    ``enabled`` (default true); ``ttl``: how long an answer stays fresh, as a
    duration like ``"30d"`` or ``"12h"`` (default: forever). An expired entry
    is still served when every model fails for a row (``_source = "stale"``).
    """

    enabled: bool = True
    ttl: str | None = None

    @property
    def ttl_s(self) -> float | None:
        """``ttl`` in seconds, or None."""
        if self.ttl is None:
            return None
        return parse_duration(self.ttl)

    @field_validator("ttl")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            if parse_duration(v) <= 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"ttl {v!r} is not a duration; write e.g. \"30d\", \"12h\", \"90m\" or \"1w\"") from None
        return v


#: The batch APIs' own ceilings per batch: requests and bytes (OpenAI: 50,000 and 200 MB; Anthropic: 100,000 and
#: 256 MB). ``[batch] max_requests`` / ``max_bytes`` may only lower them.
BATCH_CEILINGS = {"openai": (50_000, 200_000_000), "anthropic": (100_000, 256_000_000)}
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str | int) -> int:
    """Bytes from ``190MB``, ``1.5GB``, ``512KiB`` or a plain number of bytes (KB/MB/GB are powers of 1000).

    Raises:
        ValueError: not a size; the message says how to write one.
    """
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmg]i?b|b)?\s*", str(text).lower())
    if not m:
        raise ValueError(f"{text!r} is not a size; write e.g. \"190MB\", \"1GB\" or a number of bytes")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or "b"])


class BatchSpec(StrictModel):
    """``[batch]``: how a ``[model] batch = true`` model's requests go through its provider's batch API.

    Args (TOML keys):
        max_requests: requests (lines) per batch, default 50,000; the
            provider's ceiling (:data:`BATCH_CEILINGS`) applies when lower.
        max_bytes: bytes per batch (the JSONL file, or Anthropic's request
            body), e.g. ``"190MB"`` (default); the provider's ceiling applies
            when lower.
        poll_s: seconds between status polls of the open batches (default 30).
        deadline: how long after its creation a batch may run, a duration
            (default ``"24h"``, the providers' completion window). Past it
            llmap cancels the batch, keeps what it finished, and finishes its
            other rows in real time.
        retry: where rows go whose batch request failed, expired, or whose
            answer did not validate: ``"realtime"`` (default: the model's
            normal real-time path, under its limits) or ``"batch"`` (the next
            batch; re-asks too).
    """

    max_requests: int = Field(default=50_000, ge=1)
    max_bytes: int | str = "190MB"
    poll_s: float = Field(default=30.0, gt=0)
    deadline: str = "24h"
    retry: Literal["realtime", "batch"] = "realtime"

    @field_validator("max_bytes")
    @classmethod
    def _size(cls, v: int | str) -> int | str:
        if parse_size(v) < 1024:
            raise ValueError(f"max_bytes {v!r} is below 1 KB; write e.g. \"190MB\"")
        return v

    @field_validator("deadline")
    @classmethod
    def _deadline(cls, v: str) -> str:
        try:
            if parse_duration(v) <= 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"deadline {v!r} is not a duration; write e.g. \"24h\", \"6h\" or \"90m\"") from None
        return v

    @property
    def deadline_s(self) -> float:
        """``deadline`` in seconds."""
        return parse_duration(self.deadline)

    @property
    def max_bytes_n(self) -> int:
        """``max_bytes`` in bytes."""
        return parse_size(self.max_bytes)


class AlertsSpec(StrictModel):
    """``[alerts]``: stop early when a run is going wrong.

    ``max_failure_rate`` (0 to 1, default none): stop dispatch once more than
    this share of the last ``window`` settled rows (default 50) failed; a
    broken prompt should not burn the budget.
    """

    max_failure_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    window: int = Field(default=50, ge=1)
