"""The simulator's batch APIs, Anthropic's side: Message Batches.

Routes (from Anthropic's API reference; shapes as there, errors in its
``{"type": "error", "error": {"type", "message"}}`` form, the same
``x-api-key`` and ``anthropic-version`` checks as ``/v1/messages``):

- ``POST /v1/messages/batches {"requests": [{"custom_id", "params"}]}``: a
  ``message_batch`` object, ``processing_status = "in_progress"``. Refused
  with 400 ``invalid_request_error``: no requests, more than
  ``batch_max_requests`` (default 100,000 here), a ``custom_id`` not matching
  ``^[a-zA-Z0-9_-]{1,64}$`` or repeated, ``params`` without ``model``,
  ``messages`` or ``max_tokens``; a body over ``batch_max_bytes`` gets 413
  ``request_too_large``. Bad params otherwise show up only as ``errored``
  results, as on the real API;
- ``GET /v1/messages/batches/{id}``, ``GET /v1/messages/batches?limit&after_id``
  (newest first), ``POST /v1/messages/batches/{id}/cancel`` (``canceling``);
- ``GET /v1/messages/batches/{id}/results`` once ``ended``: JSONL lines
  ``{"custom_id", "result": {"type": "succeeded", "message"} | {"type":
  "errored", "error": {...}} | {"type": "canceled"} | {"type": "expired"}}``.

``request_counts`` has ``processing`` until the batch ends, then
``succeeded``, ``errored``, ``canceled`` and ``expired``. Time, expiry,
cancels and per-request failures (``batch_fail_rate``: ``errored`` with
``api_error``) follow :class:`~llmap.sim.batches.Timeline`, as the OpenAI
side does; each answer is the one ``/v1/messages`` would give (tool_use,
JSON text, prompt-cache usage).
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from llmap.sim.batches import BatchesMixin, Timeline, digest
from llmap.sim.messages import error_response, segments

if TYPE_CHECKING:
    import random

    from llmap.sim.config import SimConfig
    from llmap.sim.limits import Clock
    from llmap.sim.stats import SimStats

__all__ = ["BatchAPIsMixin", "MessageBatchesMixin"]

CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
#: Message Batches' own ceiling on requests per batch.
MAX_REQUESTS = 100_000
BATCHES = "/v1/messages/batches"


@dataclass
class _MsgBatch:
    doc: dict[str, Any]
    requests: list[dict[str, Any]]
    timeline: Timeline
    results: list[dict[str, Any]] = field(default_factory=list)
    ended: bool = False


def rfc3339(t: float) -> str:
    """POSIX seconds as Anthropic writes times: RFC 3339, UTC, microseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1e6):06d}Z"


