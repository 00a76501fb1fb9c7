"""The engine's seam to the operators: check a job's operator before any request, run it, say what it did.

:func:`prepare` (preflight) adapts the input plan to the operator (the output's
columns, reduce's group columns) and opens the embedding model, checking it the
way providers are checked. :func:`run_operator` runs ``cluster``, ``resolve`` or
``reduce`` on the engine's pieces (the job's lanes, stats, response cache and
progress) and returns its summary. ``filter`` runs the ``map`` path unchanged;
:func:`filter_summary` counts what it kept. ``kind = "map"`` never comes here.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pyarrow as pa

from llmap import errors as E
from llmap.control.lanes import Lane
from llmap.io.sinks import ResultLayout, export_families
from llmap.io.sources import Source
from llmap.observe.progress import Progress, Tally
from llmap.operators.context import OpContext
from llmap.plan import Compiled, InputPlan
from llmap.providers.embeddings import Embedder, make_embedder
from llmap.run.pool import install_sigterm
from llmap.run.stats import DispatchStats, Stop
from llmap.spec import JobSpec
from llmap.store.answers import AnswerCache
from llmap.store.ledger import Ledger
from llmap.store.operators import OperatorBook
from llmap.store.vectors import VectorCache

__all__ = ["OWN_PIPELINE", "check_kind_executor", "filter_summary", "finish_operator", "operator_report",
           "prepare_operator", "run_operator", "summary_line"]

#: Kinds with a pipeline of their own; ``filter`` is ``map`` with a filtered export.
OWN_PIPELINE = ("cluster", "resolve", "reduce")


def check_kind_executor(spec: JobSpec, executor: str) -> None:
    """Cluster, resolve and reduce run in this process.

    Raises:
        SpecError: another executor was asked for.
    """
    if executor != "local" and spec.kind in OWN_PIPELINE:
        raise E.SpecError(f"kind = {spec.kind!r} runs in this process; drop --executor {executor}")


async def prepare_operator(spec: JobSpec, source: Source, inp: InputPlan) -> tuple[InputPlan, Embedder | None]:
    """Check the operator against its input and open what it needs, before any request.

    Returns:
        The input plan for the operator (reduce: its group columns read, one output row per group; map and
        filter: ``inp`` itself), and the checked embedding model for cluster and resolve (the caller closes
        it), else None.

    Raises:
        SpecError: a ``[reduce] by`` column is missing, or the embedding model cannot be reached or loaded.
    """
    if spec.kind == "reduce":
        by = spec.reduce.by
        source.require_columns([(c, "[reduce] by") for c in by])
        schema = source.arrow_schema(by) if by else pa.schema([])
        data = pa.schema(list(schema) + [pa.field("_rows", pa.int64())])
        inp = dataclasses.replace(inp, data_columns=list(dict.fromkeys(inp.data_columns + by)),
                                  layout=ResultLayout(data, spec.result_fields()))
    if spec.kind not in ("cluster", "resolve"):
        return inp, None
    embedder = make_embedder(spec)
    try:
        await embedder.check()
    except BaseException:
        await embedder.aclose()
        raise
    return inp, embedder


async def run_operator(spec: JobSpec, compiled: Compiled, ledger: Ledger, run_id: int, lanes: list[Lane],
                       stats: DispatchStats, answers: AnswerCache, progress: Progress, tally: Tally,
                       embedder: Embedder | None) -> dict[str, Any]:
    """Run the job's operator over plan ``run_id``; results are committed to the ledger as they come.

    A budget cap, an error every request would hit, or a step that cannot be answered (an embedding
    request that failed after its retries) stops it through ``stats`` (``stop_reason``): rows stay
    pending, every answered step is kept, and the next run continues.

    Returns:
        The operator's figures (the summary line and ``llmap report`` show them).

    Raises:
        asyncio.CancelledError: Ctrl-C or SIGTERM; what was committed is kept.
        DiskFull: a commit found the disk full.
    """
    from llmap.operators.cluster import run_cluster
    from llmap.operators.reduce import run_reduce
    from llmap.operators.resolve import run_resolve

    vectors = VectorCache() if spec.cache.enabled and embedder is not None else None
    ctx = OpContext(spec, compiled, ledger, run_id, lanes, stats, answers, progress, tally, embedder, vectors)
    undo = install_sigterm(asyncio.current_task())
    try:
        await {"cluster": run_cluster, "resolve": run_resolve, "reduce": run_reduce}[spec.kind](ctx)
    except Stop:
        pass  # stats says why
    except E.ProviderError as exc:  # an embedding request that failed after its retries
        stats.halt(f"{type(exc).__name__}: {exc}")
    finally:
        undo()
        if vectors is not None:
            vectors.close()
        ledger.record([], run_id=run_id, requests=stats.take_request_log())
    return {k: v for k, v in ctx.summary.items() if not k.startswith("_")}


def finish_operator(spec: JobSpec, ledger: Ledger, run_id: int) -> dict[str, Any] | None:
    """After the output is exported: cluster's families table beside it; filter's counts (returned).

    Raises:
        DiskFull: the disk filled while writing the families table.
    """
    if spec.kind == "cluster":
        export_families(spec, ledger)
    if spec.kind == "filter":
        return filter_summary(spec, ledger, run_id)
    return None


def filter_summary(spec: JobSpec, ledger: Ledger, run_id: int) -> dict[str, Any]:
    """``kind = "filter"``: rows kept (the field is true), dropped (false or null) and not settled."""
    field = spec.filter_field()
    path = '$."' + field.replace('"', '\\"') + '"'
    kept, dropped, other = ledger.connection.execute(
        "SELECT coalesce(sum(status IN ('done', 'fallback') AND json_extract(output, ?) = 1), 0), "
        "coalesce(sum(status IN ('done', 'fallback') AND coalesce(json_extract(output, ?), 0) != 1), 0), "
        "coalesce(sum(status NOT IN ('done', 'fallback', 'skipped')), 0) FROM rows WHERE plan = ?",
        (path, path, run_id)).fetchone()
    summary = {"field": field, "kept": kept, "dropped": dropped, "unsettled": other}
    ledger.record([], also=[OperatorBook.summary_statement(run_id, "filter", summary)])
    return summary


def summary_line(kind: str, s: dict[str, Any]) -> str:
    """The operator's figures in one line, for the end of ``llmap run``."""
    if not s:
        return ""
    if kind == "filter":
        return (f"filter on {s['field']}: {s['kept']:,} kept, {s['dropped']:,} dropped"
                + (f", {s['unsettled']:,} not settled" if s.get("unsettled") else ""))
    if kind == "cluster":
        rate = f"{100 * s.get('assignment_rate', 0):.1f}%"
        merge = f" ({100 * s['merge_success_rate']:.0f}% of {s['merge_pairs']:,} pairs judged)" \
            if s.get("merge_success_rate") is not None else ""
        return (f"cluster: assignment rate {rate} ({s.get('assigned', 0):,} of {s.get('rows', 0):,} rows), "
                f"{s.get('families_created', 0):,} families created ({s.get('families', 0):,} in all), "
                f"{s.get('merges', 0):,} merges made{merge}" + _calls(s))
    if kind == "resolve":
        return (f"resolve: {s.get('entities', 0):,} entities from {s.get('rows', 0):,} rows, "
                f"{s.get('merged_rows', 0):,} rows merged; {s.get('judged', 0):,} pairs judged "
                f"({s.get('same', 0):,} the same) of {s.get('candidates', 0):,} candidates" + _calls(s))
    if kind == "reduce":
        return (f"reduce: {s.get('groups', 0):,} groups ({s.get('reduced', 0):,} reduced now, "
                f"{s.get('hierarchical', 0):,} in several levels, {s.get('chunks', 0):,} chunks)" + _calls(s))
    return ""


