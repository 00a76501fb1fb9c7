"""Anthropic's Message Batches API: the requests go inline, in one JSON body.

From Anthropic's API reference:

- create, ``POST /v1/messages/batches {"requests": [{"custom_id", "params"}]}``:
  at most 100,000 requests or 256 MB; ``custom_id`` matches
  ``^[a-zA-Z0-9_-]{1,64}$`` and is unique in the batch; ``params`` is a
  Messages request. Bad params show up only as ``errored`` results;
- poll ``GET /v1/messages/batches/{id}``: ``processing_status`` is
  ``in_progress``, ``canceling`` or ``ended``; ``request_counts`` holds
  ``processing``, ``succeeded``, ``errored``, ``canceled`` and ``expired``
  (all but ``processing`` stay 0 until the batch ends);
- once ended, ``GET /v1/messages/batches/{id}/results`` streams JSONL lines
  ``{"custom_id", "result": {"type": "succeeded", "message"} | {"type":
  "errored", "error": {"type": "error", "error": {"type", "message"}}} |
  {"type": "canceled"} | {"type": "expired"}}`` in any order. Errored,
  canceled and expired requests are not billed;
- ``GET /v1/messages/batches?limit&after_id`` lists batches newest first
  (``has_more``, ``last_id``); ``POST /v1/messages/batches/{id}/cancel``.

There is no metadata: llmap's tag is the prefix of every custom id
(``<tag>-<n>``), and a batch whose creation answered after a crash is found
by its creation time and request count (:meth:`AnthropicBatches.find`).

Each request's ``params`` is :meth:`AnthropicProvider.body
<llmap.providers.anthropic.AnthropicProvider.body>`, and each message is
read by its ``parse_answer``; the calls share its pooled client.
"""

from __future__ import annotations

import json
from typing import Any

from llmap import errors as E
from llmap.providers.anthropic import AnthropicProvider
from llmap.providers.base import Completion, Request, error_for_response
from llmap.providers.batch.base import (
    FIND_WINDOW_S,
    BatchState,
    Found,
    LineResult,
    parse_time,
    too_large,
)
from llmap.providers.http import HttpAnswer, decode_json

__all__ = ["AnthropicBatches", "ERROR_STATUS"]

BATCHES = "/v1/messages/batches"
#: The HTTP status of each of Anthropic's error types (its errors reference), for an ``errored`` result.
ERROR_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
                "permission_error": 403, "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429,
                "api_error": 500, "timeout_error": 504, "overloaded_error": 529}
_UNFINISHED = {"canceled": "cancelled", "expired": "expired"}


