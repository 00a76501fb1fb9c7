"""The simulator's batch APIs, OpenAI's side: the Files API and the Batch API.

Routes (from OpenAI's API reference; shapes as there):

- ``POST /v1/files`` (multipart: ``purpose``, ``file``): a file object; only
  ``purpose = "batch"`` is taken; a file over ``batch_max_bytes`` gets 400
  "File is too large.";
- ``GET /v1/files/{id}/content``: the file's bytes (input, output, error files);
- ``POST /v1/batches {input_file_id, endpoint, completion_window, metadata}``:
  a batch object, ``status = "validating"``; ``endpoint`` must be
  ``/v1/chat/completions``, ``completion_window`` ``24h``, ``metadata`` at
  most 16 pairs;
- ``GET /v1/batches/{id}``, ``GET /v1/batches?limit&after`` (newest first,
  ``has_more``, ``first_id``, ``last_id``), ``POST /v1/batches/{id}/cancel``.

Validation happens at creation and shows on the next poll as ``failed``
with ``errors.data``: a line that is not ``{custom_id, method: "POST", url:
endpoint, body}``, a repeated ``custom_id``, more than ``batch_max_requests``
lines (a code and message of the simulator's own: OpenAI's reference gives
the limit, not the error's words), or, when ``batch_max_tokens`` is set, the
model's prompt tokens queued in unfinished batches going over it:
``token_limit_exceeded`` with OpenAI's message. Refused batches do not count
against the queue.

Time (:class:`Timeline`): a batch runs its lines in file order over
``batch_time`` seconds (``validating`` first, ``finalizing`` last). If it
has not finished after ``batch_window`` seconds it *expires*: the lines done
by then are in the output file (answered, billed), the rest in the error
file with ``batch_expired``. A cancel takes ``batch_cancel_time`` seconds
(``cancelling``); lines not done at the cancel are ``batch_cancelled``. A
done line fails with ``batch_fail_rate`` (500 ``server_error`` in the error
file), else it is answered as ``POST /v1/chat/completions`` would answer it
(the same checks and answers: ``bad-request`` models get their 400 there).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from llmap.sim.answers import completion_tokens, make_answer, prompt_tokens
from llmap.sim.calibrated import accuracy_for
from llmap.sim.config import SimConfig
from llmap.sim.labels import labels_of
from llmap.sim.limits import Clock

if TYPE_CHECKING:
    from llmap.sim.stats import SimStats

__all__ = ["BatchesMixin", "Timeline", "digest"]

ENDPOINT = "/v1/chat/completions"
_OPEN = ("validating", "in_progress", "finalizing", "cancelling")


def digest(body: Any) -> str:
    """A request body's fingerprint (what ``bodies_repeated`` counts)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
           param: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": type_, "param": param, "code": code}},
                             status=status)


@dataclass
class Timeline:
    """When a batch's lines run, under the simulator's batch settings (seconds of its monotonic clock).

    Attributes:
        created: when the batch was created.
        n: its lines.
        time_s: seconds to run them all (``batch_time``).
        window_s: the completion window (``batch_window``).
        cancel_s: seconds a cancel takes (``batch_cancel_time``).
        cancel_at: when a cancel was asked, or None.
    """

    created: float
    n: int
    time_s: float
    window_s: float
    cancel_s: float
    cancel_at: float | None = None

    def done_by(self, t: float) -> int:
        """Lines finished by time ``t``."""
        if self.time_s <= 0:
            return self.n
        return min(self.n, math.floor(self.n * max(0.0, t - self.created) / self.time_s + 1e-9))

    def phase(self, now: float) -> tuple[str, int]:
        """``(phase, lines done)``: ``running``, ``cancelling``, or the ending ``completed`` / ``expired`` /
        ``cancelled``."""
        if self.cancel_at is not None:
            done = self.done_by(self.cancel_at)
            return ("cancelled", done) if now - self.cancel_at >= self.cancel_s else ("cancelling", done)
        if now - self.created >= self.time_s:
            return "completed", self.n
        if now - self.created >= self.window_s:
            return "expired", self.done_by(self.created + self.window_s)
        return "running", self.done_by(now)


@dataclass
class _Batch:
    doc: dict[str, Any]
    lines: list[dict[str, Any]]
    model: str
    tokens: int
    timeline: Timeline
    failed: list[dict[str, Any]] = field(default_factory=list)
    ended: bool = False


