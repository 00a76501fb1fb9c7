"""Starting a Ray run: the workers, the budget actor and the response cache actor.

:class:`Launch` is made at the start of ``llmap run --executor ray`` (:mod:`llmap.engine`), before the
job is checked and planned, so the actors start meanwhile; :meth:`Launch.executor` hands the workers
set up to a :class:`~llmap.run.ray.executor.RayExecutor`, which leases them rows.

* The budget actor (:mod:`llmap.run.ray.budget`): one RPM/TPM budget, AIMD limit and circuit breaker
  per model for the whole cluster.
* The response cache actor (:func:`~llmap.run.ray.data.cache_actor`) on the driver's node, over llmap's
  cache file, unless ``[cache] enabled = false``.
* N :class:`~llmap.run.ray.worker.RowWorker` actors, round robin over the cluster's nodes; API keys
  reach the nodes through Ray's runtime environment.

Ray is imported only when these run; ``import llmap`` never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
from typing import Any

from llmap import errors as E
from llmap.run.dispatch import Dispatcher
from llmap.run.ray.budget import budget_actor
from llmap.run.ray.executor import RayExecutor, connect, drop_worker
from llmap.run.ray.worker import RowWorker
from llmap.run.stats import DispatchStats
from llmap.spec import JobSpec
from llmap.store.cache import FILE_NAME as CACHE_FILE
from llmap.store.cache import default_cache_dir

__all__ = ["Launch"]


def _secrets(spec: JobSpec) -> dict[str, str]:
    """The environment variables the job's models read (API keys, header values) that are set here:
    workers on other nodes get them through Ray's runtime environment."""
    names = set()
    for m in spec.models:
        if getattr(m, "api_key_env", None):
            names.add(m.api_key_env)
        for v in (getattr(m, "headers", None) or {}).values():
            names.update(re.findall(r"\$\{(\w+)\}", str(v)))
    return {n: os.environ[n] for n in sorted(names) if n in os.environ}


class Launch:
    """Ray workers starting: made at the start of a run, so the workers (and the budget and cache
    actors) start while the driver checks and plans the job; :meth:`executor` waits for the first.

    The first worker starts at once and the others once it is set up (or failed): on a busy machine
    several Python processes starting together each take longer, and one worker can send from the
    start (its share of the budget's concurrency follows the workers that report, not those expected).

    Args:
        spec: the job.
        workers: how many (default: one per CPU of the cluster).
        address: the Ray cluster (see :func:`connect`).

    Raises:
        SpecError: Ray is missing or unreachable (at once: connecting blocks).
    """

    _rest: asyncio.Future | None = None  # starts the workers after the first

    def __init__(self, spec: JobSpec, *, workers: int | None, address: str | None = "auto") -> None:
        connect(address)
        import ray

        n = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.budget = budget_actor(spec, workers=1)
        self.cache = None
        if spec.cache.enabled:
            from llmap.run.ray.data import cache_actor

            self.cache = cache_actor(default_cache_dir() / CACHE_FILE, spec.cache.ttl_s)
        token = uuid.uuid4().hex[:8]
        env = _secrets(spec)
        options: dict[str, Any] = {"namespace": "llmap", "num_cpus": 0, "max_concurrency": 10_000}
        if env:
            options["runtime_env"] = {"env_vars": env}
        remote, nodes = ray.remote(RowWorker), _nodes()
        self.handles: dict[str, Any] = {}
        self._setups: dict[str, asyncio.Future] = {}

        def start(i: int) -> None:
            name = f"llmap-worker-{spec.name}-{token}-{i}"
            self.handles[name] = remote.options(name=name, scheduling_strategy=_place(nodes, i), **options).remote(
                spec, name, self.budget, self.cache)
            self._setups[name] = asyncio.ensure_future(_setup(self.handles[name]))

        async def rest() -> None:
            await asyncio.wait(list(self._setups.values()))
            for i in range(1, n):
                start(i)

        start(0)
        self._rest = asyncio.ensure_future(rest())

    async def executor(self, dispatcher: Dispatcher, stats: DispatchStats, **kw: Any) -> RayExecutor:
        """Wait until one worker is set up; the executor over it (the others join it as they start).

        A worker that could not be placed or started (its node went away) is dropped; the
        others go on.

        Raises:
            SpecError: a worker cannot build the job's providers (a missing API key variable there).
            ray.exceptions.RayError: no worker started; the first worker's error.
        """
        import ray

        seen: set[str] = set()
        ready: dict[str, Any] = {}
        errors: dict[str, BaseException] = {}
        try:
            while not ready:
                waits = [f for n, f in self._setups.items() if n not in seen]
                if self._rest is not None and not self._rest.done():
                    waits.append(self._rest)
                if not waits:
                    break
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for name, fut in [(n, f) for n, f in self._setups.items() if n not in seen and f.done()]:
                    seen.add(name)
                    exc = fut.exception()
                    if exc is None:
                        ready[name] = self.handles[name]
                        continue
                    cause = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) else None
                    if isinstance(cause, E.LlmapError):  # the job, not the cluster: every worker would fail alike
                        raise E.SpecError(f"a Ray worker could not start the job: {cause}") from None
                    errors[name] = exc
            if self._rest is not None:
                await self._rest  # the other workers are starting
        except BaseException:
            await self.abandon()
            raise
        if not ready:
            await self.abandon()
            raise next(iter(errors.values()))
        for name in errors:
            drop_worker(name, self.handles.pop(name), errors[name])
        joining = {name: (self.handles[name], fut) for name, fut in self._setups.items() if name not in seen}
        self.handles, self._setups = {}, {}
        cache, self.cache = self.cache, None
        return RayExecutor(ready, self.budget, dispatcher, stats, joining=joining, cache=cache, **kw)

    async def abandon(self) -> None:
        """End the workers (the run stopped before it needed them)."""
        import ray

        if self._rest is not None:
            self._rest.cancel()
            await asyncio.gather(self._rest, return_exceptions=True)
        for fut in self._setups.values():
            fut.cancel()
        await asyncio.gather(*self._setups.values(), return_exceptions=True)
        for h in [*self.handles.values(), *([self.cache] if self.cache is not None else [])]:
            with contextlib.suppress(Exception):
                ray.kill(h)
        self.handles, self._setups, self.cache = {}, {}, None


async def _setup(handle: Any) -> Any:
    return await handle.setup.remote()


def _nodes() -> list[str]:
    """The ids of the cluster's live nodes that have CPUs, in a stable order."""
    import ray

    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)


def _place(nodes: list[str], i: int) -> Any:
    """Worker ``i``'s placement: round robin over ``nodes``. Ray's SPREAD and soft node affinity are
    best effort and put several zero-CPU workers on one node at times; a hard affinity to a node
    that went away fails that worker's start, and :meth:`Launch.executor` goes on without it."""
    if not nodes:
        return "SPREAD"
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=False)
