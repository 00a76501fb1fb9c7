"""What a run would cost, before it sends anything: rows, requests, tokens, USD and time.

:func:`estimate` walks the input the way the planner and the dispatcher do
(the same row keys, input hashes, rendered messages and cache keys) and sorts
every row into exactly one bucket, in this order:

1. ``done``: the ledger holds the row ``done`` with the same input hash;
2. ``skipped``: every template input is empty;
3. ``duplicates``: an earlier row of this input makes the identical request
   (the run sends it once and shares the answer);
4. ``cached``: the response cache holds a fresh answer for the primary model;
5. ``to_request``: the rest, one request each (``pack = N``: N rows a request).

Nothing is sent and nothing is written: no provider is built (a local model is
not loaded), no endpoint is called, and the ledger and the response cache are
opened read-only, only when their files exist. The cache is read with plain
SQL rather than :meth:`~llmap.store.cache.ResponseCache.get_many`, which counts
every lookup as a hit and would make ``llmap cache stats`` report answers that
an estimate never served.

Tokens: prompt tokens are the rendered messages' characters divided by a
characters-per-token ratio (4.0, or the ratio observed on done rows of the
ledger); completion tokens per row are the mean of past answers of that model
(the ledger's ``requests`` log), else ``max_tokens`` (an upper bound). Every
figure says where it comes from (the ``*_source`` attributes).
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2.meta
import pyarrow as pa

from llmap.control.lanes import INITIAL_CONCURRENCY, MAX_CONCURRENCY
from llmap.io.sources import Source
from llmap.plan import Compiled, build_source, check_input, compile_spec, keyed_rows
from llmap.prompt.render import Renderer
from llmap.spec import JobSpec, ModelSpec
from llmap.store.answers import AnswerCache
from llmap.store.cache import FILE_NAME, ResponseCache, default_cache_dir

__all__ = ["Estimate", "ModelCost", "estimate"]

#: Characters per prompt token when the ledger has no usage to learn from.
DEFAULT_CHARS_PER_TOKEN = 4.0
#: Seconds per request assumed when the ledger has no answered request of the primary model.
DEFAULT_LATENCY_S = 1.0
#: Done rows rendered to learn the characters-per-token ratio (enough for a stable mean).
_CALIBRATION_ROWS = 2000
#: Cache keys per lookup batch (the cache query itself goes 500 keys per ``IN`` list).
_LOOKUP_BATCH = 2000
#: Rows whose fast cache key is checked against :meth:`AnswerCache.key` before it is trusted.
_VERIFY_ROWS = 32


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
        cost_usd: USD at those prices.
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
        prompt_tokens, completion_tokens: tokens on the primary model.
        completion_source: ``"past runs"`` or ``"max_tokens"`` (primary model).
        cost_usd: USD on the primary model.
        cost_upper_usd: ``cost_usd`` plus every cascade step as if every row escalated.
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
    completion_source: str = "max_tokens"
    cost_usd: float = 0.0
    cost_upper_usd: float = 0.0
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


# -- read-only history ----------------------------------------------------------------
@dataclass
class _History:
    done: dict[str, str] = field(default_factory=dict)  # key -> input hash of done rows
    calib: dict[str, int] = field(default_factory=dict)  # key -> prompt tokens of single-request primary rows
    completion: dict[str, float] = field(default_factory=dict)  # model label -> completion tokens per row
    latency: dict[str, float] = field(default_factory=dict)  # model label -> mean seconds per request


def _connect_ro(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False)
    con.execute("PRAGMA busy_timeout = 5000")
    return con


def _read_history(path: Path, primary: str) -> _History | None:
    """Done rows and past usage from the ledger, or None when there is no ledger."""
    if not path.is_file():
        return None
    h = _History()
    con = _connect_ro(path)
    try:
        try:
            for key, ih, tokens in con.execute(
                "SELECT key, input_hash, CASE WHEN source = 'model' AND attempts = 1 AND model = ? "
                "THEN prompt_tokens END FROM rows WHERE status = 'done'", (primary,)):
                h.done[key] = ih
                if tokens:
                    h.calib[key] = tokens
        except sqlite3.OperationalError:  # a ledger from before these columns: no history to use
            pass
        try:
            for model, ct, items, lat in con.execute(
                "SELECT model, sum(completion_tokens), sum(pack_size), avg(latency_s) FROM requests "
                "WHERE outcome = '200' GROUP BY model"):
                if items:
                    h.completion[model] = (ct or 0) / items
                if lat is not None:
                    h.latency[model] = lat
        except sqlite3.OperationalError:
            pass
    finally:
        con.close()
    return h


# -- requests, as the dispatcher would build them --------------------------------------
def _dumps(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class _RequestKeys:
    """A row's cache key on the primary model and its prompt characters.

    The general path is :meth:`Renderer.messages` + :meth:`AnswerCache.key`.
    When the system prompt reads no column, the messages before the row's user
    prompt are the same for every row, so only the user template is rendered
    and the canonical JSON of :func:`~llmap.store.cache.request_key` is built
    around it, and the user template is rendered through Jinja2's public
    ``new_context(shared=True)`` with its globals merged in once (Jinja2 merges
    them per render otherwise): 5x faster. The first rows are checked against
    the general path; any difference or error turns the fast path off.
    """

    def __init__(self, renderer: Renderer, model: ModelSpec, schema: dict[str, Any], system_src: str | None) -> None:
        self.renderer = renderer
        self.model = model
        self.schema = schema
        static = system_src is None or not jinja2.meta.find_undeclared_variables(
            renderer.user.environment.parse(system_src))
        self.fast = static
        self._verify = _VERIFY_ROWS
        self._prefix = self._suffix = ""
        self._head_chars = 0
        self._ready = False
        self._globals = dict(renderer.user.globals)
        self._content = json.JSONEncoder(ensure_ascii=False).encode

    def _prepare(self, row: Mapping[str, Any]) -> None:
        head = self.renderer.messages(row)[:-1]
        m = self.model
        rest = _dumps({"model": m.name + "@" + (m.base_url or m.model_path or ""),
                       "params": {"temperature": m.temperature, "max_tokens": m.max_tokens},
                       "provider": m.provider, "schema": self.schema})
        self._prefix = '{"messages":[' + "".join(_dumps(x) + "," for x in head) + '{"content":'
        self._suffix = ',"role":"user"}],' + rest[1:]
        self._head_chars = sum(len(x["content"]) for x in head)
        self._ready = True

    def slow(self, row: Mapping[str, Any]) -> tuple[str, int]:
        msgs = self.renderer.messages(row)
        return AnswerCache.key(self.model, msgs, self.schema), sum(len(x["content"]) for x in msgs)

    def _fast(self, row: Mapping[str, Any]) -> tuple[str, int]:
        r = self.renderer
        u = r.user
        ctx = u.new_context({**self._globals, **(r.cut(row) if r.max_chars else row)}, shared=True)
        content = u.environment.concat(u.root_render_func(ctx))
        canonical = self._prefix + self._content(content) + self._suffix
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest(), self._head_chars + len(content)

    def __call__(self, row: Mapping[str, Any]) -> tuple[str, int]:
        if not self.fast:
            return self.slow(row)
        if not self._ready:
            self._prepare(row)
        if not self._verify:
            return self._fast(row)
        self._verify -= 1
        want = self.slow(row)
        try:
            got = self._fast(row)
        except Exception:
            got = None
        if got != want:
            self.fast = False
        return want


_JSON_SAFE = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_floating,
              pa.types.is_boolean, pa.types.is_null)


def _json_safe(schema: pa.Schema) -> bool:
    """Whether rows of this schema come back from the ledger's JSON unchanged (no dates, decimals, ...)."""
    return all(any(t(f.type) for t in _JSON_SAFE) for f in schema)