class AnthropicBatches:
    """Anthropic's Message Batches for one ``[model]``, through its real-time :class:`AnthropicProvider`.

    Args:
        provider: the model's real-time provider (its client, key, request building and parsing).
    """

    kind = "anthropic"
    max_requests = 100_000
    max_bytes = 256_000_000

    def __init__(self, provider: AnthropicProvider) -> None:
        self.provider = provider
        self.http = provider.http
        self.label = provider.label

    def line(self, custom_id: str, request: Request) -> dict[str, Any]:
        """``{"custom_id", "params"}``: the Messages request real time would send."""
        return {"custom_id": custom_id, "params": self.provider.body(request)}

    def _raise(self, ans: HttpAnswer, what: str) -> None:
        exc = error_for_response(ans.status, decode_json(ans.body), ans.headers, model=self.label)
        if isinstance(exc, E.BadRequest) and (ans.status == 413 or too_large(str(exc))):
            raise E.BatchTooLarge(f"{what}: {exc}", model=self.label, status=ans.status) from None
        exc.args = (f"{what}: {exc}",)
        raise exc

    async def create(self, tag: str, lines: list[dict[str, Any]], *, job: str) -> BatchState:
        """``POST /v1/messages/batches`` with every request inline (see :class:`~.base.BatchAPI`)."""
        ans = await self.http.send("POST", BATCHES, body={"requests": lines})
        if ans.status >= 400:
            self._raise(ans, "creating the message batch")
        return self._state(json.loads(ans.body))

    async def find(self, tag: str, *, created_at: float, requests: int, known: set[str]) -> Found:
        """The batch created for the intent: created within :data:`~.base.FIND_WINDOW_S` of it, with as many
        requests, and not already known. An ended candidate is certain when its results' custom ids carry
        ``tag``; one running candidate is taken (its results are checked when they come); several running
        candidates leave the answer open (``maybe``) until they end."""
        after = None
        running: list[BatchState] = []
        while True:
            page = {"limit": "100", **({"after_id": after} if after else {})}
            ans = await self.http.send("GET", BATCHES, params=page)
            if ans.status >= 400:
                self._raise(ans, "listing message batches")
            page = json.loads(ans.body)
            data = page.get("data") or []
            for doc in data:
                st = self._state(doc)
                t = st.created_at
                if st.provider_id in known or t is None or abs(t - created_at) > FIND_WINDOW_S:
                    continue
                if sum(st.counts.values()) != requests:
                    continue
                if st.open:
                    running.append(st)
                elif await self._carries(st, tag):
                    return Found(st)
            oldest = min((parse_time(d.get("created_at")) or 0 for d in data), default=0)
            if not data or not page.get("has_more") or oldest < created_at - FIND_WINDOW_S:
                break
            after = page.get("last_id") or data[-1].get("id")
        if len(running) == 1:
            return Found(running[0])
        return Found(None, maybe=len(running) > 1)

    async def _carries(self, st: BatchState, tag: str) -> bool:
        try:
            lines = await self.results(st)
        except E.ProviderError:
            return False
        return bool(lines) and lines[0].custom_id.startswith(f"{tag}-")

    async def get(self, provider_id: str) -> BatchState:
        """``GET /v1/messages/batches/{id}``."""
        ans = await self.http.send("GET", f"{BATCHES}/{provider_id}")
        if ans.status >= 400:
            self._raise(ans, f"polling message batch {provider_id}")
        return self._state(json.loads(ans.body))

    async def cancel(self, provider_id: str) -> BatchState:
        """``POST /v1/messages/batches/{id}/cancel``."""
        ans = await self.http.send("POST", f"{BATCHES}/{provider_id}/cancel")
        if ans.status >= 400:
            self._raise(ans, f"cancelling message batch {provider_id}")
        return self._state(json.loads(ans.body))

    async def results(self, state: BatchState) -> list[LineResult]:
        """``GET /v1/messages/batches/{id}/results``: every request's result."""
        ans = await self.http.send("GET", f"{BATCHES}/{state.provider_id}/results")
        if ans.status >= 400:
            self._raise(ans, f"downloading the results of message batch {state.provider_id}")
        return [_line(json.loads(text)) for text in ans.body.splitlines() if text.strip()]

    def completion(self, body: bytes, request: Request) -> Completion:
        """The message in ``body``, read by :meth:`AnthropicProvider.parse_answer`."""
        return self.provider.parse_answer(body, request)

    async def aclose(self) -> None:
        """Nothing of its own: the client is the real-time provider's."""

    @staticmethod
    def _state(doc: dict[str, Any]) -> BatchState:
        status = str(doc.get("processing_status") or "")
        counts = {k: int(v or 0) for k, v in (doc.get("request_counts") or {}).items()}
        return BatchState(str(doc["id"]), status, status != "ended", False, counts, [],
                          parse_time(doc.get("created_at")), doc)


def _line(doc: dict[str, Any]) -> LineResult:
    cid = str(doc.get("custom_id"))
    result = doc.get("result") if isinstance(doc.get("result"), dict) else {}
    kind = result.get("type")
    if kind == "succeeded":
        return LineResult(cid, body=json.dumps(result.get("message")).encode())
    if kind in _UNFINISHED:
        return LineResult(cid, unfinished=_UNFINISHED[kind])
    err = result.get("error") if isinstance(result.get("error"), dict) else {}
    inner = err.get("error") if isinstance(err.get("error"), dict) else err
    status = ERROR_STATUS.get(str(inner.get("type")), 500)
    return LineResult(cid, status=status, error=err)
