"""The plan: a job spec checked against itself and its input, and compiled, before any request.

:mod:`llmap.spec` is pure data (TOML ⇄ typed objects). Everything that needs
more than one key to check lives here, in one place, so a bad job is one
:class:`~llmap.errors.SpecError` (exit 2) before money is spent:

- :func:`compile_spec` (the spec alone): template syntax, field constraints,
  few-shot examples and the fallback against the fields, ``escalate_if``
  bound by DuckDB against the fields, a cost cap without prices. It returns
  the :class:`Compiled` job: renderer, output schema, cascade conditions.
- :func:`check_input` (the spec and its input's header): every column the
  job names exists, ``where`` runs, keys are present and unique; it returns
  the columns to read and the output's layout.

:func:`load_spec` and :func:`spec_from_dict` read a job and run
:func:`compile_spec`'s checks: a spec they return is one llmap can run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from llmap import errors as E
from llmap.control.cascade import EscalateIf
from llmap.io.documents import Documents
from llmap.io.extract import missing_libraries
from llmap.io.sinks import ResultLayout
from llmap.io.sources import Source
from llmap.prompt.render import Renderer
from llmap.prompt.schema import OutputSchema, check_examples, check_fallback, check_fields
from llmap.spec import JobSpec, parse_spec, read_spec
from llmap.store.fingerprint import input_hash, key_text

__all__ = ["Compiled", "InputPlan", "KeyedRow", "build_source", "check_input", "compile_spec", "keyed_rows",
           "load_spec", "spec_from_dict"]


@dataclass(frozen=True)
class Compiled:
    """A job spec compiled: what every row's request is made from.

    Attributes:
        renderer: the prompt templates and few-shot turns.
        schema: the output fields as JSON Schema and validator.
        escalate_if: per ``[[model]]``, its bound ``escalate_if``, or None.
        fingerprint: the request fingerprint (prompt, fields, model settings;
            see :meth:`~llmap.spec.JobSpec.request_fingerprint`).
        documents: the document columns (``[input.documents]``), or None.
    """

    renderer: Renderer
    schema: OutputSchema
    escalate_if: tuple[EscalateIf | None, ...]
    fingerprint: str
    documents: Documents | None = None

    def close(self) -> None:
        """Release the cascade conditions' DuckDB connections and the document store."""
        for cond in self.escalate_if:
            if cond is not None:
                cond.close()
        if self.documents is not None:
            self.documents.close()


@dataclass(frozen=True)
class InputPlan:
    """What the input contributes to a run.

    Attributes:
        data_columns: the columns read and kept in the ledger (key, template
            variables, ``keep``, the ``per_group`` column), in that order.
        layout: the output file's columns and types.
    """

    data_columns: list[str]
    layout: ResultLayout


def compile_spec(spec: JobSpec, *, source: str = "job") -> Compiled:
    """Check everything the spec says against itself, and compile it.

    Args:
        spec: a parsed spec.
        source: how to name the job in error messages (its file name).

    Raises:
        SpecError: one line naming the problem and the fix.
    """
    renderer = Renderer.from_spec(spec.prompt, source=source, max_chars=spec.input.max_chars)
    check_fields(spec.output.fields, source=source)
    check_examples(spec.output.fields, spec.prompt.examples, source=source)
    if spec.output.fallback is not None:
        check_fallback(spec.output.fields, spec.output.fallback, source=source)
    _check_cost_cap(spec, source)
    _check_batch(spec, source)
    _check_documents(spec, renderer, source)
    escalate = _bind_cascade(spec, source)
    fingerprint = spec.request_fingerprint()
    documents = None
    if spec.input.documents:
        documents = Documents(spec, fingerprint=fingerprint, variables=renderer.variables)
    return Compiled(renderer, OutputSchema(spec.output.fields), escalate, fingerprint, documents)


def spec_from_dict(doc: dict[str, Any], *, base_dir: Path, name: str, source: str = "job") -> JobSpec:
    """Parse a job document (see :func:`llmap.spec.parse_spec`) and run :func:`compile_spec`'s checks.

    Raises:
        SpecError: on the first problem, as one line naming the fix.
    """
    spec = parse_spec(doc, base_dir=base_dir, name=name, source=source)
    compile_spec(spec, source=source).close()
    return spec


