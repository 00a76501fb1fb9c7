"""Ray Data's side of llmap: the mapper actors behind :func:`llmap.ray.map_batches` and the shared cache.

:class:`LlmapMapper` is the callable class handed to ``ds.map_batches``: each
mapper is one llmap dispatcher (render, send, validate, re-ask, fail over)
plugged into the cluster-wide budget (:mod:`llmap.run.ray.budget`).
:class:`CacheService` is the response cache actor: llmap's usual cache file on
the driver's node, shared by every mapper, so an answer paid for by a batch
job, ``llmap.map`` or another pipeline is not paid for again.

Ray is imported only when these run; ``import llmap`` never imports it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmap.errors import RenderError
from llmap.spec import JobSpec
from llmap.store.cache import CacheEntry, ResponseCache
from llmap.store.ledger import RowResult

__all__ = ["CACHE_ACTOR", "CacheService", "LlmapMapper"]

#: The response cache actor's name.
CACHE_ACTOR = "llmap-response-cache"


class CacheService:
    """The response cache actor's body: llmap's cache file on one node, for every actor.

    Args:
        path: the cache file (default: :func:`~llmap.store.cache.default_cache_dir` there).
        ttl_s: seconds an answer stays fresh, or None.
    """

    def __init__(self, path: str | None = None, ttl_s: float | None = None) -> None:
        self.cache = ResponseCache(Path(path) if path else None, ttl_s=ttl_s)

    def ready(self) -> bool:
        """True once the cache file is open."""
        return True

    def get_many(self, keys: Sequence[str]) -> dict[str, CacheEntry]:
        """Fresh answers for ``keys`` (hits are counted)."""
        return self.cache.get_many(keys)

    def put_many(self, entries: Sequence[CacheEntry]) -> int:
        """Store validated answers; returns how many were written."""
        return self.cache.put_many(entries, wait=True)


class LlmapMapper:
    """A callable class for ``ds.map_batches``: a batch of rows in, the rows plus the answers out.

    Args:
        spec: the job (made by :func:`map_batches` from its arguments).
        workers: how many mappers run (the budget's share count).
        cache: use the shared response cache actor.
    """

    def __init__(self, spec: JobSpec, workers: int = 1, cache: bool = True) -> None:
        import ray

        self.spec = spec
        self.name = f"llmap-mapper-{ray.get_runtime_context().get_worker_id()[:12]}"
        self._loop = asyncio.new_event_loop()
        self._cache = ray.get_actor(CACHE_ACTOR, namespace="llmap") if cache else None
        self._loop.run_until_complete(self._setup(workers))

    async def _setup(self, workers: int) -> None:
        from llmap.run.ray.budget import budget_actor
        from llmap.run.ray.worker import RowWorker

        self.worker = RowWorker(self.spec, self.name, budget_actor(self.spec, workers=workers))
        await self.worker.setup()
        self.worker.dispatcher.answers = None  # the shared cache actor answers (one query per batch)

    def __call__(self, batch: Any) -> Any:
        """Answer one batch (a ``pyarrow.Table``); returns it with the output columns added."""
        import pyarrow as pa

        from llmap.io.sinks import FIELD_ARROW

        table = batch if isinstance(batch, pa.Table) else pa.Table.from_pydict(batch)
        rows = table.to_pylist()
        results = self._loop.run_until_complete(self._solve(rows))
        fields = {k: f.type for k, f in self.spec.output.fields.items()}
        for name, t in fields.items():
            vals = [(r.output or {}).get(name) if r.status == "done" else None for r in results]
            table = table.append_column(name, pa.array(vals, type=FIELD_ARROW[t]))
        for name in ("_status", "_error", "_model", "_source"):
            attr = name[1:]
            table = table.append_column(name, pa.array([getattr(r, attr) for r in results], type=pa.string()))
        return table

    async def _solve(self, rows: list[dict[str, Any]]) -> list[RowResult]:
        d = self.worker.dispatcher
        from llmap.store.answers import AnswerCache

        results: list[RowResult | None] = [None] * len(rows)
        keys: dict[int, str] = {}
        messages: dict[int, list[dict[str, str]]] = {}
        for i, row in enumerate(rows):
            try:
                messages[i] = d.renderer.messages(row)
            except RenderError as exc:
                results[i] = RowResult(str(i), "failed", error=str(exc))
                continue
            keys[i] = AnswerCache.key(d.lanes[0].model, messages[i], d.schema.json_schema)
        hits: dict[str, CacheEntry] = {}
        if self._cache is not None and keys:
            hits = await self._cache.get_many.remote(list(set(keys.values())))
        todo = []
        for i, k in keys.items():
            hit = hits.get(k)
            if hit is not None and not await d.escalates(d.lanes[0], hit.output):
                results[i] = RowResult(str(i), "done", output=hit.output, model=hit.model, source="cache")
            else:
                todo.append(i)

        async def one(i: int) -> None:
            try:
                results[i] = await d.solve_messages(str(i), messages[i])
            except Exception as exc:  # Stop (an error every row hits) or a bug: the row fails, the task lives
                why = d.stats.stop_reason if d.stats.stop_reason else f"{type(exc).__name__}: {exc}"
                results[i] = RowResult(str(i), "failed", error=why)

        await asyncio.gather(*(one(i) for i in todo))
        fresh = [CacheEntry(keys[i], r.model or "", r.output, r.prompt_tokens, r.completion_tokens)
                 for i in todo if (r := results[i]) is not None and r.status == "done" and r.source == "model"
                 and r.output is not None and r.model == d.lanes[0].label]
        if self._cache is not None and fresh:
            await self._cache.put_many.remote(fresh)
        return [r if r is not None else RowResult(str(i), "failed", error="not settled") for i, r in enumerate(results)]
