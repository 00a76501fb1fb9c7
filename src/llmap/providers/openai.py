"""Any OpenAI-compatible ``/v1/chat/completions`` server (OpenAI, vLLM, llama.cpp server, Ollama, ...).

One pooled aiohttp session per provider; ``limits.concurrency`` connections.
Connect and read timeouts are always on so a hung request is abandoned.
There are no retries here: the dispatcher is the one retry layer.

The one exception is a *refused request shape*
(:class:`~llmap.control.dialect.RequestShape`): when the server refuses the
structured-output dialect (``structured = "auto"``), a parameter spelling
(``max_tokens`` on an OpenAI reasoning model) or ``logprobs`` (asked for
per-row confidence), the same request is sent again
at once in the next shape, inside :meth:`OpenAIProvider.complete`. Such a
refusal is no outage: it never reaches the retry policy, the circuit breaker
or the concurrency control. Each resend comes back as a
:class:`~llmap.providers.base.Refusal` with the answer (or the error), so the
run counts it. Until the server has answered once (in this run, or in an
earlier one that :class:`~llmap.store.dialects.DialectMemory` remembers) the
provider is ``discovering`` and its lane sends one request at a time, so a
server that refuses the first dialect costs one refused request, not one per
row in flight. When the limits are known, the others wait for that first
answer at most :data:`DISCOVERY_GRACE_S` or 3 preflight round trips (a refusal
comes back on arrival, an answer only after generation). A server that refuses
everything is found out by the misconfiguration check
(:mod:`llmap.control.misconfig`) after a few requests, not a burst.
"""

from __future__ import annotations

import json
import time
from typing import Any

from llmap import errors as E
from llmap.control.dialect import RequestShape, Sent, dialect_refused, refused_parameter
from llmap.providers.base import Completion, Refusal, Request, error_for_response
from llmap.providers.http import HttpAnswer, HttpClient, api_key, decode_json, expand_headers
from llmap.spec import ModelSpec
from llmap.store.dialects import DialectMemory

__all__ = ["OpenAIProvider"]

#: Used when ``[model] base_url`` is not set.
DEFAULT_BASE_URL = "https://api.openai.com/v1"