def operator_report(spec: JobSpec, run: int | None = None) -> list[str]:
    """``llmap report``'s lines on the operator of run ``run`` (default the latest): its summary line; the
    largest families (cluster) or a sample of the merges (resolve). Read-only; empty for map or a run without one.
    """
    if spec.kind == "map" or not spec.ledger_path.is_file():
        return []
    ledger = Ledger(spec.ledger_path, readonly=True)
    try:
        book = OperatorBook(ledger)
        got = book.summary(run)
        if got is None:
            return []
        _, kind, s = got
        lines = [f"{kind}: {summary_line(kind, s).split(': ', 1)[-1]}"]
        if kind == "cluster":
            fams = sorted(book.families(), key=lambda f: -f.size)
            lines += [f"  {f.id} ({f.size:,} rows) {f.name}: {f.description}" for f in fams[:10]]
            if len(fams) > 10:
                lines.append(f"  ... {len(fams) - 10:,} more in the families table")
        if kind == "resolve":
            lines.append(f"  threshold {s.get('threshold')}; merges, largest first:")
            for m in s.get("merges_sample") or []:
                lines.append(f"  {m['entity']} ({m['rows']} rows): " + " | ".join(m["texts"]))
        return lines
    finally:
        ledger.close()


def _calls(s: dict[str, Any]) -> str:
    emb = s.get("embedding_requests")
    return f"; {emb:,} embedding requests" if emb else ""
