"""``llmap.map`` and ``llmap.amap``: the one-call Python API over in-memory data.

``amap`` is the async core (for Jupyter and async code, where an event loop
already runs); ``map`` is its thin sync wrapper.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from llmap.engine import Job, require_no_running_loop
from llmap.errors import SpecError
from llmap.io.sinks import result_batches, stored_layout
from llmap.io.sources import Source
from llmap.plan import spec_from_dict
from llmap.prompt.render import Renderer
from llmap.spec import JobSpec, ModelSpec
from llmap.spec.base import DEFAULT_LOCAL_MODEL
from llmap.store.ledger import Ledger

__all__ = ["amap", "call_spec", "map", "model_table"]

_builtin_map = map


def _to_arrow(data: Any) -> tuple[pa.Table, str]:
    """(table, kind) where kind is how to give the result back."""
    if isinstance(data, pa.Table):
        return data, "arrow"
    mod = type(data).__module__.split(".")[0]
    if mod == "pandas":
        return pa.Table.from_pandas(data, preserve_index=False), "pandas"
    if mod == "polars":
        return data.to_arrow(), "polars"
    if isinstance(data, Sequence) and not isinstance(data, str | bytes):
        if not all(isinstance(r, Mapping) for r in data):
            raise SpecError("llmap.map: data must be a list of dicts, a pandas or polars DataFrame, or a pyarrow Table")
        return pa.Table.from_pylist(list(data)), "records"
    raise SpecError(
        f"llmap.map: cannot read {type(data).__name__}; pass a list of dicts, a pandas or polars DataFrame, "
        "or a pyarrow Table"
    )


def _from_arrow(table: pa.Table, kind: str) -> Any:
    if kind == "pandas":
        return table.to_pandas()
    if kind == "polars":
        import polars as pl

        return pl.from_arrow(table)
    if kind == "records":
        return table.to_pylist()
    return table


def _fields(fields: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: ({"type": v} if isinstance(v, str) else dict(v)) for k, v in fields.items()}


def model_table(model: str | Mapping[str, Any] | ModelSpec, base_url: str | None = None,
                api_key_env: str | None = None) -> dict[str, Any]:
    """The ``[model]`` table a model argument stands for (``llmap.map``'s ``model=``, the CLI's ``--model``).

    Args:
        model: ``"local"`` or ``"gemma-3-270m"`` (the embedded model), a
            name starting with ``claude`` (``provider = "anthropic"``), a label
            ``openai:NAME`` / ``anthropic:NAME``, any other name
            (``provider = "openai"``), or a ``[model]`` table as a dict or
            :class:`~llmap.spec.ModelSpec`, returned as it is.
        base_url, api_key_env: added to a named model's table when given.

    Returns:
        The table as a dict, for :func:`llmap.plan.spec_from_dict`.
    """
    if isinstance(model, ModelSpec):
        return model.model_dump(exclude_defaults=True)
    if isinstance(model, Mapping):
        return dict(model)
    if model in ("local", DEFAULT_LOCAL_MODEL, f"local:{DEFAULT_LOCAL_MODEL}"):
        return {"provider": "local"}
    prefix, _, rest = model.partition(":")
    if rest and prefix in ("openai", "anthropic"):  # a label, as the output's _model column writes it
        provider, model = prefix, rest
    else:  # Claude models speak Anthropic's Messages API (for an OpenAI-compatible shim, pass a [model] dict)
        provider = "anthropic" if model.startswith("claude") else "openai"
    doc: dict[str, Any] = {"provider": provider, "name": model}
    if base_url:
        doc["base_url"] = base_url
    if api_key_env:
        doc["api_key_env"] = api_key_env
    return doc


def call_spec(*, name: str, source: str, prompt: str, fields: Mapping[str, Any],
              model: str | Mapping[str, Any] | ModelSpec, system: str | None = None,
              examples: Sequence[Mapping[str, Any]] = (), base_url: str | None = None,
              api_key_env: str | None = None, max_reask: int = 2, limits: Mapping[str, Any] | None = None,
              output_path: str = "unused.parquet", ledger: str | None = None) -> JobSpec:
    """The job spec of a one-call API (:func:`map`, :func:`llmap.ray.map_batches`) from its arguments.

    The input is a placeholder (``SELECT 1``): the caller hands its rows over as a
    :class:`~llmap.io.sources.Source` or settles them itself.

    Args:
        name: the job's name; ``source``: what the spec came from, for error messages.
        prompt, fields, model, system, examples, base_url, api_key_env, max_reask: as for :func:`amap`.
        limits: the ``[limits]`` table (``concurrency``, ``rpm``, ``tpm``, ...).
        output_path: ``[output] path``; ``ledger``: the ledger file, or None for the default.

    Raises:
        SpecError: a bad argument, as one line naming it.
    """
    doc: dict[str, Any] = {
        "name": name,
        "input": {"sql": "SELECT 1"},
        "prompt": {"user": prompt, **({"system": system} if system else {}), "examples": list(examples)},
        "output": {"path": output_path, "fields": _fields(fields), "max_reask": max_reask},
        "model": model_table(model, base_url, api_key_env),
        "limits": dict(limits or {}),
    }
    if ledger is not None:
        doc["ledger"] = ledger
    spec = spec_from_dict(doc, base_dir=Path.cwd(), name=name, source=source)
    Renderer.from_spec(spec.prompt, source=source).check_examples(source=source)  # rows have every column
    return spec


async def amap(
    data: Any,
    *,
    prompt: str,
    fields: Mapping[str, Any],
    model: str | Mapping[str, Any] | ModelSpec = "local",
    system: str | None = None,
    examples: Sequence[Mapping[str, Any]] = (),
    base_url: str | None = None,
    api_key_env: str | None = None,
    concurrency: int = 16,
    max_reask: int = 2,
    ledger: str | Path | None = None,
) -> Any:
    """Ask the model once per row and return the rows with the answer fields added (async).

    The same as :func:`map`, awaited in the running event loop: use it in
    Jupyter and in async code (``out = await llmap.amap(rows, ...)``).

    Args:
        data: a list of dicts, a pandas or polars DataFrame, or a pyarrow Table.
        prompt: the user message, a Jinja2 template over the row's columns.
        fields: output field name -> type (``"string"``, ``"integer"``,
            ``"number"``, ``"boolean"``) or a dict with ``type``, ``enum``,
            ``description``.
        model: ``"local"`` (embedded Gemma 3 270M; needs ``llmap[local]``), a
            Claude model name (``"claude-haiku-4-5"``: Anthropic's Messages API,
            key in ``ANTHROPIC_API_KEY``), an OpenAI-compatible model name (with
            ``base_url``), or a ``[model]`` dict / :class:`~llmap.spec.ModelSpec`.
        system: optional system prompt template.
        examples: few-shot ``{"input": {...}, "output": {...}}`` pairs.
        base_url: the base URL when ``model`` is a name (OpenAI-compatible, or
            Anthropic's for a Claude model; default the provider's own).
        api_key_env: environment variable holding the API key.
        concurrency: requests in flight.
        max_reask: re-asks after an invalid answer.
        ledger: a ledger file to make the call resumable; default a temp file.

    Returns:
        The same kind as ``data`` (list of dicts for a list), with one column
        per field plus ``_status``, ``_error``, ``_model``, ``_source``, ``_confidence`` and ``_raw``, in input order.

    Raises:
        SpecError: bad arguments or a field name that clashes with a column.
        LedgerLocked: another run holds ``ledger``; nothing was sent.
        RunInterrupted: Ctrl-C.
    """
    table, kind = _to_arrow(data)
    clash = [f for f in fields if f in table.column_names]
    if clash:
        raise SpecError(f"llmap.map: field {clash[0]!r} is already a column of data; rename the field")
    with tempfile.TemporaryDirectory(prefix="llmap-map-") as tmp:
        spec = call_spec(name="map", source="llmap.map", prompt=prompt, fields=fields, model=model, system=system,
                         examples=examples, base_url=base_url, api_key_env=api_key_env, max_reask=max_reask,
                         limits={"concurrency": concurrency}, output_path=str(Path(tmp) / "out.parquet"),
                         ledger=str(ledger) if ledger else str(Path(tmp) / "map.ledger.sqlite"))
        job = Job(spec, source=Source.from_arrow(table))
        await job.arun(export_output=False)
        with Ledger(spec.ledger_path, readonly=True) as led:
            plan = led.latest_plan()
            layout = stored_layout(led, spec)
            answers = pa.Table.from_batches(list(result_batches(led, plan, layout)), schema=layout.schema)
    out = table
    for name in [*fields, "_status", "_error", "_model", "_source", "_confidence", "_raw"]:
        out = out.append_column(name, answers.column(name))
    return _from_arrow(out, kind)


def map(  # noqa: A001 - the library's name for its one verb
    data: Any,
    *,
    prompt: str,
    fields: Mapping[str, Any],
    model: str | Mapping[str, Any] | ModelSpec = "local",
    system: str | None = None,
    examples: Sequence[Mapping[str, Any]] = (),
    base_url: str | None = None,
    api_key_env: str | None = None,
    concurrency: int = 16,
    max_reask: int = 2,
    ledger: str | Path | None = None,
) -> Any:
    """Ask the model once per row and return the rows with the answer fields added.

    A sync wrapper over :func:`amap` (it runs its own event loop); the
    arguments and the result are :func:`amap`'s.

    Raises:
        SpecError: bad arguments or a field name that clashes with a column.
        RunInterrupted: Ctrl-C.
        EventLoopRunning: called inside a running event loop (Jupyter, async
            code), where it cannot block; ``await llmap.amap(...)`` there.
    """
    require_no_running_loop("llmap.map()", "await llmap.amap(...)")
    return asyncio.run(amap(data, prompt=prompt, fields=fields, model=model, system=system, examples=examples,
                            base_url=base_url, api_key_env=api_key_env, concurrency=concurrency,
                            max_reask=max_reask, ledger=ledger))
