"""The simulator's Anthropic Messages API: ``POST /v1/messages`` and ``GET /v1/models/{model_id}``.

Written from Anthropic's API reference (errors, rate limits, prompt caching,
structured outputs) and answers seen in the wild; every error body has
Anthropic's shape ``{"type": "error", "error": {"type", "message"},
"request_id"}``. A request goes through these checks, in order; the first
that applies answers it:

1. body not a JSON object with ``model`` and ``messages``: 400 ``invalid_request_error``;
2. ``require_key`` set and ``x-api-key`` missing or different: 401
   ``authentication_error`` ("x-api-key header is required" / "invalid x-api-key");
3. no ``anthropic-version`` header: 400 "anthropic-version: header is required";
4. ``max_tokens`` missing or below 1: 400 "max_tokens: Field required";
   more than 4 blocks with ``cache_control``: 400;
5. inside the ``outage`` window: 529 ``overloaded_error``;
6. ``quota_tokens`` used up: 429 ``rate_limit_error`` "This request would exceed
   your account's monthly spend limit. Please try again later." (no ``retry-after``);
7. model starting with ``bad-request``: 400; with ``missing-model``: 404
   ``not_found_error``; a message over ``context_chars``: 400 "prompt is too long";
8. limits (``rpm``, ``itpm``, ``otpm``; :class:`~llmap.sim.limits.MessagesLimiter`):
   429 ``rate_limit_error`` with ``retry-after`` and the rate-limit headers;
9. faults drawn per request: ``fail_rate`` 500 ``api_error``, ``overload_rate``
   529 ``overloaded_error``, ``limit_rate`` 429 ``rate_limit_error`` with
   ``retry-after: 1``, ``hang_rate``, ``malformed_rate``;
10. the answer, after the simulated latency: with a forced tool
    (``tool_choice = {"type": "tool", "name"}``) a ``tool_use`` block whose
    ``input`` is valid against the tool's ``input_schema`` (``stop_reason``
    ``tool_use``); with ``output_config.format`` (``json_schema``) a text block
    of JSON valid against it; else plain text. An answer longer than
    ``max_tokens`` is cut (``stop_reason`` ``max_tokens``: an empty tool input,
    or the text cut); a last user message holding ``[sim:refuse]`` gets
    ``stop_reason`` ``refusal``.

Prompt caching: the request is read in Anthropic's cache order (tools,
system, messages). When a block carries ``cache_control``, everything up to
the last such block is the prefix; once it is at least ``cache_min_tokens``
long it is cached for 5 minutes (refreshed on each read) when the answer is
made, and later requests with the same model and prefix read it:
``usage.cache_read_input_tokens``; the first writes it:
``cache_creation_input_tokens``; ``input_tokens`` is the rest. Requests
sent before the first answer each write it, as on the real API. Only
uncached input counts against ``itpm``.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
from typing import TYPE_CHECKING, Any

from aiohttp import web

from llmap.sim.answers import completion_tokens, last_user_text, make_answer, message_text
from llmap.sim.config import SimConfig
from llmap.sim.labels import labels_of
from llmap.sim.limits import Clock, MessagesLimiter

if TYPE_CHECKING:
    import random

    from llmap.sim.stats import SimStats

__all__ = ["CACHE_TTL_S", "MessagesMixin", "PromptCache", "REFUSE_MARKER", "segments"]

#: How long a prompt-cache entry lives after its last use, seconds (Anthropic's default 5 minutes).
CACHE_TTL_S = 300.0
#: Text in the last user message that makes the simulated model refuse (``stop_reason = "refusal"``).
REFUSE_MARKER = "[sim:refuse]"
_MAX_BREAKPOINTS = 4
_SPEND = "This request would exceed your account's monthly spend limit. Please try again later."


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None,
                   request_id: str = "req_sim") -> web.Response:
    """An Anthropic error response: ``{"type": "error", "error": {"type", "message"}, "request_id"}``."""
    body = {"type": "error", "error": {"type": type_, "message": message}, "request_id": request_id}
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


def segments(body: dict[str, Any]) -> list[tuple[str, int, bool]]:
    """The request in Anthropic's cache order (tools, system, messages): ``(text, tokens, cache_control)``.

    Tokens are ``ceil(chars / 4)`` per block, plus 4 per message (on its
    last block), as :func:`llmap.sim.answers.prompt_tokens` counts them.
    """
    out: list[tuple[str, int, bool]] = []

    def add(text: str, marked: bool, extra: int = 0) -> None:
        out.append((text, math.ceil(len(text) / 4) + extra, marked))

    for tool in body.get("tools") or []:
        if isinstance(tool, dict):
            add(json.dumps({k: v for k, v in tool.items() if k != "cache_control"}, sort_keys=True),
                "cache_control" in tool)
    system = body.get("system")
    for block in ([{"type": "text", "text": system}] if isinstance(system, str) else system or []):
        if isinstance(block, dict):
            add(message_text([block]), "cache_control" in block)
    for m in body.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        blocks = [b for b in blocks if isinstance(b, dict)] or [{"type": "text", "text": ""}]
        for j, block in enumerate(blocks):
            add(message_text([block]), "cache_control" in block, 4 if j == len(blocks) - 1 else 0)
    return out


class PromptCache:
    """Cached prefixes by key, each alive ``CACHE_TTL_S`` after its last use. Pure: times are passed in."""

    def __init__(self, ttl_s: float = CACHE_TTL_S, most: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.most = most
        self._until: dict[str, float] = {}

    def read(self, key: str, now: float) -> bool:
        """True when ``key`` is cached at ``now`` (its life starts again)."""
        until = self._until.get(key)
        if until is None or until <= now:
            self._until.pop(key, None)
            return False
        self._until[key] = now + self.ttl_s
        return True

    def write(self, key: str, now: float) -> None:
        """Cache ``key`` from ``now`` on (the oldest entry goes when full)."""
        if len(self._until) >= self.most and key not in self._until:
            self._until.pop(next(iter(self._until)))
        self._until[key] = now + self.ttl_s

    def clear(self) -> None:
        self._until.clear()


class MessagesMixin:
    """``/v1/messages`` and ``/v1/models/{model_id}`` for :class:`~llmap.sim.server.SimServer`.

    Uses the server's ``_config``, ``_clock``, ``_wall_clock``, ``_rng``,
    ``_tokens_served``, ``stats``, ``_answer``, ``_latency`` and ``_sleep``.
    """

    _config: SimConfig
    _clock: Clock
    _wall_clock: Clock
    _rng: random.Random
    _tokens_served: int
    stats: SimStats

    def _init_messages(self, config: SimConfig) -> None:
        self._messages_limiter = MessagesLimiter(config.rpm, config.itpm, config.otpm, self._clock,
                                                 burst_s=config.burst_s)
        self.prompt_cache = PromptCache()
        self._message_ids = itertools.count(1)

    def _reconfigure_messages(self, old: SimConfig, new: SimConfig) -> None:
        if (old.rpm, old.itpm, old.otpm, old.burst_s) != (new.rpm, new.itpm, new.otpm, new.burst_s):
            self._messages_limiter = MessagesLimiter(new.rpm, new.itpm, new.otpm, self._clock, burst_s=new.burst_s)

    def _reset_messages(self) -> None:
        self._messages_limiter.reset()
        self.prompt_cache.clear()

    def _key_ok(self, request: web.Request) -> web.Response | None:
        key = self._config.require_key
        if key is None:
            return None
        given = request.headers.get("x-api-key")
        if given is None and request.headers.get("Authorization") == f"Bearer {key}":
            return None  # GET /v1/models/{id} may come from an OpenAI client
        if given is None:
            return error_response(401, "authentication_error", "x-api-key header is required")
        if given != key:
            return error_response(401, "authentication_error", "invalid x-api-key")
        return None

    async def model_info(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{model_id}``: the model (404 ``not_found_error`` for ``missing-model*``)."""
        refused = self._key_ok(request)
        if refused is not None:
            return refused
        model = request.match_info["model_id"]
        if model.startswith("missing-model"):
            return error_response(404, "not_found_error", f"model: {model}")
        return web.json_response({"type": "model", "id": model, "display_name": model,
                                  "created_at": "2025-01-01T00:00:00Z",
                                  "capabilities": {"structured_outputs": {"supported": True}}})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/messages``: checks, limits, faults, then the answer (see the module docstring)."""
        cfg = self._config
        stats = self.stats
        stats.requests += 1
        answer = self._answer  # type: ignore[attr-defined]
        try:
            body = json.loads(await request.read())
        except ValueError:
            return answer(400, error_response(400, "invalid_request_error", "There was an error parsing the body"))
        model = body.get("model") if isinstance(body, dict) else None
        msgs = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(model, str) or not isinstance(msgs, list) or not msgs:
            return answer(400, error_response(400, "invalid_request_error", "model and messages: Field required"))
        stats.record_model(model)
        refused = self._key_ok(request)
        if refused is not None:
            return answer(401, refused)
        if not request.headers.get("anthropic-version"):
            return answer(400, error_response(400, "invalid_request_error", "anthropic-version: header is required"))
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return answer(400, error_response(400, "invalid_request_error", "max_tokens: Field required"))
        segs = segments(body)
        marks = sum(1 for _, _, marked in segs if marked)
        if marks > _MAX_BREAKPOINTS:
            return answer(400, error_response(400, "invalid_request_error",
                                      f"A maximum of {_MAX_BREAKPOINTS} blocks with cache_control may be provided. "
                                      f"Found {marks}."))
        if cfg.outage is not None and cfg.outage[0] <= self._clock() - self._started < cfg.outage[1]:  # type: ignore[attr-defined]
            return answer(529, error_response(529, "overloaded_error", "Overloaded"))
        if cfg.quota_tokens is not None and self._tokens_served >= cfg.quota_tokens:
            return answer(429, error_response(429, "rate_limit_error", _SPEND))
        refusal = self._refuse_message(model, segs)
        if refusal is not None:
            return refusal
        prompt = sum(t for _, t, _ in segs)
        prefix, key = self._prefix(model, segs)
        now = self._clock()
        read = prefix if key is not None and self.prompt_cache.read(key, now) else 0
        write = prefix if key is not None and not read else 0
        headers: dict[str, str] | None = None
        limiter = self._messages_limiter
        if limiter.active:
            admission = limiter.admit(prompt - read)  # cache reads do not count against ITPM
            headers = MessagesLimiter.headers(admission, self._wall_clock())
            if not admission.allowed:
                unit = admission.limited_by
                msg = (f"This request would exceed your organization's rate limit of {admission.limit:,} {unit} per "
                       f"minute (org: sim, model: {model}). For details, refer to: "
                       "https://docs.claude.com/en/api/rate-limits. You can see the response headers for current "
                       "usage. Please reduce the prompt length or the maximum tokens requested, or try again later.")
                return answer(429, error_response(429, "rate_limit_error", msg, headers))
        return await self._serve_message(body, model, max_tokens, (prompt, read, write), key, headers)

    def _refuse_message(self, model: str, segs: list[tuple[str, int, bool]]) -> web.Response | None:
        answer = self._answer  # type: ignore[attr-defined]
        if model.startswith("bad-request"):
            return answer(400, error_response(400, "invalid_request_error",
                                      f"Invalid request for model '{model}' (simulated bad request)."))
        if model.startswith("missing-model"):
            return answer(404, error_response(404, "not_found_error", f"model: {model}"))
        longest = max((len(text) for text, _, _ in segs), default=0)
        if longest > self._config.context_chars:
            tokens = sum(t for _, t, _ in segs)
            limit = math.ceil(self._config.context_chars / 4)
            return answer(400, error_response(400, "invalid_request_error",
                                      f"prompt is too long: {tokens} tokens > {limit} maximum"))
        return None

    def _prefix(self, model: str, segs: list[tuple[str, int, bool]]) -> tuple[int, str | None]:
        """The marked prefix's tokens and cache key (None when nothing is marked or it is too short)."""
        last = max((i for i, (_, _, marked) in enumerate(segs) if marked), default=-1)
        if last < 0:
            return 0, None
        tokens = sum(t for _, t, _ in segs[: last + 1])
        if tokens < self._config.cache_min_tokens:
            return 0, None
        digest = hashlib.sha256(json.dumps([model, [text for text, _, _ in segs[: last + 1]]]).encode()).hexdigest()
        return tokens, digest

    async def _serve_message(self, body: dict[str, Any], model: str, max_tokens: int, usage: tuple[int, int, int],
                             key: str | None, headers: dict[str, str] | None) -> web.StreamResponse:
        cfg = self._config
        answer = self._answer  # type: ignore[attr-defined]
        faults = cfg.fail_rate + cfg.overload_rate + cfg.limit_rate
        draw = self._rng.random() if faults or cfg.hang_rate or cfg.malformed_rate else 1.0
        if draw < faults:
            if draw >= cfg.fail_rate + cfg.overload_rate:
                msg = ("This request would exceed your organization's rate limit. For details, refer to: "
                       "https://docs.claude.com/en/api/rate-limits. Please try again later.")
                limited = {**(headers or {}), "retry-after": "1"}
                return answer(429, error_response(429, "rate_limit_error", msg, limited))
            await self._sleep(self._latency(0))  # type: ignore[attr-defined]
            if draw < cfg.fail_rate:
                return answer(500, error_response(500, "api_error", "Internal server error", headers))
            return answer(529, error_response(529, "overloaded_error", "Overloaded", headers))
        if draw < faults + cfg.hang_rate:
            self.stats.hung += 1
            await asyncio.Event().wait()  # cancelled when the client goes away
        content, stop, output = self._content(body, model, max_tokens)
        await self._sleep(self._latency(output))  # type: ignore[attr-defined]
        prompt, read, write = usage
        if key is not None:
            self.prompt_cache.write(key, self._clock())  # usable once the answer is made
        self._messages_limiter.settle(output)  # OTPM counts what was produced
        payload = {
            "id": f"msg_sim{next(self._message_ids):x}", "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": prompt - read - write, "cache_creation_input_tokens": write,
                      "cache_read_input_tokens": read, "output_tokens": output},
        }
        text = json.dumps(payload)
        if draw < faults + cfg.hang_rate + cfg.malformed_rate:
            self.stats.malformed += 1
            text = text[: len(text) // 2]
        self._tokens_served += prompt + output
        self.stats.record_success(prompt, output, cache_read=read, cache_write=write)
        return answer(200, web.Response(text=text, content_type="application/json", headers=headers))

    def _content(self, body: dict[str, Any], model: str, max_tokens: int) -> tuple[list[dict[str, Any]], str, int]:
        """The answer's content blocks, its ``stop_reason`` and its output tokens."""
        msgs = [{"role": m.get("role"), "content": m.get("content")} for m in body["messages"] if isinstance(m, dict)]
        if REFUSE_MARKER in last_user_text(msgs):
            return [], "refusal", 1
        choice = body.get("tool_choice")
        tools = {t.get("name"): t for t in body.get("tools") or [] if isinstance(t, dict)}
        forced = tools.get(choice.get("name")) if isinstance(choice, dict) and choice.get("type") == "tool" else None
        fmt = (body.get("output_config") or {}).get("format") if isinstance(body.get("output_config"), dict) else None
        schema = forced.get("input_schema") if forced else fmt.get("schema") if isinstance(fmt, dict) else None
        chat: dict[str, Any] = {"model": model, "messages": msgs, "temperature": body.get("temperature")}
        if isinstance(schema, dict):
            chat["response_format"] = {"type": "json_schema", "json_schema": {"schema": schema}}
        text = make_answer(chat, rng=self._rng, drop_item_rate=self._config.drop_item_rate,
                           corrupt_item_rate=self._config.corrupt_item_rate, labels=labels_of(self._config)).content
        output = completion_tokens(text)
        cut = output > max_tokens
        if forced is not None:
            block = {"type": "tool_use", "id": f"toolu_sim{next(self._message_ids):x}", "name": forced["name"],
                     "input": {} if cut else json.loads(text)}
            return [block], "max_tokens" if cut else "tool_use", min(output, max_tokens)
        block = {"type": "text", "text": text[: max_tokens * 4] if cut else text}
        return [block], "max_tokens" if cut else "end_turn", min(output, max_tokens)
