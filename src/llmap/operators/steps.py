"""Model steps: requests an operator builds from windows, pairs, rows or chunks, sent the way ``map`` sends rows.

A *step kind* (propose families, merge two families, assign a row, judge a
pair, summarize a chunk, answer a group) is a prompt and an output schema of
its own. :class:`StepRunner` sends a list of steps of one kind through a
:class:`~llmap.run.dispatch.Dispatcher` built for that kind over the job's
lanes (so the job's limits, retries, failover, response cache, in-run dedup
and budget caps apply), packs them with the :class:`~llmap.run.packer.Packer`
when the kind packs, and lets the :class:`~llmap.run.settle.Settler` judge
every answer against the kind's schema (re-asks included).

Every step is keyed by its request's content (:meth:`~llmap.store.answers.AnswerCache.key`
of the model, the single-step messages and the schema). Before sending, the
runner looks the keys up in the ledger's ``op_steps``; a step found there is
not sent again. Each settled step is committed with the request log at the end
of the event-loop turn it settles in, so a SIGKILL loses at most the requests
in flight, and a rerun that rebuilds the same steps sends only the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from llmap.errors import AnswerInvalid, DiskFull
from llmap.prompt.render import Renderer
from llmap.run.dispatch import Dispatcher
from llmap.run.packer import Packer
from llmap.run.settle import error_text
from llmap.run.stats import Stop
from llmap.spec import Example, PromptSpec
from llmap.store.answers import AnswerCache
from llmap.store.ledger import RowResult
from llmap.store.operators import StepRecord

if TYPE_CHECKING:
    from llmap.operators.context import OpContext

__all__ = ["Step", "StepKind", "StepResult", "StepRunner", "StepSchema", "raw"]

#: Seconds between response-cache flushes while steps settle (the ledger is committed every turn).
_CACHE_FLUSH_S = 0.25


def raw(text: str | None) -> str:
    """``text`` for a Jinja2 template, verbatim (a user's prompt may hold ``{{``)."""
    return "" if not text else "{% raw %}" + text.replace("{% endraw %}", "") + "{% endraw %}"


class StepSchema:
    """A step kind's answer contract: a JSON Schema sent with each request and a pydantic model that validates.

    It offers what the dispatcher and the settle stage read of an
    :class:`~llmap.prompt.schema.OutputSchema` (``json_schema``, ``validate``).

    Args:
        title: the schema's ``title`` (the simulator tells step kinds apart by it).
        properties: JSON Schema properties of the answer object (all required).
        model: the pydantic model the answer must validate against.
    """

    def __init__(self, title: str, properties: dict[str, Any], model: type[BaseModel]) -> None:
        self.json_schema = {"title": title, "type": "object", "properties": properties,
                            "required": list(properties), "additionalProperties": False}
        self.names = tuple(properties)
        self._model = model

    def validate(self, content: str) -> dict[str, Any]:
        """Parse and validate one answer.

        Raises:
            AnswerInvalid: not JSON, or not the schema; ``detail`` says what to fix (the re-ask's text).
        """
        try:
            return self._model.model_validate_json(content).model_dump()
        except ValidationError as exc:
            parts = []
            for e in exc.errors()[:5]:
                loc = ".".join(str(p) for p in e["loc"]) or "answer"
                parts.append(f"the answer is not valid JSON: {content[:80]!r}" if e["type"] == "json_invalid"
                             else f"{loc}: {e['msg']}")
            raise AnswerInvalid("; ".join(parts)) from None


class StrictAnswer(BaseModel):
    """Base of step answers: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True, slots=True)
class Step:
    """One step to settle.

    Attributes:
        id: the caller's name for it (a window, a pair, a row key, a chunk), unique in one call.
        row: the template variables of the kind's user template.
    """

    id: str
    row: dict[str, Any]


@dataclass(frozen=True, slots=True)
class StepResult:
    """A settled step: ``done`` with ``output``, or ``failed`` with ``error``."""

    status: str
    output: dict[str, Any] | None = None
    error: str | None = None
    model: str | None = None
    source: str | None = None


class StepKind:
    """A prompt and a schema for one kind of step, and the dispatcher that sends it.

    Args:
        ctx: the operator's context (lanes, stats, answers, limits).
        name: the kind (``propose``, ``merge``, ``assign``, ``judge``, ``summary``, ``answer``).
        system: the system template (Jinja2; wrap user text in :func:`raw`).
        user: the user template over a step's ``row``.
        schema: the answer contract (a :class:`StepSchema` or an :class:`~llmap.prompt.schema.OutputSchema`).
        max_tokens: completion tokens per step (a pack gets this times its size).
        pack: steps per request (1: no packing).
        examples: few-shot ``(row, answer)`` pairs sent before every step as prior turns (small models follow
            the shape of an example far better than an instruction).
    """

    def __init__(self, ctx: OpContext, name: str, *, system: str, user: str, schema: Any, max_tokens: int,
                 pack: int = 1, examples: Sequence[tuple[dict[str, Any], dict[str, Any]]] = ()) -> None:
        self.name = name
        self.max_tokens = max_tokens
        prompt = PromptSpec(system=system, user=user, examples=[Example(input=i, output=o) for i, o in examples])
        renderer = Renderer.from_spec(prompt, source=f"{name} step")
        self.dispatcher = Dispatcher(ctx.lanes, renderer, schema, ctx.spec.limits, max_reask=ctx.spec.output.max_reask,
                                     fallback=None, stats=ctx.stats, answers=ctx.answers)
        self.packer = Packer(self.dispatcher, pack) if pack > 1 else None
        self.pack = pack


@contextlib.contextmanager
def step_tokens(lanes: Sequence[Any], max_tokens: int) -> Iterator[None]:
    """Let every lane's requests ask for ``max_tokens`` completion tokens while a kind's steps run.

    The kinds of one operator run one after another, so swapping the lanes' model settings is safe; the
    cache keys and cut detection read the same value.
    """
    saved = [lane.model for lane in lanes]
    for lane in lanes:
        lane.model = lane.model.model_copy(update={"max_tokens": max_tokens})
    try:
        yield
    finally:
        for lane, model in zip(lanes, saved, strict=True):
            lane.model = model


class StepRunner:
    """Settles steps through their kind's dispatcher; see the module docstring.

    Args:
        ctx: the operator's context: the ledger (``op_steps``), commits, progress.
    """

    def __init__(self, ctx: OpContext) -> None:
        self.ctx = ctx
        self._buffer: list[StepRecord] = []
        self._commit_due = False
        self._flushed_at = 0.0
        self._disk_full: DiskFull | None = None

    async def run(self, kind: StepKind, steps: Sequence[Step], *,
                  on_result: Callable[[str, StepResult], None] | None = None) -> dict[str, StepResult]:
        """Settle ``steps`` of ``kind``; steps already in the ledger are not sent.

        Args:
            kind: what the steps are.
            steps: the steps (distinct ids).
            on_result: called once per step as it settles (progress).

        Returns:
            Step id -> result. A step missing from it was not settled: the run is stopping (a budget cap,
            an error every request would hit, Ctrl-C); the caller must not go on.

        Raises:
            DiskFull: a commit found the disk full.
        """
        ctx, d = self.ctx, kind.dispatcher
        results: dict[str, StepResult] = {}
        if not steps:
            return results
        with step_tokens(ctx.lanes, kind.max_tokens):
            model, schema = ctx.lanes[0].model, d.schema.json_schema
            keyed: dict[str, list[Step]] = {}  # content key -> steps with that request
            rendered: dict[str, tuple[dict[str, Any], list[dict[str, str]]]] = {}
            for s in steps:
                messages = d.renderer.messages(s.row)
                key = AnswerCache.key(model, messages, schema)
                keyed.setdefault(key, []).append(s)
                rendered.setdefault(key, (s.row, messages))

            def settle(key: str, res: StepResult, record: StepRecord | None) -> None:
                for s in keyed[key]:
                    results[s.id] = res
                    if on_result is not None:
                        on_result(s.id, res)
                if record is not None:
                    self._buffer.append(record)
                    self._commit_soon()

            known = ctx.book.steps(keyed)
            todo: list[str] = []
            for key in keyed:
                rec = known.get(key)
                if rec is not None:
                    settle(key, StepResult("done", rec.output, model=rec.model, source=rec.source), None)
                else:
                    todo.append(key)
            answers = ctx.answers
            if answers is not None and todo:
                answers.prefetch(todo)
                left = []
                for key in todo:
                    hit = answers.peek(key)
                    if hit is None:
                        answers.pass_over(key)
                        left.append(key)
                        continue
                    settle(key, StepResult("done", hit.output, model=hit.model, source="cache"),
                           StepRecord(key, kind.name, hit.output, hit.model, "cache"))
                todo = left
            if todo:
                await self._send(kind, todo, rendered, settle)
            self.commit()
            if answers is not None:
                self._flush_cache(wait=True)
        if self._disk_full is not None:
            raise self._disk_full
        return results

    async def _send(self, kind: StepKind, todo: list[str], rendered: dict, settle: Callable) -> None:
        d, ctx = kind.dispatcher, self.ctx
        size = kind.pack if kind.packer is not None else 1
        packs = [todo[i:i + size] for i in range(0, len(todo), size)]
        queue: asyncio.Queue[list[str] | None] = asyncio.Queue()
        for p in packs:
            queue.put_nowait(p)
        n_workers = min(len(packs), 2 * max(lane.max_in_flight for lane in d.lanes), 1024)
        for _ in range(n_workers):
            queue.put_nowait(None)
        d.watch_tail(lambda: queue.qsize() <= n_workers)

        async def worker() -> None:
            while (pack := await queue.get()) is not None:
                if ctx.stats.stop.is_set():
                    continue  # drain: the steps stay unsettled
                short = {str(i): key for i, key in enumerate(pack)}
                try:
                    if kind.packer is not None and len(pack) > 1:
                        out = await kind.packer.solve([(sid, rendered[k][0], rendered[k][1], k)
                                                       for sid, k in short.items()])
                    else:
                        (sid, key), = short.items()
                        out = [await d.solve_messages(sid, rendered[key][1], lead=key)]
                except Stop:
                    continue
                except DiskFull:
                    raise
                except Exception as exc:  # a bug or a step's bad value fails these steps, the run goes on
                    out = [RowResult(sid, "failed", error=error_text(exc)) for sid in short]
                for r in out:
                    key = short[r.key]
                    if r.status == "done":
                        settle(key, StepResult("done", r.output, model=r.model, source=r.source),
                               StepRecord(key, kind.name, r.output, r.model, r.source, r.prompt_tokens,
                                          r.completion_tokens))
                    else:
                        settle(key, StepResult("failed", error=r.error or "no answer", model=r.model), None)

        watchdog = asyncio.create_task(d.watchdog(), name="llmap-timeout-watchdog")
        workers = [asyncio.create_task(worker(), name=f"llmap-{kind.name}") for _ in range(n_workers)]
        try:
            await asyncio.gather(*workers)
        finally:
            for t in [*workers, watchdog]:
                t.cancel()
            await asyncio.gather(*workers, watchdog, return_exceptions=True)
            if kind.packer is not None:
                await kind.packer.aclose()
            if ctx.answers is not None:
                ctx.answers.abandon()

    # -- commits ---------------------------------------------------------------------------------
    def _commit_soon(self) -> None:
        if not self._commit_due:
            self._commit_due = True
            asyncio.get_running_loop().call_soon(self._commit_now)

    def _commit_now(self) -> None:
        self._commit_due = False
        try:
            self.commit()
        except DiskFull as exc:  # no new requests; raised when the steps are down
            self._disk_full = self._disk_full or exc
            self.ctx.stats.stop.set()

    def commit(self) -> None:
        """Commit the settled steps and the request log in one transaction, then show progress."""
        ctx = self.ctx
        records, self._buffer = self._buffer, []
        log = ctx.stats.take_request_log()
        if records or log:
            ctx.ledger.record([], run_id=ctx.run_id, requests=log,
                              also=ctx.book.step_statements(ctx.run_id, records))
        if ctx.answers is not None and time.monotonic() - self._flushed_at >= _CACHE_FLUSH_S:
            self._flush_cache(wait=False)
        ctx.advance()

    def _flush_cache(self, *, wait: bool) -> None:
        self._flushed_at = time.monotonic()
        try:
            self.ctx.answers.flush(wait=wait)
        except DiskFull:
            if wait:
                raise
