"""Any OpenAI-compatible ``/v1/chat/completions`` server (OpenAI, vLLM, llama.cpp server, Ollama, ...).

One pooled aiohttp session per provider; ``limits.concurrency`` connections.
Connect and read timeouts are always on so a hung request is abandoned.
There are no retries here: the dispatcher is the one retry layer.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import aiohttp

from llmap import errors as E
from llmap.providers.base import Completion, Request, error_for_response, map_transport_error
from llmap.spec import ModelSpec

__all__ = ["OpenAIProvider"]

#: Used when ``[model] base_url`` is not set.
DEFAULT_BASE_URL = "https://api.openai.com/v1"

_KEEP_HEADERS = ("x-ratelimit-", "anthropic-ratelimit-", "retry-after")


def _limit_headers(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith(_KEEP_HEADERS)}


class OpenAIProvider:
    """An OpenAI-compatible chat completions endpoint.

    Args:
        spec: the ``[model]`` table (``base_url``, ``api_key_env``, ``name``,
            ``timeout_s``, ``connect_timeout_s``).
        concurrency: connection pool size (``limits.concurrency``).

    Raises:
        SpecError: ``api_key_env`` names a variable that is not set.
    """

    def __init__(self, spec: ModelSpec, *, concurrency: int = 16) -> None:
        self.spec = spec
        self.label = spec.label
        self.max_concurrency = concurrency
        self.base_url = (spec.base_url or DEFAULT_BASE_URL).rstrip("/")
        self._headers = {"Content-Type": "application/json"}
        self._secret: bytes | None = None
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise E.SpecError(
                    f"environment variable {spec.api_key_env} is not set; export it with your API key, "
                    "or change [model] api_key_env"
                )
            self._headers["Authorization"] = f"Bearer {key}"
            self._secret = key.encode()
        self._timeout = aiohttp.ClientTimeout(total=None, connect=spec.connect_timeout_s, sock_read=spec.timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

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
            async with self._client().get(url, timeout=aiohttp.ClientTimeout(total=self.spec.connect_timeout_s + 5)) as r:
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

    async def complete(self, request: Request) -> Completion:
        """POST one chat completion; see :meth:`llmap.providers.base.Provider.complete`."""
        body: dict[str, Any] = {
            "model": self.spec.name,
            "messages": request.messages,
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
        }
        if request.schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": request.schema, "strict": True},
            }
        t0 = time.monotonic()
        try:
            async with self._client().post(f"{self.base_url}/chat/completions", data=json.dumps(body)) as resp:
                raw = await resp.read()
                status = resp.status
                headers = _limit_headers(resp.headers)
        except Exception as exc:  # the transport boundary: map everything
            raise map_transport_error(exc, model=self.label, row_key=request.row_key) from exc
        latency = time.monotonic() - t0
        if self._secret and self._secret in raw:  # a server that echoes the key must not put it in our errors
            raw = raw.replace(self._secret, b"***")
        if status >= 400:
            try:
                parsed: Any = json.loads(raw)
            except ValueError:
                parsed = {"error": raw.decode("utf-8", "replace")[:300]}
            raise error_for_response(status, parsed, headers, model=self.label, row_key=request.row_key)
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
