"""The simulator's HTTP server: an OpenAI-compatible chat completions API, and Anthropic's Messages API.

Routes:

- ``POST /v1/chat/completions``: a chat completion (see :meth:`SimServer.chat`).
- ``POST /v1/messages``, ``GET /v1/models/{model_id}``: Anthropic's Messages
  API (see :mod:`llmap.sim.messages`). The batch APIs: :mod:`llmap.sim.batches`, :mod:`llmap.sim.message_batches`.
- ``GET /v1/models``: ``{"object": "list", "data": [...]}``; ``POST /v1/embeddings``: :mod:`llmap.sim.groups`.
- ``GET /stats``: counters (:mod:`llmap.sim.stats`); ``POST /stats/reset``
  zeroes them, refills the rate-limit buckets and the token quota.
- ``GET /config``: the current :class:`SimConfig` as JSON; ``POST /config``
  with a JSON object of fields changes them while serving (e.g.
  ``{"fail_rate": 0}`` to end a simulated failure streak). Answers 400 on
  an unknown field or a bad value.

A chat request goes through these checks, in order; the first that applies
answers it:

1. body is not a JSON object with ``model`` and ``messages``: 400;
2. ``require_key`` set and the ``Authorization: Bearer`` differs: 401
   ``invalid_api_key`` (also on ``/v1/models``);
3. inside the ``outage`` window: 503;
4. ``quota_tokens`` used up: 429 ``insufficient_quota`` (no ``retry-after``);
5. model starting with ``bad-request``: 400; with ``missing-model``: 404
   ``model_not_found``; a message over ``context_chars``: 400
   ``context_length_exceeded``; ``stream: true``: 400 (not simulated); a
   ``response_format`` type not in ``response_formats``: 400 as OpenAI
   answers it, or 500 with pydantic's validation error as llama-cpp-python's
   server does (``format_error``); a model named like an OpenAI reasoning
   model (``o1``, ``o3``, ``o4``, ``gpt-5``...) with ``max_tokens`` or a
   ``temperature`` other than 1: 400 ``unsupported_parameter`` /
   ``unsupported_value``, OpenAI's bodies;
6. rate limits (RPM/TPM, :mod:`llmap.sim.limits`): 429 ``rate_limit_exceeded``
   with ``retry-after`` and rate-limit headers;
7. random faults, drawn per request from the seeded random source:
   ``fail_rate`` 500/503, ``hang_rate`` no answer until the client leaves,
   ``malformed_rate`` 200 with a truncated body;
8. the answer (:mod:`llmap.sim.answers`) after the simulated latency.

Rate-limit headers go on every answer past step 6 when a limit is set.
Nothing is logged per request (no access log) to keep the hot path cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import random
import sys
import time
from typing import IO, Any

from aiohttp import web

from llmap.sim.answers import completion_tokens, make_answer, message_text, prompt_tokens
from llmap.sim.calibrated import accuracy_for
from llmap.sim.config import SimConfig
from llmap.sim.groups import GroupsMixin
from llmap.sim.labels import labels_of
from llmap.sim.limits import Admission, Clock, RateLimiter, Sleep, ratelimit_headers
from llmap.sim.message_batches import BatchAPIsMixin
from llmap.sim.messages import MessagesMixin
from llmap.sim.refusals import Refusal, refuse_format, refuse_params
from llmap.sim.stats import SimStats

__all__ = ["SimServer", "listening_line", "serve_forever", "start_site"]

MODELS_BODY = json.dumps(
    {
        "object": "list",
        "data": [{"id": "sim", "object": "model", "created": 0, "owned_by": "llmap"}],
    }
)


def _error(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/json", headers=headers
    )


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type="application/json")


class SimServer(MessagesMixin, BatchAPIsMixin, GroupsMixin):
    """The state and handlers of one simulator (config, limits, stats, faults).

    Everything runs on one event loop; nothing here is thread-safe.

    Args:
        config: the behaviour.
        clock: monotonic seconds (rate limits, outage window, batch timelines, stats).
        wall_clock: Unix seconds (``created``, Anthropic reset timestamps).
        sleep: awaits the answer latency, seconds (default ``asyncio.sleep``; a test passes
            one that moves its fake clock instead).
    """

    def __init__(self, config: SimConfig, *, clock: Clock = time.monotonic, wall_clock: Clock = time.time,
                 sleep: Sleep = asyncio.sleep) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleeper = sleep
        self._config = config
        self._limiter = RateLimiter(config.rpm, config.tpm, clock, burst_s=config.burst_s)
        self._rng = random.Random(config.seed)
        self._ids = itertools.count(1)
        self._started = clock()
        self._tokens_served = 0
        self.stats = SimStats(clock, wall_clock)
        self._init_messages(config)

    @property
    def config(self) -> SimConfig:
        """The current configuration."""
        return self._config

    def reconfigure(self, **changes: Any) -> SimConfig:
        """Change settings while serving; ``host``/``port`` changes are ignored.

        A change of ``rpm``/``tpm``/``burst_s`` starts fresh (full) buckets; a change of
        ``seed`` restarts the random source.

        Returns:
            The new configuration.

        Raises:
            TypeError: an unknown field.
            ValueError: a value out of range.
        """
        changes.pop("host", None)
        changes.pop("port", None)
        new = self._config.replace(**changes)
        if (new.rpm, new.tpm, new.burst_s) != (self._config.rpm, self._config.tpm, self._config.burst_s):
            self._limiter = RateLimiter(new.rpm, new.tpm, self._clock, burst_s=new.burst_s)
        if "seed" in changes:
            self._rng = random.Random(new.seed)
        self._reconfigure_messages(self._config, new)
        self._config = new
        return new

    def reset(self) -> None:
        """Zero the stats, refill the rate-limit buckets and the token quota."""
        self.stats.reset()
        self._limiter.reset()
        self._reset_messages()
        self._tokens_served = 0

    def make_app(self) -> web.Application:
        """The aiohttp application serving this simulator's routes."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_get("/v1/models/{model_id}", self.model_info)
        self.add_batch_api_routes(app)
        self.add_group_routes(app)
        app.router.add_get("/stats", self.get_stats)
        app.router.add_post("/stats/reset", self.reset_stats)
        app.router.add_get("/config", self.get_config)
        app.router.add_post("/config", self.set_config)
        app.on_startup.append(self._on_startup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self._started = self._clock()

    # ------------------------------------------------------------------ small routes

    def _authorized(self, request: web.Request) -> bool:
        key = self._config.require_key
        return key is None or request.headers.get("Authorization") == f"Bearer {key}"

    @staticmethod
    def _unauthorized() -> web.Response:
        return _error(
            401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
        )

    async def models(self, request: web.Request) -> web.Response:
        """``GET /v1/models``: the one model ``sim`` (401 on a wrong key)."""
        if not self._authorized(request):
            return self._unauthorized()
        return web.Response(text=MODELS_BODY, content_type="application/json")

    async def get_stats(self, request: web.Request) -> web.Response:
        """``GET /stats``: :meth:`SimStats.snapshot`."""
        return _json(self.stats.snapshot())

    async def reset_stats(self, request: web.Request) -> web.Response:
        """``POST /stats/reset``: :meth:`reset`, answering the zeroed stats."""
        self.reset()
        return _json(self.stats.snapshot())

    async def get_config(self, request: web.Request) -> web.Response:
        """``GET /config``: the configuration as JSON."""
        return _json(self._config.to_dict())

    async def set_config(self, request: web.Request) -> web.Response:
        """``POST /config``: :meth:`reconfigure` with the JSON object's fields."""
        try:
            changes = json.loads(await request.read())
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object of config fields")
            if isinstance(changes.get("outage"), list):
                changes["outage"] = tuple(changes["outage"])
            return _json(self.reconfigure(**changes).to_dict())
        except (ValueError, TypeError) as exc:
            return _error(400, str(exc), "invalid_request_error")

    # ------------------------------------------------------------------ chat

    def _answer(self, status: int, response: web.Response) -> web.Response:
        self.stats.record_status(status)
        return response

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``: checks, faults, then the answer."""
        cfg = self._config
        stats = self.stats
        stats.requests += 1
        try:
            body = json.loads(await request.read())
        except ValueError:
            msg = "We could not parse the JSON body of your request."
            return self._answer(400, _error(400, msg, "invalid_request_error"))
        model = body.get("model") if isinstance(body, dict) else None
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(model, str) or not isinstance(messages, list) or not messages:
            msg = "The request needs a string 'model' and a non-empty list 'messages'."
            return self._answer(400, _error(400, msg, "invalid_request_error"))
        stats.record_model(model)
        if not self._authorized(request):
            return self._answer(401, self._unauthorized())
        if cfg.outage is not None:
            elapsed = self._clock() - self._started
            if cfg.outage[0] <= elapsed < cfg.outage[1]:
                msg = "The service is temporarily unavailable (simulated outage)."
                return self._answer(503, _error(503, msg, "server_error"))
        if cfg.quota_tokens is not None and self._tokens_served >= cfg.quota_tokens:
            msg = "You exceeded your current quota, please check your plan and billing details."
            return self._answer(429, _error(429, msg, "insufficient_quota", "insufficient_quota"))
        refusal = self._refuse_request(body, model, messages)
        if refusal is not None:
            return refusal
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        prompt = prompt_tokens(messages)
        headers: dict[str, str] | None = None
        limiter = self._limiter
        if limiter.active:
            cost = prompt + (max_tokens if isinstance(max_tokens, int) else 16)
            admission = limiter.admit(cost)
            headers = ratelimit_headers(admission, cfg.header_style, self._wall_clock())
            if not admission.allowed:
                return self._answer(429, self._rate_limited(admission, model, headers))
        return await self._serve(body, model, prompt, headers)

    def _refuse_request(
        self, body: dict[str, Any], model: str, messages: list[Any]
    ) -> web.Response | None:
        """Terminal 400/404 answers, or ``None`` when the request is acceptable."""
        if model.startswith("bad-request"):
            msg = f"Invalid request for model '{model}' (simulated bad request)."
            return self._answer(400, _error(400, msg, "invalid_request_error"))
        if model.startswith("missing-model"):
            msg = f"The model `{model}` does not exist or you do not have access to it."
            return self._answer(404, _error(404, msg, "invalid_request_error", "model_not_found"))
        limit = self._config.context_chars
        for m in messages:
            if not isinstance(m, dict):
                msg = "Each message must be an object with 'role' and 'content'."
                return self._answer(400, _error(400, msg, "invalid_request_error"))
            if len(message_text(m.get("content"))) > limit:
                msg = (
                    f"This model's maximum context length is {limit} characters; "
                    "your messages are longer. Please reduce the length of the messages."
                )
                return self._answer(
                    400,
                    _error(
                        400, msg, "invalid_request_error", "context_length_exceeded", "messages"
                    ),
                )
        if body.get("stream"):
            msg = "The simulator does not stream; send stream=false."
            return self._answer(400, _error(400, msg, "invalid_request_error", param="stream"))
        return self._refuse_format(body) or self._refuse_params(body, model)

    def _refuse_format(self, body: dict[str, Any]) -> web.Response | None:
        """A ``response_format`` type this server does not take (``response_formats``), refused
        the way OpenAI or llama-cpp-python's server refuses it (``format_error``)."""
        return self._refused(refuse_format(body, self._config))

    def _refuse_params(self, body: dict[str, Any], model: str) -> web.Response | None:
        """Parameters the model refuses (:func:`llmap.sim.refusals.refuse_params`): OpenAI's reasoning models'
        ``max_tokens`` and temperature, ``logprobs`` with ``refuse_logprobs``."""
        return self._refused(refuse_params(body, model, self._config))

    def _refused(self, refusal: Refusal | None) -> web.Response | None:
        if refusal is None:
            return None
        status, message, type_, code, param = refusal
        return self._answer(status, _error(status, message, type_, code, param))

    def _rate_limited(
        self, admission: Admission, model: str, headers: dict[str, str]
    ) -> web.Response:
        kind = admission.limited_by
        if admission.too_large:
            limit = admission.tokens.limit if admission.tokens else 0
            msg = (
                f"Request too large for {model} on tokens per min (TPM): Limit {limit}, "
                f"Requested {admission.requested}. The input or output tokens must be "
                "reduced in order to run successfully."
            )
        else:
            unit = "requests per min (RPM)" if kind == "requests" else "tokens per min (TPM)"
            msg = (
                f"Rate limit reached for {model} on {unit}. "
                f"Please try again in {headers.get('retry-after', '1')}s."
            )
        return _error(429, msg, kind, "rate_limit_exceeded", headers=headers)

    async def _serve(
        self, body: dict[str, Any], model: str, prompt: int, headers: dict[str, str] | None
    ) -> web.StreamResponse:
        """Draw a fault, wait the latency, and answer."""
        cfg = self._config
        draw = self._rng.random() if cfg.fail_rate or cfg.hang_rate or cfg.malformed_rate else 1.0
        if draw < cfg.fail_rate:
            await self._sleep(self._latency(0))
            if self._rng.random() < 0.5:
                msg = "The server had an error while processing your request. Sorry about that!"
                return self._answer(500, _error(500, msg, "server_error", headers=headers))
            msg = "The server is overloaded or not ready yet."
            return self._answer(503, _error(503, msg, "server_error", headers=headers))
        if draw < cfg.fail_rate + cfg.hang_rate:
            self.stats.hung += 1
            await asyncio.Event().wait()  # cancelled when the client goes away
        try:
            answer = self.group_answer(body) or make_answer(
                body,
                rng=self._rng,
                drop_item_rate=cfg.drop_item_rate,
                corrupt_item_rate=cfg.corrupt_item_rate,
                accuracy=accuracy_for(model, cfg.accuracy, cfg.accuracies),
                power=cfg.power,
                labels=labels_of(cfg),
            )
        except ValueError as exc:
            msg = f"Invalid response_format: {exc}"
            err = _error(400, msg, "invalid_request_error", param="response_format")
            return self._answer(400, err)
        completion = completion_tokens(answer.content)
        await self._sleep(self._latency(completion))
        payload = {
            "id": f"chatcmpl-sim{next(self._ids):x}",
            "object": "chat.completion",
            "created": int(self._wall_clock()),
            "model": model,
            "system_fingerprint": "fp_llmap_sim",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer.content, "refusal": None},
                    "logprobs": answer.logprobs(body),
                    "finish_reason": answer.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }
        text = json.dumps(payload)
        if draw < cfg.fail_rate + cfg.hang_rate + cfg.malformed_rate:
            self.stats.malformed += 1
            text = text[: len(text) // 2]
        self._tokens_served += prompt + completion
        self.stats.record_success(prompt, completion)
        response = web.Response(text=text, content_type="application/json", headers=headers)
        return self._answer(200, response)

    def _latency(self, completion_tokens: int) -> float:
        """Seconds to wait: lognormal around the median, plus per-token time."""
        cfg = self._config
        delay = cfg.latency_median
        if delay and cfg.latency_sigma:
            delay *= math.exp(cfg.latency_sigma * self._rng.gauss(0.0, 1.0))
        return delay + cfg.per_token_ms * completion_tokens / 1000

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            await self._sleeper(seconds)


# ---------------------------------------------------------------------- serving


def listening_line(host: str, port: int) -> str:
    """The line a simulator prints first: ``llmap simulator listening on URL``."""
    return f"llmap simulator listening on http://{host}:{port}/v1"


async def start_site(
    server: SimServer, host: str, port: int, *, shutdown_timeout: float = 0.5
) -> tuple[web.AppRunner, int]:
    """Start serving ``server`` on ``host:port`` in the running event loop.

    Args:
        server: the simulator state and handlers.
        host: interface to bind.
        port: TCP port; 0 picks a free one.
        shutdown_timeout: seconds :meth:`web.AppRunner.cleanup` waits for open
            requests (hung ones included) before cancelling them.

    Returns:
        The runner (call ``await runner.cleanup()`` to stop) and the bound port.

    Raises:
        OSError: the address cannot be bound.
    """
    runner = web.AppRunner(server.make_app(), access_log=None, handler_cancellation=True,
                           shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]


def serve_forever(config: SimConfig, *, out: IO[str] | None = None) -> None:
    """Serve until interrupted, printing :func:`listening_line` first (flushed).

    Args:
        config: the behaviour, host and port.
        out: where the listening line goes; standard output by default.

    Raises:
        OSError: the address cannot be bound.
    """
    stream = out if out is not None else sys.stdout

    async def main() -> None:
        runner, port = await start_site(SimServer(config), config.host, config.port)
        print(listening_line(config.host, port), file=stream, flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