def load_spec(path: str | Path) -> JobSpec:
    """Read a job file and check it (:func:`llmap.spec.read_spec`, then :func:`compile_spec`'s checks).

    Raises:
        SpecError: the file is missing, is not valid TOML, or fails a check.
    """
    spec = read_spec(path)
    compile_spec(spec, source=Path(path).name).close()
    return spec


def build_source(spec: JobSpec, *, limit: int | None = None, given: Source | None = None) -> Source:
    """The job's input: ``given`` (an in-memory table, for :func:`llmap.map`), or ``[input] path`` / ``sql``.

    Args:
        spec: the job.
        limit: at most this many rows; default ``[input] limit``.
        given: a source built by the caller; its limit is set and it is returned.

    Raises:
        InputError: the input cannot be opened.
    """
    inp = spec.input
    lim = limit if limit is not None else inp.limit
    if given is not None:
        given.limit = lim
        return given
    if inp.sql is not None:
        return Source.from_sql(inp.sql, base_dir=spec.base_dir, where=inp.where, limit=lim, order_by=inp.order_by)
    return Source.from_path(spec.resolve(inp.path), where=inp.where, limit=lim, order_by=inp.order_by,
                            encoding=inp.encoding)


def check_input(spec: JobSpec, compiled: Compiled, source: Source) -> InputPlan:
    """Check the input against the job: columns, ``where``, keys; and lay out the output.

    Raises:
        InputError: a column the job names is missing, ``where`` fails, or a
            key is empty or repeated (the message names the first such key).
    """
    renderer = compiled.renderer
    needed: list[tuple[str, str]] = []
    if spec.input.key:
        needed.append((spec.input.key, "[input] key"))
    needed += [(v, "[prompt] template") for v in renderer.variables]
    needed += [(c, "[output] keep") for c in spec.output.keep]
    for i, ex in enumerate(spec.prompt.examples, 1):
        needed += [(c, f"[prompt] examples #{i}") for c in ex.input]
    group = [spec.input.per_group.column] if spec.input.per_group else []
    needed += [(c, "[input] per_group") for c in group]
    needed += [(c, "[input] max_chars") for c in spec.input.max_chars]
    needed += [(c, "[input.documents]") for c in spec.input.documents]
    source.require_columns(needed)
    source.check_where()
    _check_keys(spec, source)
    key = [spec.input.key] if spec.input.key else []
    columns = list(dict.fromkeys(key + list(renderer.variables) + list(spec.output.keep) + group))
    shown = list(dict.fromkeys(key + list(spec.output.keep)))
    key_schema = source.arrow_schema(shown)
    if not spec.input.key:
        key_schema = pa.schema([pa.field("_row", pa.int64())] + list(key_schema))
    return InputPlan(columns, ResultLayout(key_schema, {n: f.type for n, f in spec.output.fields.items()}))


@dataclass(frozen=True, slots=True)
class KeyedRow:
    """One input row as the ledger knows it.

    Attributes:
        seq: its position in the input (0-based).
        key: its key as text (the ``[input] key`` column, else ``seq``).
        row: column -> value (with ``_row`` = ``seq`` when the job has no key).
        inputs: the template variables' values.
        input_hash: :func:`~llmap.store.fingerprint.input_hash` of the inputs.
        batch_schema: the Arrow schema of the batch it came in.
    """

    seq: int
    key: str
    row: dict[str, Any]
    inputs: dict[str, Any]
    input_hash: str
    batch_schema: pa.Schema


def keyed_rows(spec: JobSpec, compiled: Compiled, source: Source, columns: list[str]) -> Iterator[KeyedRow]:
    """Every input row with its key and input hash, in input order (the planner and ``estimate``).

    A document column's value counts by its content (:meth:`~llmap.io.documents.Documents.identities`).
    """
    key_col = spec.input.key
    variables = compiled.renderer.variables
    docs = compiled.documents
    fp = compiled.fingerprint.encode()
    seq = -1
    for batch in source.batches(columns):
        for row in batch.to_pylist():
            seq += 1
            if key_col:
                key = key_text(row[key_col])
            else:
                key = str(seq)
                row["_row"] = seq
            inputs = {v: row[v] for v in variables}
            hashed = docs.identities(inputs) if docs is not None else inputs
            yield KeyedRow(seq, key, row, inputs, input_hash(fp, hashed), batch.schema)


