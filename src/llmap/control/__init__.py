"""Dispatch policies: rate limits, concurrency, retries and circuit breaking.

Every policy here is a small object whose decisions are pure functions of its
state and an explicit ``now`` (clock seconds); only :class:`Limiter` awaits,
through an injected ``sleep``. See each module for units and defaults.
"""

from llmap.control.breaker import BreakerState, CircuitBreaker
from llmap.control.concurrency import AIMDConcurrency
from llmap.control.headers import (
    Budget,
    RateLimitInfo,
    parse_duration,
    parse_rate_limit_headers,
    parse_reset,
    parse_retry_after,
)
from llmap.control.limits import Limiter, Permit, RateLimiter, TokenBucket
from llmap.control.retry import RetryDecision, RetryPolicy
from llmap.control.tokens import OutputTokenEstimator, PromptTokenEstimator

__all__ = [
    "AIMDConcurrency",
    "BreakerState",
    "Budget",
    "CircuitBreaker",
    "Limiter",
    "OutputTokenEstimator",
    "Permit",
    "PromptTokenEstimator",
    "RateLimitInfo",
    "RateLimiter",
    "RetryDecision",
    "RetryPolicy",
    "TokenBucket",
    "parse_duration",
    "parse_rate_limit_headers",
    "parse_reset",
    "parse_retry_after",
]