class BatchesMixin:
    """OpenAI's Files and Batch routes for :class:`~llmap.sim.server.SimServer` (see the module docstring).

    Uses the server's ``_config``, ``_clock``, ``_wall_clock``, ``_rng``, ``stats``,
    ``_authorized``, ``_unauthorized`` and ``_refuse_request``.
    """

    _config: SimConfig
    _clock: Clock
    _wall_clock: Clock
    _rng: random.Random
    stats: SimStats

    @functools.cached_property
    def files(self) -> dict[str, tuple[dict[str, Any], bytes]]:
        """File id -> (file object, bytes): inputs, outputs and error files."""
        return {}

    @functools.cached_property
    def batches(self) -> dict[str, _Batch]:
        """Batch id -> batch, in creation order."""
        return {}

    @functools.cached_property
    def _batch_ids(self) -> itertools.count:
        return itertools.count(1)

    def add_batch_routes(self, app: web.Application) -> None:
        """Register the Files and Batch routes."""
        app.router.add_post("/v1/files", self.upload_file)
        app.router.add_get("/v1/files/{file_id}/content", self.file_content)
        app.router.add_post("/v1/batches", self.create_batch)
        app.router.add_get("/v1/batches", self.list_batches)
        app.router.add_get("/v1/batches/{batch_id}", self.get_batch)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self.cancel_batch)

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._batch_ids):06x}{self._rng.getrandbits(32):08x}"

    def _store(self, data: bytes, filename: str, purpose: str) -> str:
        fid = self._new_id("file-sim")
        self.files[fid] = ({"id": fid, "object": "file", "bytes": len(data), "created_at": int(self._wall_clock()),
                            "filename": filename, "purpose": purpose, "status": "processed", "expires_at": None,
                            "status_details": None}, data)
        return fid

    # -- files ----------------------------------------------------------------
    async def upload_file(self, request: web.Request) -> web.Response:
        """``POST /v1/files``: multipart ``purpose`` and ``file``."""
        if not self._authorized(request):  # type: ignore[attr-defined]
            return self._unauthorized()  # type: ignore[attr-defined]
        try:
            form = await request.post()
        except ValueError:
            return _error(400, "The request must be multipart/form-data with purpose and file.")
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "batch" or not hasattr(upload, "file"):
            return _error(400, "The simulator takes purpose=batch and a file part.", param="purpose")
        data = upload.file.read()
        if len(data) > self._config.batch_max_bytes:
            return _error(400, "File is too large.")
        fid = self._store(data, upload.filename or "batch.jsonl", "batch")
        return web.json_response(self.files[fid][0])

    async def file_content(self, request: web.Request) -> web.Response:
        """``GET /v1/files/{id}/content``."""
        if not self._authorized(request):  # type: ignore[attr-defined]
            return self._unauthorized()  # type: ignore[attr-defined]
        found = self.files.get(request.match_info["file_id"])
        if found is None:
            return _error(404, f"No such File object: {request.match_info['file_id']}", code="not_found",
                          param="id")
        return web.Response(body=found[1], content_type="application/octet-stream")

    # -- batches --------------------------------------------------------------
    async def create_batch(self, request: web.Request) -> web.Response:
        """``POST /v1/batches``: validated now, the verdict shown by the next poll."""
        if not self._authorized(request):  # type: ignore[attr-defined]
            return self._unauthorized()  # type: ignore[attr-defined]
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.")
        if body.get("endpoint") != ENDPOINT:
            return _error(400, f"The simulator batches {ENDPOINT} only.", param="endpoint")
        if body.get("completion_window") != "24h":
            return _error(400, "completion_window must be 24h.", param="completion_window")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or len(metadata) > 16:
            return _error(400, "metadata holds at most 16 key-value pairs.", param="metadata")
        found = self.files.get(str(body.get("input_file_id")))
        if found is None:
            return _error(400, f"Cannot find file {body.get('input_file_id')}.", param="input_file_id")
        now, wall = self._clock(), self._wall_clock()
        cfg = self._config
        bid = self._new_id("batch_sim")
        lines, failed = _read_lines(found[1])
        model = next((str(ln["body"].get("model")) for ln in lines if isinstance(ln.get("body"), dict)), "")
        tokens = sum(prompt_tokens(ln["body"].get("messages") or []) for ln in lines
                     if isinstance(ln.get("body"), dict))
        if not failed and len(lines) > cfg.batch_max_requests:
            failed = [{"code": "too_many_requests_in_batch", "line": None, "param": None,
                       "message": f"The batch has {len(lines):,} requests; the limit is at most "
                                  f"{cfg.batch_max_requests:,} requests per batch."}]
        if not failed and cfg.batch_max_tokens is not None:
            queued = sum(b.tokens for b in self.batches.values() if b.model == model and not b.failed
                         and self._phase(b)[0] in ("running", "cancelling"))
            if queued + tokens > cfg.batch_max_tokens:
                failed = [{"code": "token_limit_exceeded", "line": None, "param": None,
                           "message": f"Enqueued token limit reached for {model} in organization org-sim. Limit: "
                                      f"{cfg.batch_max_tokens:,} enqueued tokens. Please try again once some "
                                      "in_progress batches have been completed."}]
        doc = {"id": bid, "object": "batch", "endpoint": ENDPOINT, "errors": None,
               "input_file_id": body["input_file_id"], "completion_window": "24h", "status": "validating",
               "output_file_id": None, "error_file_id": None, "created_at": int(wall), "in_progress_at": None,
               "expires_at": int(wall + 86400), "finalizing_at": None, "completed_at": None, "failed_at": None,
               "expired_at": None, "cancelling_at": None, "cancelled_at": None,
               "request_counts": {"total": len(lines), "completed": 0, "failed": 0}, "metadata": metadata}
        tl = Timeline(now, len(lines), cfg.batch_time, cfg.batch_window, cfg.batch_cancel_time)
        self.batches[bid] = _Batch(doc, lines, model, tokens, tl, failed)
        if failed:
            self.stats.batches.refused += 1
            self.stats.batches.refused_lines += len(lines)
        else:
            self.stats.batches.accepted([(str(ln.get("custom_id")), digest(ln.get("body"))) for ln in lines])
        return web.json_response(doc)

    def _phase(self, b: _Batch) -> tuple[str, int]:
        return b.timeline.phase(self._clock())

    def _refresh(self, b: _Batch) -> dict[str, Any]:
        """The batch object now: its status from its timeline; its files once it ends."""
        doc, wall = b.doc, int(self._wall_clock())
        if b.failed:
            if doc["status"] != "failed":
                doc.update(status="failed", failed_at=wall, errors={"object": "list", "data": b.failed})
            return doc
        if b.ended:
            return doc
        phase, done = self._phase(b)
        if phase == "running":
            age = self._clock() - b.timeline.created
            early, late = min(0.05, b.timeline.time_s / 10), b.timeline.time_s - min(0.05, b.timeline.time_s / 10)
            status = "validating" if age < early else "finalizing" if age >= late else "in_progress"
            doc["status"] = status
            doc["in_progress_at"] = doc["in_progress_at"] or (wall if status != "validating" else None)
            doc["request_counts"]["completed"] = done
        elif phase == "cancelling":
            doc.update(status="cancelling")
        else:
            self._end(b, phase, done)
        return doc

    def _end(self, b: _Batch, phase: str, done: int) -> None:
        """Answer the lines done, write the output and error files, and close the batch."""
        cfg, stats = self._config, self.stats
        out, err = [], []
        for i, line in enumerate(b.lines):
            cid = line.get("custom_id")
            rid = f"batch_req_sim{i:06x}"
            if i >= done:
                code = "batch_expired" if phase == "expired" else "batch_cancelled"
                msg = ("This request could not be executed before the completion window expired." if phase == "expired"
                       else "This request was not executed because the batch was cancelled.")
                err.append({"id": rid, "custom_id": cid, "response": None, "error": {"code": code, "message": msg}})
                continue
            if cfg.batch_fail_rate and self._rng.random() < cfg.batch_fail_rate:
                stats.batches.failed_lines += 1
                body = {"error": {"message": "The server had an error while processing your request. Sorry about "
                                             "that!", "type": "server_error", "param": None, "code": None}}
                err.append({"id": rid, "custom_id": cid, "response": {"status_code": 500, "request_id": rid,
                                                                      "body": body}, "error": None})
                continue
            status, payload = self._chat_answer(line["body"])
            entry = {"id": rid, "custom_id": cid, "response": {"status_code": status, "request_id": rid,
                                                               "body": payload}, "error": None}
            (out if status == 200 else err).append(entry)
        stats.batches.expired += phase == "expired"
        stats.batches.cancelled += phase == "cancelled"
        wall = int(self._wall_clock())
        doc = b.doc
        doc.update(status=phase, finalizing_at=doc["finalizing_at"] or wall, **{f"{phase}_at": wall})
        doc["output_file_id"] = self._store(_jsonl(out), f"{doc['id']}_output.jsonl", "batch_output") if out else None
        doc["error_file_id"] = self._store(_jsonl(err), f"{doc['id']}_error.jsonl", "batch_output") if err else None
        doc["request_counts"] = {"total": len(b.lines), "completed": len(out), "failed": len(err)}
        b.ended = True

    def _chat_answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """What ``POST /v1/chat/completions`` would answer ``body`` (its refusals, or an answer), without latency."""
        model, messages = body.get("model"), body.get("messages")
        if not isinstance(model, str) or not isinstance(messages, list) or not messages:
            return 400, {"error": {"message": "The request needs a string 'model' and a non-empty list 'messages'.",
                                   "type": "invalid_request_error", "param": None, "code": None}}
        refusal = self._refuse_request(body, model, messages)  # type: ignore[attr-defined]
        if refusal is not None:
            return refusal.status, json.loads(refusal.text)
        try:
            cfg = self._config
            answer = make_answer(body, rng=self._rng, drop_item_rate=cfg.drop_item_rate,
                                 corrupt_item_rate=cfg.corrupt_item_rate,
                                 accuracy=accuracy_for(model, cfg.accuracy, cfg.accuracies),
                                 power=cfg.power, labels=labels_of(cfg))
        except ValueError as exc:
            return 400, {"error": {"message": f"Invalid response_format: {exc}", "type": "invalid_request_error",
                                   "param": "response_format", "code": None}}
        prompt, completion = prompt_tokens(messages), completion_tokens(answer.content)
        self.stats.record_success(prompt, completion)
        return 200, {"id": f"chatcmpl-simb{self._rng.getrandbits(40):x}", "object": "chat.completion",
                     "created": int(self._wall_clock()), "model": model, "system_fingerprint": "fp_llmap_sim",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.content,
                                                          "refusal": None},
                                  "logprobs": answer.logprobs(body), "finish_reason": answer.finish_reason}],
                     "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                               "total_tokens": prompt + completion}}

    def _find(self, request: web.Request) -> _Batch | web.Response:
        if not self._authorized(request):  # type: ignore[attr-defined]
            return self._unauthorized()  # type: ignore[attr-defined]
        b = self.batches.get(request.match_info["batch_id"])
        if b is None:
            return _error(404, f"No batch found with id '{request.match_info['batch_id']}'.", code="not_found")
        return b

    async def get_batch(self, request: web.Request) -> web.Response:
        """``GET /v1/batches/{id}``."""
        b = self._find(request)
        return b if isinstance(b, web.Response) else web.json_response(self._refresh(b))

    async def cancel_batch(self, request: web.Request) -> web.Response:
        """``POST /v1/batches/{id}/cancel``: ``cancelling`` now, ``cancelled`` after ``batch_cancel_time``."""
        b = self._find(request)
        if isinstance(b, web.Response):
            return b
        doc = self._refresh(b)
        if doc["status"] not in ("validating", "in_progress", "finalizing"):
            return _error(400, f"Cannot cancel a batch with status {doc['status']}.")
        b.timeline.cancel_at = self._clock()
        doc.update(status="cancelling", cancelling_at=int(self._wall_clock()))
        return web.json_response(self._refresh(b))

    async def list_batches(self, request: web.Request) -> web.Response:
        """``GET /v1/batches?limit&after``: newest first."""
        if not self._authorized(request):  # type: ignore[attr-defined]
            return self._unauthorized()  # type: ignore[attr-defined]
        ids = list(self.batches)[::-1]
        after = request.query.get("after")
        if after in self.batches:
            ids = ids[ids.index(after) + 1:]
        limit = max(1, min(100, int(request.query.get("limit") or 20)))
        page = [self._refresh(self.batches[i]) for i in ids[:limit]]
        return web.json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                                  "last_id": page[-1]["id"] if page else None, "has_more": len(ids) > limit})


def _read_lines(data: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The input file's lines, and the validation errors (each with its 1-based line)."""
    lines: list[dict[str, Any]] = []
    seen: set[str] = set()
    for no, text in enumerate(data.splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except ValueError:
            return lines, [{"code": "invalid_json_line", "line": no, "param": None,
                            "message": f"Line {no} is not valid JSON."}]
        if not isinstance(line, dict) or line.get("method") != "POST" or line.get("url") != ENDPOINT \
                or not isinstance(line.get("body"), dict) or not isinstance(line.get("custom_id"), str):
            return lines, [{"code": "invalid_request", "line": no, "param": None,
                            "message": f"Line {no} must be {{custom_id, method: POST, url: {ENDPOINT}, body}}."}]
        if line["custom_id"] in seen:
            return lines, [{"code": "duplicate_custom_id", "line": no, "param": "custom_id",
                            "message": f"The custom_id {line['custom_id']!r} on line {no} is not unique."}]
        seen.add(line["custom_id"])
        lines.append(line)
    if not lines:
        return lines, [{"code": "empty_file", "line": None, "param": None, "message": "The input file is empty."}]
    return lines, []


def _jsonl(entries: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(e) + "\n" for e in entries).encode()
