"""``llmap simulate``: serve the simulator (OpenAI-compatible and Anthropic Messages) on this machine.

The command prints ``llmap simulator listening on http://HOST:PORT/v1`` as
its first line (flushed) so a parent process can read the URL, then serves
until interrupted. ``python -m llmap.sim`` runs the same function.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

__all__ = ["HeaderStyle", "simulate"]


class HeaderStyle(StrEnum):
    """Which provider's rate-limit headers the simulator sends."""

    openai = "openai"
    anthropic = "anthropic"


def simulate(
    port: Annotated[
        int,
        typer.Option(
            help="TCP port to listen on; 0 picks a free port (read it from the first line)."
        ),
    ] = 8000,
    host: Annotated[
        str,
        typer.Option(help="Interface to bind. Keep 127.0.0.1 unless other machines must reach it."),
    ] = "127.0.0.1",
    latency_median: Annotated[
        float, typer.Option(help="Median answer latency in seconds (0 = answer at once).")
    ] = 0.0,
    latency_sigma: Annotated[
        float,
        typer.Option(
            help="Spread of the latency: sigma of a lognormal around the median "
            "(0 = always the median; 0.5 gives a realistic long tail)."
        ),
    ] = 0.0,
    per_token_ms: Annotated[
        float, typer.Option(help="Extra latency per completion token, in milliseconds.")
    ] = 0.0,
    rpm: Annotated[
        int | None,
        typer.Option(
            help="Requests per minute allowed; beyond it answer 429 with retry-after. Unlimited if unset."
        ),
    ] = None,
    tpm: Annotated[
        int | None,
        typer.Option(
            help="Tokens per minute allowed; a request costs its estimated prompt tokens "
            "plus max_tokens (16 if absent). Unlimited if unset."
        ),
    ] = None,
    burst_s: Annotated[
        float,
        typer.Option(
            help="Seconds of refill each rate-limit bucket holds: 60 (the whole minute) or less; 1 enforces "
            "3000 RPM as 50 requests a second, as Anthropic says it may. Headers still state the per-minute limit."
        ),
    ] = 60.0,
    header_style: Annotated[
        HeaderStyle,
        typer.Option(
            help="Rate-limit headers to send: openai (x-ratelimit-*, resets like '6m0s') "
            "or anthropic (anthropic-ratelimit-*, RFC 3339 reset times)."
        ),
    ] = HeaderStyle.openai,
    fail_rate: Annotated[
        float, typer.Option(help="Fraction of admitted requests answered 500 or 503 (0..1).")
    ] = 0.0,
    hang_rate: Annotated[
        float,
        typer.Option(
            help="Fraction of requests never answered: tests your client's timeout (0..1)."
        ),
    ] = 0.0,
    malformed_rate: Annotated[
        float,
        typer.Option(help="Fraction answered 200 with a truncated, unparsable JSON body (0..1)."),
    ] = 0.0,
    outage: Annotated[
        str | None,
        typer.Option(
            metavar="START:END",
            help="Window in seconds after start during which every request gets 503, e.g. 10:20.",
        ),
    ] = None,
    drop_item_rate: Annotated[
        float,
        typer.Option(
            help="In packed answers (several rows per request), fraction of items left out."
        ),
    ] = 0.0,
    corrupt_item_rate: Annotated[
        float,
        typer.Option(help="In packed answers, fraction of items given a value of the wrong type."),
    ] = 0.0,
    require_key: Annotated[
        str | None,
        typer.Option(
            help="Require 'Authorization: Bearer KEY' (on /v1/messages: 'x-api-key: KEY'); other "
            "requests get 401."
        ),
    ] = None,
    quota_tokens: Annotated[
        int | None,
        typer.Option(
            help="After this many tokens served, answer 429 insufficient_quota (on /v1/messages: "
            "Anthropic's 429 'would exceed your account's monthly spend limit'): a fatal error."
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed for the random faults and latency. Answers are always deterministic; "
            "faults are drawn per request, so a retry can succeed."
        ),
    ] = None,
    context_chars: Annotated[
        int,
        typer.Option(
            help="A message longer than this many characters gets 400 context_length_exceeded."
        ),
    ] = 200_000,
    response_formats: Annotated[
        str,
        typer.Option(
            help="response_format types the server takes, comma-separated (json_schema, json_object); "
            "'' takes none, only prompts. Others are refused as --format-error says."
        ),
    ] = "json_schema,json_object",
    format_error: Annotated[
        str,
        typer.Option(
            help="How a refused response_format is answered: openai (400 naming response_format) or "
            "llama-cpp-python (500 with pydantic's validation error, as its server does)."
        ),
    ] = "openai",
    itpm: Annotated[
        int | None,
        typer.Option(
            help="/v1/messages: input tokens per minute (Anthropic's ITPM; prompt-cache reads are "
            "free). Unlimited if unset."
        ),
    ] = None,
    otpm: Annotated[
        int | None,
        typer.Option(
            help="/v1/messages: output tokens per minute (Anthropic's OTPM; the output produced counts, "
            "max_tokens does not). Unlimited if unset."
        ),
    ] = None,
    overload_rate: Annotated[
        float,
        typer.Option(help="/v1/messages: fraction answered 529 overloaded_error (0..1).")
    ] = 0.0,
    limit_rate: Annotated[
        float,
        typer.Option(help="/v1/messages: fraction answered 429 rate_limit_error with retry-after 1 (0..1).")
    ] = 0.0,
    cache_min_tokens: Annotated[
        int,
        typer.Option(
            help="/v1/messages: the shortest prefix marked with cache_control that is cached, in tokens."
        ),
    ] = 1024,
    batch_time: Annotated[float, typer.Option(
        help="Batch APIs: seconds a batch takes to run all its requests (they finish evenly over it).")] = 1.0,
    batch_window: Annotated[float, typer.Option(
        help="Batch APIs: the completion window in seconds; a batch still running then expires, keeping the "
             "requests it finished (the real APIs: 86400).")] = 86_400.0,
    batch_fail_rate: Annotated[float, typer.Option(
        help="Batch APIs: fraction of batch requests that fail (OpenAI: 500 in the error file; Anthropic: "
             "errored api_error).")] = 0.0,
    batch_max_requests: Annotated[int, typer.Option(
        help="Batch APIs: the request cap per batch (OpenAI: fails validation; Anthropic: 400).")] = 50_000,
    batch_max_bytes: Annotated[int, typer.Option(
        help="Batch APIs: the largest batch file (OpenAI: 400 File is too large) or body (Anthropic: 413), "
             "bytes.")] = 200_000_000,
    batch_max_tokens: Annotated[int | None, typer.Option(
        help="OpenAI Batch: the enqueued-token cap per model; a batch that would pass it fails validation "
             "with token_limit_exceeded. Unlimited if unset.")] = None,
    groups: Annotated[str | None, typer.Option(
        help="A CSV or JSONL file of text, group (and name): the hidden true groups. llmap's cluster and resolve "
        "steps are answered from them, and /v1/embeddings puts same-group texts near each other.",
        show_default=False)] = None,
    group_error_rate: Annotated[float, typer.Option(
        help="Share of cluster and resolve step items answered wrong (with --groups).")] = 0.0,
    embed_noise: Annotated[float, typer.Option(
        help="How far a text's embedding lies from its group's centre (0 = on it, 1 = about as far as "
        "another group's).")] = 0.35,
    embed_dim: Annotated[int, typer.Option(help="Dimensions of /v1/embeddings vectors.")] = 64,
    batch_cancel_time: Annotated[float, typer.Option(
        help="Batch APIs: seconds a cancel takes (cancelling, then cancelled).")] = 0.1,
    accuracy: Annotated[float | None, typer.Option(
        help="Make every model a calibrated model: right on enum and boolean fields with this expected accuracy, "
             "wrong with a probability tied to the confidence its log-probabilities report.")] = None,
    model_accuracy: Annotated[str, typer.Option(
        help="Calibrated accuracy per model name, e.g. 'cheap=0.6,mid=0.8,best=0.95' (others: --accuracy).")] = "",
    calibration: Annotated[str, typer.Option(
        help="Calibrated models: well (right as often as they say), over (over-confident), under, or a power p "
             "(right with probability c^p at confidence c; over is 2).")] = "well",
    refuse_logprobs: Annotated[bool, typer.Option(
        help="Answer requests with logprobs: true 400, as a model without log-probabilities does.")] = False,
    labels: Annotated[str, typer.Option(
        help="A labels file (CSV or JSONL, as llmap label reads): the true answers of the rows it matches. A model "
             "without an accuracy answers them (an oracle); a calibrated one is right or wrong against them.")] = "",
    labels_match: Annotated[str, typer.Option(
        help="With --labels: its column whose text appears in each row's prompt (e.g. district_name).")] = "",
) -> None:
    """Serve an OpenAI-compatible chat completions API and Anthropic's Messages API, answering from JSON schemas.

    Point llmap (or any OpenAI client) at the printed base URL to try a job
    offline, for free, with rate limits and failures you choose. For
    provider = "anthropic", use the same URL without /v1 as base_url:
    /v1/messages answers a forced tool with a tool_use block, reports prompt-cache
    reads and writes, and sends anthropic-ratelimit-* headers. The batch APIs (OpenAI's /v1/files and
    /v1/batches, Anthropic's /v1/messages/batches) run each batch for --batch-time seconds.
    """
    try:
        from llmap.sim.config import (  # imported here: `llmap run` never loads the simulator
            SimConfig,
            parse_outage,
        )

        config = SimConfig(
            host=host,
            port=port,
            latency_median=latency_median,
            latency_sigma=latency_sigma,
            per_token_ms=per_token_ms,
            rpm=rpm,
            tpm=tpm,
            burst_s=burst_s,
            header_style=header_style.value,
            fail_rate=fail_rate,
            hang_rate=hang_rate,
            malformed_rate=malformed_rate,
            outage=parse_outage(outage) if outage else None,
            drop_item_rate=drop_item_rate,
            corrupt_item_rate=corrupt_item_rate,
            require_key=require_key,
            quota_tokens=quota_tokens,
            seed=seed,
            context_chars=context_chars,
            response_formats=response_formats,
            format_error=format_error,
            itpm=itpm,
            otpm=otpm,
            overload_rate=overload_rate,
            limit_rate=limit_rate,
            cache_min_tokens=cache_min_tokens,
            batch_time=batch_time,
            batch_window=batch_window,
            batch_fail_rate=batch_fail_rate,
            batch_max_requests=batch_max_requests,
            batch_max_bytes=batch_max_bytes,
            batch_max_tokens=batch_max_tokens,
            batch_cancel_time=batch_cancel_time,
            accuracy=accuracy,
            model_accuracy=model_accuracy,
            calibration=calibration,
            refuse_logprobs=refuse_logprobs,
            groups=groups,
            group_error_rate=group_error_rate,
            embed_noise=embed_noise,
            embed_dim=embed_dim,
            labels=labels,
            labels_match=labels_match,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    from llmap.sim.server import serve_forever

    serve_forever(config)
