"""OpenAI's Batch API, with the Files API: one JSONL file per batch.

From OpenAI's API reference:

- upload the input, ``POST /v1/files`` (multipart, ``purpose=batch``); each
  line is ``{"custom_id", "method": "POST", "url": "/v1/chat/completions",
  "body"}``; at most 50,000 requests and 200 MB per file;
- create the batch, ``POST /v1/batches {"input_file_id", "endpoint":
  "/v1/chat/completions", "completion_window": "24h", "metadata"}`` (up to 16
  pairs; llmap writes ``llmap_tag`` and ``llmap_job``);
- poll ``GET /v1/batches/{id}``: ``status`` is ``validating``, ``failed``
  (``errors.data[{code, message, line, param}]``, e.g.
  ``token_limit_exceeded`` when the model's queue of enqueued prompt tokens is
  full), ``in_progress``, ``finalizing``, ``completed``, ``expired``,
  ``cancelling`` or ``cancelled``;
- ``output_file_id`` lines ``{"id", "custom_id", "response": {"status_code",
  "request_id", "body"}, "error": null}`` in any order; ``error_file_id`` lines
  hold the failed requests (``response.status_code`` >= 400 and its error
  body), and after expiry or a cancel the requests that never ran
  (``"error": {"code": "batch_expired" | "batch_cancelled"}``). An expired
  batch's finished requests are in its output file, and billed;
- ``GET /v1/batches?limit&after`` lists batches, newest first, with their
  metadata (``has_more``, ``last_id``); ``POST /v1/batches/{id}/cancel``;
  ``GET /v1/files/{id}/content`` downloads a file.

Every call goes through the real-time provider's pooled client
(:class:`~llmap.providers.http.HttpClient`), and each line's ``body`` is
:meth:`OpenAIProvider.body <llmap.providers.openai.OpenAIProvider.body>` for
the request in the provider's current request shape.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from llmap import errors as E
from llmap.providers.base import Completion, Request, error_for_response
from llmap.providers.batch.base import FIND_WINDOW_S, BatchState, Found, LineResult, too_large
from llmap.providers.http import HttpAnswer, decode_json
from llmap.providers.openai import OpenAIProvider

__all__ = ["OpenAIBatches"]

ENDPOINT = "/v1/chat/completions"
_OPEN = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
_UNFINISHED = {"batch_expired": "expired", "batch_cancelled": "cancelled"}


class OpenAIBatches:
    """OpenAI's Batch API for one ``[model]``, through its real-time :class:`OpenAIProvider`.

    Args:
        provider: the model's real-time provider (its client, key, request building and parsing).
    """

    kind = "openai"
    max_requests = 50_000
    max_bytes = 200_000_000

    def __init__(self, provider: OpenAIProvider) -> None:
        self.provider = provider
        self.http = provider.http
        self.label = provider.label

    def line(self, custom_id: str, request: Request) -> dict[str, Any]:
        """``{"custom_id", "method", "url", "body"}``: the body real time would send, in its current shape."""
        return {"custom_id": custom_id, "method": "POST", "url": ENDPOINT,
                "body": self.provider.body(request, self.provider.shape.sent())}

    def _raise(self, ans: HttpAnswer, what: str) -> None:
        doc = decode_json(ans.body)
        exc = error_for_response(ans.status, doc, ans.headers, model=self.label)
        if isinstance(exc, E.BadRequest) and (ans.status == 413 or too_large(str(exc))):
            raise E.BatchTooLarge(f"{what}: {exc}", model=self.label, status=ans.status) from None
        exc.args = (f"{what}: {exc}",)
        raise exc

    async def create(self, tag: str, lines: list[dict[str, Any]], *, job: str) -> BatchState:
        """Upload the lines as a JSONL file, then create the batch tagged ``tag`` (see :class:`~.base.BatchAPI`)."""
        data = "".join(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n" for line in lines).encode()
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", data, filename=f"llmap-{tag}.jsonl", content_type="application/jsonl")
        ans = await self.http.send("POST", "/files", form=form)
        if ans.status >= 400:
            self._raise(ans, "uploading the batch file")
        file_id = json.loads(ans.body)["id"]
        body = {"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h",
                "metadata": {"llmap_tag": tag, "llmap_job": job[:512]}}
        ans = await self.http.send("POST", "/batches", body=body)
        if ans.status >= 400:
            self._raise(ans, "creating the batch")
        return self._state(json.loads(ans.body))

    async def find(self, tag: str, *, created_at: float, requests: int, known: set[str]) -> Found:
        """List batches newest first until one carries ``metadata.llmap_tag == tag``, or they are older than
        the intent (by :data:`~.base.FIND_WINDOW_S`)."""
        after = None
        while True:
            page = {"limit": "100", **({"after": after} if after else {})}
            ans = await self.http.send("GET", "/batches", params=page)
            if ans.status >= 400:
                self._raise(ans, "listing batches")
            page = json.loads(ans.body)
            data = page.get("data") or []
            for doc in data:
                if (doc.get("metadata") or {}).get("llmap_tag") == tag and doc.get("id") not in known:
                    return Found(self._state(doc))
            oldest = min((d.get("created_at") or 0 for d in data), default=0)
            if not data or not page.get("has_more") or oldest < created_at - FIND_WINDOW_S:
                return Found(None)
            after = page.get("last_id") or data[-1].get("id")

    async def get(self, provider_id: str) -> BatchState:
        """``GET /batches/{id}``."""
        ans = await self.http.send("GET", f"/batches/{provider_id}")
        if ans.status >= 400:
            self._raise(ans, f"polling batch {provider_id}")
        return self._state(json.loads(ans.body))

    async def cancel(self, provider_id: str) -> BatchState:
        """``POST /batches/{id}/cancel``."""
        ans = await self.http.send("POST", f"/batches/{provider_id}/cancel")
        if ans.status >= 400:
            self._raise(ans, f"cancelling batch {provider_id}")
        return self._state(json.loads(ans.body))

    async def results(self, state: BatchState) -> list[LineResult]:
        """The output file's and the error file's lines (either may be absent)."""
        out: list[LineResult] = []
        for key in ("output_file_id", "error_file_id"):
            file_id = state.raw.get(key)
            if not file_id:
                continue
            ans = await self.http.send("GET", f"/files/{file_id}/content")
            if ans.status >= 400:
                self._raise(ans, f"downloading {key} {file_id}")
            for text in ans.body.splitlines():
                if text.strip():
                    out.append(_line(json.loads(text)))
        return out

    def completion(self, body: bytes, request: Request) -> Completion:
        """The chat completion in ``body``, read by :meth:`OpenAIProvider.parse_answer`."""
        return self.provider.parse_answer(body, request)

    async def aclose(self) -> None:
        """Nothing of its own: the client is the real-time provider's."""

    @staticmethod
    def _state(doc: dict[str, Any]) -> BatchState:
        status = str(doc.get("status") or "")
        errors = (doc.get("errors") or {}).get("data") or [] if isinstance(doc.get("errors"), dict) else []
        counts = {k: int(v or 0) for k, v in (doc.get("request_counts") or {}).items()}
        return BatchState(str(doc["id"]), status, status in _OPEN, status == "failed", counts, list(errors),
                          doc.get("created_at"), doc)


def _line(doc: dict[str, Any]) -> LineResult:
    cid = str(doc.get("custom_id"))
    resp = doc.get("response")
    if isinstance(resp, dict) and resp.get("status_code") is not None:
        status = int(resp["status_code"])
        body = resp.get("body")
        if status < 400:
            return LineResult(cid, body=json.dumps(body).encode())
        return LineResult(cid, status=status, error=body if isinstance(body, dict) else {"error": str(body)})
    err = doc.get("error") if isinstance(doc.get("error"), dict) else {}
    unfinished = _UNFINISHED.get(str(err.get("code")))
    if unfinished:
        return LineResult(cid, unfinished=unfinished)
    return LineResult(cid, error={"error": err})
