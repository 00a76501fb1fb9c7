"""A cascade with a guarantee: the run's phases (``[cascade]``; the statistics: :mod:`llmap.control.guarantee`).

The engine hands the pending rows here instead of to one pool when the job has ``[cascade]``. The phases,
each resumable from the ledger (:mod:`llmap.store.cascade`):

1. **Proxy.** The first model answers every pending row whose current inputs have no proxy answer yet, with
   its ``_confidence``. The answers go to ``cascade_rows``, not to the rows: nothing is final yet.
2. **Sample.** Once every row has a proxy answer, a seeded uniform sample of ``label_budget`` rows is drawn
   (:func:`~llmap.control.guarantee.draw_sample`) and committed with a new decision; then the oracle (the
   last model) answers the sampled rows, which are final (they take the oracle's answer).
3. **Threshold.** From the sample, :func:`~llmap.control.guarantee.choose_threshold` picks the lowest safe
   threshold; it is committed with every row's ``keep``. No threshold: every row goes to the oracle
   (``on_miss = "escalate_all"``) or the run stops with a message (``"stop"``); never a quiet miss.
4. **Keep.** Rows scoring at least the threshold settle with the proxy's answer: no request.
5. **Escalate.** The other rows go to the oracle.

A rerun after a crash picks up at the phase the ledger shows: no new sample, no answer asked again. An
incremental run (changed or new rows) reuses the stored threshold while its bound still holds with the
changed rows it would keep counted as wrong (:func:`~llmap.control.guarantee.reuse`), and says when it no
longer does: then it draws a new sample over every row (rows that already have the oracle's answer cost
nothing), and rows kept earlier that the new threshold no longer keeps go to the oracle.

Each phase that sends requests runs the way the job says: the worker pool (:mod:`llmap.run.pool`, with
packing), the model's batch API (``batch = true`` on that ``[[model]]``: :mod:`llmap.run.batch.runner`), or
Ray workers (the driver, this process, draws the sample and decides the threshold).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from llmap.control.guarantee import FAILED, Choice, choose_threshold, draw_sample, reuse
from llmap.control.lanes import Lane
from llmap.observe.progress import Progress, Tally
from llmap.plan import Compiled, cascade_field
from llmap.run.dispatch import Dispatcher
from llmap.run.packer import Packer
from llmap.run.pool import run_pool
from llmap.run.remote import RemoteRows, run_remote_pool
from llmap.run.stats import DispatchStats
from llmap.spec import JobSpec
from llmap.store.answers import AnswerCache
from llmap.store.cascade import NEEDS_PROXY, CascadeBook, Decision, PopulationRow
from llmap.store.ledger import Ledger, RowResult
from llmap.store.results import Encoded

__all__ = ["GuaranteedCascade", "PhaseLedger", "ray_phases"]

#: Kept rows committed per transaction.
KEEP_ROWS = 512


class PhaseLedger:
    """The ledger as one phase's pool (or batch path) sees it: only the phase's pending rows, and results kept
    where the phase keeps them (the proxy's in ``cascade_rows``; the oracle's in ``rows``, with the proxy's
    answer leading each row's ``tried`` log). It has the part of :class:`~llmap.store.ledger.Ledger` the
    pool and the batch path use.

    Args:
        ledger: the job's ledger.
        book: its cascade tables.
        only: which rows (a condition over ``rows``).
        proxy: True for the proxy's phase.
    """

    def __init__(self, ledger: Ledger, book: CascadeBook, only: str, *, proxy: bool) -> None:
        self.ledger, self.book, self.only, self.proxy = ledger, book, only, proxy

    @property
    def connection(self) -> Any:
        return self.ledger.connection

    @property
    def path(self) -> Any:
        return self.ledger.path

    def pending(self, plan: int, *, after_seq: int, limit: int, hashes: bool = False) -> list[tuple]:
        return self.book.pending(plan, self.only, after_seq=after_seq, limit=limit, hashes=hashes)

    def grouped_counts(self, plan: int, column: str) -> list[tuple[Any, str, int]]:
        return self.ledger.grouped_counts(plan, column)

    def record(self, results: Sequence[RowResult] | Encoded, *, run_id: int = 0, requests: Sequence[tuple] = (),
               also: Sequence[tuple[str, tuple]] = ()) -> None:
        """Commit a phase's results (as rows, or encoded by Ray workers), the request log and ``also`` in one
        transaction."""
        if isinstance(results, Encoded):
            results = results.decode()
        if self.proxy:
            self.ledger.record([], run_id=run_id, requests=requests,
                               also=[*also, *self.book.proxy_sql(results, run_id)])
            return
        entries = self.book.entries([r.key for r in results])
        full = []
        for r in results:
            e = entries.get(r.key)
            if e is None:
                full.append(r)
                continue
            step = (e.model or "proxy", "escalated" if e.status == "done" else "failed", e.output, e.prompt_tokens,
                    e.completion_tokens)
            full.append(replace(r, tried=[step, *(r.tried or [])], prompt_tokens=r.prompt_tokens + e.prompt_tokens,
                                completion_tokens=r.completion_tokens + e.completion_tokens,
                                latency_s=r.latency_s + e.latency_s, attempts=r.attempts + e.attempts))
        self.ledger.record(full, run_id=run_id, requests=requests, also=[*also, *self.book.oracle_sql(results)])


class GuaranteedCascade:
    """One run of a ``[cascade]`` job over a plan's pending rows (see the module docstring).

    Args:
        spec: the job (with ``[cascade]`` and two models).
        compiled: the compiled job (renderer, schema, quality, fingerprint).
        ledger: the job's ledger; run_id: the run (and plan).
        lanes: the proxy's lane and the oracle's (each index 0: each phase has one model).
        stats, tally, progress: the run's counters and reporter.
        answers: the response cache and in-run dedup, or None.
        on_settled: the engine's hook on final rows (alerts, structured logs).
        detach: with a batch model, submit and return (the next run collects).
        ray: ``(workers, address)`` to send each phase's requests from Ray workers (:func:`ray_phases`), or None
            (this process's workers).
    """

    def __init__(self, *, spec: JobSpec, compiled: Compiled, ledger: Ledger, run_id: int, lanes: Sequence[Lane],
                 stats: DispatchStats, tally: Tally, progress: Progress, answers: AnswerCache | None,
                 on_settled: Callable[[list[RowResult], list[str]], None] | None = None, detach: bool = False,
                 ray: tuple[int | None, str | None] | None = None) -> None:
        assert spec.cascade is not None
        self.spec, self.cascade, self.compiled = spec, spec.cascade, compiled
        self.ledger, self.run_id = ledger, run_id
        self.book = CascadeBook(ledger)
        self.stats, self.tally, self.progress = stats, tally, progress
        self.on_settled, self.detach = on_settled, detach
        self.remote_for = ray_phases(spec, stats, workers=ray[0], address=ray[1]) if ray is not None else None
        self.field = cascade_field(spec)
        self.key = spec.cascade.decision_key(compiled.fingerprint, self.field)
        self.lanes = list(lanes)
        self.dispatchers = [self._dispatcher(lanes[0], None, answers),
                            self._dispatcher(lanes[-1], spec.output.fallback, answers)]

    def _dispatcher(self, lane: Lane, fallback: dict[str, Any] | None, answers: AnswerCache | None) -> Dispatcher:
        spec = self.spec
        return Dispatcher([lane], self.compiled.renderer, self.compiled.schema, spec.limits,
                          max_reask=spec.output.max_reask, fallback=fallback, stats=self.stats, answers=answers,
                          **self.compiled.quality)

    def say(self, text: str) -> None:
        self.progress.message(f"llmap: cascade: {text}")

    @property
    def stopped(self) -> bool:
        return self.stats.stop.is_set()

    # -- the run -------------------------------------------------------------------------------
    async def run(self) -> None:
        """Settle every pending row of the plan through the phases (stops early when the run stops)."""
        book, plan = self.book, self.run_id
        need = book.count_pending(plan, NEEDS_PROXY)
        if need:
            self.say(f"the proxy {self.lanes[0].label} answers {need:,} row{'s' if need != 1 else ''}, with "
                     "_confidence")
            await self._phase(0, NEEDS_PROXY, Tally(total=need))
            self.progress.advance(self.tally)
            if self.stopped or book.count_pending(plan, NEEDS_PROXY):
                return
        decision = self._decision()
        if decision is None:
            return
        if decision.state == "sampling":
            only = book.sampled_sql(decision.id)
            left = book.count_pending(plan, only)
            if left:
                self.say(f"the oracle {self.lanes[-1].label} answers the {left:,} sampled row"
                         f"{'s' if left != 1 else ''} still without its answer")
                await self._phase(1, only, self.tally)
                if self.stopped or book.count_pending(plan, only):
                    return
            decision = self._decide(decision)
        if decision.state == "missed" and self.cascade.on_miss == "stop":
            self.stats.halt(self._miss_text(decision.choice, decision.sample) + "; raise [cascade] label_budget, "
                            "lower target or raise delta, or set on_miss = \"escalate_all\" to send every row to the "
                            "oracle")
            return
        self._keep(decision)
        only = book.kept_sql(decision.id, False)
        if not self.stopped and book.count_pending(plan, only):
            await self._phase(1, only, self.tally)

    async def _phase(self, model: int, only: str, tally: Tally) -> None:
        """The pending rows meeting ``only`` through one model: by batch, on Ray workers, or in the pool."""
        spec = self.spec
        d = self.dispatchers[model]
        facade = PhaseLedger(self.ledger, self.book, only, proxy=model == 0)
        packer = Packer(d, spec.prompt.pack) if spec.prompt.pack != 1 else None
        hook = None if model == 0 else self.on_settled
        if spec.models[-1 if model else 0].batch:
            from llmap.run.batch.runner import run_batches

            await run_batches(ledger=facade, run_id=self.run_id, job=spec.name, spec=spec.batch,  # type: ignore[arg-type]
                              provider=d.lanes[0].provider, dispatcher=d, stats=self.stats, tally=tally,
                              progress=self.progress, pack=packer.size() if packer is not None else 1,
                              on_settled=hook, detach=self.detach, only=only)
            return
        remote = await self.remote_for(model, d) if self.remote_for is not None else None
        try:
            if remote is None:
                await run_pool(facade, self.run_id, d, self.stats, tally, self.progress,  # type: ignore[arg-type]
                               packer=packer, on_settled=hook)
            else:
                await run_remote_pool(facade, self.run_id, d, self.stats, tally, self.progress,  # type: ignore[arg-type]
                                      remote=remote, packer=packer, on_settled=hook)
        finally:
            if remote is not None:
                await remote.aclose()  # type: ignore[attr-defined]

    # -- the decision ----------------------------------------------------------------------------
    def _decision(self) -> Decision | None:
        """The decision this run works under: the stored one (continued, or reused for changed rows while its bound
        holds), or a new one with a new sample."""
        book = self.book
        decision = book.latest(self.key)
        pop = book.population(self.run_id, self.field)
        if not pop:
            return None
        if decision is not None:
            mine = [r for r in pop if r.decision == decision.id]
            changed = [r for r in pop if r.decision != decision.id]
            gone = decision.population - sum(1 for r in mine if not r.via_reuse)
            if not changed and gone <= 0:
                return decision
            what = _changes(len(changed), gone)
            if decision.state == "decided" and decision.choice is not None and decision.choice.met:
                kept = self._try_reuse(decision, pop, mine, changed, gone, what)
                if kept is not None:
                    return kept
            elif decision.state == "sampling":
                self.say(f"{what} while the sample was being answered; drawing the sample again (rows that already "
                         "have the oracle's answer cost nothing)")
            else:
                self.say(f"{what} since no threshold met the target; deciding again")
        n = min(self.cascade.label_budget, len(pop))
        if all(r.score is None for r in pop):  # nothing could be kept: spend no oracle call on a sample
            n = 0
            self.say(f"no answer of the proxy {self.lanes[0].label} has a _confidence, so no threshold can keep one; "
                     "no sample is drawn")
        sample = draw_sample([r.key for r in pop], n, self.cascade.seed)
        c = self.cascade
        settings = {"guarantee": c.guarantee, "field": self.field, "target": c.target, "delta": c.delta,
                    "label_budget": c.label_budget, "seed": c.seed, "proxy": self.lanes[0].label,
                    "oracle": self.lanes[-1].label}
        decision = book.start(run=self.run_id, key=self.key, settings=settings, plan=self.run_id, sample=sample)
        drawn = set(sample)
        have = sum(1 for r in pop if r.oracle_status == "done" and r.key in drawn)
        if n:
            self.say(f"drew a sample of {n:,} of {len(pop):,} rows (seed {c.seed})"
                     + (f"; {have:,} of them already have the oracle's answer" if have else "")
                     + ("; every row is in the sample, so every row takes the oracle's answer"
                        if n == len(pop) else ""))
        return decision

    def _try_reuse(self, decision: Decision, pop: list[PopulationRow], mine: list[PopulationRow],
                   changed: list[PopulationRow], gone: int, what: str) -> Decision | None:
        """Reuse ``decision`` for the changed rows when its bound still holds (see
        :func:`~llmap.control.guarantee.reuse`); else say why not and return None."""
        choice = decision.choice
        assert choice is not None and choice.threshold is not None
        t = choice.threshold

        def kept(r: PopulationRow) -> bool:
            return r.score is not None and r.score >= t

        new_kept = [r for r in changed if kept(r)]
        old_kept = [r for r in mine if r.via_reuse and r.keep == 1]  # earlier reuses: counted as wrong again
        kept_true_now = sum(1 for r in pop if kept(r) and r.proxy is True)
        r = reuse(choice, population=len(pop), gone_positive_room=gone, changed_kept=len(new_kept) + len(old_kept),
                  changed_kept_true=sum(1 for x in [*new_kept, *old_kept] if x.proxy is True),
                  kept_true_now=kept_true_now)
        if not r.holds:
            self.say(f"{what} since the threshold was chosen: the threshold {t:.4g} no longer holds "
                     f"({choice.guarantee} bound {r.bound:.3f} < "
                     f"{choice.target:g} with the {len(new_kept) + len(old_kept):,} changed rows it would keep "
                     "counted as wrong); drawing a new sample over every row (rows that already have the oracle's "
                     "answer cost nothing)")
            return None
        event = {"run": self.run_id, "changed": len(changed), "kept": len(new_kept), "gone": gone, "bound": r.bound}
        self.book.adopt(decision, [x.key for x in changed], run=self.run_id, event=event)
        self.say(f"{what} since the threshold was chosen: the threshold {t:.4g} still holds "
                 f"({choice.guarantee} >= {r.bound:.3f} with the "
                 f"{len(new_kept):,} changed rows it keeps counted as wrong); {len(changed) - len(new_kept):,} go to "
                 "the oracle")
        return decision

    def _decide(self, decision: Decision) -> Decision:
        """Choose the threshold from the answered sample and commit it with every row's ``keep``."""
        c = self.cascade
        pop = self.book.population(self.run_id, self.field, decision=decision.id)
        sample = {i: (r.oracle if r.oracle_status == "done" else FAILED) for i, r in enumerate(pop) if r.sampled}
        choice = choose_threshold([r.score for r in pop], [r.proxy for r in pop], sample, guarantee=c.guarantee,
                                  target=c.target, delta=c.delta)
        reopened = self.book.decide(decision, choice, run=self.run_id)
        if choice.met:
            assert choice.bound is not None and choice.upper is not None and choice.estimate is not None
            self.say(f"threshold {choice.threshold:.4g}: {choice.guarantee} >= {choice.bound:.3f} with probability "
                     f">= {1 - c.delta:g} (target {c.target:g}; interval [{choice.bound:.3f}, {choice.upper:.3f}], "
                     f"estimate {choice.estimate:.3f}); {choice.kept:,} rows keep the proxy's answer, "
                     f"{choice.escalated:,} go to the oracle, {choice.sampled:,} were sampled"
                     + (f"; {reopened:,} rows kept earlier go to the oracle" if reopened else ""))
        elif c.on_miss == "escalate_all":
            self.say(self._miss_text(choice, choice.sampled) + "; every row goes to the oracle (on_miss = "
                     "\"escalate_all\")")
        fresh = self.book.latest(self.key)
        assert fresh is not None
        return fresh

    def _miss_text(self, choice: Choice | None, sampled: int) -> str:
        c = self.cascade
        text = (f"no threshold meets {c.guarantee} >= {c.target:g} on {self.field!r} with probability >= "
                f"{1 - c.delta:g} from {sampled:,} sampled rows")
        if choice is not None and choice.no_score == choice.population:
            return text + (f" (no answer of the proxy {self.lanes[0].label} has a _confidence: it returned no "
                           "log-probabilities)")
        if choice is not None and choice.first_failure is not None:
            return text + f" (even the highest score, {choice.first_failure:.4g}, fails)"
        return text

    # -- keep ------------------------------------------------------------------------------------
    def _keep(self, decision: Decision) -> None:
        """Settle the pending rows the threshold keeps with the proxy's answers (no request), a page at a time."""
        book, plan = self.book, self.run_id
        only = book.kept_sql(decision.id, True)
        after = -1
        while not self.stopped:
            page = book.pending(plan, only, after_seq=after, limit=KEEP_ROWS)
            if not page:
                return
            after = page[-1][0]
            entries = book.entries([k for _, k, _ in page])
            results, datas = [], []
            for _, key, data in page:
                e = entries[key]
                results.append(RowResult(key, "done", output=e.output, model=e.model, source=e.source or "model",
                                         attempts=e.attempts, prompt_tokens=e.prompt_tokens,
                                         completion_tokens=e.completion_tokens, latency_s=e.latency_s,
                                         tried=[(e.model or "proxy", "done", e.output, e.prompt_tokens,
                                                 e.completion_tokens)], confidence=e.score))
                datas.append(data)
            if self.on_settled is not None:
                self.on_settled(results, datas)
            self.ledger.record(results, run_id=plan, requests=self.stats.take_request_log())
            self.tally.done += len(results)
            self.progress.advance(self.tally)


def _changes(changed: int, gone: int) -> str:
    """``"12 rows changed or new and 3 rows gone"``."""
    parts = []
    if changed:
        parts.append(f"{changed:,} row{'s' if changed != 1 else ''} changed or new")
    if gone > 0:
        parts.append(f"{gone:,} row{'s' if gone != 1 else ''} gone")
    return " and ".join(parts)


def ray_phases(spec: JobSpec, stats: DispatchStats, *, workers: int | None,
               address: str | None) -> Callable[[int, Dispatcher], Awaitable[RemoteRows]]:
    """Ray workers for a guaranteed cascade, one set per phase, each with the phase's model alone; the driver (this
    process) keeps the ledger, draws the sample and decides the threshold.

    Args:
        spec: the job; stats: the run's counters.
        workers, address: as ``llmap run --workers --ray-address`` (:class:`~llmap.run.ray.executor.Launch`).
    """

    async def start(model: int, dispatcher: Dispatcher) -> RemoteRows:
        from llmap.run.ray.launch import Launch

        phase = spec.model_copy(update={"models": [spec.models[model]], "cascade": None})
        return await Launch(phase, workers=workers, address=address).executor(dispatcher, stats)

    return start
