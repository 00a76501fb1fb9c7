"""Anthropic's Messages API: ``POST {base_url}/v1/messages``.

One pooled client per provider (:class:`~llmap.providers.http.HttpClient`,
the same one the OpenAI-compatible provider uses), no retries here: the
dispatcher is the one retry layer, and errors are mapped at the boundary
(:func:`~llmap.providers.base.error_for_response` reads Anthropic's
``{"type": "error", "error": {"type", "message"}}`` bodies).

The request (see :meth:`AnthropicProvider.body`):

- headers ``x-api-key`` (from ``api_key_env``, default ``ANTHROPIC_API_KEY``)
  and ``anthropic-version: 2023-06-01``;
- the system prompt goes to the top-level ``system``; few-shot examples are
  prior user/assistant turns; a document image (an OpenAI ``image_url`` part
  with a data URI, :mod:`llmap.prompt.parts`) becomes an image block with a
  base64 source; ``max_tokens`` (required by the API) and
  ``temperature`` carry over; ``[model] params`` are merged last;
- structured output: ``structured = "tool"`` (the default) sends one tool
  whose ``input_schema`` is the fields' JSON Schema, forced with
  ``tool_choice = {"type": "tool", "name": "answer"}``, and the answer is the
  ``tool_use`` block's ``input``; ``structured = "json_schema"`` sends
  ``output_config = {"format": {"type": "json_schema", "schema": ...}}``
  (structured outputs, generally available without a beta header) and the
  answer is the text. Structured outputs refuse numeric and length bounds
  (``minimum``, ``maxLength``...): they are left out of that schema and
  llmap's own validation enforces them (a violation is re-asked);
- prompt caching (``prompt_cache``, default on): ``cache_control =
  {"type": "ephemeral"}`` on the last block of the prefix every request
  shares (:attr:`~llmap.providers.base.Request.shared_prefix`): the last
  few-shot turn, else the system prompt, else the tool. The row's own text
  comes after it. While the cache is cold the provider is ``discovering``,
  so the lane sends one request first and the rest read the prefix it wrote.

The answer's ``usage`` (``input_tokens``, ``cache_creation_input_tokens``,
``cache_read_input_tokens``, ``output_tokens``) becomes the
:class:`~llmap.providers.base.Completion`'s prompt tokens (all three
summed), cache reads and writes, and the tokens counted against the
input-token limit (all but cache reads). ``stop_reason = "max_tokens"`` and
``"refusal"`` are passed on for the dispatcher to handle.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from llmap import errors as E
from llmap.prompt.parts import split_data_uri
from llmap.providers.base import Completion, Request, error_for_response
from llmap.providers.http import HttpAnswer, HttpClient, api_key, decode_json, expand_headers
from llmap.spec import ModelSpec

__all__ = ["ANTHROPIC_VERSION", "TOOL_NAME", "AnthropicProvider", "output_schema"]

#: Used when ``[model] base_url`` is not set.
DEFAULT_BASE_URL = "https://api.anthropic.com"
#: The API version every request names (``anthropic-version``).
ANTHROPIC_VERSION = "2023-06-01"
#: The one tool of ``structured = "tool"``.
TOOL_NAME = "answer"
_TOOL_DESCRIPTION = "Record the answer. Call this tool once, with every field of the answer."
_CACHE = {"type": "ephemeral"}
_EMPTY = "(empty)"
#: JSON Schema keywords structured outputs refuse (Anthropic's structured-outputs limits).
_UNSUPPORTED = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength",
                          "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"})


def output_schema(schema: Any) -> Any:
    """``schema`` without the keywords Anthropic's structured outputs refuse (numeric and length bounds)."""
    if isinstance(schema, dict):
        return {k: output_schema(v) for k, v in schema.items() if k not in _UNSUPPORTED}
    if isinstance(schema, list):
        return [output_schema(v) for v in schema]
    return schema


def _blocks(text: str | list[dict[str, Any]], cache: bool) -> list[dict[str, Any]]:
    blocks = [dict(b) for b in text] if isinstance(text, list) else [{"type": "text", "text": text}]
    if cache and blocks:
        blocks[-1]["cache_control"] = dict(_CACHE)
    return blocks


