"""llmap on Ray Data: ``llmap.ray.map_batches(ds, prompt=..., fields=..., model=...)``.

For pipelines whose rows are a Ray Dataset already. Each batch goes through
llmap's own dispatcher (render, send, validate, re-ask, fail over), in a pool
of :class:`LlmapMapper` actors that share:

* the cluster-wide budget (:mod:`llmap.run.ray_budget`): one RPM/TPM limit,
  Retry-After pauses, AIMD limit and circuit breaker per model, whatever the
  number of actors (the same budget actor as ``llmap run --executor ray`` on
  the same models);
* the response cache: a named actor (:class:`CacheService`) on the driver's
  node keeps llmap's usual cache file, so an answer paid for by a batch job,
  ``llmap.map`` or another pipeline is not paid for again, and the reverse.

Every row comes back with the output fields plus ``_status`` (``done`` or
``failed``), ``_error``, ``_model`` and ``_source``: a row that fails (a bad
value, retries spent, an answer that never validates) is a row with
``_status = "failed"`` and the error, never a crashed task. There is no
ledger: Ray Data owns the rows; rerunning the pipeline answers the rows done
before from the cache.

Ray is imported only when these functions run; ``import llmap`` never imports it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llmap.errors import RenderError
from llmap.spec import JobSpec, ModelSpec
from llmap.store.cache import CacheEntry, ResponseCache
from llmap.store.ledger import RowResult

__all__ = ["CacheService", "LlmapMapper", "map_batches"]

#: The response cache actor's name.
CACHE_ACTOR = "llmap-response-cache"
#: Handles of the actors this driver made (Ray ends an actor whose handles are all gone).
_ACTORS: dict[str, Any] = {}


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


def _spec(prompt: str, fields: Mapping[str, Any], model: str | Mapping[str, Any] | ModelSpec, *,
          system: str | None, examples: Sequence[Mapping[str, Any]], base_url: str | None,
          api_key_env: str | None, concurrency: int, max_reask: int, rpm: float | None,
          tpm: float | None) -> JobSpec:
    from llmap.api import _fields, _model
    from llmap.plan import spec_from_dict

    limits: dict[str, Any] = {"concurrency": concurrency}
    if rpm:
        limits["rpm"] = rpm
    if tpm:
        limits["tpm"] = tpm
    doc = {
        "name": "map_batches",
        "input": {"sql": "SELECT 1"},
        "prompt": {"user": prompt, **({"system": system} if system else {}), "examples": list(examples)},
        "output": {"path": "unused.parquet", "fields": _fields(fields), "max_reask": max_reask},
        "model": _model(model, base_url, api_key_env),
        "limits": limits,
    }
    return spec_from_dict(doc, base_dir=Path.cwd(), name="map_batches", source="llmap.ray.map_batches")


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
        from llmap.run.ray_budget import budget_actor
        from llmap.run.ray_worker import RowWorker

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


def map_batches(ds: Any, *, prompt: str, fields: Mapping[str, Any], model: str | Mapping[str, Any] | ModelSpec,
                system: str | None = None, examples: Sequence[Mapping[str, Any]] = (), base_url: str | None = None,
                api_key_env: str | None = None, concurrency: int = 2, requests_in_flight: int = 64,
                rpm: float | None = None, tpm: float | None = None, max_reask: int = 2, batch_size: int = 256,
                cache: bool = True) -> Any:
    """Ask the model once per row of a Ray Dataset; returns the Dataset with the answers added.

    Args:
        ds: a ``ray.data.Dataset``.
        prompt: the user message, a Jinja2 template over the row's columns.
        fields: output field name -> type, as for :func:`llmap.map`.
        model: an OpenAI-compatible model name (with ``base_url``), or a ``[model]`` dict /
            :class:`~llmap.spec.ModelSpec`.
        system, examples, base_url, api_key_env, max_reask: as for :func:`llmap.map`.
        concurrency: mapper actors (each one llmap dispatcher).
        requests_in_flight: the most requests in flight across all mappers (the AIMD ceiling).
        rpm, tpm: requests and tokens per minute for the whole cluster; default: learned
            from the provider's rate-limit headers.
        batch_size: rows per batch handed to a mapper.
        cache: use llmap's response cache (a file on the driver's node, shared through an actor).

    Returns:
        A Dataset with the input columns, one column per field, and ``_status``, ``_error``,
        ``_model``, ``_source``.

    Raises:
        SpecError: bad arguments (before any request), or Ray missing.
    """
    from llmap.run.ray import require_ray
    from llmap.store.cache import FILE_NAME as CACHE_FILE
    from llmap.store.cache import default_cache_dir

    ray = require_ray()
    spec = _spec(prompt, fields, model, system=system, examples=examples, base_url=base_url,
                 api_key_env=api_key_env, concurrency=requests_in_flight, max_reask=max_reask, rpm=rpm, tpm=tpm)
    from llmap.run.ray_budget import budget_actor

    budget_actor(spec, workers=concurrency)  # made (and held) here, joined by every mapper
    if cache:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        actor = ray.remote(CacheService).options(name=CACHE_ACTOR, namespace="llmap", get_if_exists=True,
                                                 num_cpus=0, scheduling_strategy=here).remote(
            str(default_cache_dir() / CACHE_FILE), spec.cache.ttl_s)
        ray.get(actor.ready.remote())
        _ACTORS[CACHE_ACTOR] = actor  # a handle held here keeps the actor alive as long as this driver
    return ds.map_batches(LlmapMapper, fn_constructor_kwargs={"spec": spec, "workers": concurrency, "cache": cache},
                          batch_size=batch_size, batch_format="pyarrow", concurrency=concurrency, num_cpus=0)

