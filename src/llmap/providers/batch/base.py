"""What :mod:`llmap.run.batch.runner` needs from a provider's batch API, and the one place its answers are mapped.

Two implementations: :class:`~llmap.providers.batch.openai.OpenAIBatches`
(the Files API and the Batch API) and
:class:`~llmap.providers.batch.anthropic.AnthropicBatches` (Message
Batches). Each builds its lines from the real-time provider's own request
building (``OpenAIProvider.body``, ``AnthropicProvider.body``) and reads each
answer with the real-time provider's own parser (``parse_answer``), so a
batch request is the same request, and its answer the same answer, as the
real-time path's. A failed line is mapped to :mod:`llmap.errors` here
(:func:`line_error`), through :func:`~llmap.providers.base.error_for_response`.

Every batch is tagged with llmap's own id for it (``tag``), written to the
ledger *before* the batch is created, so that a batch whose creation
answered after a crash can be found again (:meth:`BatchAPI.find`): OpenAI
keeps the tag in the batch's ``metadata``; Anthropic has no metadata, so its
custom ids start with the tag and :meth:`BatchAPI.find` matches creation
time and request count.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmap import errors as E
from llmap.providers.base import Completion, Request, error_for_response

__all__ = ["BatchAPI", "BatchState", "Found", "LineResult", "line_error", "parse_time", "too_large"]

#: Seconds either side of the intent's time in which a batch found by :meth:`BatchAPI.find` may have been created
#: (clock skew between this machine and the provider, and the create request's own time).
FIND_WINDOW_S = 600.0
#: Words of a validation error or an upload refusal that say a batch is too big (count or bytes).
_TOO_LARGE = re.compile(r"too large|too many|too big|at most \d|maximum|exceed|limit of [\d,]+ requests|file size",
                        re.IGNORECASE)


@dataclass(frozen=True)
class BatchState:
    """A batch as the provider reports it, in words common to both APIs.

    Attributes:
        provider_id: the provider's id of the batch.
        status: the provider's own word (OpenAI ``validating``... ``cancelled``;
            Anthropic ``in_progress``, ``canceling``, ``ended``).
        open: requests may still run (answers may still come).
        failed: the batch was refused at validation: no request of it ran
            (``errors`` says why; OpenAI only).
        counts: the provider's request counts (its own keys).
        errors: validation errors ``[{"code", "message", "line", "param"}]``.
        created_at: POSIX seconds of its creation at the provider, or None.
        raw: the provider's object, for what is not read here (output file ids).
    """

    provider_id: str
    status: str
    open: bool
    failed: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    created_at: float | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def error_code(self) -> str:
        """The first validation error's code (``token_limit_exceeded``...), or ``""``."""
        return str(self.errors[0].get("code") or "") if self.errors else ""

    @property
    def error_text(self) -> str:
        """The validation errors as one line."""
        return "; ".join(f"{e.get('code') or 'error'}: {e.get('message') or ''}".strip() for e in self.errors[:3])


@dataclass(frozen=True)
class LineResult:
    """One line of a batch's results.

    Attributes:
        custom_id: the line's custom id.
        body: the answer's JSON body (a chat completion, a message) when the request answered.
        status: the HTTP status of a request that failed, else None.
        error: the failed request's error body (``{"error": {...}}``), or None.
        unfinished: ``"expired"`` or ``"cancelled"`` for a request that never ran (not billed), else None.
    """

    custom_id: str
    body: bytes | None = None
    status: int | None = None
    error: Mapping[str, Any] | None = None
    unfinished: str | None = None


@dataclass(frozen=True)
class Found:
    """What :meth:`BatchAPI.find` learned of an intent whose creation was never recorded.

    Attributes:
        state: the batch created for it, or None.
        maybe: True when no batch is certain yet (several could be it): look again later; the intent's rows
            stay held meanwhile.
    """

    state: BatchState | None = None
    maybe: bool = False


class BatchAPI(Protocol):
    """One provider's batch API, bound to the real-time provider of the same ``[model]``.

    Attributes:
        kind: ``"openai"`` or ``"anthropic"``.
        label: ``provider:name`` of the model.
        max_requests, max_bytes: the API's own ceilings per batch.
    """

    kind: str
    label: str
    max_requests: int
    max_bytes: int

    def line(self, custom_id: str, request: Request) -> dict[str, Any]:
        """One request as a line of the batch (the real-time provider's body for ``request``)."""

    async def create(self, tag: str, lines: list[dict[str, Any]], *, job: str) -> BatchState:
        """Create a batch of ``lines`` tagged ``tag``; returns once the provider has answered with its id.

        Raises:
            BatchTooLarge: refused for its size before creation (split it).
            ProviderError: any other refusal, or no answer (then whether it was
                created is unknown: :meth:`find` tells).
        """

    async def find(self, tag: str, *, created_at: float, requests: int, known: set[str]) -> Found:
        """The batch created for an intent whose provider id was never recorded (a crash during creation).

        Args:
            tag: the intent's tag.
            created_at: POSIX seconds when the intent was written (just before the create request).
            requests: its lines.
            known: provider ids the ledger already holds (never the answer).
        """

    async def get(self, provider_id: str) -> BatchState:
        """Poll one batch."""

    async def results(self, state: BatchState) -> list[LineResult]:
        """Every line of an ended batch (answers, failures, and the requests that never ran)."""

    async def cancel(self, provider_id: str) -> BatchState:
        """Ask the provider to cancel a batch; requests already answered stay answered (and billed)."""

    def completion(self, body: bytes, request: Request) -> Completion:
        """The answer in ``body``, read as the real-time provider reads one."""

    async def aclose(self) -> None:
        """Release the connections (the real-time provider's client is shared: closing it is its owner's job)."""


def too_large(text: str) -> bool:
    """True when a validation error or refusal says the batch is too big (``too large``, ``at most N``...)."""
    return bool(_TOO_LARGE.search(text)) and "token_limit_exceeded" not in text


def line_error(res: LineResult, *, model: str) -> E.ProviderError:
    """The :mod:`llmap.errors` error of a failed line (transient: retry it; terminal: the row fails with it).

    A line without an HTTP status (OpenAI ``error.code`` such as ``request_timeout``) is transient.
    """
    if res.status is not None:
        return error_for_response(res.status, dict(res.error or {}), model=model)
    err = (res.error or {}).get("error", res.error or {})
    code = err.get("code") if isinstance(err, Mapping) else None
    message = err.get("message") if isinstance(err, Mapping) else None
    return E.Overloaded(f"{code or 'error'}: {message or 'the batch request did not run'}", model=model)


def parse_time(value: Any) -> float | None:
    """POSIX seconds from a Unix timestamp (OpenAI) or an RFC 3339 string (Anthropic), or None."""
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str) or not value:
        return None
    m = re.match(r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(\.\d+)?(Z|[+-]\d\d:?\d\d)?$", value.strip())
    if not m:
        return None
    y, mo, d, h, mi, s = (int(x) for x in m.groups()[:6])
    t = calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) + float(m.group(7) or 0)
    tz = m.group(8)
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        hh, mm = int(tz[1:3]), int(tz[-2:])
        t -= sign * (hh * 3600 + mm * 60)
    return t