# -- the estimate ------------------------------------------------------------------------
def estimate(spec: JobSpec, *, limit: int | None = None, source: Source | None = None) -> Estimate:
    """Estimate rows, requests, tokens, USD and time of running the job now, sending nothing.

    Args:
        spec: the job; its ledger and the response cache are read if they exist.
        limit: optional cap on input rows, as ``llmap run --limit``.
        source: an input built by the caller (an in-memory table); default ``[input]``.

    Returns:
        An :class:`Estimate`; ``elapsed_s`` is how long the estimate took.

    Raises:
        SpecError: the input lacks a column the job names, ``where`` fails, or
            keys are empty or repeated (the same checks as a run's preflight).
    """
    started = time.perf_counter()
    model = spec.model
    compiled = compile_spec(spec)
    compiled.close()  # the cascade conditions are not evaluated here
    given = source
    source = build_source(spec, limit=limit, given=given)
    est = Estimate(pack=spec.prompt.pack)
    try:
        columns = check_input(spec, compiled, source).data_columns
        hist = _read_history(spec.ledger_path, model.label)
        est.ledger_found = hist is not None
        hist = hist or _History()
        probe = None
        cache_path = default_cache_dir() / FILE_NAME
        if not spec.cache.enabled:
            est.cache_source = "[cache] enabled = false"
        elif not cache_path.is_file():
            est.cache_source = "no response cache yet"
        else:
            probe = ResponseCache(cache_path, ttl_s=spec.cache.ttl_s, readonly=True)
            est.cache_source = f"response cache {cache_path}"
        try:
            calib_chars, calib_tokens, calib_rows = _walk(spec, compiled, source, columns, hist, probe, est)
        finally:
            if probe is not None:
                probe.close()
    finally:
        if given is None:
            source.close()
    if calib_tokens:
        est.chars_per_token = min(16.0, max(0.5, calib_chars / calib_tokens))
        est.chars_per_token_source = f"ledger ({calib_rows} done rows)"
    _cost_and_time(est, spec, hist)
    est.elapsed_s = time.perf_counter() - started
    return est