def _check_keys(spec: JobSpec, source: Source) -> None:
    key = spec.input.key
    if not key:
        return
    nulls = source.null_keys(key)
    if nulls:
        raise E.InputError(
            f"key column {key!r} is empty in {nulls} row(s) of {source.label}; fill it, filter those rows "
            "with [input] where, or choose another [input] key"
        )
    dup = source.first_duplicate(key)
    if dup is not None:
        raise E.InputError(
            f"key {key!r} is not unique: {key_text(dup[0])!r} appears {dup[1]} times in {source.label}; "
            "choose a unique [input] key, or drop it to key rows by row number"
        )


def _check_cost_cap(spec: JobSpec, source: str) -> None:
    """``max_cost_usd`` counts USD from the models' prices: a model without them would never count."""
    if spec.limits.max_cost_usd is None:
        return
    for m in spec.models:
        missing = [k for k in ("price_in", "price_out") if k not in m.model_fields_set]
        if m.provider == "local" or not missing:  # the embedded model costs nothing
            continue
        raise E.SpecError(
            f"{source}: [limits] max_cost_usd is set but [[model]] {m.name!r} has no {' or '.join(missing)}, so its "
            f"spend would count as $0 and the cap would never stop it; add price_in and price_out to that model (USD "
            f"per million prompt / completion tokens; 0 if it is free), or cap [limits] max_tokens instead"
        )


def _check_batch(spec: JobSpec, source: str) -> None:
    """``[model] batch`` sends the first model's requests through its batch API; the models after it answer in
    real time (failover, cascade, retries), and ``per_group`` quotas need real-time answers to count."""
    later = [m for m in spec.models[1:] if m.batch]
    if later:
        raise E.SpecError(f"{source}: [[model]] {later[0].name!r} has batch = true, but only the first [[model]] can "
                          "go by batch (the ones after it answer in real time); move it first or drop batch")
    if spec.model.batch and spec.input.per_group is not None:
        raise E.SpecError(f"{source}: [input] per_group counts answers as they come, which a batch cannot; drop "
                          "per_group or [model] batch")
    given = spec.model_fields_set
    if "batch" in given and not spec.model.batch:
        raise E.SpecError(f"{source}: [batch] is set but no [model] has batch = true; add batch = true to the first "
                          "[model] or drop [batch]")


def _check_documents(spec: JobSpec, renderer: Renderer, source: str) -> None:
    """Document columns are read by a template, their libraries are installed, and they go where they can."""
    docs = spec.input.documents
    if not docs:
        return
    unread = [c for c in docs if c not in renderer.variables]
    if unread:
        raise E.SpecError(f"{source}: [input.documents] {unread[0]!r} is not read by any template; use "
                          f"{{{{ {unread[0]} }}}} in [prompt] user, or drop it from [input.documents]")
    for column, d in docs.items():
        missing = missing_libraries(d.kind)
        if missing:
            raise E.SpecError(f"{source}: [input.documents] {column!r} (kind = {d.kind!r}) needs "
                              f"{', '.join(missing)}; install them with `pip install 'llmap[documents]'`")
    if spec.model.batch:
        raise E.SpecError(f"{source}: [input.documents] does not go with [model] batch yet (a batch's rows are "
                          "rendered again when collected); drop batch = true")
    images = all(m.takes_images for m in spec.models) and spec.prompt.pack == 1
    in_system = [c for c, d in docs.items() if d.kind in ("image", "auto") and c in renderer.system_variables]
    if images and in_system:
        raise E.SpecError(f"{source}: [input.documents] {in_system[0]!r} may hold an image, which goes to the "
                          "model as an image part, and only user messages carry those; read it in [prompt] user, "
                          "or set its kind to \"pdf\", \"html\" or \"text\"")


def _bind_cascade(spec: JobSpec, source: str) -> tuple[EscalateIf | None, ...]:
    types = {n: f.type for n, f in spec.output.fields.items()}
    out: list[EscalateIf | None] = []
    for i, m in enumerate(spec.models):
        if m.escalate_if is None:
            out.append(None)
            continue
        if i == len(spec.models) - 1:
            raise E.SpecError(
                f"{source}: [[model]] {m.name!r} has escalate_if but no model after it to escalate to; "
                "add a stronger [[model]] below it or remove escalate_if"
            )
        try:
            out.append(EscalateIf.bind(m.escalate_if, types, name=f"[[model]] {m.name!r} escalate_if"))
        except ValueError as exc:
            for cond in out:
                if cond is not None:
                    cond.close()
            raise E.SpecError(f"{source}: {exc}") from None
    return tuple(out)
