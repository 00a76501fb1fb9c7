"""The provider protocol and the one boundary where third-party errors are mapped.

Nothing above this layer sees an aiohttp, asyncio-timeout or llama.cpp
exception: :func:`error_for_response` (HTTP answers, classified by
:func:`classify_status`) and :func:`map_transport_error` turn them
into :mod:`llmap.errors` classes (``raise ... from exc``).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from llmap import errors as E
from llmap.control.headers import parse_rate_limit_headers
from llmap.errors import (
    AuthError,
    BadRequest,
    ContextTooLong,
    FatalProviderError,
    MalformedResponse,
    Overloaded,
    ProviderError,
    QuotaExhausted,
    RateLimited,
    RequestTimeout,
)

__all__ = [
    "Completion",
    "Provider",
    "Refusal",
    "Request",
    "classify_status",
    "error_for_response",
    "is_request_validation_error",
    "map_transport_error",
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
        shared_prefix: how many leading messages are the same for every
            request of the run (the system prompt, the few-shot turns); 0 when
            none is (a system prompt that reads the row's columns). A provider
            with a prompt cache marks the end of them; the row's own text
            (and any re-ask) comes after.
        logprobs: ask for the completion tokens' log-probabilities (per-row
            confidence, :mod:`llmap.quality.confidence`): OpenAI-compatible
            ``logprobs: true`` with ``top_logprobs``; the embedded model reads
            them off its own sampling. A server that refuses the parameter is
            remembered like a structured-output dialect.
    """

    messages: list[dict[str, str]]
    schema: dict[str, Any] | None
    temperature: float
    max_tokens: int
    row_key: str | None = None
    shared_prefix: int = 0
    logprobs: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the server refused for its *shape* and that the provider sent again at once in the
    next shape (see :mod:`llmap.control.dialect`): a request of the run, but no answer and no outage.

    Attributes:
        status: the refusal's HTTP status.
        latency_s: seconds the refused request took.
        note: what changed, in words (said once per change), or None.
    """

    status: int
    latency_s: float
    note: str | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """One answer.

    Attributes:
        content: the completion text.
        prompt_tokens, completion_tokens: usage as the provider reported it
            (tokens); 0 if it did not.
        latency_s: seconds from sending the request to reading the answer.
        headers: response headers (lower-cased names), for rate-limit budgets.
        usage_reported: False when the answer carried no ``usage``: the token
            counts are then 0 and the dispatcher estimates them instead.
        refusals: requests sent before this answer and refused for their shape.
        cache_read_tokens: of ``prompt_tokens``, those read from the
            provider's prompt cache (Anthropic ``cache_read_input_tokens``,
            OpenAI ``usage.prompt_tokens_details.cached_tokens``).
        cache_write_tokens: of ``prompt_tokens``, those written to it
            (Anthropic ``cache_creation_input_tokens``).
        limit_prompt_tokens: of ``prompt_tokens``, those the provider counts
            against its input-token limit; None means all of them (Anthropic
            does not count cache reads).
        stop_reason: why the answer ended, when that matters: ``"max_tokens"``
            (cut at ``max_tokens``), ``"refusal"`` (the model declined), or
            None (a complete answer).
        logprobs: the completion's tokens in order, each ``(token text, natural
            log of its probability)``, when the provider returned them
            (OpenAI-compatible ``choices[0].logprobs.content[].token/.logprob``;
            the embedded model, after its grammar's mask); None when it gave none.
            The tokens' texts concatenate to ``content``.
    """

    content: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    headers: dict[str, str] = field(default_factory=dict)
    usage_reported: bool = True
    refusals: tuple[Refusal, ...] = ()
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    limit_prompt_tokens: int | None = None
    stop_reason: str | None = None
    logprobs: tuple[tuple[str, float], ...] | None = None

    @property
    def counted_prompt_tokens(self) -> int:
        """Prompt tokens that count against the provider's input-token limit."""
        return self.prompt_tokens if self.limit_prompt_tokens is None else self.limit_prompt_tokens


@runtime_checkable
class Provider(Protocol):
    """What the dispatcher needs from a model backend.

    ``label`` is ``provider:name``. ``max_concurrency`` is how many requests
    the provider can usefully run at once (1 for one embedded model process).
    ``discovering`` is True while the provider still learns what the server
    takes (its structured-output dialect, parameter spellings): the lane then
    sends one request at a time until an answer comes back. ``structured``
    names the structured-output dialect in use, in words, for the ledger and
    ``llmap status`` (None when the provider has no such choice).
    """

    label: str
    max_concurrency: int
    discovering: bool
    structured: str | None

    async def check(self) -> None:
        """Fail fast before any paid request: the URL answers, the key works, the model loads.

        Raises:
            SpecError: naming the problem and the fix.
        """

    async def complete(self, request: Request) -> Completion:
        """Send one request.

        Returns:
            The answer; its ``refusals`` are the requests the server refused
            for their shape on the way (counted as requests of the run).

        Raises:
            TransientError: worth retrying (429, 5xx, timeout, bad body).
            TerminalError: not worth retrying (400, 404, auth, quota). Either
                carries ``refusals`` likewise.
        """

    async def aclose(self) -> None:
        """Release connections and models."""


_CONTEXT_MARKERS = (
    "context_length_exceeded",
    "maximum context length",
    "context length",
    "context size",
    "context window",
    "prompt is too long",
    "too many tokens",
    "exceed_context_size",
)
_QUOTA_MARKERS = ("insufficient_quota", "exceeded your current quota", "billing_hard_limit",
                  # Anthropic: a 429 rate_limit_error "This request would exceed your account's monthly spend limit"
                  "spend limit")
#: Any 4xx whose words say the account is out of money: every row would hit it (Anthropic answers 400
#: invalid_request_error "Your credit balance is too low to access the Anthropic API ...").
_BILLING_MARKERS = ("credit balance is too low", "billing_error")


#: Words of a request-validation error (pydantic, FastAPI): the request is wrong, whatever the status.
_VALIDATION_MARKERS = (
    "validation error",
    "input should be",
    "field required",
    "extra_forbidden",
    "extra inputs are not permitted",
)
_PYDANTIC_ITEM = re.compile(r"'loc': \(([^)]*)\), 'msg': (?:\"([^\"]*)\"|'([^']*)')(?:, 'input': ('[^']*'|\d+))?")


def _one_line(message: str) -> str:
    """A server's error message as one short line: pydantic's multi-line validation errors
    become ``loc: msg (input)``, tracebacks are cut, whitespace collapsed, at most 300 characters."""
    for cut in ("\n\n  File ", "\nTraceback", "\n  File "):
        if cut in message:
            message = message[: message.index(cut)]
    items = _PYDANTIC_ITEM.findall(message)
    if items and "validation error" in message:
        head = message.split(":", 1)[0].strip()
        parts = []
        for loc, msg_dq, msg_sq, given in items[:3]:
            where = ".".join(p.strip().strip("'\"") for p in loc.split(",") if p.strip())
            parts.append(f"{where}: {msg_dq or msg_sq}" + (f" (got {given})" if given else ""))
        message = f"{head}: " + "; ".join(parts)
    message = " ".join(message.split())
    return message if len(message) <= 300 else message[:297] + "..."


def _detail_text(detail: Any) -> str:
    """FastAPI's ``detail``: a string, or a list of ``{loc, msg, type}``."""
    if isinstance(detail, list):
        parts = []
        for d in detail[:3]:
            if isinstance(d, Mapping):
                loc = ".".join(str(p) for p in d.get("loc") or ())
                parts.append(f"{loc}: {d.get('msg', '')}" if loc else str(d.get("msg", "")))
        return f"{len(detail)} validation error{'s' if len(detail) != 1 else ''}: " + "; ".join(parts)
    return str(detail or "")


def _error_fields(body: Any) -> tuple[str, str]:
    """Return (code and type joined by a space, message) from an error body; "" when absent."""
    if not isinstance(body, Mapping):
        return "", ""
    inner: Any = body.get("error", body)
    if isinstance(inner, str):
        return "", _one_line(inner)
    if not isinstance(inner, Mapping):
        return "", ""
    code = " ".join(str(inner[key]) for key in ("code", "type") if inner.get(key))
    message = inner.get("message") or _detail_text(inner.get("detail") or body.get("detail"))
    return code, _one_line(str(message))


def is_request_validation_error(body: Any) -> bool:
    """True when an error body is a request-validation error (pydantic or FastAPI words).

    llama-cpp-python's server answers a request its pydantic model refuses
    with HTTP 500 (``internal_server_error``, "1 validation error: ... Input
    should be ..."): the same request fails the same way every time, so it is
    a bad request, not an outage.
    """
    code, message = _error_fields(body)
    text = f"{code} {message}".lower()
    return any(marker in text for marker in _VALIDATION_MARKERS)


def classify_status(status: int, body: Mapping[str, Any] | None = None) -> type[ProviderError]:
    """Map an HTTP status and error body to the exception class to raise.

    Reads OpenAI-style bodies (``{"error": {"code", "type", "message"}}``),
    Anthropic's (``{"type": "error", "error": {"type", "message"}}``) and
    looser ones (``{"error": "text"}``, ``{"detail": "text"}``).

    * 2xx: MalformedResponse (call it only when the body is unusable).
    * 401, 403: AuthError (fatal: stops the run).
    * 402, a 429 whose code or message says ``insufficient_quota`` or a
      spend limit (Anthropic: "This request would exceed your account's
      monthly spend limit", with or without ``retry-after``: a monthly limit
      does not come back in minutes), and any 4xx that says the credit
      balance is too low (Anthropic's 400) or ``billing_error``:
      QuotaExhausted (fatal). OpenRouter and others answer 402 when credits run out.
    * 408: RequestTimeout.
    * 409: Overloaded (a conflict or lock timeout; transient, as the OpenAI SDK treats it).
    * 429: RateLimited.
    * 413 (Anthropic's ``request_too_large``: the request is over 32 MB):
      ContextTooLong, the request's own size (a pack is split, a row fails alone).
    * 400, 404, 422 and any other 4xx: BadRequest, or ContextTooLong when the
      code or message says the context length was exceeded
      (``context_length_exceeded``, "maximum context length", "prompt is too long", ...).
    * 500 whose body is a request-validation error (pydantic / FastAPI words:
      "validation error", "Input should be", "Field required",
      ``extra_forbidden``): BadRequest. llama-cpp-python's server answers a
      refused request body this way; retrying it can only fail again.
    * other 5xx, and 529 (Anthropic's ``overloaded_error``: busy for every customer): Overloaded.
    * anything else (1xx, 3xx): FatalProviderError: an unfollowed redirect or an
      odd status means a wrong base URL, which every row would hit.

    Args:
        status: the HTTP status code.
        body: the decoded JSON body, or None.

    Returns:
        A subclass of :class:`~llmap.errors.ProviderError` (not an instance).
    """
    code, message = _error_fields(body)
    text = f"{code} {message}".lower()
    if 200 <= status < 300:
        return MalformedResponse
    if status in (401, 403):
        return AuthError
    if status == 402:
        return QuotaExhausted
    if status == 408:
        return RequestTimeout
    if status == 409:
        return Overloaded
    if status == 429:
        if any(marker in text for marker in _QUOTA_MARKERS):
            return QuotaExhausted
        return RateLimited
    if 400 <= status < 500:
        if any(marker in text for marker in _BILLING_MARKERS):
            return QuotaExhausted
        if status == 413 or any(marker in text for marker in _CONTEXT_MARKERS):
            return ContextTooLong
        return BadRequest
    if 500 <= status < 600:
        if status == 500 and is_request_validation_error(body):
            return BadRequest
        return Overloaded
    return FatalProviderError


def error_for_response(
    status: int,
    body: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    message: str | None = None,
    model: str | None = None,
    row_key: str | None = None,
    attempt: int | None = None,
    wall_now: float | None = None,
) -> ProviderError:
    """Build the :mod:`llmap.errors` instance for a failed HTTP response.

    The class comes from :func:`classify_status`; a :class:`RateLimited` gets
    ``retry_after`` (seconds) from ``retry-after-ms`` / ``retry-after``.

    Args:
        status: the HTTP status code.
        body: the decoded JSON error body, if any.
        headers: the response headers, if any.
        message: the message to use; by default the body's message or "HTTP <status>".
        model: the model the request was for.
        row_key: the key of the row the request served.
        attempt: the 1-based attempt number.
        wall_now: wall-clock POSIX seconds for HTTP-date Retry-After; default ``time.time()``.

    Returns:
        The exception, not raised; the caller raises it ``from`` the original.
    """
    cls = classify_status(status, body)
    if message is None:
        _, detail = _error_fields(body)
        message = f"HTTP {status}: {detail}" if detail else f"HTTP {status}"
    context: dict[str, Any] = {
        "model": model,
        "row_key": row_key,
        "attempt": attempt,
        "status": status,
    }
    if cls is RateLimited:
        retry_after = None
        if headers:
            now = time.time() if wall_now is None else wall_now
            retry_after = parse_rate_limit_headers(headers, wall_now=now).retry_after_s
        return RateLimited(message, retry_after=retry_after, **context)
    return cls(message, **context)


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
