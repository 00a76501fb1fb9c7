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
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmap import errors as E
from llmap.control.breaker import BreakerState
from llmap.control.lanes import Lane
from llmap.io.sinks import check_writable, export, result_batches
from llmap.io.sources import Source
from llmap.observe.logs import JsonLog, LoggedProgress, settled_hook
from llmap.observe.progress import NullProgress, Progress, Tally
from llmap.operators.runner import check_kind_executor, finish_operator, prepare_operator, run_operator
from llmap.plan import (
    Compiled,
    InputPlan,
    build_source,
    check_input,
    compile_spec,
    keyed_rows,
    load_spec,
)
from llmap.providers.base import Provider
from llmap.providers.factory import make_provider
from llmap.run.dispatch import Dispatcher
from llmap.run.packer import Packer
from llmap.run.pool import run_pool
from llmap.run.stats import DispatchStats
from llmap.spec import JobSpec
from llmap.store.answers import AnswerCache
from llmap.store.batches import BatchBook
from llmap.store.cache import FILE_NAME as CACHE_FILE
from llmap.store.cache import ResponseCache, default_cache_dir
from llmap.store.diskfull import guard
from llmap.store.fingerprint import completion_fingerprint
from llmap.store.ledger import Ledger, PlannedRow, RowResult
from llmap.store.lock import LedgerLock

if TYPE_CHECKING:
    from llmap.run.ray.launch import Launch

__all__ = ["Job", "Prepared", "RunResult", "require_no_running_loop"]

#: Rows planned into the ledger per transaction.
PLAN_ROWS = 2048


