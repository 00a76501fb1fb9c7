"""llmap on Ray Data: ``llmap.ray.map_batches(ds, prompt=..., fields=..., model=...)``.

For pipelines whose rows are a Ray Dataset already. Each batch goes through
llmap's own dispatcher (render, send, validate, re-ask, fail over), in a pool
of :class:`~llmap.run.ray.data.LlmapMapper` actors that share:

* the cluster-wide budget (:mod:`llmap.run.ray.budget`): one RPM/TPM limit,
  Retry-After pauses, AIMD limit and circuit breaker per model, whatever the
  number of actors (the same budget actor as ``llmap run --executor ray`` on
  the same models);
* the response cache: a named actor (:class:`~llmap.run.ray.data.CacheService`) on the driver's
  node keeps llmap's usual cache file, so an answer paid for by a batch job,
  ``llmap.map`` or another pipeline is not paid for again, and the reverse.

Every row comes back with the output fields plus ``_status`` (``done`` or
``failed``), ``_error``, ``_model``, ``_source``, ``_confidence`` and ``_raw``: a row that fails (a bad
value, retries spent, an answer that never validates) is a row with
``_status = "failed"`` and the error, never a crashed task. There is no
ledger: Ray Data owns the rows; rerunning the pipeline answers the rows done
before from the cache.

Ray is imported only when these functions run; ``import llmap`` never imports it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from llmap.spec import ModelSpec

__all__ = ["map_batches"]

#: Handles of the actors this driver made (Ray ends an actor whose handles are all gone).
_ACTORS: dict[str, Any] = {}


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
        ``_model``, ``_source``, ``_confidence``, ``_raw``.

    Raises:
        SpecError: bad arguments (before any request), or Ray missing.
    """
    from llmap.api import call_spec
    from llmap.run.ray.budget import budget_actor
    from llmap.run.ray.data import CACHE_ACTOR, CacheService, LlmapMapper
    from llmap.run.ray.executor import require_ray
    from llmap.store.cache import FILE_NAME as CACHE_FILE
    from llmap.store.cache import default_cache_dir

    ray = require_ray()
    limits: dict[str, Any] = {"concurrency": requests_in_flight}
    if rpm:
        limits["rpm"] = rpm
    if tpm:
        limits["tpm"] = tpm
    spec = call_spec(name="map_batches", source="llmap.ray.map_batches", prompt=prompt, fields=fields, model=model,
                     system=system, examples=examples, base_url=base_url, api_key_env=api_key_env,
                     max_reask=max_reask, limits=limits)
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