def _walk(spec: JobSpec, compiled: Compiled, source: Source, columns: list[str], hist: _History,
          probe: ResponseCache | None, est: Estimate) -> tuple[int, int, int]:
    """Sort every row into its bucket (see the module docstring); returns calibration (chars, tokens, rows)."""
    renderer = compiled.renderer
    schema = compiled.schema.json_schema
    variables = renderer.variables
    dumps_row = json.JSONEncoder(ensure_ascii=False, default=str).encode
    keys = _RequestKeys(renderer, spec.model, schema, spec.prompt.system)
    done, calib = hist.done, hist.calib
    seen_inputs: set[str] = set()  # input hashes already keyed: identical inputs render identical requests
    seen_keys: set[str] = set()
    waiting: list[tuple[str, int]] = []  # (cache key, prompt chars) to look up
    calib_chars = calib_tokens = calib_rows = 0

    def lookup() -> None:
        fresh = set(probe.get_many([k for k, _ in waiting], count_hits=False)) if probe is not None else set()
        for k, chars in waiting:
            if k in fresh:
                est.cached += 1
            else:
                est.to_request += 1
                est.prompt_chars += chars
        waiting.clear()

    last_schema, roundtrip = None, False
    for r in keyed_rows(spec, compiled, source, columns):
        est.rows += 1
        if r.batch_schema is not last_schema:
            last_schema, roundtrip = r.batch_schema, not _json_safe(r.batch_schema)
        key, row, inputs, h = r.key, r.row, r.inputs, r.input_hash
        if done.get(key) == h:
            est.done += 1
            if calib_rows < _CALIBRATION_ROWS and key in calib:
                calib_rows += 1
                calib_tokens += calib[key]
                calib_chars += keys(json.loads(dumps_row(row)) if roundtrip else row)[1]
            continue
        if variables and all(v is None or v == "" for v in inputs.values()):
            est.skipped += 1
            continue
        if h in seen_inputs:
            est.duplicates += 1
            continue
        seen_inputs.add(h)
        # The dispatcher renders the row as stored in the ledger: JSON text, read back.
        ckey, chars = keys(json.loads(dumps_row(row)) if roundtrip else row)
        if ckey in seen_keys:
            est.duplicates += 1
            continue
        seen_keys.add(ckey)
        waiting.append((ckey, chars))
        if len(waiting) >= _LOOKUP_BATCH:
            lookup()
    lookup()
    return calib_chars, calib_tokens, calib_rows


