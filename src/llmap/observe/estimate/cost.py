"""The estimate's figures: what the rows to request cost in tokens, USD and time (``llmap estimate``).

:mod:`llmap.observe.estimate.rows` sorts the input's rows and measures the prompts;
this module turns those counts into tokens per model, USD at the models'
prices (:func:`llmap.pricing.cost_usd`) and wall time under the limits.

Prompt caching: for a model with ``prompt_cache`` (Anthropic), the prefix
every request shares (system prompt, few-shot turns) is assumed written to
the cache by the first request and read from it by every later one, when it
is at least :data:`CACHE_MIN_TOKENS` long (the smallest minimum Anthropic
caches; some models need up to 4,096 tokens, and a cache entry unused for 5
minutes expires, so this is the best case).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llmap.control.lanes import INITIAL_CONCURRENCY, MAX_CONCURRENCY
from llmap.pricing import cost_usd
from llmap.spec import ModelSpec

__all__ = ["CACHE_MIN_TOKENS", "DEFAULT_CHARS_PER_TOKEN", "DEFAULT_LATENCY_S", "Estimate", "History", "ModelCost",
           "cost_and_time"]

#: Characters per prompt token when the ledger has no usage to learn from.
DEFAULT_CHARS_PER_TOKEN = 4.0
#: Seconds per request assumed when the ledger has no answered request of the primary model.
DEFAULT_LATENCY_S = 1.0
#: Seconds per request assumed for the embedded model without past runs: a row decoded among 16 in each of 2
#: processes (B16 on 2 cores: 61 Wyoming rows in 9.6 s, model load included, 32 in flight: about 5 s each).
LOCAL_LATENCY_S = 5.0
#: The shortest shared prefix assumed cached, tokens (Anthropic's smallest minimum).
CACHE_MIN_TOKENS = 1024


@dataclass
class ModelCost:
    """Tokens and USD on one model.

    Attributes:
        label: ``provider:name``.
        role: ``"primary"``, or ``"escalation"`` for a cascade step (costed as if
            every row escalated: an upper bound).
        requests: requests to this model.
        prompt_tokens, completion_tokens: estimated tokens.
        completion_per_row: completion tokens per row used for the estimate.
        completion_source: ``"past runs"`` (mean of the ledger's answered
            requests of this model) or ``"max_tokens"`` (its cap: an upper bound).
        price_in, price_out: the model's USD per million prompt / completion tokens.
        cost_usd: USD at those prices (cache reads and writes at the cache prices).
        cache_read_tokens, cache_write_tokens: of the prompt tokens, those assumed read from / written
            to the prompt cache (the shared prefix: written by the first request, read by the rest).
        price_cache_read, price_cache_write: the model's USD per million of those.
        free: the embedded model (``provider = "local"``): it costs nothing, and has no prices to set.
    """

    label: str
    role: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    completion_per_row: float
    completion_source: str
    price_in: float
    price_out: float
    cost_usd: float
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    price_cache_read: float = 0.0
    price_cache_write: float = 0.0
    free: bool = False


@dataclass
class Estimate:
    """What a run of a job would do now, and where each assumption comes from.

    Row counts (they add up to ``rows``): ``done``, ``skipped``, ``duplicates``,
    ``cached``, ``to_request`` (see the module docstring for the order).

    Attributes:
        rows: rows in the input after ``where`` and ``limit``.
        requests: requests to the primary model: ``to_request``, divided by
            ``pack`` when it is a number.
        pack: ``[prompt] pack``.
        prompt_chars: characters of the rendered messages of the rows to request.
        chars_per_token: characters per prompt token used.
        chars_per_token_source: ``"default"`` or ``"ledger (N done rows)"``.
        prompt_tokens, completion_tokens: tokens on the primary model (``image_tokens`` included).
        images: images sent as image parts (``[input.documents]``), on the rows to request.
        image_tokens: their prompt tokens by the primary model's provider's formula
            (:mod:`llmap.observe.estimate.images`).
        documents_unread: documents of the rows to request never read yet (not fetched, not
            extracted): each counted at its column's ``max_tokens``, an upper bound.
        prefix_chars: characters of the prefix every request shares (system prompt,
            few-shot turns; 0 when the system prompt reads a column).
        cache_read_tokens: of ``prompt_tokens``, those assumed read from the primary
            model's prompt cache (see the module docstring); 0 without ``prompt_cache``.
        completion_source: ``"past runs"`` or ``"max_tokens"`` (primary model).
        cost_usd: USD on the primary model.
        cost_upper_usd: ``cost_usd`` plus every cascade step as if every row escalated.
        batch_cost_usd: with ``[model] batch = true``, the primary model's cost by its batch API
            (``batch_factor``, its ``price_batch_factor``, x ``cost_usd``), shown beside the real-time one; else None.
        models: per-model figures, primary first.
        time_s: estimated wall seconds: the largest of the RPM bound, the TPM
            bound and ``requests * latency_s / concurrency``.
        time_bound: which of ``"rpm"``, ``"tpm"``, ``"concurrency"`` set ``time_s``.
        rpm, tpm: the primary model's limits used, or None.
        latency_s, latency_source: seconds per request, ``"past runs"`` or ``"assumed"``.
        concurrency, concurrency_source: requests in flight assumed, and why.
        cache_source: how cache hits were found (or why there are none).
        ledger_found: whether the job's ledger existed.
        notes: what the estimate leaves out, in words.
        elapsed_s: seconds the estimate itself took.
    """

    rows: int = 0
    done: int = 0
    skipped: int = 0
    duplicates: int = 0
    cached: int = 0
    to_request: int = 0
    requests: int = 0
    pack: int | str = 1
    prompt_chars: int = 0
    chars_per_token: float = DEFAULT_CHARS_PER_TOKEN
    chars_per_token_source: str = "default"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    images: int = 0
    image_tokens: int = 0
    documents_unread: int = 0
    prefix_chars: int = 0
    cache_read_tokens: int = 0
    completion_source: str = "max_tokens"
    cost_usd: float = 0.0
    cost_upper_usd: float = 0.0
    batch_cost_usd: float | None = None
    batch_factor: float = 0.5
    models: list[ModelCost] = field(default_factory=list)
    time_s: float = 0.0
    time_bound: str = "concurrency"
    rpm: float | None = None
    tpm: float | None = None
    latency_s: float = DEFAULT_LATENCY_S
    latency_source: str = "assumed"
    concurrency: int = INITIAL_CONCURRENCY
    concurrency_source: str = ""
    cache_source: str = ""
    ledger_found: bool = False
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


@dataclass
class History:
    """What the ledger says about past runs (read-only; empty without a ledger).

    Attributes:
        done: key -> input hash of done rows.
        calib: key -> prompt tokens of single-request primary rows (for the characters-per-token ratio).
        completion: model label -> completion tokens per row of past answers.
        latency: model label -> mean seconds per request of past answers.
    """

    done: dict[str, str] = field(default_factory=dict)
    calib: dict[str, int] = field(default_factory=dict)
    completion: dict[str, float] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)


def _cascade(models: Sequence[ModelSpec]) -> list[ModelSpec]:
    """The models rows may escalate to: each one after a model with ``escalate_if``."""
    out = []
    for prev, nxt in zip(models, models[1:], strict=False):
        if prev.escalate_if is None:
            break
        out.append(nxt)
    return out


def _model_cost(m: ModelSpec, role: str, rows: int, requests: int, prompt_tokens: int, hist: History,
                prefix_tokens: int = 0) -> ModelCost:
    per_row = hist.completion.get(m.label)
    src = "past runs" if per_row is not None else "max_tokens"
    per_row = per_row if per_row is not None else float(m.max_tokens)
    completion = round(per_row * rows)
    read = write = 0
    if m.caches_prompt and prefix_tokens >= CACHE_MIN_TOKENS and requests:
        write = prefix_tokens  # the first request writes the shared prefix, every later one reads it
        read = min(prefix_tokens * (requests - 1), max(0, prompt_tokens - write))
    cost = cost_usd(m, prompt_tokens, completion, read, write)
    return ModelCost(m.label, role, requests, prompt_tokens, completion, per_row, src, m.price_in, m.price_out, cost,
                     read, write, m.cache_read_price, m.cache_write_price, m.provider == "local")


def cost_and_time(est: Estimate, spec: Any, hist: History) -> None:
    """Fill ``est``'s tokens, per-model costs, time and notes from its row counts and ``hist``."""
    model, limits = spec.model, spec.limits
    pack = spec.prompt.pack
    n = est.to_request
    est.requests = math.ceil(n / pack) if isinstance(pack, int) else n
    est.prompt_tokens = math.ceil(est.prompt_chars / est.chars_per_token) if est.prompt_chars else 0
    est.prompt_tokens += est.image_tokens
    prefix = math.ceil(est.prefix_chars / est.chars_per_token) if est.prefix_chars else 0
    primary = _model_cost(model, "primary", n, est.requests, est.prompt_tokens, hist, prefix)
    est.cache_read_tokens = primary.cache_read_tokens
    est.models = [primary]
    est.completion_tokens, est.completion_source = primary.completion_tokens, primary.completion_source
    est.cost_usd = est.cost_upper_usd = primary.cost_usd
    if model.batch:
        est.batch_factor, est.batch_cost_usd = model.price_batch_factor, primary.cost_usd * model.price_batch_factor
    cascade = getattr(spec, "cascade", None)
    for m in _cascade(spec.models) if cascade is None else spec.models[1:]:  # [cascade]: the oracle
        step = _model_cost(m, "escalation", n, n, est.prompt_tokens, hist, prefix)
        est.models.append(step)
        est.cost_upper_usd += step.cost_usd

    # time on the primary model
    est.rpm = model.rpm or limits.rpm
    est.tpm = model.tpm or limits.tpm
    if model.label in hist.latency:
        est.latency_s, est.latency_source = hist.latency[model.label], "past runs"
    elif model.provider == "local":
        est.latency_s, est.latency_source = LOCAL_LATENCY_S, "assumed (B16: 16 rows decoded together per process)"
    else:
        est.latency_s, est.latency_source = DEFAULT_LATENCY_S, "assumed"
    if model.provider == "local":  # processes x rows each decodes together (llmap.providers.local.provider)
        from llmap.providers.local.provider import DEFAULT_PROCESSES, DEFAULT_SEQUENCES, cores

        n = cores()
        wanted = limits.concurrency or DEFAULT_PROCESSES
        procs = max(1, min(wanted, n))
        est.concurrency = procs * DEFAULT_SEQUENCES
        why = "[limits] concurrency" if limits.concurrency else "the default"
        est.concurrency_source = (f"embedded model: {procs} model process{'es' if procs != 1 else ''} ({why}, at "
                                  f"most one per core of {n}) x {DEFAULT_SEQUENCES} rows decoded together")
    elif limits.concurrency:
        est.concurrency, est.concurrency_source = limits.concurrency, "[limits] concurrency"
    else:
        est.concurrency = INITIAL_CONCURRENCY
        est.concurrency_source = (f"adaptive: assumed {INITIAL_CONCURRENCY}, where it starts "
                                  f"(it grows to {MAX_CONCURRENCY} without 429s)")
    bounds = {"concurrency": est.requests * est.latency_s / est.concurrency}
    if est.rpm:
        bounds["rpm"] = est.requests / (est.rpm / 60)
    if est.tpm:
        bounds["tpm"] = (est.prompt_tokens + est.completion_tokens) / (est.tpm / 60)
    est.time_bound = max(bounds, key=lambda k: bounds[k])
    est.time_s = bounds[est.time_bound]
    est.notes = _notes(est, spec)