class MessageBatchesMixin:
    """Message Batches routes for :class:`~llmap.sim.server.SimServer` (see the module docstring).

    Uses the server's ``_config``, ``_clock``, ``_wall_clock``, ``_rng``, ``stats``,
    ``_key_ok``, ``_refuse_message``, ``_prefix``, ``prompt_cache`` and ``_content``.
    """

    _config: SimConfig
    _clock: Clock
    _wall_clock: Clock
    _rng: random.Random
    stats: SimStats

    @functools.cached_property
    def message_batches(self) -> dict[str, _MsgBatch]:
        """Message batch id -> batch, in creation order."""
        return {}

    def add_message_batch_routes(self, app: web.Application) -> None:
        """Register the Message Batches routes."""
        app.router.add_post(BATCHES, self.create_message_batch)
        app.router.add_get(BATCHES, self.list_message_batches)
        app.router.add_get(BATCHES + "/{batch_id}", self.get_message_batch)
        app.router.add_post(BATCHES + "/{batch_id}/cancel", self.cancel_message_batch)
        app.router.add_get(BATCHES + "/{batch_id}/results", self.message_batch_results)

    def _checked(self, request: web.Request) -> web.Response | None:
        refused = self._key_ok(request)  # type: ignore[attr-defined]
        if refused is not None:
            return refused
        if not request.headers.get("anthropic-version"):
            return error_response(400, "invalid_request_error", "anthropic-version: header is required")
        return None

    async def create_message_batch(self, request: web.Request) -> web.Response:
        """``POST /v1/messages/batches``."""
        refused = self._checked(request)
        if refused is not None:
            return refused
        raw = await request.read()
        cfg = self._config
        if len(raw) > cfg.batch_max_bytes:
            return error_response(413, "request_too_large",
                                  f"Request exceeds the maximum size of {cfg.batch_max_bytes:,} bytes")
        try:
            body = json.loads(raw)
        except ValueError:
            return error_response(400, "invalid_request_error", "There was an error parsing the body")
        reqs = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(reqs, list) or not reqs:
            return error_response(400, "invalid_request_error",
                                  "requests: List should have at least 1 item after validation")
        cap = min(cfg.batch_max_requests, MAX_REQUESTS)
        if len(reqs) > cap:
            return error_response(400, "invalid_request_error",
                                  f"requests: List should have at most {cap} items after validation, not {len(reqs)}")
        seen: set[str] = set()
        for i, r in enumerate(reqs):
            cid = r.get("custom_id") if isinstance(r, dict) else None
            params = r.get("params") if isinstance(r, dict) else None
            if not isinstance(cid, str) or not CUSTOM_ID.match(cid):
                return error_response(400, "invalid_request_error",
                                      f"requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'")
            if cid in seen:
                return error_response(400, "invalid_request_error", f"requests.{i}.custom_id: Duplicate custom_id "
                                      f"{cid!r}; each request's custom_id must be unique")
            seen.add(cid)
            if not isinstance(params, dict) or not all(k in params for k in ("model", "messages", "max_tokens")):
                return error_response(400, "invalid_request_error",
                                      f"requests.{i}.params: model, messages and max_tokens: Field required")
        wall = self._wall_clock()
        bid = f"msgbatch_sim{len(self.message_batches) + 1:06x}{self._rng.getrandbits(32):08x}"
        doc = {"id": bid, "type": "message_batch", "processing_status": "in_progress",
               "request_counts": {"processing": len(reqs), "succeeded": 0, "errored": 0, "canceled": 0,
                                  "expired": 0},
               "ended_at": None, "created_at": rfc3339(wall), "expires_at": rfc3339(wall + 86400),
               "archived_at": None, "cancel_initiated_at": None, "results_url": None}
        tl = Timeline(self._clock(), len(reqs), cfg.batch_time, cfg.batch_window, cfg.batch_cancel_time)
        self.message_batches[bid] = _MsgBatch(doc, reqs, tl)
        self.stats.batches.accepted([(r["custom_id"], digest(r["params"])) for r in reqs])
        return web.json_response(doc)

    def _refresh_message_batch(self, b: _MsgBatch) -> dict[str, Any]:
        if b.ended:
            return b.doc
        phase, done = b.timeline.phase(self._clock())
        if phase == "running":
            return b.doc
        if phase == "cancelling":
            b.doc["processing_status"] = "canceling"
            return b.doc
        self._end_message_batch(b, phase, done)
        return b.doc

    def _end_message_batch(self, b: _MsgBatch, phase: str, done: int) -> None:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        for i, r in enumerate(b.requests):
            if i >= done:
                kind = "expired" if phase == "expired" else "canceled"
                result: dict[str, Any] = {"type": kind}
            elif self._config.batch_fail_rate and self._rng.random() < self._config.batch_fail_rate:
                self.stats.batches.failed_lines += 1
                kind, result = "errored", {"type": "errored", "error": {
                    "type": "error", "error": {"type": "api_error", "message": "Internal server error"},
                    "request_id": f"req_simb{i:06x}"}}
            else:
                kind, result = self._message_result(r["params"], i)
            counts[kind] += 1
            b.results.append({"custom_id": r["custom_id"], "result": result})
        self.stats.batches.expired += phase == "expired"
        self.stats.batches.cancelled += phase == "cancelled"
        wall = self._wall_clock()
        b.doc.update(processing_status="ended", request_counts=counts, ended_at=rfc3339(wall),
                     results_url=f"{BATCHES}/{b.doc['id']}/results")
        b.ended = True

    def _message_result(self, params: dict[str, Any], i: int) -> tuple[str, dict[str, Any]]:
        """What ``POST /v1/messages`` would answer ``params``: ``succeeded`` with the message, or ``errored``."""
        model, max_tokens = str(params.get("model")), params.get("max_tokens")
        segs = segments(params)
        refusal = self._refuse_message(model, segs)  # type: ignore[attr-defined]
        if refusal is None and (not isinstance(max_tokens, int) or max_tokens < 1):
            refusal = error_response(400, "invalid_request_error", "max_tokens: Field required")
        if refusal is not None:
            return "errored", {"type": "errored", "error": json.loads(refusal.text)}
        prompt = sum(t for _, t, _ in segs)
        prefix, key = self._prefix(model, segs)  # type: ignore[attr-defined]
        now = self._clock()
        read = prefix if key is not None and self.prompt_cache.read(key, now) else 0  # type: ignore[attr-defined]
        write = prefix if key is not None and not read else 0
        if key is not None:
            self.prompt_cache.write(key, now)  # type: ignore[attr-defined]
        content, stop, output = self._content(params, model, max_tokens)  # type: ignore[attr-defined]
        self.stats.record_success(prompt, output, cache_read=read, cache_write=write)
        message = {"id": f"msg_simb{i:06x}{self._rng.getrandbits(24):06x}", "type": "message", "role": "assistant",
                   "model": model, "content": content, "stop_reason": stop, "stop_sequence": None,
                   "usage": {"input_tokens": prompt - read - write, "cache_creation_input_tokens": write,
                             "cache_read_input_tokens": read, "output_tokens": output}}
        return "succeeded", {"type": "succeeded", "message": message}

    def _message_batch(self, request: web.Request) -> _MsgBatch | web.Response:
        refused = self._checked(request)
        if refused is not None:
            return refused
        b = self.message_batches.get(request.match_info["batch_id"])
        if b is None:
            return error_response(404, "not_found_error", f"No message batch with id {request.match_info['batch_id']}")
        return b

    async def get_message_batch(self, request: web.Request) -> web.Response:
        """``GET /v1/messages/batches/{id}``."""
        b = self._message_batch(request)
        return b if isinstance(b, web.Response) else web.json_response(self._refresh_message_batch(b))

    async def cancel_message_batch(self, request: web.Request) -> web.Response:
        """``POST /v1/messages/batches/{id}/cancel``: ``canceling`` now, ``ended`` after ``batch_cancel_time``."""
        b = self._message_batch(request)
        if isinstance(b, web.Response):
            return b
        doc = self._refresh_message_batch(b)
        if doc["processing_status"] == "in_progress":
            b.timeline.cancel_at = self._clock()
            doc.update(processing_status="canceling", cancel_initiated_at=rfc3339(self._wall_clock()))
        return web.json_response(self._refresh_message_batch(b))

    async def message_batch_results(self, request: web.Request) -> web.Response:
        """``GET /v1/messages/batches/{id}/results``: JSONL, once the batch has ended."""
        b = self._message_batch(request)
        if isinstance(b, web.Response):
            return b
        if self._refresh_message_batch(b)["processing_status"] != "ended":
            return error_response(404, "not_found_error",
                                  f"No results found for Message Batch {b.doc['id']}: it has not ended yet")
        text = "".join(json.dumps(r) + "\n" for r in b.results)
        return web.Response(text=text, content_type="application/x-jsonl")

    async def list_message_batches(self, request: web.Request) -> web.Response:
        """``GET /v1/messages/batches?limit&after_id``: newest first."""
        refused = self._checked(request)
        if refused is not None:
            return refused
        ids = list(self.message_batches)[::-1]
        after = request.query.get("after_id")
        if after in self.message_batches:
            ids = ids[ids.index(after) + 1:]
        limit = max(1, min(1000, int(request.query.get("limit") or 20)))
        page = [self._refresh_message_batch(self.message_batches[i]) for i in ids[:limit]]
        return web.json_response({"data": page, "first_id": page[0]["id"] if page else None,
                                  "last_id": page[-1]["id"] if page else None, "has_more": len(ids) > limit})


class BatchAPIsMixin(BatchesMixin, MessageBatchesMixin):
    """Both batch APIs, for :class:`~llmap.sim.server.SimServer`."""

    def add_batch_api_routes(self, app: web.Application) -> None:
        """Register OpenAI's Files and Batch routes and Anthropic's Message Batches routes."""
        self.add_batch_routes(app)
        self.add_message_batch_routes(app)