def require_no_running_loop(call: str, instead: str) -> None:
    """Refuse a blocking call made inside a running event loop (Jupyter, async code).

    Raises:
        EventLoopRunning: a loop runs in this thread; the message says to use ``instead``.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise E.EventLoopRunning(
        f"{call} cannot run inside a running event loop (Jupyter, async code); use `{instead}` there"
    )


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
        cache_read_tokens: prompt tokens read from the providers' prompt caches in this run.
        rate_limited: 429 answers in this run.
        retries: attempts after the first, summed over rows and models.
        batches: provider ids of the job's batches still running at the end (``[model] batch``).
        detached: the run submitted its batches and returned without waiting (``--detach``).
        operator: the figures of the job's operator (:func:`llmap.operators.runner.summary_line`), None for map.
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
    cache_read_tokens: int = 0
    batches: tuple[str, ...] = ()
    detached: bool = False
    operator: dict[str, Any] | None = None


@dataclass
class Prepared:
    """What preflight (:meth:`Job.prepare`) hands to the run. It holds open resources: the run
    closes them, and a caller that only checks a job closes them with :meth:`aclose`.

    Attributes:
        source: the input, opened (DuckDB), projected to the columns the job reads.
        compiled: the compiled job: renderer, output schema, bound ``escalate_if`` (:mod:`llmap.plan`).
        input: the input's checked plan: data columns, key, output layout.
        providers: one checked provider per ``[[model]]`` (endpoints reached, keys read, the local
            model loaded); embedder: a cluster or resolve job's checked embedding model, else None.
    """

    source: Source
    compiled: Compiled
    input: InputPlan
    providers: list[Provider]
    embedder: Any = None

    async def aclose(self) -> None:
        """Close the providers, the compiled job and the input (errors on the way are ignored)."""
        for p in [*self.providers, *([self.embedder] if self.embedder is not None else [])]:
            with contextlib.suppress(Exception):
                await p.aclose()
        if self.compiled.documents is not None:
            await self.compiled.documents.aclose()
        self.compiled.close()
        with contextlib.suppress(Exception):
            self.source.close()


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
        self._executor = "local"
        self._launch: Launch | None = None  # Ray workers starting, until dispatch takes them
        self._detach = False
        self._on_start: Callable[[DispatchStats, Tally, list[Lane]], None] | None = None
        self._op_summary: dict[str, Any] | None = None
        self._ray: tuple[int | None, str | None] = (None, "auto")  # Ray's workers and address (a [cascade]'s phases)

    @classmethod
    def from_toml(cls, path: str | Path) -> Job:
        """Load and validate a job file. Raises :class:`~llmap.errors.SpecError`."""
        return cls(load_spec(path))

    # -- preflight ------------------------------------------------------------
    async def prepare(self, *, limit: int | None = None, check_output: bool = True) -> Prepared:
        """Run every check that needs no paid request (:mod:`llmap.plan`, the output path, the providers).

        Args:
            limit: at most this many rows (overrides ``[input] limit``).
            check_output: also check that ``[output] path`` can be written.

        Returns:
            The checked job, with its resources open (close it with :meth:`Prepared.aclose` unless
            the run takes it over).

        Raises:
            SpecError: the first problem, as one line naming the fix (CLI exit 2); nothing was sent
                and nothing is left open.
        """
        spec = self.spec
        compiled = compile_spec(spec)
        providers: list[Provider] = []
        try:
            source = build_source(spec, limit=limit, given=self._source)
            inp = check_input(spec, compiled, source)
            if check_output:
                check_writable(spec.output_path)
            providers = [make_provider(m, concurrency=spec.limits.concurrency) for m in spec.models]
            for p in providers:
                await p.check()
            if compiled.documents is not None:  # the first rows' documents can be read
                await compiled.documents.preflight(source)
            inp, embedder = await prepare_operator(spec, source, inp)  # map: unchanged, no embedding model
        except BaseException:
            for p in providers:
                with contextlib.suppress(Exception):
                    await p.aclose()
            if compiled.documents is not None:
                await compiled.documents.aclose()
            compiled.close()
            raise
        return Prepared(source, compiled, inp, providers, embedder)

    # -- plan -----------------------------------------------------------------
    def _plan(self, ledger: Ledger, run_id: int, prep: Prepared) -> None:
        renderer = prep.compiled.renderer
        variables = renderer.variables
        planned: list[PlannedRow] = []
        dumps = json.JSONEncoder(ensure_ascii=False, default=str).encode  # json.dumps(..., same), built once
        for r in keyed_rows(self.spec, prep.compiled, prep.source, prep.input.data_columns):
            data = dumps(r.row)
            cut = renderer.truncated_columns(r.row) if renderer.max_chars else None
            truncated = json.dumps(cut) if cut else None
            vals = r.inputs.values()  # every input empty: first the cheap test that one is
            if variables and (None in vals or "" in vals) and all(v is None or v == "" for v in vals):
                planned.append(PlannedRow(r.key, r.seq, r.input_hash, data, "skipped", "every template input is empty",
                                          truncated))
            else:
                planned.append(PlannedRow(r.key, r.seq, r.input_hash, data, truncated=truncated))
            if len(planned) >= PLAN_ROWS:
                ledger.plan(run_id, planned)
                planned = []
        if planned:
            ledger.plan(run_id, planned)

    # -- run ------------------------------------------------------------------
    def run(self, *, limit: int | None = None, fresh: bool = False, progress: Progress | None = None,
            export_output: bool = True, log: JsonLog | None = None,
            on_start: Callable[[DispatchStats, Tally, list[Lane]], None] | None = None,
            wait_lock: bool = False, detach: bool = False, executor: str = "local",
            workers: int | None = None, ray_address: str | None = "auto") -> RunResult:
        """Run the job to completion (sync wrapper over :meth:`arun`).

        The run holds the job's ledger lock (:mod:`llmap.store.lock`) for its
        whole life, so two runs of one job never pay for a row twice.

        Args:
            limit: at most this many rows (overrides ``[input] limit``).
            fresh: forget the ledger's rows first.
            progress: a progress reporter (default: none).
            export_output: write ``[output] path`` at the end.
            log: a structured event log (``--log-json``), or None.
            on_start: called once dispatch starts with the live counters and lanes
                (e.g. to serve metrics).
            wait_lock: when another run holds the ledger, wait for it to end
                (``--wait-lock``) instead of raising :class:`~llmap.errors.LedgerLocked`.
            detach: with ``[model] batch``, submit the batches and return
                without waiting for them (``--detach``); the next run collects them.
            executor: ``"local"`` (this process sends every request) or ``"ray"``: this
                process keeps the ledger (plans, leases rows, commits), and ``workers`` Ray actors
                render, look up the response cache (a file on this machine, through an actor), send
                under one cluster-wide rate limit, and write the cache (:mod:`llmap.run.ray.executor`;
                needs ``llmap[ray]``).
            workers: Ray workers (default: one per CPU of the cluster); ``executor="ray"`` only.
            ray_address: the Ray cluster: ``"auto"`` (default) joins a running one, else
                starts a local one; ``executor="ray"`` only.

        Raises:
            SpecError: bad spec or input; nothing was sent.
            LedgerLocked: another run of this job holds its ledger; nothing was sent.
            RunInterrupted: Ctrl-C or SIGTERM; committed rows are kept.
            DiskFull: a write of the ledger, the cache or the output found the disk
                full; dispatch stopped, committed rows are kept.
            EventLoopRunning: called inside a running event loop; ``await job.arun(...)`` there.
        """
        require_no_running_loop("Job.run()", "await job.arun(...)")
        return asyncio.run(self.arun(limit=limit, fresh=fresh, progress=progress, export_output=export_output,
                                     log=log, on_start=on_start, wait_lock=wait_lock, detach=detach,
                                     executor=executor, workers=workers, ray_address=ray_address))

    async def arun(self, *, limit: int | None = None, fresh: bool = False, progress: Progress | None = None,
                   export_output: bool = True, log: JsonLog | None = None,
                   on_start: Callable[[DispatchStats, Tally, list[Lane]], None] | None = None,
                   wait_lock: bool = False, detach: bool = False, executor: str = "local",
                   workers: int | None = None, ray_address: str | None = "auto") -> RunResult:
        """Run the job in the current event loop. See :meth:`run`."""
        check_kind_executor(self.spec, executor)
        if executor != "local" and self.spec.input.documents:
            raise E.SpecError(f"[input.documents] are read in this process, not by Ray workers yet; drop --executor "
                              f"{executor}, or turn the documents into a text column first")
        if executor != "local" or workers is not None:
            from llmap.run.ray.executor import check_executor

            check_executor(executor, workers, batch=any(m.batch for m in self.spec.models))
        self._executor = executor
        self._detach = detach
        lock = LedgerLock(self.spec.ledger_path, job=self.spec.name)
        await lock.acquire(wait=wait_lock, on_wait=(progress or NullProgress()).message)
        try:
            self._ray = (workers, ray_address)
            if self._executor == "ray" and self.spec.cascade is None:  # the workers start while the job is planned
                from llmap.run.ray.launch import Launch

                self._launch = Launch(self.spec, workers=workers, address=ray_address)
            return await self._arun(limit=limit, fresh=fresh, progress=progress, export_output=export_output,
                                    log=log, on_start=on_start)
        finally:
            if self._launch is not None:  # not needed after all (no pending row, or the run failed first)
                await self._launch.abandon()
                self._launch = None
            lock.release()

    async def _arun(self, *, limit: int | None, fresh: bool, progress: Progress | None, export_output: bool,
                    log: JsonLog | None,
                    on_start: Callable[[DispatchStats, Tally, list[Lane]], None] | None) -> RunResult:
        progress = progress or NullProgress()
        if log is not None:
            progress = LoggedProgress(progress, log)
        self._log, self._on_start = log, on_start
        started = time.monotonic()
        prep = await self.prepare(limit=limit, check_output=export_output)
        try:
            ledger = Ledger(self.spec.ledger_path)
        except BaseException:
            await prep.aclose()
            raise
        stats = DispatchStats()
        disk_full = False
        run_id = None
        planned = False
        counts: dict[str, int] = {}
        running: tuple[str, ...] = ()
        tally: Tally | None = None
        reason = "complete"
        try:
            run_id = ledger.start_run(prep.compiled.fingerprint, models=[m.label for m in self.spec.models],
                                      prompt_hash=self.spec.prompt_fingerprint())
            if fresh:
                ledger.reset(run_id)  # each row's state is kept in the run's history (llmap rollback)
            ledger.set_meta("output_schema", prep.input.layout.schema.serialize().to_pybytes())
            ledger.set_meta("data_columns",
                            json.dumps(prep.input.data_columns + ([] if self.spec.input.key else ["_row"])))
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
                from llmap.run.batch.runner import still_running

                raise E.RunInterrupted(
                    "interrupted; finished rows are kept in the ledger, run the same command again to continue"
                    + (still_running(ledger) if self.spec.model.batch else "")) from None
            finally:
                progress.finish(tally)
            if stats.stop_reason is not None:
                reason = f"stopped: {stats.stop_reason}"
        except E.DiskFull:
            reason, disk_full = "stopped: disk full", True
            raise
        finally:
            for p in [*prep.providers, *([prep.embedder] if prep.embedder is not None else [])]:
                with contextlib.suppress(Exception):
                    await p.aclose()
            if prep.compiled.documents is not None:
                await prep.compiled.documents.aclose()
            out = None
            try:
                if run_id is not None:
                    stats.note_dialects(prep.providers)
                    try:
                        ledger.end_run(run_id, exit_reason=reason, requests=stats.requests,
                                       prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
                                       cost_usd=stats.cost_usd, rate_limited=stats.rate_limited,
                                       retries=stats.retries, cached=tally.cache_hits if tally else 0,
                                       by_model=stats.by_model, cache_read_tokens=stats.cache_read_tokens,
                                       cache_write_tokens=stats.cache_write_tokens)
                    except E.DiskFull:
                        if not disk_full:
                            raise  # else the DiskFull on its way out already says it
                    if export_output and planned and not disk_full:
                        out = self.spec.output_path
                        layout = prep.input.layout
                        export(result_batches(ledger, run_id, layout, spec=self.spec), layout.schema, out)
                        self._op_summary = finish_operator(self.spec, ledger, run_id) or self._op_summary
                    counts = ledger.counts(run_id)
                    if any(m.batch for m in self.spec.models):
                        running = tuple(r.provider_id or f"batch {r.id}" for r in BatchBook(ledger).held())
                    if reason == "complete" and counts["pending"] == 0 and counts["failed"] == 0:
                        self._mark_complete(ledger)
            finally:
                ledger.close()
                prep.compiled.close()
        stop = None
        if stats.stop_reason is not None:
            stop = f"{stats.stop_reason}; fix it and run again: finished rows are kept"
        detached = self._detach and any(m.batch for m in self.spec.models)
        left = 0 if detached else counts["pending"]
        exit_code = 0 if counts["failed"] == 0 and left == 0 and stop is None else 1
        return RunResult(counts, out, exit_code, stop, stats.requests, stats.prompt_tokens,
                         stats.completion_tokens, time.monotonic() - started, stats.cost_usd, stats.rate_limited,
                         stats.retries, stats.cache_read_tokens, running, detached, self._op_summary)

    def _settled_hook(self, stats: DispatchStats,
                      prep: Prepared) -> Callable[[list[RowResult], list[str]], None] | None:
        """Alerts and structured row logs on every batch of settled rows (:func:`llmap.observe.logs.settled_hook`)."""
        return settled_hook(self.spec.alerts, self._log, prep.compiled.renderer, stats.halt)

    def _mark_complete(self, ledger: Ledger) -> None:
        """Record what ``llmap run --if-changed`` compares against (see :mod:`llmap.store.fingerprint`)."""
        fingerprint = completion_fingerprint(self.spec, ledger.connection)
        at = time.strftime("%Y-%m-%d %H:%M:%S")
        ledger.set_meta("complete", json.dumps({"fingerprint": fingerprint, "at": at}))

    async def _dispatch(self, ledger: Ledger, run_id: int, prep: Prepared, stats: DispatchStats, tally: Tally,
                        progress: Progress) -> None:
        spec = self.spec

        def on_breaker(lane: Lane, old: BreakerState, new: BreakerState) -> None:
            if new is BreakerState.OPEN:
                progress.message(f"llmap: circuit breaker for {lane.label} opened; "
                                 + ("failing over" if len(prep.providers) > 1 and spec.cascade is None
                                    else "pausing requests to it"))
            elif new is BreakerState.CLOSED and old is not BreakerState.CLOSED:
                progress.message(f"llmap: {lane.label} answers again; circuit breaker closed")

        lanes = [Lane(0 if (guaranteed := spec.cascade is not None) else i, p, m, spec.limits, on_breaker=on_breaker)
                 for i, (p, m) in enumerate(zip(prep.providers, spec.models, strict=True))]
        stats.on_halt = lambda reason: progress.message(
            f"llmap: stopping: {reason}; requests in flight will finish, progress is kept")
        stats.on_warn = lambda text: progress.message(f"llmap: {text}")
        cache = remote = None
        if spec.cache.enabled and self._launch is None:  # Ray: the workers use the cache actor, not this process
            with guard(default_cache_dir() / CACHE_FILE, "response cache"):
                cache = ResponseCache(ttl_s=spec.cache.ttl_s)
        try:
            if self._log is not None:
                stats.on_request = self._log.request
            if self._on_start is not None:
                self._on_start(stats, tally, lanes)
            if guaranteed:
                from llmap.run.guaranteed import GuaranteedCascade

                await GuaranteedCascade(spec=spec, compiled=prep.compiled, ledger=ledger, run_id=run_id, lanes=lanes,
                                        stats=stats, tally=tally, progress=progress, answers=AnswerCache(cache),
                                        on_settled=self._settled_hook(stats, prep), detach=self._detach,
                                        ray=self._ray if self._executor == "ray" else None).run()
                return
            dispatcher = Dispatcher(lanes, prep.compiled.renderer, prep.compiled.schema, spec.limits,
                                    max_reask=spec.output.max_reask, fallback=spec.output.fallback, stats=stats,
                                    answers=AnswerCache(cache), escalate_if=prep.compiled.escalate_if,
                                    documents=prep.compiled.documents, **prep.compiled.quality)
            packer = None
            if spec.prompt.pack != 1:
                packer = Packer(dispatcher, spec.prompt.pack)
            per_group = spec.input.per_group
            if spec.kind in ("cluster", "resolve", "reduce"):  # windows, pairs or groups of rows become requests
                self._op_summary = await run_operator(spec, prep.compiled, ledger, run_id, lanes, stats,
                                                      dispatcher.answers, progress, tally, prep.embedder)
                return
            if spec.model.batch:  # the first model's requests go through its provider's batch API
                from llmap.run.batch.runner import run_batches

                await run_batches(ledger=ledger, run_id=run_id, job=spec.name, spec=spec.batch,
                                  provider=prep.providers[0], dispatcher=dispatcher, stats=stats, tally=tally,
                                  progress=progress, pack=packer.size() if packer is not None else 1,
                                  on_settled=self._settled_hook(stats, prep), detach=self._detach)
                return
            if self._launch is not None and tally.total > tally.done + tally.failed + tally.skipped + tally.fallback:
                launch, self._launch = self._launch, None
                remote = await launch.executor(dispatcher, stats)
                progress.message(f"llmap: {remote.size} Ray workers send the requests")
            quota = (per_group.column, per_group.n) if per_group else None
            if remote is not None:
                from llmap.run.remote import run_remote_pool

                await run_remote_pool(ledger, run_id, dispatcher, stats, tally, progress, remote=remote, quota=quota,
                                      packer=packer, on_settled=self._settled_hook(stats, prep))
                return
            await run_pool(ledger, run_id, dispatcher, stats, tally, progress, quota=quota, packer=packer,
                           on_settled=self._settled_hook(stats, prep))
        finally:
            if remote is not None:
                await remote.aclose()
            if cache is not None:
                cache.close()