def _content(content: Any) -> Any:
    """A message's content for ``/v1/messages``: text as it is (a placeholder when empty), and llmap's content
    parts (:mod:`llmap.prompt.parts`) as text and image blocks (a data URI becomes a base64 source)."""
    if not isinstance(content, list):
        return content or _EMPTY
    blocks: list[dict[str, Any]] = []
    for part in content:
        if part.get("type") == "image_url":
            url = part["image_url"]["url"]
            data = split_data_uri(url)
            source = ({"type": "base64", "media_type": data[0], "data": data[1]} if data is not None
                      else {"type": "url", "url": url})
            blocks.append({"type": "image", "source": source})
        elif part.get("text"):  # the API refuses an empty text block
            blocks.append({"type": "text", "text": part["text"]})
    return blocks or _EMPTY


class AnthropicProvider:
    """Anthropic's ``/v1/messages``.

    Args:
        spec: the ``[model]`` table (``base_url``, ``api_key_env``, ``name``,
            ``structured``, ``prompt_cache``, ``params``, ``headers``,
            ``query``, timeouts).
        concurrency: connection pool size (``limits.concurrency``).

    Attributes:
        structured: ``"tool"`` or ``"json_schema"``, recorded in the ledger.
        discovering: True while prompt caching is on and no answer has come
            back yet: the first request writes the shared prefix to the cache,
            the others wait for it and read it.

    Raises:
        SpecError: the API key's variable (``ANTHROPIC_API_KEY`` by default),
            or a ``${VAR}`` in ``headers``, is not set.
    """

    def __init__(self, spec: ModelSpec, *, concurrency: int = 16) -> None:
        self.spec = spec
        self.label = spec.label
        self.max_concurrency = concurrency
        self.base_url = (spec.base_url or DEFAULT_BASE_URL).rstrip("/")
        self.structured = "json_schema" if spec.structured == "json_schema" else "tool"
        self.cache_prompt = spec.caches_prompt
        self._answered = False
        secrets: list[bytes] = []
        key = api_key(spec.key_env or "ANTHROPIC_API_KEY")
        secrets.append(key.encode())
        headers = {"content-type": "application/json", "x-api-key": key, "anthropic-version": ANTHROPIC_VERSION}
        headers.update(expand_headers(spec.headers, secrets))
        self.http = HttpClient(self.base_url, label=self.label, headers=headers, secrets=secrets,
                               concurrency=concurrency, connect_timeout_s=spec.connect_timeout_s,
                               read_timeout_s=spec.timeout_s, query=spec.query)

    @property
    def discovering(self) -> bool:
        """True until the first answer while prompt caching is on (see the class docstring)."""
        return self.cache_prompt and not self._answered

    async def check(self) -> None:
        """GET ``{base_url}/v1/models/{name}`` (free): the URL answers, the key works, the model exists.

        Raises:
            SpecError: the server cannot be reached, rejects the key, does not
                know the model, or says the model has no structured outputs
                while ``structured = "json_schema"``.
        """
        try:
            ans = await self.http.get(f"/v1/models/{quote(self.spec.name, safe='')}")
        except OSError as exc:
            raise E.SpecError(f"cannot reach [model] base_url {self.base_url}: {exc}; check the URL and your "
                              "network") from None
        doc = decode_json(ans.body) if ans.body else {}
        err = doc.get("error") if isinstance(doc, dict) else None
        kind = err.get("type") if isinstance(err, dict) else None
        if ans.status in (401, 403):
            raise E.SpecError(f"{self.base_url} rejected the key in ${self.spec.key_env} (HTTP {ans.status}"
                              f"{': ' + str(err.get('message')) if isinstance(err, dict) else ''}); set a valid "
                              "key or fix [model] api_key_env")
        if ans.status == 404 and kind == "not_found_error":
            raise E.SpecError(f"{self.base_url} does not know model {self.spec.name!r} (HTTP 404); check [model] "
                              "name (e.g. claude-haiku-4-5, claude-sonnet-4-5)")
        caps = doc.get("capabilities") if isinstance(doc, dict) and ans.status == 200 else None
        so = caps.get("structured_outputs") if isinstance(caps, dict) else None
        if self.structured == "json_schema" and isinstance(so, dict) and so.get("supported") is False:
            raise E.SpecError(f"model {self.spec.name!r} does not support structured outputs; set [model] "
                              "structured = \"tool\" (the default)")

    # -- the request ------------------------------------------------------------
    def body(self, request: Request) -> dict[str, Any]:
        """The JSON body of ``request``; ``[model] params`` are merged last (``output_config`` key by key)."""
        messages = list(request.messages)
        system = None
        if messages and messages[0].get("role") == "system":
            system, messages = messages[0]["content"], messages[1:]
        shared = max(0, request.shared_prefix - (1 if system is not None else 0)) if request.shared_prefix else 0
        cache = self.cache_prompt
        # the API refuses an empty text block: an empty earlier answer (re-asked) is sent as a placeholder
        turns = [{"role": m["role"], "content": _content(m["content"])} for m in messages]
        # The cache breakpoint: the last shared turn, else the system prompt, else the tool.
        mark_turn = cache and shared > 0
        mark_system = cache and not mark_turn and system is not None and request.shared_prefix > 0
        mark_tool = cache and not mark_turn and not mark_system
        if mark_turn:
            last = turns[shared - 1]
            last["content"] = _blocks(last["content"], True)
        body: dict[str, Any] = {"model": self.spec.name, "max_tokens": request.max_tokens,
                                "temperature": request.temperature, "messages": turns}
        if system is not None:
            body["system"] = _blocks(system, mark_system)
        if request.schema is not None:
            if self.structured == "tool":
                tool: dict[str, Any] = {"name": TOOL_NAME, "description": _TOOL_DESCRIPTION,
                                        "input_schema": request.schema}
                if mark_tool:
                    tool["cache_control"] = dict(_CACHE)
                body["tools"] = [tool]
                body["tool_choice"] = {"type": "tool", "name": TOOL_NAME}
            else:
                body["output_config"] = {"format": {"type": "json_schema", "schema": output_schema(request.schema)}}
        params = dict(self.spec.params)
        if isinstance(params.get("output_config"), dict) and "output_config" in body:
            params["output_config"] = {**body["output_config"], **params["output_config"]}
        body.update(params)
        return body

    async def complete(self, request: Request) -> Completion:
        """POST one message; see :meth:`llmap.providers.base.Provider.complete`.

        Raises:
            ProviderError: mapped from the HTTP answer (429 with ``retry_after``,
                529 ``Overloaded``, 401/403 ``AuthError``, a spend limit
                ``QuotaExhausted``, 400/413 ``BadRequest``/``ContextTooLong``
                with the server's message), or ``MalformedResponse``.
        """
        ans = await self.http.post_json("/v1/messages", self.body(request), row_key=request.row_key)
        if ans.status >= 400:
            exc = error_for_response(ans.status, decode_json(ans.body), ans.headers, model=self.label,
                                     row_key=request.row_key)
            if isinstance(exc, E.QuotaExhausted):
                exc.args = (f"{exc.args[0]}; raise the spend limit or add credits in the Anthropic Console "
                            "(Settings > Limits, Billing), then run again",)
            raise exc
        comp = self._parse(ans, request)
        self._answered = True
        return comp

    def parse_answer(self, body: bytes, request: Request) -> Completion:
        """The :class:`~llmap.providers.base.Completion` in a message's JSON ``body`` read elsewhere (a message
        batch's results), read exactly as :meth:`complete` reads an answer.

        Raises:
            MalformedResponse: the body is not a message.
        """
        return self._parse(HttpAnswer(200, body, {}, 0.0), request)

    def _parse(self, ans: HttpAnswer, request: Request) -> Completion:
        try:
            doc = json.loads(ans.body)
            blocks = doc["content"]
            if not isinstance(blocks, list):
                raise TypeError("content is not a list")
            tool = next((b for b in blocks if isinstance(b, dict) and b.get("type") == "tool_use"), None)
            if tool is not None and self.structured == "tool":
                content = json.dumps(tool.get("input"), ensure_ascii=False)
            else:
                content = "".join(b.get("text", "") for b in blocks if isinstance(b, dict) and b.get("type") == "text")
            usage = doc.get("usage")
            reported = isinstance(usage, dict) and ("input_tokens" in usage or "output_tokens" in usage)
            usage = usage if reported else {}
            fresh = int(usage.get("input_tokens") or 0)
            write = int(usage.get("cache_creation_input_tokens") or 0)
            read = int(usage.get("cache_read_input_tokens") or 0)
            stop = doc.get("stop_reason")
            return Completion(
                content=content,
                prompt_tokens=fresh + write + read,
                completion_tokens=int(usage.get("output_tokens") or 0),
                latency_s=ans.latency_s,
                headers=ans.headers,
                usage_reported=reported,
                cache_read_tokens=read,
                cache_write_tokens=write,
                # cache reads do not count against the input-token limit
                limit_prompt_tokens=fresh + write if reported else None,
                stop_reason=stop if stop in ("max_tokens", "refusal") else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise E.MalformedResponse(
                f"malformed answer from {self.label}: {exc!r}: {ans.body[:120]!r}", model=self.label,
                row_key=request.row_key,
            ) from exc

    async def aclose(self) -> None:
        """Close the connection pool; later requests fail instead of reopening it."""
        await self.http.aclose()
