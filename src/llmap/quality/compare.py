"""``llmap eval --models A,B,C --sample N``: one labelled sample through several models, side by side.

The sample is ``N`` rows (seeded, :attr:`~llmap.spec.quality.EvalSpec.seed`) of the latest run's rows
that have a true answer (every labelled row without ``--sample``). Each model answers it as the job
would answer it, through the normal path: the same prompt, fields, checks, re-asks, limits and the
response cache, one model at a time. Each model's run has its own ledger beside the job's
(``.llmap/<job>.eval/<model>.ledger.sqlite``): running the comparison again sends nothing for rows
already answered, and a later full run with the chosen model reuses the sample's answers from the cache.

For each model it reports, over the sample:

- accuracy: the done rows whose every labelled field equals its label, with the 95% Wilson interval;
- cost: what the sample's answers cost at the model's list prices (tokens of each answer, from the
  ledger or, for an answer the cache gave, from the cache entry: so the figure is the same on a rerun
  that costs nothing), and cost per correct answer (cost / correct rows);
- latency: the mean seconds per answer (as the requests took, cached ones included when the cache kept it);
- what this comparison itself sent and spent (0 on a rerun).

Models are named as ``[[model]]`` or ``[[eval.models]]`` tables name them (``name`` or ``provider:name``);
another name is the first model with that name (same provider, endpoint and key; its prices unknown,
shown as such).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from llmap import errors as E
from llmap.io.sources import Source
from llmap.pricing import cost_usd
from llmap.quality.eval import labelled_keys, latest_rows
from llmap.quality.labels import key_column
from llmap.quality.metrics import Rate
from llmap.spec import JobSpec, ModelSpec
from llmap.store.answers import AnswerCache
from llmap.store.cache import FILE_NAME, ResponseCache, default_cache_dir
from llmap.store.ledger import Ledger

__all__ = ["ModelResult", "compare", "resolve_models"]


@dataclass
class ModelResult:
    """One model's figures over the sample.

    Attributes:
        model: ``provider:name``.
        sample: rows in the sample.
        done: of them, rows the model answered (done).
        accuracy: done rows whose every labelled field is right.
        cost_usd: the sample's answers at the model's list prices, USD (None: prices unknown).
        cost_per_correct_usd: ``cost_usd / accuracy.k`` (None when nothing is right or prices are unknown).
        latency_s: mean seconds per answer (None when unknown).
        requests: requests this comparison sent to it (0 on a rerun).
        spent_usd: what those requests cost, USD.
        priced: whether the model has prices (``price_in``/``price_out`` given, or a local model).
        rank: 1 for the most accurate (ties: the cheaper per correct answer first).
    """

    model: str
    sample: int
    done: int
    accuracy: Rate
    cost_usd: float | None
    cost_per_correct_usd: float | None
    latency_s: float | None
    requests: int
    spent_usd: float
    priced: bool
    rank: int = 0

    def as_dict(self) -> dict[str, Any]:
        """For ``--json``: unrounded numbers."""
        return {"model": self.model, "rank": self.rank, "sample": self.sample, "done": self.done,
                **self.accuracy.as_dict("accuracy"), "correct": self.accuracy.k, "cost_usd": self.cost_usd,
                "cost_per_correct_usd": self.cost_per_correct_usd, "latency_s": self.latency_s,
                "requests": self.requests, "spent_usd": self.spent_usd, "priced": self.priced}


def resolve_models(spec: JobSpec, names: list[str]) -> list[tuple[ModelSpec, bool]]:
    """The model specs ``names`` mean, each with whether its prices are known.

    A name is a ``[[model]]`` or ``[[eval.models]]`` entry's ``name`` or label (``provider:name``); any
    other name is the first model with that name.

    Raises:
        SpecError: no name given, or a name twice.
    """
    if not names:
        raise E.SpecError("--models is empty; name the models to compare, e.g. --models gpt-4o-mini,gpt-4o")
    dup = [n for n in names if names.count(n) > 1]
    if dup:
        raise E.SpecError(f"--models names {dup[0]!r} twice")
    known = [*spec.models, *spec.eval.models]
    out = []
    for name in names:
        m = next((m for m in known if name in (m.name, m.label)), None)
        if m is None:
            base = spec.model
            bare = name.split(":", 1)[1] if name.startswith(base.provider + ":") else name
            m = base.model_copy(update={"name": bare})
            priced = base.provider == "local"
        else:
            priced = m.provider == "local" or {"price_in", "price_out"} <= m.model_fields_set
        out.append((m.model_copy(update={"escalate_if": None, "batch": False}), priced))
    return out


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "model"


def sample_keys(spec: JobSpec, n: int | None, seed: int) -> tuple[list[tuple[str, dict[str, Any]]], dict]:
    """The sample: ``(key, row data)`` of ``n`` labelled rows of the latest run (all of them when ``n`` is
    None), in input order, and key -> field -> true value.

    Raises:
        SpecError: no labelled row.
    """
    _, rows = latest_rows(spec)
    truth = labelled_keys(spec, rows)
    pool = [(k, d) for k, d, *_ in rows if k in truth]
    if not pool:
        raise E.SpecError(f"job {spec.name!r} has no labelled row to compare models on: add labels with `llmap "
                          "label JOB FILE` (or [eval] gold), after a run of the job")
    if n is not None and n < len(pool):
        chosen = set(random.Random(seed).sample(range(len(pool)), n))
        pool = [p for i, p in enumerate(pool) if i in chosen]
    return pool, truth


async def compare(spec: JobSpec, names: list[str], *, sample: int | None = None, seed: int | None = None,
                  say: Callable[[str], None] = lambda _: None) -> tuple[list[ModelResult], int]:
    """Run the labelled sample through each model and rank them (see the module docstring).

    Args:
        spec: the job.
        names: the models (``--models``).
        sample: rows (``--sample``); default ``[eval] sample``, else every labelled row.
        seed: the sample's seed; default ``[eval] seed``.
        say: where progress lines go.

    Returns:
        The results ranked (most accurate first), and the sample size.

    Raises:
        SpecError: a bad name, no labelled row, or a model's run could not start (its own error).
    """
    from llmap.engine import Job

    models = resolve_models(spec, names)
    pool, truth = sample_keys(spec, sample if sample is not None else spec.eval.sample,
                              seed if seed is not None else spec.eval.seed)
    key = key_column(spec)
    table = pa.Table.from_pylist([data for _, data in pool])
    folder = spec.ledger_path.parent / f"{spec.name}.eval"
    inp = spec.input.model_copy(update={"path": "<eval sample>", "sql": None, "key": key, "where": None,
                                        "limit": None, "order_by": None, "per_group": None, "encoding": None})
    results = []
    for m, priced in models:
        slug = _slug(m.label)
        sub = spec.model_copy(update={
            "models": [m], "cascade": None, "input": inp, "ledger": str(folder / f"{slug}.ledger.sqlite"),
            "output": spec.output.model_copy(update={"path": str(folder / f"{slug}.parquet")}),
        })
        say(f"llmap: eval: {m.label}: {len(pool):,} rows")
        res = await Job(sub, source=Source.from_arrow(table)).arun()
        results.append(_score(sub, m, priced, pool, truth, res.requests, res.cost_usd))
    results.sort(key=lambda r: (-(r.accuracy.value or 0.0), r.cost_per_correct_usd if r.cost_per_correct_usd
                                is not None else float("inf"), r.model))
    for i, r in enumerate(results, 1):
        r.rank = i
    return results, len(pool)


def _score(sub: JobSpec, m: ModelSpec, priced: bool, pool: list[tuple[str, dict[str, Any]]],
           truth: dict[str, dict[str, Any]], requests: int, spent: float) -> ModelResult:
    with Ledger(sub.ledger_path) as led:
        plan = led.latest_plan()
        got = {k: (status, output, source, pt, ct, lat)
               for k, status, output, source, pt, ct, lat in led.connection.execute(
            "SELECT key, status, output, source, prompt_tokens, completion_tokens, latency_s FROM rows WHERE plan = ?",
            (plan,))}
    cached = _cache_entries(sub, m, pool, {k for k, v in got.items() if v[2] in ("cache", "stale")})
    right = done = 0
    tokens_in = tokens_out = 0
    latencies = []
    for k, _data in pool:
        status, output, source, pt, ct, lat = got.get(k, ("pending", None, None, 0, 0, None))
        entry = cached.get(k)
        if entry is not None:
            pt, ct, lat = entry.prompt_tokens, entry.completion_tokens, entry.latency_s
        tokens_in += pt or 0
        tokens_out += ct or 0
        if lat is not None and (source == "model" or entry is not None):
            latencies.append(lat)
        if status != "done" or not output:
            continue
        done += 1
        answer = json.loads(output)
        if all(answer.get(f) == v for f, v in truth[k].items()):
            right += 1
    cost = cost_usd(m, tokens_in, tokens_out, 0, 0) if priced else None
    acc = Rate(right, done)
    return ModelResult(m.label, len(pool), done, acc, cost, cost / right if cost is not None and right else None,
                       sum(latencies) / len(latencies) if latencies else None, requests, spent, priced)


def _cache_entries(sub: JobSpec, m: ModelSpec, pool: list[tuple[str, dict[str, Any]]], keys: set[str]) -> dict:
    """Key -> the response cache's entry for the rows answered from the cache (their tokens and latency)."""
    path: Path = default_cache_dir() / FILE_NAME
    if not keys or not sub.cache.enabled or not path.is_file():
        return {}
    from llmap.plan import compile_spec

    compiled = compile_spec(sub)
    try:
        ckeys = {k: AnswerCache.key(m, compiled.renderer.messages(d), compiled.schema.json_schema)
                 for k, d in pool if k in keys}
    finally:
        compiled.close()
    cache = ResponseCache(path, readonly=True)
    try:
        found = cache.get_many(list(ckeys.values()), count_hits=False)
    finally:
        cache.close()
    return {k: found[c] for k, c in ckeys.items() if c in found}
