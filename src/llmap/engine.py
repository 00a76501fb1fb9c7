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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from llmap import errors as E
from llmap.control.breaker import BreakerState
from llmap.control.route import MAX_CONCURRENCY, Lane
from llmap.dispatch import Dispatcher, DispatchStats, Stop, install_sigterm
from llmap.io.sinks import ResultLayout, check_writable, export, result_batches
from llmap.io.sources import Source
from llmap.prompt.render import Renderer
from llmap.prompt.schema import OutputSchema
from llmap.providers.base import Provider
from llmap.report import NullProgress, Progress, Tally
from llmap.spec import JobSpec, ModelSpec, load_spec
from llmap.store.ledger import Ledger, PlannedRow, RowResult

__all__ = ["Job", "RunResult", "StatusReport", "job_export", "job_status", "make_provider"]

#: Rows committed to the ledger per transaction (results are also flushed every ``_FLUSH_S``).
_COMMIT_ROWS = 256
_FLUSH_S = 0.25


def make_provider(spec: ModelSpec, *, concurrency: int) -> Provider:
    """Build the provider for one ``[model]`` entry.

    Raises:
        SpecError: a missing API key variable, missing local-model packages or model file.
    """
    if spec.provider == "openai":
        from llmap.providers.openai import OpenAIProvider

        return OpenAIProvider(spec, concurrency=concurrency)
    from llmap.providers.local import LocalProvider

    return LocalProvider(spec)


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
            return Source.from_sql(inp.sql, base_dir=self.spec.base_dir, where=inp.where, limit=lim)
        return Source.from_path(self.spec.resolve(inp.path), where=inp.where, limit=lim)

    def _check_columns(self, source: Source, renderer: Renderer) -> list[str]:
        spec = self.spec
        needed: list[tuple[str, str]] = []
        if spec.input.key:
            needed.append((spec.input.key, "[input] key"))
        needed += [(v, "[prompt] template") for v in renderer.variables]
        needed += [(c, "[output] keep") for c in spec.output.keep]
        for i, ex in enumerate(spec.prompt.examples, 1):
            needed += [(c, f"[prompt] examples #{i}") for c in ex.input]
        source.require_columns(needed)
        source.check_where()
        cols: list[str] = []
        for c in ([spec.input.key] if spec.input.key else []) + list(renderer.variables) + list(spec.output.keep):
            if c not in cols:
                cols.append(c)
        return cols

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
        renderer = Renderer.from_spec(spec.prompt)
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
        providers = [make_provider(m, concurrency=spec.limits.concurrency or MAX_CONCURRENCY) for m in spec.models]
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
                if variables and all(v is None or v == "" for v in inputs.values()):
                    planned.append(PlannedRow(key, seq, h, data, "skipped", "every template input is empty"))
                else:
                    planned.append(PlannedRow(key, seq, h, data))
            ledger.plan(run_id, planned)

    # -- run ------------------------------------------------------------------
    def run(self, *, limit: int | None = None, fresh: bool = False, progress: Progress | None = None,
            export_output: bool = True) -> RunResult:
        """Run the job to completion (sync wrapper over :meth:`arun`).

        Raises:
            SpecError: bad spec or input; nothing was sent.
            RunInterrupted: Ctrl-C or SIGTERM; committed rows are kept.
        """
        return asyncio.run(self.arun(limit=limit, fresh=fresh, progress=progress, export_output=export_output))

    async def arun(self, *, limit: int | None = None, fresh: bool = False, progress: Progress | None = None,
                   export_output: bool = True) -> RunResult:
        """Run the job in the current event loop. See :meth:`run`."""
        progress = progress or NullProgress()
        started = time.monotonic()
        prep = await self.prepare(limit=limit, check_output=export_output)
        self.last_layout = prep.layout
        ledger = Ledger(self.spec.ledger_path)
        stats = DispatchStats()
        run_id = None
        planned = False
        counts: dict[str, int] = {}
        reason = "complete"
        try:
            if fresh:
                ledger.reset()
            run_id = ledger.start_run(prep.fingerprint)
            ledger.set_meta("output_schema", prep.layout.schema.serialize().to_pybytes())
            ledger.set_meta("data_columns", json.dumps(prep.data_columns + ([] if self.spec.input.key else ["_row"])))
            self._plan(ledger, run_id, prep)
            planned = True
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
                               cost_usd=stats.cost_usd, rate_limited=stats.rate_limited, retries=stats.retries)
                if export_output and planned:
                    out = self.spec.output_path
                    export(result_batches(ledger, run_id, prep.layout), prep.layout.schema, out)
                counts = ledger.counts(run_id)
            ledger.close()
        stop = None
        if stats.stop_reason is not None:
            stop = f"{stats.stop_reason}; fix it and run again: finished rows are kept"
        exit_code = 0 if counts["failed"] == 0 and counts["pending"] == 0 and stop is None else 1
        return RunResult(counts, out, exit_code, stop, stats.requests, stats.prompt_tokens,
                         stats.completion_tokens, time.monotonic() - started, stats.cost_usd, stats.rate_limited,
                         stats.retries)

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
        dispatcher = Dispatcher(lanes, prep.renderer, prep.schema, spec.limits, max_reask=spec.output.max_reask,
                                fallback=spec.output.fallback, stats=stats)
        # Rows waiting out a backoff hold a worker but no request slot: keep more workers than slots.
        n_workers = min(1024, 2 * max(lane.max_in_flight for lane in lanes))
        todo: asyncio.Queue = asyncio.Queue(maxsize=n_workers * 2)
        buffer: list[RowResult] = []

        def flush() -> None:
            if not buffer:
                return
            ledger.record(buffer)  # durable before it counts
            for r in buffer:
                setattr(tally, r.status, getattr(tally, r.status) + 1)
            buffer.clear()
            tally.requests = stats.requests
            tally.prompt_tokens, tally.completion_tokens = stats.prompt_tokens, stats.completion_tokens
            tally.cost_usd, tally.rate_limited = stats.cost_usd, stats.rate_limited
            progress.advance(tally)

        handed_out = asyncio.Event()
        dispatcher.draining = lambda: handed_out.is_set() and todo.qsize() <= n_workers

        async def producer() -> None:
            after = -1
            while not stats.stop.is_set():
                page = ledger.pending(run_id, after_seq=after, limit=512)
                if not page:
                    break
                for seq, key, data in page:
                    await todo.put((key, data))
                    after = seq
            handed_out.set()
            for _ in range(n_workers):
                await todo.put(None)

        async def worker() -> None:
            while (item := await todo.get()) is not None:
                if stats.stop.is_set():
                    continue  # keep draining so the producer never blocks; the row stays pending
                key, data = item
                try:
                    buffer.append(await dispatcher.solve(key, json.loads(data)))
                except Stop:
                    continue
                if len(buffer) >= _COMMIT_ROWS:
                    flush()

        async def ticker() -> None:
            while True:
                await asyncio.sleep(_FLUSH_S)
                flush()

        prod = asyncio.create_task(producer())
        workers = [asyncio.create_task(worker()) for _ in range(n_workers)]
        helpers = [asyncio.create_task(ticker()), asyncio.create_task(dispatcher.watchdog())]
        undo_sigterm = install_sigterm(asyncio.current_task())
        try:
            results = await asyncio.gather(prod, *workers, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        except asyncio.CancelledError:
            for t in (prod, *workers):
                t.cancel()
            await asyncio.gather(prod, *workers, return_exceptions=True)
            raise
        finally:
            for t in helpers:
                t.cancel()
            undo_sigterm()
            flush()


# -- reading a job's ledger (status, export) ------------------------------------


@dataclass
class StatusReport:
    """Rows per status, overall and optionally per group.

    Attributes:
        total: status -> rows, over the latest run's plan.
        by: the grouping column, or None.
        groups: group value -> (status -> rows), sorted by group value.
        ledger_path: the ledger that was read.
    """

    total: dict[str, int]
    by: str | None
    groups: dict[Any, dict[str, int]]
    ledger_path: Path


def _open_ledger(spec: JobSpec) -> tuple[Ledger, int]:
    path = spec.ledger_path
    if not path.is_file():
        raise E.SpecError(f"job {spec.name!r} has no ledger at {str(path)!r} yet; run `llmap run` on it first")
    ledger = Ledger(path)
    plan = ledger.latest_plan()
    if plan is None:
        ledger.close()
        raise E.SpecError(f"job {spec.name!r} has no planned rows yet; run `llmap run` on it first")
    return ledger, plan


def job_status(job: Job, by: str | None = None) -> StatusReport:
    """Counts per status from the ledger, optionally grouped by an input column.

    A column the ledger stores (key, template variables, ``keep``) is grouped
    there; any other input column is read from the input (key + column only).

    Raises:
        SpecError: no ledger yet, or ``by`` is not an input column.
    """
    from llmap.store.ledger import STATUSES

    ledger, plan = _open_ledger(job.spec)
    try:
        total = ledger.counts(plan)
        groups: dict[Any, dict[str, int]] = {}
        if by:
            stored = json.loads(ledger.get_meta("data_columns") or "[]")
            if by in stored:
                for g, status, n in ledger.grouped_counts(plan, by):
                    groups.setdefault(g, dict.fromkeys(STATUSES, 0))[status] = n
            else:
                groups = _group_from_source(job, ledger, plan, by)
    finally:
        ledger.close()
    ordered = dict(sorted(groups.items(), key=lambda kv: (kv[0] is None, str(kv[0]))))
    return StatusReport(total, by, ordered, job.spec.ledger_path)


def _group_from_source(job: Job, ledger: Ledger, plan: int, by: str) -> dict[Any, dict[str, int]]:
    from llmap.store.ledger import STATUSES

    spec = job.spec
    source = job._build_source(None)
    key = spec.input.key
    source.require_columns([(by, "--by")] + ([(key, "[input] key")] if key else []))
    status_of = dict(ledger.statuses(plan))
    groups: dict[Any, dict[str, int]] = {}
    seq = -1
    cols = [key, by] if key else [by]
    for batch in source.batches(cols):
        for row in batch.to_pylist():
            seq += 1
            k = _key_text(row[key]) if key else str(seq)
            st = status_of.get(k)
            if st is not None:
                groups.setdefault(row[by], dict.fromkeys(STATUSES, 0))[st] += 1
    return groups


def job_export(job: Job, path: Path | None = None) -> tuple[Path, int]:
    """Export the latest run's rows from the ledger to ``path`` (default ``[output] path``).

    Returns:
        (the written path, rows written).

    Raises:
        SpecError: no ledger yet, or an unsupported extension.
    """
    ledger, plan = _open_ledger(job.spec)
    try:
        schema = pa.ipc.read_schema(pa.py_buffer(ledger.get_meta("output_schema")))
        layout = ResultLayout.from_schema(schema, {n: f.type for n, f in job.spec.output.fields.items()})
        out = path or job.spec.output_path
        n = export(result_batches(ledger, plan, layout), layout.schema, out)
    finally:
        ledger.close()
    return out, n