def _cascade(models: Sequence[ModelSpec]) -> list[ModelSpec]:
    """The models rows may escalate to: each one after a model with ``escalate_if``."""
    out = []
    for prev, nxt in zip(models, models[1:], strict=False):
        if prev.escalate_if is None:
            break
        out.append(nxt)
    return out


def _model_cost(m: ModelSpec, role: str, rows: int, requests: int, prompt_tokens: int, hist: _History) -> ModelCost:
    per_row = hist.completion.get(m.label)
    src = "past runs" if per_row is not None else "max_tokens"
    per_row = per_row if per_row is not None else float(m.max_tokens)
    completion = round(per_row * rows)
    cost = (prompt_tokens * m.price_in + completion * m.price_out) / 1e6
    return ModelCost(m.label, role, requests, prompt_tokens, completion, per_row, src, m.price_in, m.price_out, cost)


def _cost_and_time(est: Estimate, spec: Any, hist: _History) -> None:
    model, limits = spec.model, spec.limits
    pack = spec.prompt.pack
    n = est.to_request
    est.requests = math.ceil(n / pack) if isinstance(pack, int) else n
    est.prompt_tokens = math.ceil(est.prompt_chars / est.chars_per_token) if est.prompt_chars else 0
    primary = _model_cost(model, "primary", n, est.requests, est.prompt_tokens, hist)
    est.models = [primary]
    est.completion_tokens, est.completion_source = primary.completion_tokens, primary.completion_source
    est.cost_usd = est.cost_upper_usd = primary.cost_usd
    for m in _cascade(spec.models):
        step = _model_cost(m, "escalation", n, n, est.prompt_tokens, hist)
        est.models.append(step)
        est.cost_upper_usd += step.cost_usd

    # time on the primary model
    est.rpm = model.rpm or limits.rpm
    est.tpm = model.tpm or limits.tpm
    if model.label in hist.latency:
        est.latency_s, est.latency_source = hist.latency[model.label], "past runs"
    else:
        est.latency_s, est.latency_source = DEFAULT_LATENCY_S, "assumed"
    if model.provider == "local":
        est.concurrency, est.concurrency_source = 1, "local model: one request at a time"
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
    notes = ["re-asks, retries and hedged requests are not counted"]
    pack = spec.prompt.pack
    if pack == "auto":
        notes.append('pack = "auto": the size is picked during the run; requests are counted one per row '
                     "(an upper bound)")
    elif pack > 1:
        notes.append(f"pack = {pack}: {pack} rows per request; prompt tokens are the unpacked sum "
                     "(a pack sends the system prompt once, so roughly the same or less)")
    if len(est.models) > 1:
        notes.append("cascade: later models are costed as if every row escalated (an upper bound); "
                     "time is for the primary model only")
    failover = len(spec.models) - len(est.models)
    if failover > 0:
        notes.append(f"{failover} failover model(s) answer only when the one before fails: not costed")
    if spec.input.per_group is not None:
        notes.append("[input] per_group may stop a group early: rows are counted as if it did not")
    if spec.limits.max_cost_usd is not None and est.cost_usd > spec.limits.max_cost_usd:
        notes.append(f"the run would stop at [limits] max_cost_usd = {spec.limits.max_cost_usd:g}")
    if spec.limits.max_tokens is not None and est.prompt_tokens + est.completion_tokens > spec.limits.max_tokens:
        notes.append(f"the run would stop at [limits] max_tokens = {spec.limits.max_tokens}")
    return notes
