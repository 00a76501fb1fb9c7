"""The provider protocol and the one boundary where third-party errors are mapped.

Nothing above this layer sees an aiohttp, asyncio-timeout or llama.cpp
exception: :func:`error_for_status` and :func:`map_transport_error` turn them
into :mod:`llmap.errors` classes (``raise ... from exc``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from llmap import errors as E

__all__ = [
    "Completion",
    "Provider",
    "Request",
    "error_for_status",
    "map_transport_error",
    "parse_retry_after",
]


@dataclass(frozen=True, slots=True)
class Request:
    """One chat completion request.

    Attributes:
        messages: OpenAI-style ``[{"role", "content"}]``.
        schema: JSON Schema the answer must satisfy, or None for free text.
        temperature: sampling temperature.
        max_tokens: cap on completion tokens.
        row_key: the row this request serves (for error context only).
    """

    messages: list[dict[str, str]]
    schema: dict[str, Any] | None
    temperature: float
    max_tokens: int
    row_key: str | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """One answer.

    Attributes:
        content: the completion text.
        prompt_tokens, completion_tokens: usage as the provider reported it
            (tokens); 0 if it did not.
        latency_s: seconds from sending the request to reading the answer.
        headers: response headers (lower-cased names), for rate-limit budgets.
    """

    content: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    headers: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Provider(Protocol):
    """What the dispatcher needs from a model backend.

    ``label`` is ``provider:name``. ``max_concurrency`` is how many requests
    the provider can usefully run at once (1 for the in-process model).
    """

    label: str
    max_concurrency: int

    async def check(self) -> None:
        """Fail fast before any paid request: the URL answers, the key works, the model loads.

        Raises:
            SpecError: naming the problem and the fix.
        """

    async def complete(self, request: Request) -> Completion:
        """Send one request.

        Raises:
            TransientError: worth retrying (429, 5xx, timeout, bad body).
            TerminalError: not worth retrying (400, 404, auth, quota).
        """

    async def aclose(self) -> None:
        """Release connections and models."""


def parse_retry_after(headers: dict[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (seconds), or None."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra:
        try:
            return max(0.0, float(ra))
        except ValueError:
            return None  # an HTTP date; rare for LLM APIs, fall back to backoff
    return None


def error_for_status(status: int, body: Any, headers: dict[str, str], *, model: str,
                     row_key: str | None = None) -> E.ProviderError:
    """Map an HTTP error answer to an exception (not raised; the caller raises it).

    Args:
        status: HTTP status code (>= 400).
        body: the parsed JSON body, or the raw text if it was not JSON.
        headers: response headers with lower-cased names.
        model: model label, for context.
        row_key: the row served, for context.

    Returns:
        ``AuthError`` for 401/403, ``QuotaExhausted`` for OpenAI's
        ``insufficient_quota``, ``RateLimited`` (with ``retry_after``) for 429,
        ``ContextTooLong`` for ``context_length_exceeded``, ``BadRequest`` for
        other 400/404/422, ``RequestTimeout`` for 408, ``Overloaded`` for 409,
        5xx and 529; any other status is ``BadRequest``.
    """
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or err)
        code = str(err.get("code") or err.get("type") or "")
    else:
        message = str(err or body or "")[:300]
        code = ""
    text = f"HTTP {status} from {model}: {message}".strip().rstrip(":")
    kw = {"model": model, "row_key": row_key, "status": status}
    if status in (401, 403):
        return E.AuthError(text, **kw)
    if code == "insufficient_quota":
        return E.QuotaExhausted(text, **kw)
    if status == 429:
        return E.RateLimited(text, retry_after=parse_retry_after(headers), **kw)
    if code == "context_length_exceeded" or "context length" in message.lower():
        return E.ContextTooLong(text, **kw)
    if status == 408:
        return E.RequestTimeout(text, **kw)
    if status == 409 or status == 529 or status >= 500:
        return E.Overloaded(text, **kw)
    return E.BadRequest(text, **kw)


def map_transport_error(exc: BaseException, *, model: str, row_key: str | None = None) -> E.ProviderError:
    """Map a transport-level exception (no HTTP answer) to an exception.

    ``asyncio.TimeoutError`` (including aiohttp's timeouts) becomes
    :class:`~llmap.errors.RequestTimeout`; connection errors become
    :class:`~llmap.errors.ConnectionFailed`; anything else is
    :class:`~llmap.errors.ConnectionFailed` too, with its type in the message.
    """
    kw = {"model": model, "row_key": row_key}
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return E.RequestTimeout(f"request to {model} timed out", **kw)
    detail = str(exc) or type(exc).__name__
    return E.ConnectionFailed(f"connection to {model} failed: {detail}", **kw)
