"""The plan: a job spec checked against itself and its input, and compiled, before any request.

:mod:`llmap.spec` is pure data (TOML ⇄ typed objects). Everything that needs
more than one key to check lives here, in one place, so a bad job is one
:class:`~llmap.errors.SpecError` (exit 2) before money is spent:

- :func:`compile_spec` (the spec alone): template syntax, field constraints,
  few-shot examples and the fallback against the fields, ``escalate_if``
  bound by DuckDB against the fields, a cost cap without prices, the fields
  ``_confidence`` covers, ``[eval]`` against the fields. It returns the
  :class:`Compiled` job: renderer, output schema, cascade conditions, quality.
- :func:`check_input` (the spec and its input's header): every column the
  job names exists (``[eval] gold`` columns too), ``where`` runs, keys are
  present and unique, ``[output] checks`` bind against the input's columns
  and the fields; it returns the columns to read and the output's layout.

:func:`load_spec` and :func:`spec_from_dict` read a job and run
:func:`compile_spec`'s checks: a spec they return is one llmap can run.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
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
from llmap.quality.checks import Checks, duckdb_types
from llmap.quality.confidence import Confidence
from llmap.spec import JobSpec, parse_spec, read_spec
from llmap.store.fingerprint import input_hash, key_text

__all__ = ["Compiled", "InputPlan", "KeyedRow", "build_source", "cascade_field", "check_input", "compile_spec",
           "keyed_rows", "load_spec", "row_key", "spec_from_dict"]


@dataclass(frozen=True)
class Compiled:
    """A job spec compiled: what every row's request is made from.

    Attributes:
        renderer: the prompt templates and few-shot turns.
        schema: the output fields as JSON Schema and validator.
        escalate_if: per ``[[model]]``, its bound ``escalate_if``, or None.
        fingerprint: the request fingerprint (prompt, fields, model settings;
            see :meth:`~llmap.spec.JobSpec.request_fingerprint`).
        quality: the settle stage's ``confidence`` (:class:`~llmap.quality.confidence.Confidence`) and,
            once :func:`check_input` (or :func:`bind_checks`) has bound them against the input,
            ``checks`` (:class:`~llmap.quality.checks.Checks`): keyword arguments of the
            :class:`~llmap.run.dispatch.Dispatcher`.
        documents: the document columns (``[input.documents]``), or None.
    """

    renderer: Renderer
    schema: OutputSchema
    escalate_if: tuple[EscalateIf | None, ...]
    fingerprint: str
    quality: dict[str, Any] = field(default_factory=dict)
    documents: Documents | None = None

    @property
    def checks(self) -> Checks | None:
        """The bound ``[output] checks``, or None (none, or not bound yet)."""
        return self.quality.get("checks")

    def close(self) -> None:
        """Release the cascade conditions' and the checks' DuckDB connections, and the document store."""
        for cond in self.escalate_if:
            if cond is not None:
                cond.close()
        checks = self.quality.pop("checks", None)
        if checks is not None:
            checks.close()
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
    _check_eval(spec, source)
    _check_documents(spec, renderer, source)
    _check_cascade(spec, source)
    confidence = Confidence(spec.output.fields, spec.output.confidence, source=source)
    escalate = _bind_cascade(spec, source)
    fingerprint = spec.request_fingerprint()
    documents = None
    if spec.input.documents:
        documents = Documents(spec, fingerprint=fingerprint, variables=renderer.variables)
    return Compiled(renderer, OutputSchema(spec.output.fields), escalate, fingerprint, {"confidence": confidence},
                    documents)


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


def check_input(spec: JobSpec, compiled: Compiled, source: Source, *, source_name: str = "job") -> InputPlan:
    """Check the input against the job: columns, examples, ``where``, keys; and lay out the output.

    Args:
        spec, compiled: the job and its compiled form (:func:`compile_spec`).
        source: the job's input.
        source_name: how to name the job in error messages.

    Raises:
        InputError: a column the job names is missing (the message lists the
            input's columns and the closest name), ``where`` fails, or a key
            is empty or repeated (the message names the first such key).
        SpecError: a few-shot example lacks a column the templates read.
    """
    renderer = compiled.renderer
    keys = spec.input.key_columns
    needed: list[tuple[str, str]] = [(k, "[input] key") for k in keys]
    needed += [(v, "[prompt] template") for v in renderer.variables]
    needed += [(c, "[output] keep") for c in spec.output.keep]
    for i, ex in enumerate(spec.prompt.examples, 1):
        needed += [(c, f"[prompt] examples #{i}") for c in ex.input]
    group = [spec.input.per_group.column] if spec.input.per_group else []
    needed += [(c, "[input] per_group") for c in group]
    needed += [(c, "[input] max_chars") for c in spec.input.max_chars]
    gold = list(dict.fromkeys(spec.eval.gold.values()))
    needed += [(c, "[eval] gold") for c in gold]
    needed += [(c, "[input.documents]") for c in spec.input.documents]
    source.require_columns(needed)
    renderer.check_examples(source=source_name)  # after the template's columns: a typo there names the template
    source.check_where()
    checks = bind_checks(spec, compiled, source)
    _check_keys(spec, source)
    kept = gold + (checks.columns if checks is not None else [])  # what eval and the checks read later
    columns = list(dict.fromkeys(keys + list(renderer.variables) + list(spec.output.keep) + group + kept))
    shown = list(dict.fromkeys(keys + list(spec.output.keep)))
    key_schema = source.arrow_schema(shown)
    if not keys:
        key_schema = pa.schema([pa.field("_row", pa.int64())] + list(key_schema))
    return InputPlan(columns, ResultLayout(key_schema, spec.result_fields()))


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


def row_key(row: dict[str, Any], columns: list[str]) -> str:
    """A row's key as the ledger stores it: the key column's value as text
    (:func:`~llmap.store.fingerprint.key_text`), or for a composite key the
    JSON list of its columns' values as text (``["634920","elementary"]``)."""
    if len(columns) == 1:
        return key_text(row[columns[0]])
    return json.dumps([key_text(row[c]) for c in columns], ensure_ascii=False, separators=(",", ":"))


def keyed_rows(spec: JobSpec, compiled: Compiled, source: Source, columns: list[str]) -> Iterator[KeyedRow]:
    """Every input row with its key and input hash, in input order (the planner and ``estimate``).

    A document column's value counts by its content (:meth:`~llmap.io.documents.Documents.identities`).
    """
    keys = spec.input.key_columns
    variables = compiled.renderer.variables
    docs = compiled.documents
    fp = compiled.fingerprint.encode()
    seq = -1
    for batch in source.batches(columns):
        for row in batch.to_pylist():
            seq += 1
            if keys:
                key = row_key(row, keys)
            else:
                key = str(seq)
                row["_row"] = seq
            inputs = {v: row[v] for v in variables}
            hashed = docs.identities(inputs) if docs is not None else inputs
            yield KeyedRow(seq, key, row, inputs, input_hash(fp, hashed), batch.schema)


def bind_checks(spec: JobSpec, compiled: Compiled, source: Source) -> Checks | None:
    """Bind ``[output] checks`` against the input's columns (read from its header) and the fields, and keep
    them in ``compiled.quality`` for the settle stage. A Ray worker calls this too.

    Returns:
        The bound checks, or None when the job has none.

    Raises:
        SpecError: a check does not bind (an unknown column, a syntax error, not a condition), one line.
    """
    if not spec.output.checks:
        return None
    if compiled.checks is not None:
        return compiled.checks
    types = duckdb_types(source.schema)
    if not spec.input.key:
        types = {"_row": "BIGINT", **types}
    checks = Checks.bind(spec.output.checks, compiled.schema.field_types, types)
    compiled.quality["checks"] = checks
    return checks


def _check_eval(spec: JobSpec, source: str) -> None:
    """``[eval] gold`` and ``tolerance`` name output fields (tolerance: number or integer ones)."""
    fields = spec.output.fields
    for key in ("gold", "tolerance"):
        for name in getattr(spec.eval, key):
            if name not in fields:
                raise E.SpecError(f"{source}: [eval] {key} names {name!r}, which is not an output field; fields: "
                                  f"{', '.join(fields)}")
    for name in spec.eval.tolerance:
        if fields[name].type not in ("integer", "number"):
            raise E.SpecError(f"{source}: [eval] tolerance for {name!r} applies to integer and number fields; "
                              f"{name!r} is a {fields[name].type}")


def _check_keys(spec: JobSpec, source: Source) -> None:
    keys = spec.input.key_columns
    if not keys:
        return
    what = f"key column {keys[0]!r}" if len(keys) == 1 else f"a column of key {keys!r}"
    nulls = source.null_keys(keys)
    if nulls:
        raise E.InputError(
            f"{what} is empty in {nulls} row(s) of {source.label}; fill it, filter those rows "
            "with [input] where, or choose another [input] key"
        )
    dup = source.first_duplicate(keys)
    if dup is not None:
        value = key_text(dup[0][0]) if len(keys) == 1 else "(" + ", ".join(key_text(v) for v in dup[0]) + ")"
        name = keys[0] if len(keys) == 1 else keys
        fix = ("add a column to the key (key = [...] lists several)" if len(keys) == 1
               else "add another column to the key")
        raise E.InputError(
            f"key {name!r} is not unique: {value!r} appears {dup[1]} times in {source.label}; "
            f"choose a unique [input] key, {fix}, or drop it to key rows by row number"
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
    real time (failover, cascade, retries), and ``per_group`` quotas need real-time answers to count. In a
    ``[cascade]`` each model answers in its own phase, so either may go by batch."""
    later = [m for m in spec.models[1:] if m.batch]
    if later and spec.cascade is None:
        raise E.SpecError(f"{source}: [[model]] {later[0].name!r} has batch = true, but only the first [[model]] can "
                          "go by batch (the ones after it answer in real time); move it first or drop batch")
    if any(m.batch for m in spec.models) and spec.input.per_group is not None:
        raise E.SpecError(f"{source}: [input] per_group counts answers as they come, which a batch cannot; drop "
                          "per_group or [model] batch")
    given = spec.model_fields_set
    if "batch" in given and not any(m.batch for m in spec.models):
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


def cascade_field(spec: JobSpec) -> str:
    """The output field ``[cascade]`` promises about: ``field``, else a filter's deciding field, else the job's only
    field."""
    assert spec.cascade is not None
    if spec.cascade.field:
        return spec.cascade.field
    return spec.filter_field() if spec.kind == "filter" else next(iter(spec.output.fields))


def _check_cascade(spec: JobSpec, source: str) -> None:
    """``[cascade]``: two models (the proxy, then the oracle), no ``escalate_if``, a field the promise can be about,
    and a proxy whose answers carry ``_confidence``."""
    c = spec.cascade
    if c is None:
        return
    fields = spec.output.fields
    where = f"{source}: [cascade]"
    if spec.kind not in ("map", "filter"):
        raise E.SpecError(f"{where} keeps or escalates each row's answer, which kind = {spec.kind!r} does not give "
                          "(its requests cover several rows); drop [cascade], or use kind = \"map\" or \"filter\"")
    if len(spec.models) != 2:
        raise E.SpecError(f"{where} needs exactly two [[model]] tables, the proxy first and the oracle last; the job "
                          f"has {len(spec.models)}")
    for m in spec.models:
        if m.escalate_if is not None:
            raise E.SpecError(f"{where} chooses which rows go to the oracle from a sample; drop escalate_if from "
                              f"[[model]] {m.name!r}")
    if spec.kind == "filter" and c.field is not None and c.field != spec.filter_field():
        raise E.SpecError(f"{where} field {c.field!r} is not the field the filter decides by "
                          f"({spec.filter_field()!r}); drop [cascade] field, or set [filter] field = {c.field!r}")
    if c.field is None and len(fields) > 1 and spec.kind != "filter":
        raise E.SpecError(f"{where} field is required when the job has several fields; name the one the promise is "
                          f"about, one of: {', '.join(fields)}")
    name = cascade_field(spec)
    if name not in fields:
        near = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else f"; fields: {', '.join(fields)}"
        raise E.SpecError(f"{where} field {name!r} is not an output field{hint}")
    if c.guarantee in ("precision", "recall") and fields[name].type != "boolean":
        raise E.SpecError(f"{where} guarantee = {c.guarantee!r} is about a boolean field (true is positive); "
                          f"{name!r} is a {fields[name].type}: use guarantee = \"agreement\", or a boolean field")
    if spec.output.confidence is False:
        raise E.SpecError(f"{where} ranks the proxy's answers by their _confidence, which [output] confidence = false "
                          "turns off; drop it (or list the fields it covers)")
    proxy = spec.models[0]
    if proxy.provider == "anthropic":
        raise E.SpecError(f"{where}: the proxy [[model]] {proxy.name!r} is anthropic, whose Messages API returns no "
                          "log-probabilities, so no answer would have a _confidence to keep it by; make an "
                          "OpenAI-compatible model (or the embedded one) the first [[model]]")
    if spec.input.documents:
        raise E.SpecError(f"{where} does not read [input.documents] yet (its phases would send the documents' paths, "
                          "not their text); drop one of them, or turn the documents into a text column first")
    if spec.input.per_group is not None:
        raise E.SpecError(f"{where} decides from a sample of every row, which [input] per_group quotas would cut; drop "
                          "one of them")


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
