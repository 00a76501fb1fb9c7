"""Ray Data's side of llmap: the mapper actors behind :func:`llmap.ray.map_batches` and the shared cache.

:class:`LlmapMapper` is the callable class handed to ``ds.map_batches``: each
mapper is one llmap dispatcher (render, send, validate, re-ask, fail over)
plugged into the cluster-wide budget (:mod:`llmap.run.ray.budget`).
:class:`CacheService` is the response cache actor: llmap's usual cache file on
the driver's node, shared by every mapper (and, made by :func:`cache_actor`, by
every worker of ``llmap run --executor ray``), so an answer paid for by a batch
job, ``llmap.map`` or another pipeline is not paid for again.

Ray is imported only when these run; ``import llmap`` never imports it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmap.io.sinks import answer_columns
from llmap.run.rows import PendingRow
from llmap.spec import JobSpec
from llmap.store.cache import CacheEntry, ResponseCache
from llmap.store.ledger import RowResult

__all__ = ["CACHE_ACTOR", "CacheService", "LlmapMapper", "cache_actor"]

#: The response cache actor's name (``map_batches``'s; the one :func:`cache_actor` makes for a run has none).
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
        """Fresh answers for ``keys`` (hits are counted by :meth:`write`, for the answers served)."""
        return self.cache.get_many(keys, count_hits=False)

    def put_many(self, entries: Sequence[CacheEntry]) -> int:
        """Store validated answers; returns how many were written."""
        return self.cache.put_many(entries, wait=True)

    def write(self, entries: Sequence[CacheEntry], hits: Sequence[str] = ()) -> int:
        """Store validated answers and count ``hits`` (keys of stored answers served), in two short
        transactions; returns how many answers were written.

        Raises:
            DiskFull: the cache's disk is full (nothing is written).
        """
        n = self.cache.put_many(entries, wait=True) if entries else 0
        self.cache.record_hits(list(hits), wait=True)
        return n


def cache_actor(path: Path, ttl_s: float | None) -> Any:
    """A response cache actor over ``path`` with ``ttl_s``, on this process's Ray node, for one run's
    workers (their handle is passed to them). The caller ends it (``ray.kill``) once the workers have
    closed; several actors over one file share it as several llmap processes do (SQLite WAL)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(CacheService).options(namespace="llmap", num_cpus=0, scheduling_strategy=here).remote(
        str(path), ttl_s)


class LlmapMapper:
    """A callable class for ``ds.map_batches``: a batch of rows in, the rows plus the answers out.

    It runs the steps every executor shares (:class:`~llmap.run.rows.RowSteps`: render and key,
    answer from the cache, solve), with the shared response cache actor as its cache: one lookup
    per batch, and the answers it validated written back in one call.

    Args:
        spec: the job (made by :func:`llmap.ray.map_batches` from its arguments).
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

        self.worker = RowWorker(self.spec, self.name, budget_actor(self.spec, workers=workers), self._cache)
        await self.worker.setup()

    def __call__(self, batch: Any) -> Any:
        """Answer one batch (a ``pyarrow.Table``); returns it with the output columns added."""
        import pyarrow as pa

        table = batch if isinstance(batch, pa.Table) else pa.Table.from_pydict(batch)
        results = self._loop.run_until_complete(self._solve(table.to_pylist()))
        fields = {k: f.type for k, f in self.spec.output.fields.items()}
        for name, column in answer_columns(fields, results):
            table = table.append_column(name, column)
        return table

    async def _solve(self, rows: list[dict[str, Any]]) -> list[RowResult]:
        """The worker's steps over one batch (render and key, cache lookup, solve each row, cache write)."""
        w = self.worker
        results: dict[str, RowResult] = {}
        ready, failed = w.prepare([PendingRow(str(i), "", row=row) for i, row in enumerate(rows)])
        results.update((res.key, res) for res, _ in failed)
        answered, todo = await w.answer(ready)
        results.update((res.key, res) for res in answered)
        solved = await asyncio.gather(*(w.solve([r]) for r in todo))
        for r, res in zip(todo, solved, strict=True):
            why = w.stats.stop_reason or "the run stopped before this row was sent"
            results[r.key] = res[0] if res else RowResult(r.key, "failed", error=why)
        await w.write_cache()
        return [results[str(i)] for i in range(len(rows))]