def _notes(est: Estimate, spec: Any) -> list[str]:
    notes = ["re-asks and retries are not counted"]
    budget = spec.limits.hedge_budget if spec.limits.hedge_tail else 0.0
    if budget and est.requests:
        most = int(budget * est.requests)
        per = est.cost_usd / est.requests if est.requests else 0.0
        notes.append(f"hedged copies in the run's tail: at most {most:,} ([limits] hedge_budget = {budget:g} of "
                     f"the requests), at most ${most * per:,.4f}")
    if est.cache_read_tokens:
        notes.append(f"prompt cache: the {est.prefix_chars:,}-character prefix every request shares is assumed "
                     "written once and read by every later request (the best case: a model may need a longer "
                     "prefix, and an entry unused for 5 minutes expires)")
    pack = spec.prompt.pack
    if pack == "auto":
        notes.append('pack = "auto": the size is picked during the run; requests are counted one per row '
                     "(an upper bound)")
    elif pack > 1:
        notes.append(f"pack = {pack}: {pack} rows per request; prompt tokens are the unpacked sum "
                     "(a pack sends the system prompt once, so roughly the same or less)")
    cascade = getattr(spec, "cascade", None)
    if cascade is not None:
        least = min(cascade.label_budget, est.to_request)
        notes.append(f"[cascade]: the oracle answers the sample ({least:,} rows) and the rows below the threshold "
                     "the sample proves safe, so between that and every row: costed as if every row (an upper "
                     "bound); time is for the proxy only")
    elif len(est.models) > 1:
        notes.append("cascade: later models are costed as if every row escalated (an upper bound); "
                     "time is for the primary model only")
    failover = len(spec.models) - len(est.models)
    if failover > 0:
        notes.append(f"{failover} failover model(s) answer only when the one before fails: not costed")
    if spec.input.per_group is not None:
        notes.append("[input] per_group may stop a group early: rows are counted as if it did not")
    if est.documents_unread:
        notes.append(f"{est.documents_unread:,} document(s) not read yet (never fetched or extracted): each counted at "
                     "its column's max_tokens, an upper bound (a run reads them, and the next estimate counts them)")
    if est.images:
        notes.append(f"{est.images:,} image(s) sent as image parts: {est.image_tokens:,} prompt tokens by "
                     f"{spec.model.provider}'s published formula")
    if spec.limits.max_cost_usd is not None and est.cost_usd > spec.limits.max_cost_usd:
        notes.append(f"the run would stop at [limits] max_cost_usd = {spec.limits.max_cost_usd:g}")
    if spec.limits.max_tokens is not None and est.prompt_tokens + est.completion_tokens > spec.limits.max_tokens:
        notes.append(f"the run would stop at [limits] max_tokens = {spec.limits.max_tokens}")
    return notes
