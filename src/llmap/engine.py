"""The engine: wires Source -> Planner -> Dispatcher -> Parser -> Ledger -> Sink.

1. **Preflight** (:meth:`Job.prepare`): the spec, the input's header, the
   ``where`` expression, keys, the output path, the API key and the model
   endpoint are all checked before any request is sent. Any problem is a
   :class:`~llmap.errors.SpecError` (CLI exit 2).
2. **Plan**: rows stream from the source in Arrow batches into the ledger.
   A row already ``done`` with the same input hash stays done.
3. **Dispatch**: pending rows page out of the ledger into a bounded queue;
   ``limits.concurrency`` workers render, call the provider, validate, re-ask
   and fail over; one writer commits results in batches. A row counts only
   after its result is committed.
4. **Export**: the output file is written from the ledger.

Memory does not grow with the input: every stage is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from llmap import errors as E
from llmap.control.alerts import FailureRateAlert
from llmap.control.breaker import BreakerState
from llmap.control.route import MAX_CONCURRENCY, Lane
from llmap.dispatch import Dispatcher, DispatchStats
from llmap.io.sinks import ResultLayout, check_writable, export, result_batches
from llmap.io.sources import Source
from llmap.logs import JsonLog
from llmap.packer import Packer
from llmap.pool import run_pool
from llmap.prompt.render import Renderer
from llmap.prompt.schema import OutputSchema
from llmap.providers.base import Provider
from llmap.report import NullProgress, Progress, Tally
from llmap.spec import JobSpec, ModelSpec, load_spec
from llmap.store.answers import AnswerCache
from llmap.store.cache import ResponseCache
from llmap.store.ledger import Ledger, PlannedRow, RowResult

__all__ = ["Job", "RunResult", "make_provider"]



def make_provider(spec: ModelSpec, *, concurrency: int | None) -> Provider:
    """Build the provider for one ``[model]`` entry.

    Args:
        spec: the ``[model]`` table.
        concurrency: ``[limits] concurrency``, or None when unset (adaptive for
            HTTP providers; the default process count for ``local``).

    Raises:
        SpecError: a missing API key variable, missing local-model packages or model file.
    """
    if spec.provider == "openai":
        from llmap.providers.openai import OpenAIProvider

        return OpenAIProvider(spec, concurrency=concurrency or MAX_CONCURRENCY)
    from llmap.providers.local import LocalProvider

    return LocalProvider(spec, processes=concurrency)


@dataclass
class RunResult:
    """What a run did.

    Attributes:
        counts: rows per status in this run's plan (``pending``/``done``/``failed``/``skipped``).
        output_path: the exported file, or None when nothing was exported.
        exit_code: 0 every row done, skipped or fallback; 1 some rows failed or the run stopped early.
        stop_reason: why dispatch stopped early (a fatal provider error or a budget cap), or None.
        requests: requests sent in this run.
        prompt_tokens, completion_tokens: tokens spent in this run.
        elapsed_s: wall time of the run in seconds.
        cost_usd: USD spent in this run at the models' prices.
        rate_limited: 429 answers in this run.
        retries: attempts after the first, summed over rows and models.
    """

    counts: dict[str, int]
    output_path: Path | None
    exit_code: int
    stop_reason: str | None = None
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    cost_usd: float = 0.0
    rate_limited: int = 0
    retries: int = 0


@dataclass
class _Prepared:
    source: Source
    renderer: Renderer
    schema: OutputSchema
    providers: list[Provider]
    data_columns: list[str]
    layout: ResultLayout
    fingerprint: str


def _key_text(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v)


class Job:
    """One job: a spec plus its ledger.

    Args:
        spec: a validated :class:`~llmap.spec.JobSpec`.
        source: optional pre-built source (e.g. an Arrow table for
            :func:`llmap.map`); by default built from ``spec.input``.
    """

    def __init__(self, spec: JobSpec, *, source: Source | None = None) -> None:
        self.spec = spec
        self._source = source
        self._log: JsonLog | None = None
        self._on_start: Callable[[DispatchStats, Tally, list[Lane]], None] | None = None

    @classmethod
    def from_toml(cls, path: str | Path) -> Job:
        """Load and validate a job file. Raises :class:`~llmap.errors.SpecError`."""
        return cls(load_spec(path))

    # -- preflight ------------------------------------------------------------
    def _build_source(self, limit: int | None) -> Source:
        inp = self.spec.input
        lim = limit if limit is not None else inp.limit
        if self._source is not None:
            self._source.limit = lim
            return self._source
        if inp.sql is not None:
            return Source.from_sql(inp.sql, base_dir=self.spec.base_dir, where=inp.where, limit=lim,
                                   order_by=inp.order_by)
        return Source.from_path(self.spec.resolve(inp.path), where=inp.where, limit=lim, order_by=inp.order_by)

    def _check_columns(self, source: Source, renderer: Renderer) -> list[str]:
        spec = self.spec
        needed: list[tuple[str, str]] = []
        if spec.input.key:
            needed.append((spec.input.key, "[input] key"))
        needed += [(v, "[prompt] template") for v in renderer.variables]
        needed += [(c, "[output] keep") for c in spec.output.keep]
        for i, ex in enumerate(spec.prompt.examples, 1):
            needed += [(c, f"[prompt] examples #{i}") for c in ex.input]
        group = [spec.input.per_group.column] if spec.input.per_group else []
        needed += [(c, "[input] per_group") for c in group]
        needed += [(c, "[input] max_chars") for c in spec.input.max_chars]
        source.require_columns(needed)
        source.check_where()
        key = [spec.input.key] if spec.input.key else []
        return list(dict.fromkeys(key + list(renderer.variables) + list(spec.output.keep) + group))

    def _check_keys(self, source: Source) -> None:
        key = self.spec.input.key
        if not key:
            return
        nulls = source.null_keys(key)
        if nulls:
            raise E.InputError(
                f"key column {key!r} is empty in {nulls} row(s) of {source.label}; fill it, filter those rows "
                "with [input] where, or choose another [input] key"
            )
        dup = source.first_duplicate(key)
        if dup is not None:
            raise E.InputError(
                f"key {key!r} is not unique: {_key_text(dup[0])!r} appears {dup[1]} times in {source.label}; "
                "choose a unique [input] key, or drop it to key rows by row number"
            )

    async def prepare(self, *, limit: int | None = None, check_output: bool = True) -> _Prepared:
        """Run every check that needs no paid request. Raises :class:`~llmap.errors.SpecError`."""
        spec = self.spec
        renderer = Renderer.from_spec(spec.prompt, max_chars=spec.input.max_chars)
        schema = OutputSchema(spec.output.fields)
        source = self._build_source(limit)
        data_columns = self._check_columns(source, renderer)
        self._check_keys(source)
        shown = [c for c in ([spec.input.key] if spec.input.key else []) + list(spec.output.keep)]
        shown = list(dict.fromkeys(shown))
        key_schema = source.arrow_schema(shown)
        if not spec.input.key:
            key_schema = pa.schema([pa.field("_row", pa.int64())] + list(key_schema))
        layout = ResultLayout(key_schema, {n: f.type for n, f in spec.output.fields.items()})
        if check_output:
            check_writable(spec.output_path)
        providers = [make_provider(m, concurrency=spec.limits.concurrency) for m in spec.models]
        try:
            for p in providers:
                await p.check()
        except BaseException:
            for p in providers:
                await p.aclose()
            raise
        return _Prepared(source, renderer, schema, providers, data_columns, layout, spec.request_fingerprint())

    # -- plan -----------------------------------------------------------------
    def _plan(self, ledger: Ledger, run_id: int, prep: _Prepared) -> None:
        key_col = self.spec.input.key
        variables = prep.renderer.variables
        fp = prep.fingerprint.encode()
        seq = -1
        for batch in prep.source.batches(prep.data_columns):
            planned = []
            for row in batch.to_pylist():
                seq += 1
                if key_col:
                    key = _key_text(row[key_col])
                else:
                    key = str(seq)
                    row["_row"] = seq
                inputs = {v: row[v] for v in variables}
                h = hashlib.sha256(fp + json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
                data = json.dumps(row, ensure_ascii=False, default=str)
                cut = prep.renderer.truncated_columns(row) if prep.renderer.max_chars else None
                truncated = json.dumps(cut) if cut else None
                if variables and all(v is None or v == "" for v in inputs.values()):
                    planned.append(PlannedRow(key, seq, h, data, "skipped", "every template input is empty", truncated))
                else:
                    planned.append(PlannedRow(key, seq, h, data, truncated=truncated))
            ledger.plan(run_id, planned)

    # -- run ------------------------------------------------------------------
    def run(self, *, limit: int | None = None, fresh: bool = False, progress: Progress | None = None,
            export_output: bool = True, log: JsonLog | None = None,
            on_start: Callable[[DispatchStats, Tally, list[Lane]], None] | None = None) -> RunResult:
        """Run the job to completion (sync wrapper over :meth:`arun`).

        Args:
            limit: at most this many rows (overrides ``[input] limit``).
            fresh: forget the ledger's rows first.
            progress: a progress reporter (default: none).
            export_output: write ``[output] path`` at the end.
            log: a structured event log (``--log-json``), or None.
            on_start: called once dispatch starts with the live counters and lanes
                (e.g. to serve metrics).

        Raises:
            SpecError: bad spec or input; nothing was sent.
            RunInterrupted: Ctrl-C or SIGTERM; committed rows are kept.
        """
        return asyncio.run(self.arun(limit=limit, fresh=fresh, progress=progress, export_output=export_output,
                                     log=log, on_start=on_start))

    async def arun(self, *, limit: int | None = None, fresh: bool = False, progress: Progress | None = None,
                   export_output: bool = True, log: JsonLog | None = None,
                   on_start: Callable[[DispatchStats, Tally, list[Lane]], None] | None = None) -> RunResult:
        """Run the job in the current event loop. See :meth:`run`."""
        progress = progress or NullProgress()
        if log is not None:
            progress = _Logged(progress, log)
        self._log, self._on_start = log, on_start
        started = time.monotonic()
        prep = await self.prepare(limit=limit, check_output=export_output)
        self.last_layout = prep.layout
        ledger = Ledger(self.spec.ledger_path)
        stats = DispatchStats()
        run_id = None
        planned = False
        counts: dict[str, int] = {}
        tally: Tally | None = None
        reason = "complete"
        try:
            if fresh:
                ledger.reset()
            run_id = ledger.start_run(prep.fingerprint)
            ledger.set_meta("output_schema", prep.layout.schema.serialize().to_pybytes())
            ledger.set_meta("data_columns", json.dumps(prep.data_columns + ([] if self.spec.input.key else ["_row"])))
            self._plan(ledger, run_id, prep)
            planned = True
            prep.source.close()  # the ledger holds the work now: give DuckDB's buffers back before dispatch
            c = ledger.counts(run_id)
            tally = Tally(total=sum(c.values()), done=c["done"], failed=c["failed"], skipped=c["skipped"],
                          fallback=c["fallback"])
            progress.start(tally)
            try:
                await self._dispatch(ledger, run_id, prep, stats, tally, progress)
            except asyncio.CancelledError:
                reason = "interrupted"
                raise E.RunInterrupted(
                    "interrupted; finished rows are kept in the ledger, run the same command again to continue"
                ) from None
            finally:
                progress.finish(tally)
            if stats.stop_reason is not None:
                reason = f"stopped: {stats.stop_reason}"
        finally:
            for p in prep.providers:
                with contextlib.suppress(Exception):
                    await p.aclose()
            out = None
            if run_id is not None:
                ledger.end_run(run_id, exit_reason=reason, requests=stats.requests,
                               prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
                               cost_usd=stats.cost_usd, rate_limited=stats.rate_limited, retries=stats.retries,
                               cached=tally.cache_hits if tally else 0, by_model=stats.by_model)
                if export_output and planned:
                    out = self.spec.output_path
                    export(result_batches(ledger, run_id, prep.layout), prep.layout.schema, out)
                counts = ledger.counts(run_id)
                if reason == "complete" and counts["pending"] == 0 and counts["failed"] == 0:
                    self._mark_complete(ledger)
            ledger.close()
        stop = None
        if stats.stop_reason is not None:
            stop = f"{stats.stop_reason}; fix it and run again: finished rows are kept"
        exit_code = 0 if counts["failed"] == 0 and counts["pending"] == 0 and stop is None else 1
        return RunResult(counts, out, exit_code, stop, stats.requests, stats.prompt_tokens,
                         stats.completion_tokens, time.monotonic() - started, stats.cost_usd, stats.rate_limited,
                         stats.retries)

    def _settled_hook(self, stats: DispatchStats, prep: _Prepared) -> Callable[[list[RowResult], list[str]], None]:
        """Alerts and structured row logs, run on every batch of settled rows."""
        alerts = self.spec.alerts
        alert = FailureRateAlert(alerts.max_failure_rate, alerts.window) if alerts.max_failure_rate is not None else None
        log = self._log

        def hook(results: list[RowResult], datas: list[str]) -> None:
            for r, data in zip(results, datas, strict=True):
                if log is not None:
                    messages = prep.renderer.messages(json.loads(data)) if log.log_prompts else None
                    log.row(r, messages)
                if alert is not None and r.status in ("done", "failed") and alert.observe(r.status == "failed"):
                    stats.halt(alert.message())

        return hook

    def _mark_complete(self, ledger: Ledger) -> None:
        """Record what ``llmap run --if-changed`` compares against (see :mod:`llmap.status`)."""
        from llmap.status import completion_fingerprint

        fingerprint = completion_fingerprint(self.spec, ledger.connection)
        at = time.strftime("%Y-%m-%d %H:%M:%S")
        ledger.set_meta("complete", json.dumps({"fingerprint": fingerprint, "at": at}))

    async def _dispatch(self, ledger: Ledger, run_id: int, prep: _Prepared, stats: DispatchStats, tally: Tally,
                        progress: Progress) -> None:
        spec = self.spec

        def on_breaker(lane: Lane, old: BreakerState, new: BreakerState) -> None:
            if new is BreakerState.OPEN:
                progress.message(f"llmap: circuit breaker for {lane.label} opened; "
                                 + ("failing over" if len(prep.providers) > 1 else "pausing requests to it"))
            elif new is BreakerState.CLOSED and old is not BreakerState.CLOSED:
                progress.message(f"llmap: {lane.label} answers again; circuit breaker closed")

        lanes = [Lane(i, p, m, spec.limits, on_breaker=on_breaker)
                 for i, (p, m) in enumerate(zip(prep.providers, spec.models, strict=True))]
        stats.on_halt = lambda reason: progress.message(
            f"llmap: stopping: {reason}; requests in flight will finish, progress is kept")
        cache = ResponseCache(ttl_s=spec.cache.ttl_s) if spec.cache.enabled else None
        try:
            dispatcher = Dispatcher(lanes, prep.renderer, prep.schema, spec.limits,
                                    max_reask=spec.output.max_reask, fallback=spec.output.fallback, stats=stats,
                                    answers=AnswerCache(cache))
            packer = None
            if spec.prompt.pack != 1:
                packer = Packer(dispatcher, spec.prompt.pack, draining=lambda: dispatcher.draining())
            per_group = spec.input.per_group
            if self._log is not None:
                stats.on_request = self._log.request
            if self._on_start is not None:
                self._on_start(stats, tally, lanes)
            await run_pool(ledger, run_id, dispatcher, stats, tally, progress,
                           quota=(per_group.column, per_group.n) if per_group else None, packer=packer,
                           on_settled=self._settled_hook(stats, prep))
        finally:
            if cache is not None:
                cache.close()


class _Logged:
    """A progress reporter that also writes its messages to the structured log."""

    def __init__(self, inner: Progress, log: JsonLog) -> None:
        self.inner, self.log = inner, log

    def start(self, tally: Tally) -> None:
        self.inner.start(tally)

    def advance(self, tally: Tally) -> None:
        self.inner.advance(tally)
        self.log.flush()

    def message(self, text: str) -> None:
        self.inner.message(text)
        self.log.message(text)

    def finish(self, tally: Tally) -> None:
        self.inner.finish(tally)
        self.log.flush()
