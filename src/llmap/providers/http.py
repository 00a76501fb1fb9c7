"""The pooled HTTP client every HTTP provider shares (OpenAI-compatible, Anthropic).

One aiohttp session per provider, with ``limits.concurrency`` connections,
connect and read timeouts always on (a hung request is abandoned), and no
retries: the dispatcher is the one retry layer. Transport errors are mapped
here (:func:`~llmap.providers.base.map_transport_error`), and any secret the
provider sends (API keys, ``${VAR}`` headers) is replaced by ``***`` in every
body read back, so a server that echoes a key never puts it into an error,
the ledger or a log. After :meth:`HttpClient.aclose` the client refuses to
send rather than open a session nobody would close.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from llmap.errors import SpecError
from llmap.providers.base import map_transport_error

__all__ = ["HttpAnswer", "HttpClient", "api_key", "decode_json", "expand_headers"]

#: ``${VAR}`` in a ``[model] headers`` value: read from the environment.
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

#: Response headers kept with an answer: the rate-limit budgets and Retry-After.
RATE_LIMIT_HEADERS = ("x-ratelimit-", "anthropic-ratelimit-", "retry-after")


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """One HTTP answer.

    Attributes:
        status: the HTTP status.
        body: the body, secrets replaced by ``***``.
        headers: the rate-limit headers (lower-cased names; see :data:`RATE_LIMIT_HEADERS`).
        latency_s: seconds from sending to having read the body.
    """

    status: int
    body: bytes
    headers: dict[str, str]
    latency_s: float


def decode_json(raw: bytes) -> Any:
    """An error body as JSON, or ``{"error": <its first 300 characters>}`` when it is not JSON."""
    try:
        return json.loads(raw)
    except ValueError:
        return {"error": raw.decode("utf-8", "replace")[:300]}


def api_key(env: str) -> str:
    """The API key in environment variable ``env``.

    Raises:
        SpecError: the variable is not set (or empty), naming it and the fix.
    """
    key = os.environ.get(env)
    if not key:
        raise SpecError(f"environment variable {env} is not set; export it with your API key, or change "
                        "[model] api_key_env")
    return key


def expand_headers(headers: Mapping[str, str], secrets: list[bytes]) -> dict[str, str]:
    """``[model] headers`` with each ``${VAR}`` read from the environment; the values read are
    appended to ``secrets`` (redacted from every body read back).

    Raises:
        SpecError: a ``${VAR}`` is not set, naming the header and the variable.
    """
    def value(match: re.Match, header: str) -> str:
        var = match.group(1)
        got = os.environ.get(var)
        if not got:
            raise SpecError(f"[model] headers {header!r} reads ${{{var}}}, which is not set; export it "
                            "or change the header")
        secrets.append(got.encode())
        return got

    return {name: _ENV_REF.sub(lambda m, n=name: value(m, n), v) for name, v in headers.items()}


class HttpClient:
    """A pooled session to one base URL.

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` (no trailing slash needed).
        label: ``provider:name``, for errors.
        headers: sent with every request (the API key among them).
        secrets: values to redact from bodies read back (the key, secret headers).
        concurrency: the most connections.
        connect_timeout_s, read_timeout_s: timeouts, seconds.
        query: query parameters added to every request (Azure's ``api-version``).
    """

    def __init__(self, base_url: str, *, label: str, headers: Mapping[str, str], secrets: list[bytes],
                 concurrency: int, connect_timeout_s: float, read_timeout_s: float,
                 query: Mapping[str, str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.label = label
        self._headers = dict(headers)
        self._secrets = list(secrets)
        self._concurrency = concurrency
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=read_timeout_s)
        self._connect_timeout_s = connect_timeout_s
        self._query = dict(query or {}) or None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _client(self) -> aiohttp.ClientSession:
        if self._closed:  # a late request after the run ended must not open a session nobody closes
            raise RuntimeError(f"the provider {self.label} is closed")
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._concurrency, limit_per_host=self._concurrency)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                                  headers=self._headers, raise_for_status=False)
        return self._session

    def redact(self, raw: bytes) -> bytes:
        """``raw`` with every secret replaced by ``***``."""
        for secret in self._secrets:
            if secret and secret in raw:
                raw = raw.replace(secret, b"***")
        return raw

    async def post_json(self, path: str, body: Any, *, row_key: str | None = None) -> HttpAnswer:
        """POST ``body`` as JSON to ``{base_url}{path}``.

        Raises:
            RequestTimeout, ConnectionFailed: no HTTP answer (mapped transport errors).
        """
        t0 = time.monotonic()
        try:
            async with self._client().post(f"{self.base_url}{path}", data=json.dumps(body),
                                           params=self._query) as resp:
                raw = await resp.read()
                status = resp.status
                headers = {k.lower(): v for k, v in resp.headers.items() if k.lower().startswith(RATE_LIMIT_HEADERS)}
        except Exception as exc:  # the transport boundary: map everything
            raise map_transport_error(exc, model=self.label, row_key=row_key) from exc
        return HttpAnswer(status, self.redact(raw), headers, time.monotonic() - t0)

    async def send(self, method: str, path: str, *, body: Any = None, form: aiohttp.FormData | None = None,
                   params: Mapping[str, str] | None = None) -> HttpAnswer:
        """One request of a batch API (upload a file, create, poll, list, cancel a batch, download results).

        Args:
            method: ``GET`` or ``POST``.
            path: appended to the base URL.
            body: sent as JSON, or None.
            form: a multipart form (a file upload), sent instead of ``body``.
            params: query parameters, added to the client's own (Azure's ``api-version``).

        Returns:
            The answer, its whole body read (secrets redacted); any status.

        Raises:
            RequestTimeout, ConnectionFailed: no HTTP answer (mapped transport errors).
        """
        t0 = time.monotonic()
        query = {**(self._query or {}), **(params or {})} or None
        kwargs: dict[str, Any] = {"params": query}
        if form is not None:
            writer = form()  # its own Content-Type (multipart, with the boundary) replaces the JSON one
            kwargs |= {"data": writer, "headers": {"Content-Type": writer.content_type}}
        elif body is not None:
            kwargs["data"] = json.dumps(body)
        try:
            async with self._client().request(method, f"{self.base_url}{path}", **kwargs) as resp:
                raw = await resp.read()
                headers = {k.lower(): v for k, v in resp.headers.items() if k.lower().startswith(RATE_LIMIT_HEADERS)}
                status = resp.status
        except Exception as exc:  # the transport boundary: map everything
            raise map_transport_error(exc, model=self.label) from exc
        return HttpAnswer(status, self.redact(raw), headers, time.monotonic() - t0)

    async def get(self, path: str) -> HttpAnswer:
        """GET ``{base_url}{path}`` (a free request: ``check()`` before a run).

        Raises:
            OSError: the server cannot be reached (the message says why).
        """
        t0 = time.monotonic()
        try:
            async with self._client().get(f"{self.base_url}{path}", params=self._query,
                                          timeout=aiohttp.ClientTimeout(total=self._connect_timeout_s + 5)) as r:
                raw = await r.read()
                headers = {k.lower(): v for k, v in r.headers.items() if k.lower().startswith(RATE_LIMIT_HEADERS)}
                return HttpAnswer(r.status, self.redact(raw), headers, time.monotonic() - t0)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise OSError(str(exc) or type(exc).__name__) from None

    async def probe(self, path: str) -> int:
        """GET ``{base_url}{path}`` and return its status; costs nothing (``check()`` before a run).

        Raises:
            OSError: the server cannot be reached (the message says why).
        """
        return (await self.get(path)).status

    async def aclose(self) -> None:
        """Close the pool; later requests fail instead of reopening it."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None
