"""``llmap run JOB --preview N``: a few sampled rows answered outside the job's ledger.

The loop of editing a prompt and reading ten answers. :func:`preview` draws
N rows at random (reservoir sampling with a seed: the same seed shows the
same rows again, so a prompt edit can be compared row for row) from the rows
a run would read (after ``where``, ``order_by`` and ``limit``), and runs them
through the same engine as a run: the same checks, renderer, dispatcher,
validation, re-asks and response cache, so a row answered before costs
nothing and a full run later reuses every answer the preview paid for.

It writes nothing into the job's folder: the ledger, its lock and the
output go to a temporary folder, deleted afterwards; the job's own ledger is
never opened. Batch models (``[model] batch = true``) answer in real time
here, and ``per_group`` quotas do not apply to the sample.
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmap.engine import Job, require_no_running_loop
from llmap.io.sources import Source
from llmap.observe.progress import Progress
from llmap.plan import build_source, check_input, compile_spec
from llmap.spec import JobSpec
from llmap.store.ledger import Ledger

__all__ = ["DEFAULT_SEED", "Preview", "PreviewRow", "apreview", "preview"]

#: The sample's seed when none is given: every preview of a job shows the same rows.
DEFAULT_SEED = 0


@dataclass
class PreviewRow:
    """One sampled row and its answer.

    Attributes:
        seq: the row's position among the rows a run reads (0-based).
        key: its key as the ledger would store it (the row number without ``[input] key``).
        inputs: the columns its templates read.
        answer: the output fields, or None when it failed.
        status: ``done``, ``failed``, ``skipped`` or ``fallback``.
        error: why it failed or was skipped, else None.
        model: the model that answered; source: ``model``, ``cache`` or ``stale``.
    """

    seq: int
    key: str
    inputs: dict[str, Any]
    answer: dict[str, Any] | None
    status: str
    error: str | None = None
    model: str | None = None
    source: str | None = None


@dataclass
class Preview:
    """A preview's rows and what they cost.

    Attributes:
        rows: the sampled rows, in input order.
        columns: the template variables (the inputs shown); fields: the output fields.
        seed: the sample's seed; requests: requests sent (rows answered from the cache send none).
        prompt_tokens, completion_tokens, cost_usd: what those requests used.
        elapsed_s: wall seconds, model start included.
    """

    rows: list[PreviewRow]
    columns: list[str]
    fields: list[str]
    seed: int
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def _in_template_order(variables: tuple[str, ...], source: str) -> list[str]:
    """The template variables in the order the templates first name them (the renderer sorts them)."""
    def first(v: str) -> int:
        m = re.search(rf"\b{re.escape(v)}\b", source)
        return m.start() if m else len(source)

    return sorted(variables, key=lambda v: (first(v), v))


def _sample_spec(spec: JobSpec, tmp: Path) -> JobSpec:
    """``spec`` with its ledger and output in ``tmp``, real-time models, and no filters (the sample is filtered)."""
    doc = spec.model_dump(exclude_unset=True, exclude={"batch"})  # no [batch]: the sample answers in real time
    doc["input"] = {**doc["input"], "where": None, "order_by": None, "limit": None, "per_group": None}
    doc["output"] = {**doc["output"], "path": str(tmp / "preview.parquet")}
    doc["models"] = [{**m, "batch": False} for m in doc["models"]]
    doc["ledger"] = str(tmp / "preview.ledger.sqlite")
    doc["base_dir"] = spec.base_dir
    return JobSpec.model_validate(doc)


async def apreview(spec: JobSpec, n: int, *, seed: int = DEFAULT_SEED, progress: Progress | None = None,
                   source: Source | None = None) -> Preview:
    """Answer ``n`` sampled rows of a job without touching its ledger or its folder (see the module docstring).

    Args:
        spec: the job.
        n: rows to sample (all rows when the input has fewer).
        seed: the sample's seed.
        progress: a progress reporter for the run of the sample.
        source: the job's input, already opened (closed by the caller); default ``[input]``.

    Returns:
        The :class:`Preview`.

    Raises:
        SpecError: the job or its input fails a check (nothing sent).
        RunInterrupted: Ctrl-C.
    """
    started = time.monotonic()
    compiled = compile_spec(spec)
    compiled.close()
    src = build_source(spec, given=source)
    try:
        columns = check_input(spec, compiled, src).data_columns
        table = src.sample(columns, n, seed=seed)
    finally:
        if source is None:
            src.close()
    seqs = table.column("_seq").to_pylist()
    with tempfile.TemporaryDirectory(prefix="llmap-preview-") as tmp:
        sample = _sample_spec(spec, Path(tmp))
        job = Job(sample, source=Source.from_arrow(table))
        res = await job.arun(export_output=False, progress=progress)
        with Ledger(sample.ledger_path, readonly=True) as led:
            plan = led.latest_plan()
            stored = [r for page in led.iter_rows(plan) for r in page] if plan is not None else []
    variables = _in_template_order(compiled.renderer.variables, f"{spec.prompt.system or ''}\n{spec.prompt.user}")
    rows = []
    for i, (key, data, status, output, error, model, src_kind, *_) in enumerate(stored):  # + confidence, raw
        d = json.loads(data)
        shown_key = str(seqs[i]) if not spec.input.key_columns else key
        rows.append(PreviewRow(seqs[i], shown_key, {v: d.get(v) for v in variables},
                               json.loads(output) if output else None, status, error, model, src_kind))
    notes = []
    if spec.model.batch:
        notes.append("[model] batch = true: the preview asked in real time (full price); the run goes by batch")
    if spec.input.per_group is not None:
        notes.append("[input] per_group does not apply to the sample")
    return Preview(rows, variables, list(spec.output.fields), seed, res.requests, res.prompt_tokens,
                   res.completion_tokens, res.cost_usd, time.monotonic() - started, notes)


def preview(spec: JobSpec, n: int, *, seed: int = DEFAULT_SEED, progress: Progress | None = None) -> Preview:
    """The sync twin of :func:`apreview` (it runs its own event loop).

    Raises:
        SpecError, RunInterrupted: see :func:`apreview`.
        EventLoopRunning: called inside a running event loop; ``await apreview(...)`` there.
    """
    require_no_running_loop("llmap.preview.preview()", "await llmap.preview.apreview(...)")
    return asyncio.run(apreview(spec, n, seed=seed, progress=progress))
