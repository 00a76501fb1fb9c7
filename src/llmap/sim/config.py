"""The simulator's configuration: one frozen dataclass, also the CLI's flags.

Every field of :class:`SimConfig` is a flag of ``llmap simulate`` (and of
``python -m llmap.sim``) named after it with dashes: ``fail_rate`` is
``--fail-rate``. :meth:`SimConfig.to_argv` writes those flags, so a parent
process can start a simulator with the same settings it would give
:class:`~llmap.sim.simulator.Simulator`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["CALIBRATIONS", "FORMAT_ERRORS", "HEADER_STYLES", "RESPONSE_FORMATS", "SimConfig", "parse_outage"]

HEADER_STYLES = ("openai", "anthropic")
#: ``response_format`` types a server may take (``text``, i.e. none, is always taken).
RESPONSE_FORMATS = ("json_schema", "json_object")
#: How a server says no to a ``response_format`` type it does not take.
FORMAT_ERRORS = ("openai", "llama-cpp-python")
#: ``calibration`` curves of a calibrated model (:data:`llmap.sim.calibrated.CURVES`).
CALIBRATIONS = ("well", "over", "under")


def parse_outage(text: str) -> tuple[float, float]:
    """Parse an outage window ``"START:END"`` (seconds after server start).

    Args:
        text: two non-negative numbers of seconds, e.g. ``"5:10"`` or ``"0:2.5"``.

    Returns:
        ``(start, end)`` in seconds.

    Raises:
        ValueError: not two numbers separated by ``:``, or ``end < start``.
    """
    start_text, sep, end_text = text.partition(":")
    if not sep:
        raise ValueError(f"outage must look like START:END (seconds), got {text!r}")
    start, end = float(start_text), float(end_text)
    if start < 0 or end < start:
        raise ValueError(f"outage needs 0 <= START <= END, got {text!r}")
    return start, end


@dataclass(frozen=True, slots=True)
class SimConfig:
    """How the simulator behaves. All rates are fractions of requests (0..1).

    Attributes:
        host: interface to bind.
        port: TCP port; 0 picks a free (ephemeral) one.
        latency_median: median answer latency, seconds.
        latency_sigma: sigma of the lognormal latency (0 = always the median).
        per_token_ms: extra latency per completion token, milliseconds.
        rpm: requests per minute allowed (``None`` = unlimited).
        tpm: tokens per minute allowed (``None`` = unlimited); a request costs
            its estimated prompt tokens plus ``max_tokens`` (16 when absent).
        burst_s: seconds of refill each rate-limit bucket holds (``rpm``,
            ``tpm``, ``itpm``, ``otpm``): 60 holds the whole minute; 1 holds
            one second's worth, as Anthropic says a limit may be enforced ("a
            rate of 60 requests per minute (RPM) might be enforced as 1
            request per second"). The headers' ``limit`` stays per minute.
        header_style: ``"openai"`` (``x-ratelimit-*``) or ``"anthropic"``
            (``anthropic-ratelimit-*``) rate-limit headers.
        fail_rate: fraction answered 500 or 503 (after admission).
        hang_rate: fraction never answered; the server waits until the client
            goes away.
        malformed_rate: fraction answered 200 with a truncated JSON body.
        outage: ``(start, end)`` seconds after server start during which every
            chat request gets 503; ``None`` = no outage.
        drop_item_rate: fraction of packed items left out of answers.
        corrupt_item_rate: fraction of packed items given a wrong-typed value.
        require_key: when set, requests must send ``Authorization: Bearer
            <key>`` or get 401 ``invalid_api_key``.
        quota_tokens: after this many tokens served (prompt + completion), every
            chat request gets 429 ``insufficient_quota``; ``None`` = no quota.
        seed: seed of the fault/latency random source (``None`` = random).
            Faults are drawn per request, not per body, so a retry can succeed.
        context_chars: a message longer than this many characters gets 400
            ``context_length_exceeded``.
        itpm: input tokens per minute on ``/v1/messages`` (Anthropic's ITPM;
            uncached input only: cache reads are free); ``None`` = unlimited.
        otpm: output tokens per minute on ``/v1/messages`` (Anthropic's OTPM;
            the output tokens produced are counted, ``max_tokens`` is not).
        overload_rate: fraction of ``/v1/messages`` answered 529
            ``overloaded_error`` (after admission).
        limit_rate: fraction of ``/v1/messages`` answered 429
            ``rate_limit_error`` with ``retry-after: 1`` (after admission: a
            limit shared with other clients of the key).
        cache_min_tokens: the shortest prefix ``/v1/messages`` caches when it is
            marked with ``cache_control``, tokens (Anthropic: 1,024 to 4,096 by model).
        batch_time: seconds a batch takes to run all its requests (both batch
            APIs, :mod:`llmap.sim.batches`); its lines finish evenly over it.
        batch_window: a batch's completion window, seconds (the providers'
            24 h): one still running then *expires*, keeping the requests it
            finished.
        batch_fail_rate: fraction of batch requests that fail (OpenAI: 500 in
            the error file; Anthropic: ``errored`` ``api_error``).
        batch_max_requests: the most requests a batch may hold (the request
            cap): OpenAI's batch fails validation, Anthropic's create gets 400.
        batch_max_bytes: the largest batch file (OpenAI upload: 400 "File is
            too large.") or Message Batches body (413), bytes.
        batch_max_tokens: OpenAI's enqueued-token cap: prompt tokens a model
            may have queued in unfinished batches; a batch that would pass it
            fails validation with ``token_limit_exceeded``. None = no cap.
        batch_cancel_time: seconds a cancel takes (``cancelling``).
        response_formats: the ``response_format`` types the server takes,
            comma-separated, from :data:`RESPONSE_FORMATS`; ``""`` takes none
            (only prompts). A ``json_object`` may carry a ``schema`` beside its
            type, as llama-cpp-python's server takes it.
        groups: a CSV or JSONL file of ``text``, ``group`` (and ``name``): the hidden true groups that operator
            steps are answered from and embeddings are drawn around (:mod:`llmap.sim.groups`); None = none.
        group_error_rate: fraction of operator step items answered wrong (a row proposed or assigned to the
            wrong family, a pair verdict flipped).
        embed_noise: how far a text's embedding lies from its group's centre (0 = on it; about 1 = as far as
            another group's).
        embed_dim: dimensions of ``/v1/embeddings`` vectors.
        format_error: how another type is refused: ``"openai"`` (400,
            ``param: response_format``, as OpenAI answers models without
            Structured Outputs) or ``"llama-cpp-python"`` (500 whose message
            is pydantic's validation error, as ``python -m llama_cpp.server``
            0.3.36 answers ``json_schema``).
        accuracy: every model is a *calibrated* model that gives the true answer of an enum or boolean
            field with this expected accuracy, wrong with a probability tied to the confidence it reports
            (:mod:`llmap.sim.calibrated`); None = the ordinary deterministic answers.
        model_accuracy: per model name, ``"name=0.9,other=0.6"``: that model's accuracy (as ``accuracy``).
        calibration: how the reported confidence relates to being right: ``"well"`` (right as often as it
            says), ``"over"`` (over-confident) or ``"under"`` (under-confident); or the curve's power ``p`` as a
            number (right with probability ``c ** p`` at confidence ``c``: ``"3"`` is more over-confident than
            ``"over"``, which is 2).
        labels: a labels file (CSV or JSONL, as ``llmap label`` reads) whose values are the true answers of the
            rows they match (:mod:`llmap.sim.labels`): a model without an accuracy answers them as they are
            (an oracle), a calibrated one is right or wrong against them. ``""``: no labels.
        labels_match: the labels file's column whose text appears in a row's prompt (required with ``labels``).
        refuse_logprobs: answer a request with ``logprobs: true`` 400 (as a model without log-probabilities).

    Raises:
        ValueError: on construction, when a value is out of range.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    latency_median: float = 0.0
    latency_sigma: float = 0.0
    per_token_ms: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    burst_s: float = 60.0
    header_style: str = "openai"
    fail_rate: float = 0.0
    hang_rate: float = 0.0
    malformed_rate: float = 0.0
    outage: tuple[float, float] | None = None
    drop_item_rate: float = 0.0
    corrupt_item_rate: float = 0.0
    require_key: str | None = None
    quota_tokens: int | None = None
    seed: int | None = None
    context_chars: int = 200_000
    response_formats: str = "json_schema,json_object"
    format_error: str = "openai"
    itpm: int | None = None
    otpm: int | None = None
    overload_rate: float = 0.0
    limit_rate: float = 0.0
    cache_min_tokens: int = 1024
    batch_time: float = 1.0
    batch_window: float = 86_400.0
    batch_fail_rate: float = 0.0
    batch_max_requests: int = 50_000
    batch_max_bytes: int = 200_000_000
    batch_max_tokens: int | None = None
    batch_cancel_time: float = 0.1
    accuracy: float | None = None
    model_accuracy: str = ""
    calibration: str = "well"
    refuse_logprobs: bool = False
    groups: str | None = None
    group_error_rate: float = 0.0
    embed_noise: float = 0.35
    embed_dim: int = 64
    labels: str = ""
    labels_match: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.outage, str):
            object.__setattr__(self, "outage", parse_outage(self.outage))
        elif self.outage is not None:
            start, end = (float(x) for x in self.outage)
            if start < 0 or end < start:
                raise ValueError(f"outage needs 0 <= start <= end, got {self.outage!r}")
            object.__setattr__(self, "outage", (start, end))
        for name in ("fail_rate", "hang_rate", "malformed_rate"):
            _check_rate(name, getattr(self, name))
        for name in ("drop_item_rate", "corrupt_item_rate", "overload_rate", "limit_rate", "batch_fail_rate",
                     "group_error_rate"):
            _check_rate(name, getattr(self, name))
        if self.fail_rate + self.hang_rate + self.malformed_rate > 1.0 + 1e-9:
            raise ValueError("fail_rate + hang_rate + malformed_rate must not exceed 1")
        if self.fail_rate + self.overload_rate + self.limit_rate + self.hang_rate + self.malformed_rate > 1.0 + 1e-9:
            raise ValueError("fail_rate + overload_rate + limit_rate + hang_rate + malformed_rate must not exceed 1")
        for name in ("rpm", "tpm", "quota_tokens", "itpm", "otpm", "batch_max_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value!r}")
        if not 0 < self.burst_s <= 60:
            raise ValueError(f"burst_s must be in (0, 60] seconds, got {self.burst_s!r}")
        for name in ("latency_median", "latency_sigma", "per_token_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.header_style not in HEADER_STYLES:
            raise ValueError(
                f"header_style must be one of {HEADER_STYLES}, got {self.header_style!r}"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port!r}")
        unknown = [t for t in self.accepted_formats if t not in RESPONSE_FORMATS]
        if unknown:
            raise ValueError(f"response_formats: unknown type {unknown[0]!r}; use some of {RESPONSE_FORMATS}")
        if self.format_error not in FORMAT_ERRORS:
            raise ValueError(f"format_error must be one of {FORMAT_ERRORS}, got {self.format_error!r}")
        for name in ("batch_time", "batch_cancel_time"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("batch_window", "batch_max_requests", "batch_max_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.cache_min_tokens < 0:
            raise ValueError(f"cache_min_tokens must be >= 0, got {self.cache_min_tokens!r}")
        if self.embed_noise < 0 or self.embed_dim < 2:
            raise ValueError(f"embed_noise must be >= 0 and embed_dim >= 2, got {self.embed_noise!r}, "
                             f"{self.embed_dim!r}")
        if self.context_chars <= 0:
            raise ValueError(f"context_chars must be positive, got {self.context_chars!r}")
        if self.accuracy is not None:
            _check_rate("accuracy", self.accuracy)
        self.accuracies  # noqa: B018 - validates model_accuracy
        self.power  # noqa: B018 - validates calibration
        if self.labels and not self.labels_match:
            raise ValueError("labels needs labels_match: the labels file's column whose text appears in each row's "
                             "prompt")
        if self.labels:
            from llmap.sim.labels import load_labels

            load_labels(self.labels, self.labels_match)  # a missing file or column is said at once

    @property
    def accuracies(self) -> tuple[tuple[str, float], ...]:
        """``model_accuracy`` as ``(model name, accuracy)`` pairs.

        Raises:
            ValueError: an entry is not ``name=fraction``.
        """
        out = []
        for part in (p.strip() for p in self.model_accuracy.split(",")):
            if not part:
                continue
            name, sep, value = part.rpartition("=")
            try:
                acc = float(value)
            except ValueError:
                acc = -1.0
            if not sep or not name or not 0 <= acc <= 1:
                raise ValueError(f"model_accuracy: {part!r} must look like name=0.9 (a fraction in [0, 1])")
            out.append((name, acc))
        return tuple(out)

    @property
    def power(self) -> float:
        """The calibration curve's power ``p`` (:data:`llmap.sim.calibrated.CURVES`, or ``calibration`` as a number).

        Raises:
            ValueError: ``calibration`` is neither a curve's name nor a positive number.
        """
        from llmap.sim.calibrated import CURVES

        if self.calibration in CURVES:
            return CURVES[self.calibration]
        try:
            p = float(self.calibration)
        except ValueError:
            p = -1.0
        if not 0 < p <= 100:
            raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)} or a power in (0, 100], got "
                             f"{self.calibration!r}")
        return p

    @property
    def accepted_formats(self) -> tuple[str, ...]:
        """``response_formats`` as a tuple of type names."""
        return tuple(t.strip() for t in self.response_formats.split(",") if t.strip())

    def replace(self, **changes: Any) -> SimConfig:
        """A copy with ``changes`` applied (validated again).

        Raises:
            TypeError: an unknown field name.
            ValueError: a value out of range.
        """
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``outage`` as a list or ``None``)."""
        data = dataclasses.asdict(self)
        if self.outage is not None:
            data["outage"] = list(self.outage)
        return data

    def to_argv(self) -> list[str]:
        """Command-line flags reproducing this config; defaults are left out."""
        argv: list[str] = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value == field.default:
                continue
            flag = "--" + field.name.replace("_", "-")
            if isinstance(value, bool):  # a switch: --flag or --no-flag
                argv.append(flag if value else "--no-" + flag[2:])
                continue
            if field.name == "outage":
                value = f"{value[0]}:{value[1]}"
            argv += [flag, str(value)]
        return argv


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