#: Most shape changes one request may go through (2 dialect steps, 3 parameters, and slack).
_MAX_RESENDS = 7
#: ``top_logprobs`` sent with ``logprobs: true`` (llama-cpp-python's server returns no log-probabilities without it).
TOP_LOGPROBS = 1
#: The instruction ``structured = "prompt"`` adds to the system prompt (the re-ask says the same words).
PROMPT_INSTRUCTION = "Reply with only a JSON object that matches this JSON Schema: "
#: Seconds the first request of a job against a server whose shape is not known yet goes alone, when the limits
#: are known: a server refuses a request shape on arrival (before generating), so a refusal is back within a
#: round trip, long before an answer. At least this, and 3 round trips of the preflight's ``GET /models`` (a
#: local server answers that in milliseconds; a hosted API in 0.1-0.3 s).
DISCOVERY_GRACE_S = 0.1


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
            parameter spellings).
        discovering: True until the server has answered a request in the current shape.
        structured: the dialect in use, in words (``shape.describe()``), recorded in the ledger.

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
            key = api_key(spec.api_key_env)
            self._headers["Authorization"] = f"Bearer {key}"
            self._secrets.append(key.encode())
        self._headers.update(expand_headers(spec.headers, self._secrets))
        self.memory = memory if memory is not None else DialectMemory()
        self.shape = RequestShape.start(spec.structured, self.memory.get(self.base_url, spec.name),
                                        frozenset(spec.params))
        #: while ``discovering`` with known limits, the others wait this long for the first answer (seconds;
        #: see :meth:`llmap.control.lanes.Lane._grace`); raised to 3 round trips by :meth:`check`
        self.discovery_grace_s = DISCOVERY_GRACE_S
        self.http = HttpClient(self.base_url, label=self.label, headers=self._headers, secrets=self._secrets,
                               concurrency=concurrency, connect_timeout_s=spec.connect_timeout_s,
                               read_timeout_s=spec.timeout_s, query=spec.query)

    @property
    def discovering(self) -> bool:
        """True until the server has answered a request in the current shape (dialect, parameters)."""
        return not self.shape.settled

    @property
    def structured(self) -> str:
        """The structured-output dialect in use, in words (e.g. ``json_object (auto, refused json_schema)``)."""
        return self.shape.describe()

    async def check(self) -> None:
        """GET ``{base_url}/models``: proves the URL answers and the key is accepted. Costs nothing.

        Raises:
            SpecError: the server cannot be reached, or rejects the key.
        """
        t0 = time.monotonic()
        try:
            status = await self.http.probe("/models")
        except OSError as exc:
            raise E.SpecError(
                f"cannot reach [model] base_url {self.base_url}: {exc}; start the server or fix base_url"
            ) from None
        self.discovery_grace_s = max(DISCOVERY_GRACE_S, 3 * (time.monotonic() - t0))
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
        if request.logprobs and sent.logprobs:  # per-row confidence (llmap.quality.confidence)
            body["logprobs"], body["top_logprobs"] = True, TOP_LOGPROBS
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
        the module docstring), at most a few times; each such resend is one
        of the answer's (or the error's) ``refusals``. Other errors are raised
        for the dispatcher.
        """
        refusals: list[Refusal] = []
        try:
            for _ in range(_MAX_RESENDS):
                sent = self.shape.sent()
                ans = await self.http.post_json("/chat/completions", self.body(request, sent), row_key=request.row_key)
                if ans.status < 400:
                    if self.shape.accepted(sent):
                        self.memory.put(self.base_url, self.spec.name, self.shape.record())
                    return self._parse(ans, request, tuple(refusals))
                parsed = decode_json(ans.body)
                param = refused_parameter(ans.status, parsed)
                if param == "logprobs" and not request.logprobs:
                    param = None  # not asked for: the refusal is about something else
                note = self.shape.refused(sent, dialect=dialect_refused(ans.status, parsed, sent.dialect), param=param)
                if note is None:
                    raise error_for_response(ans.status, parsed, ans.headers, model=self.label,
                                             row_key=request.row_key)
                refusals.append(Refusal(ans.status, ans.latency_s, note or None))
            raise error_for_response(ans.status, parsed, ans.headers, model=self.label, row_key=request.row_key)
        except E.ProviderError as exc:
            exc.refusals = tuple(refusals)
            raise

    def parse_answer(self, body: bytes, request: Request) -> Completion:
        """The :class:`~llmap.providers.base.Completion` in a chat completion's JSON ``body`` read elsewhere (a
        batch's output file), read exactly as :meth:`complete` reads an answer.

        Raises:
            MalformedResponse: the body is not a chat completion.
        """
        return self._parse(HttpAnswer(200, body, {}, 0.0), request, ())

    def _parse(self, ans: HttpAnswer, request: Request, refusals: tuple[Refusal, ...]) -> Completion:
        try:
            doc = json.loads(ans.body)
            content = doc["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError("content is not a string")
            usage = doc.get("usage")
            reported = isinstance(usage, dict) and ("prompt_tokens" in usage or "completion_tokens" in usage)
            usage = usage if reported else {}
            details = usage.get("prompt_tokens_details")  # OpenAI's automatic prompt caching
            cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
            logprobs = _token_logprobs(doc["choices"][0].get("logprobs")) if request.logprobs else None
            return Completion(
                content=content,
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                latency_s=ans.latency_s,
                headers=ans.headers,
                usage_reported=reported,
                refusals=refusals,
                cache_read_tokens=cached,
                logprobs=logprobs,
            )
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise E.MalformedResponse(
                f"malformed answer from {self.label}: {exc!r}: {ans.body[:120]!r}", model=self.label,
                row_key=request.row_key
            ) from exc

    async def aclose(self) -> None:
        """Close the connection pool; later requests fail instead of reopening it."""
        await self.http.aclose()


def _with_schema_instruction(messages: list[dict[str, str]], schema: dict[str, Any]) -> list[dict[str, str]]:
    """``messages`` with the schema instruction at the end of the system prompt (``structured = "prompt"``)."""
    instruction = PROMPT_INSTRUCTION + json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{first['content']}\n\n{instruction}"
        return [first, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]


def _token_logprobs(value: Any) -> tuple[tuple[str, float], ...] | None:
    """``choices[0].logprobs.content[]`` (OpenAI, vLLM, llama-cpp-python's server) as ``(token, logprob)``
    pairs, or None when absent or incomplete (a token without a log-probability)."""
    content = value.get("content") if isinstance(value, dict) else None
    if not isinstance(content, list) or not content:
        return None
    out = []
    for t in content:
        if (not isinstance(t, dict) or not isinstance(t.get("token"), str)
                or not isinstance(t.get("logprob"), int | float)):
            return None
        out.append((t["token"], float(t["logprob"])))
    return tuple(out)
