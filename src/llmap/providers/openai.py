"""Any OpenAI-compatible ``/v1/chat/completions`` server (OpenAI, vLLM, llama.cpp server, Ollama, ...).

One pooled aiohttp session per provider; ``limits.concurrency`` connections.
Connect and read timeouts are always on so a hung request is abandoned.
There are no retries here: the dispatcher is the one retry layer.

The one exception is a *refused request shape*
(:class:`~llmap.control.dialect.RequestShape`): when the server refuses the
structured-output dialect (``structured = "auto"``) or a parameter spelling
(``max_tokens`` on an OpenAI reasoning model), the same request is sent again
at once in the next shape, inside :meth:`OpenAIProvider.complete`. Such a
refusal is no outage: it never reaches the retry policy, the circuit breaker
or the concurrency control. Each resend is reported to :attr:`on_resend` so
the run counts it. Until the server has answered once (in this run, or in an
earlier one that :class:`~llmap.store.dialects.DialectMemory` remembers), one
request probes at a time, so a server that refuses the first dialect costs
one refused request, not one per row in flight, and a server that refuses
everything is found out by the misconfiguration check
(:mod:`llmap.control.misconfig`) after a few requests, not a burst.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from llmap import errors as E
from llmap.control.dialect import RequestShape, Sent, dialect_refused, refused_parameter
from llmap.providers.base import Completion, Request, error_for_response, map_transport_error
from llmap.spec import ModelSpec
from llmap.store.dialects import DialectMemory

__all__ = ["OpenAIProvider"]

#: Used when ``[model] base_url`` is not set.
DEFAULT_BASE_URL = "https://api.openai.com/v1"

_KEEP_HEADERS = ("x-ratelimit-", "anthropic-ratelimit-", "retry-after")
#: Most shape changes one request may go through (2 dialect steps, 2 parameters, and slack).
_MAX_RESENDS = 6
#: ``${VAR}`` in a ``[model] headers`` value: read from the environment.
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: The instruction ``structured = "prompt"`` adds to the system prompt (the re-ask says the same words).
PROMPT_INSTRUCTION = "Reply with only a JSON object that matches this JSON Schema: "


def _limit_headers(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith(_KEEP_HEADERS)}


class OpenAIProvider:
    """An OpenAI-compatible chat completions endpoint.

    Args:
        spec: the ``[model]`` table (``base_url``, ``api_key_env``, ``name``,
            ``timeout_s``, ``connect_timeout_s``, ``structured``, ``params``,
            ``headers``, ``query``).
        concurrency: connection pool size (``limits.concurrency``).
        memory: where request shapes learned by earlier runs are kept; default
            ``$LLMAP_CACHE_DIR/dialects.json`` (:class:`~llmap.store.dialects.DialectMemory`).

    Attributes:
        shape: the :class:`~llmap.control.dialect.RequestShape` in use (dialect,
            parameter spellings); the engine records ``shape.describe()`` in the ledger.

    Raises:
        SpecError: ``api_key_env``, or a ``${VAR}`` in ``headers``, names a variable that is not set.
    """

    def __init__(self, spec: ModelSpec, *, concurrency: int = 16, memory: DialectMemory | None = None) -> None:
        self.spec = spec
        self.label = spec.label
        self.max_concurrency = concurrency
        self.base_url = (spec.base_url or DEFAULT_BASE_URL).rstrip("/")
        self._headers = {"Content-Type": "application/json"}
        self._secrets: list[bytes] = []
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise E.SpecError(
                    f"environment variable {spec.api_key_env} is not set; export it with your API key, "
                    "or change [model] api_key_env"
                )
            self._headers["Authorization"] = f"Bearer {key}"
            self._secrets.append(key.encode())
        for name, value in spec.headers.items():
            self._headers[name] = _ENV_REF.sub(lambda m, n=name: self._env_secret(m.group(1), n), value)
        self._query = dict(spec.query)
        self._timeout = aiohttp.ClientTimeout(total=None, connect=spec.connect_timeout_s, sock_read=spec.timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.memory = memory if memory is not None else DialectMemory()
        self.shape = RequestShape.start(spec.structured, self.memory.get(self.base_url, spec.name),
                                        frozenset(spec.params))
        self._probe = asyncio.Lock()
        #: Called ``(note, status, latency_s)`` for each refused request that is sent again in a new
        #: shape; ``note`` says what changed (once per change), None for a quiet resend.
        self.on_resend: Callable[[str | None, int, float], None] | None = None
        #: Asked by a request that waited for the probe: an error to raise instead of sending (the run
        #: is stopping, or this model was left out), or None to send.
        self.refuse: Callable[[], E.ProviderError | None] = lambda: None

    def _env_secret(self, var: str, header: str) -> str:
        value = os.environ.get(var)
        if not value:
            raise E.SpecError(f"[model] headers {header!r} reads ${{{var}}}, which is not set; export it "
                              "or change the header")
        self._secrets.append(value.encode())
        return value

    def _client(self) -> aiohttp.ClientSession:
        if self._closed:  # a late request after the run ended must not open a session nobody closes
            raise RuntimeError(f"the provider {self.label} is closed")
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_concurrency, limit_per_host=self.max_concurrency)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, headers=self._headers, raise_for_status=False
            )
        return self._session

    async def check(self) -> None:
        """GET ``{base_url}/models``: proves the URL answers and the key is accepted. Costs nothing.

        Raises:
            SpecError: the server cannot be reached, or rejects the key.
        """
        url = f"{self.base_url}/models"
        try:
            async with self._client().get(url, params=self._query or None,
                                          timeout=aiohttp.ClientTimeout(total=self.spec.connect_timeout_s + 5)) as r:
                status = r.status
                await r.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            detail = str(exc) or type(exc).__name__
            raise E.SpecError(
                f"cannot reach [model] base_url {self.base_url}: {detail}; start the server or fix base_url"
            ) from None
        if status in (401, 403):
            who = f"the key in ${self.spec.api_key_env}" if self.spec.api_key_env else "a request without an API key"
            raise E.SpecError(
                f"{self.base_url} rejected {who} (HTTP {status}); set a valid key or fix [model] api_key_env"
            )

    def body(self, request: Request, sent: Sent) -> dict[str, Any]:
        """The JSON body of ``request`` in the shape ``sent``; ``[model] params`` override llmap's keys."""
        messages = request.messages
        body: dict[str, Any] = {"model": self.spec.name, "messages": messages}
        if sent.temperature:
            body["temperature"] = request.temperature
        body[sent.token_param] = request.max_tokens
        if request.schema is not None:
            if sent.dialect == "json_schema":
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "answer", "schema": request.schema, "strict": True},
                }
            elif sent.dialect == "json_object":
                body["response_format"] = {"type": "json_object", "schema": request.schema}
            else:
                body["messages"] = _with_schema_instruction(messages, request.schema)
        if self.spec.params:
            if "max_completion_tokens" in self.spec.params or "max_tokens" in self.spec.params:
                body.pop("max_tokens", None)
                body.pop("max_completion_tokens", None)
            body.update(self.spec.params)
        return body

    async def complete(self, request: Request) -> Completion:
        """POST one chat completion; see :meth:`llmap.providers.base.Provider.complete`.

        A refused request shape is sent again at once in the next shape (see
        the module docstring); other errors are raised for the dispatcher.
        """
        if not self.shape.settled and request.schema is not None:
            async with self._probe:  # until the first answer, one request finds out what the server takes
                refused = self.refuse()
                if refused is not None:  # the probes before this one settled the run's fate
                    raise refused
                if not self.shape.settled:
                    return await self._complete(request)
        return await self._complete(request)

    async def _complete(self, request: Request) -> Completion:
        for _ in range(_MAX_RESENDS):
            sent = self.shape.sent()
            status, raw, headers, latency = await self._post(self.body(request, sent), request)
            if status < 400:
                if self.shape.accepted(sent):
                    self.memory.put(self.base_url, self.spec.name, self.shape.record())
                return self._parse(raw, headers, latency, request)
            parsed = _decode_error(raw)
            note = self.shape.refused(sent, dialect=dialect_refused(status, parsed, sent.dialect),
                                      param=refused_parameter(status, parsed))
            if note is None:
                raise error_for_response(status, parsed, headers, model=self.label, row_key=request.row_key)
            if self.on_resend is not None:
                self.on_resend(note or None, status, latency)
        raise error_for_response(status, parsed, headers, model=self.label, row_key=request.row_key)

    async def _post(self, body: dict[str, Any], request: Request) -> tuple[int, bytes, dict[str, str], float]:
        t0 = time.monotonic()
        try:
            async with self._client().post(f"{self.base_url}/chat/completions", data=json.dumps(body),
                                           params=self._query or None) as resp:
                raw = await resp.read()
                status = resp.status
                headers = _limit_headers(resp.headers)
        except Exception as exc:  # the transport boundary: map everything
            raise map_transport_error(exc, model=self.label, row_key=request.row_key) from exc
        for secret in self._secrets:  # a server that echoes a key must not put it in our errors
            if secret in raw:
                raw = raw.replace(secret, b"***")
        return status, raw, headers, time.monotonic() - t0

    def _parse(self, raw: bytes, headers: dict[str, str], latency: float, request: Request) -> Completion:
        try:
            doc = json.loads(raw)
            content = doc["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError("content is not a string")
            usage = doc.get("usage")
            reported = isinstance(usage, dict) and ("prompt_tokens" in usage or "completion_tokens" in usage)
            usage = usage if reported else {}
            return Completion(
                content=content,
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                latency_s=latency,
                headers=headers,
                usage_reported=reported,
            )
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise E.MalformedResponse(
                f"malformed answer from {self.label}: {exc!r}: {raw[:120]!r}", model=self.label, row_key=request.row_key
            ) from exc

    async def aclose(self) -> None:
        """Close the connection pool; later requests fail instead of reopening it."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None


def _decode_error(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return {"error": raw.decode("utf-8", "replace")[:300]}


def _with_schema_instruction(messages: list[dict[str, str]], schema: dict[str, Any]) -> list[dict[str, str]]:
    """``messages`` with the schema instruction at the end of the system prompt (``structured = "prompt"``)."""
    instruction = PROMPT_INSTRUCTION + json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{first['content']}\n\n{instruction}"
        return [first, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]
