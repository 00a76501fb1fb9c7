"""The whole job (:class:`JobSpec`) and the TOML entry points :func:`parse_spec` / :func:`read_spec`."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from llmap.errors import SpecError
from llmap.io.diagnose import missing_file
from llmap.providers.params import answer_params
from llmap.spec.base import StrictModel
from llmap.spec.cascade import CascadeSpec
from llmap.spec.documents import FetchSpec
from llmap.spec.limits import AlertsSpec, BatchSpec, CacheSpec, LimitsSpec
from llmap.spec.model import ModelSpec
from llmap.spec.operators import ClusterSpec, EmbeddingsSpec, FilterSpec, ReduceSpec, ResolveSpec
from llmap.spec.quality import EvalSpec
from llmap.spec.sections import FieldSpec, InputSpec, OutputSpec, PerGroup, PromptSpec

#: Where the job spec's keys are documented (every "unknown key" error names it).
SPEC_DOCS = "docs/job-spec.md"

#: Kinds whose rows need ``[output.fields]`` (the answer of a row, a group or the filter's boolean).
_NEEDS_FIELDS = ("map", "reduce", "filter")
#: Kinds that write a column of their own (``_family``, ``_entity``) instead of ``[output.fields]``.
_OWN_COLUMN = {"cluster": "_family", "resolve": "_entity"}


class JobSpec(StrictModel):
    """A whole job. ``base_dir`` (not a TOML key) is the job file's folder.

    ``kind`` (default ``"map"``) picks the operator (:mod:`llmap.spec.operators`); its own table
    (``[cluster]``, ``[resolve]``, ``[reduce]``, ``[filter]``) is optional, as is ``[embeddings]``.
    """

    name: str
    kind: Literal["map", "cluster", "resolve", "reduce", "filter"] = "map"
    input: InputSpec
    prompt: PromptSpec
    output: OutputSpec
    models: list[ModelSpec] = Field(min_length=1)
    limits: LimitsSpec = LimitsSpec()
    cache: CacheSpec = CacheSpec()
    alerts: AlertsSpec = AlertsSpec()
    batch: BatchSpec = BatchSpec()
    eval: EvalSpec = EvalSpec()
    cluster: ClusterSpec = ClusterSpec()
    resolve_: ResolveSpec = Field(default=ResolveSpec(), alias="resolve")
    reduce: ReduceSpec = ReduceSpec()
    filter: FilterSpec = FilterSpec()
    embeddings: EmbeddingsSpec = EmbeddingsSpec()
    fetch: FetchSpec = FetchSpec()
    cascade: CascadeSpec | None = None
    ledger: str | None = None
    base_dir: Path = Path(".")

    @model_validator(mode="after")
    def _operator_tables(self) -> JobSpec:
        given = self.model_fields_set
        for table, kind in (("cluster", "cluster"), ("resolve_", "resolve"), ("reduce", "reduce"),
                            ("filter", "filter")):
            if table in given and self.kind != kind:
                raise ValueError(f"[{kind}] is set but kind = {self.kind!r}; set kind = \"{kind}\" at the top of "
                                 f"the job file, or drop [{kind}]")
        if "embeddings" in given and self.kind not in ("cluster", "resolve"):
            raise ValueError(f"[embeddings] is used by kind = \"cluster\" and \"resolve\" only, not {self.kind!r}; "
                             "drop it")
        if self.kind in _OWN_COLUMN and self.output.fields:
            raise ValueError(f"kind = {self.kind!r} writes {_OWN_COLUMN[self.kind]} itself and takes no "
                             "[output.fields]; drop them")
        if self.embeddings.provider == "openai" and not self.embeddings.name:
            raise ValueError("[embeddings] provider = \"openai\" needs name (e.g. \"text-embedding-3-small\")")
        if self.embeddings.provider == "local" and self.embeddings.name not in (None, "all-MiniLM-L6-v2"):
            raise ValueError("[embeddings] provider = \"local\" runs all-MiniLM-L6-v2 only; drop name, or use "
                             "provider = \"openai\" with a server that has the model")
        if self.kind == "filter":
            self.filter_field()
        if self.kind in ("cluster", "resolve", "reduce"):
            self._check_operator()
        return self

    def _check_operator(self) -> None:
        """What map offers and these operators do not: say so instead of ignoring it."""
        kind = self.kind
        if self.prompt.examples:
            raise ValueError(f"[prompt] examples show one row's answer, which kind = {kind!r} does not give; drop "
                             "them")
        if "pack" in self.prompt.model_fields_set:
            raise ValueError(f"[prompt] pack is for map and filter; kind = {kind!r} packs its own steps (set "
                             f"[{kind}] pack)" if kind != "reduce" else "[prompt] pack is for map and filter; "
                             "kind = \"reduce\" sends one chunk of rows per request")
        if any(m.batch for m in self.models):
            raise ValueError(f"[model] batch is for map and filter; kind = {kind!r} sends its steps in real time")
        if any(m.escalate_if for m in self.models):
            raise ValueError(f"escalate_if is for map and filter; kind = {kind!r} uses later [[model]] tables for "
                             "failover only")
        if self.input.per_group is not None:
            raise ValueError(f"[input] per_group is for map and filter, not kind = {kind!r}")
        if kind == "reduce" and self.output.keep:
            raise ValueError("[output] keep copies a row's columns, but kind = \"reduce\" writes one row per group; "
                             "name the group's columns in [reduce] by")

    def filter_field(self) -> str:
        """``kind = "filter"``: the boolean field that decides: ``[filter] field``, else the only boolean field.

        A ``[cascade]`` on a filter promises about this field (:func:`llmap.plan.cascade_field`; another
        ``[cascade] field`` is refused there); the filter itself is the map path, so the cascade's answers are what
        the export keeps.

        Raises:
            ValueError: no such field, not a boolean, or several booleans and none named.
        """
        fields = self.output.fields
        name = self.filter.field
        if name is None:
            bools = [n for n, f in fields.items() if f.type == "boolean"]
            if len(bools) != 1:
                which = f"several ({', '.join(bools)}): set [filter] field to one" if bools else \
                    "none: add one to [output.fields], e.g. keep = { type = \"boolean\" }"
                raise ValueError(f"kind = \"filter\" keeps the rows whose boolean field is true, and the fields have "
                                 f"{which}")
            return bools[0]
        if name not in fields:
            raise ValueError(f"[filter] field {name!r} is not in [output.fields] ({', '.join(fields)})")
        if fields[name].type != "boolean":
            raise ValueError(f"[filter] field {name!r} is a {fields[name].type}; it must be a boolean")
        return name

    @property
    def model(self) -> ModelSpec:
        """The primary model (the first of ``models``)."""
        return self.models[0]

    def resolve(self, p: str) -> Path:
        """A path from the spec, resolved against the job file's folder and normalised (``a/../b`` is ``b``)."""
        path = Path(p).expanduser()
        return Path(os.path.normpath(path if path.is_absolute() else (self.base_dir / path)))

    @property
    def output_path(self) -> Path:
        return self.resolve(self.output.path)

    def result_fields(self) -> dict[str, str]:
        """The answer columns of the output, name -> field type: ``[output.fields]``, or the operator's own
        column (``_family`` for cluster, ``_entity`` for resolve)."""
        if self.kind in _OWN_COLUMN:
            return {_OWN_COLUMN[self.kind]: "string"}
        return {n: f.type for n, f in self.output.fields.items()}

    def operator_table(self) -> StrictModel | None:
        """The operator's own table (``[cluster]``, ``[resolve]``, ``[reduce]``, ``[filter]``), or None for map."""
        return {"cluster": self.cluster, "resolve": self.resolve_, "reduce": self.reduce,
                "filter": self.filter}.get(self.kind)

    @property
    def ledger_path(self) -> Path:
        """The job's SQLite ledger; default ``<job dir>/.llmap/<name>.ledger.sqlite``."""
        if self.ledger:
            return self.resolve(self.ledger)
        return self.base_dir / ".llmap" / f"{self.name}.ledger.sqlite"

    def request_fingerprint(self) -> str:
        """SHA-256 of everything besides the row that shapes a request.

        Prompt templates, examples, fields and model settings: a change to any
        of them makes done rows pending again on the next run.
        """
        models = []
        for m in self.models:
            d = m.model_dump(include={"provider", "name", "base_url", "model_path", "temperature", "max_tokens",
                                      "escalate_if"})
            if answer_params(m.params):  # only when set, so existing ledgers keep their hashes
                d["params"] = answer_params(m.params)
            models.append(d)
        doc = {
            "prompt": self.prompt.model_dump(exclude={"pack"}),
            "max_chars": self.input.max_chars,
            # type, enum and description always (as before constraints existed); constraints only when set
            "fields": {k: v.model_dump(include={"type", "enum", "description"}) | v.model_dump(exclude_defaults=True)
                       for k, v in self.output.fields.items()},
            "models": models,
        }
        if self.output.checks:  # only when set, so existing ledgers keep their hashes: done rows meet new checks
            doc["checks"] = [c.model_dump() for c in self.output.checks]
        if self.kind != "map":  # only then, so map ledgers keep their hashes
            doc["kind"] = self.kind
            op = self.operator_table()
            doc["operator"] = op.model_dump(exclude={"families_path", "show"}) if op is not None else None
            if self.kind in ("cluster", "resolve"):
                doc["embeddings"] = self.embeddings.model_dump(include={"provider", "name", "base_url"})
        if self.input.documents:  # only when set, so existing ledgers keep their hashes
            doc["documents"] = {k: v.model_dump() for k, v in self.input.documents.items()}
            doc["images"] = [m.takes_images for m in self.models]
        if self.cascade is not None:  # a guaranteed cascade settles rows differently; its keys only shape decisions
            doc["cascade"] = "guaranteed"
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def prompt_fingerprint(self) -> str:
        """SHA-256 of the prompt (templates, examples) and the output fields only: what ``llmap runs`` shows as
        the hash of prompt and fields (:meth:`request_fingerprint` also covers the models)."""
        doc = {"prompt": self.prompt.model_dump(exclude={"pack"}),
               "fields": {k: v.model_dump(exclude_defaults=True) for k, v in self.output.fields.items()}}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _loc(err: dict) -> str:
    parts = [str(p) for p in err.get("loc", ())]
    if not parts:
        return "the job"
    if parts[0] == "models":
        parts = ["model", *parts[2:]] if len(parts) > 1 and parts[1].isdigit() else ["model", *parts[1:]]
    table = parts[:-1]
    return f"[{'.'.join(table)}] {parts[-1]}" if table else parts[-1]


#: The keys of each table, for "did you mean" on an unknown key.
_TABLES: dict[str, type[StrictModel]] = {
    "input": InputSpec, "input.per_group": PerGroup, "prompt": PromptSpec, "output": OutputSpec,
    "output.fields": FieldSpec, "model": ModelSpec, "limits": LimitsSpec, "cache": CacheSpec, "alerts": AlertsSpec,
    "batch": BatchSpec, "cascade": CascadeSpec,
}
_TOP_KEYS = ["name", "ledger", "input", "prompt", "output", "model", "limits", "cache", "alerts", "batch", "eval",
             "cascade"]


def _closest(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ``""``."""
    near = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {near[0]!r}?" if near else ""


def _one_line(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    where = _loc(err)
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        loc = [str(p) for p in err["loc"]]
        parts = [p for p in loc[:-1] if not p.isdigit()]
        parts = ["model" if p == "models" else p for p in parts]
        if len(parts) == 3 and parts[:2] == ["output", "fields"]:  # [output.fields] name = { ... }
            parts = parts[:2]
        table = ".".join(parts) or "top level"
        keys = _TOP_KEYS if not parts else list(_TABLES[table].model_fields) if table in _TABLES else []
        return (f"{source}: unknown key {loc[-1]!r} in [{table}]{_closest(loc[-1], keys)}; check its spelling "
                f"against {SPEC_DOCS}, or remove it")
    if kind == "missing":
        return f"{source}: {where} is required; add it to the job file"
    msg = err.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    if not err.get("loc"):  # a check across tables names them itself
        return f"{source}: {msg}"
    return f"{source}: {where}: {msg}"


def _nulls_left_out(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with every ``nullable`` field an example's output (or the fallback) leaves out set to null.

    TOML has no null: a few-shot example shows the model a "not stated"
    answer by leaving a ``nullable = true`` field out of its ``output``.
    """
    out, prompt = doc.get("output"), doc.get("prompt")
    fields = out.get("fields") if isinstance(out, dict) else None
    if not isinstance(fields, dict):
        return doc
    nullable = [n for n, f in fields.items() if isinstance(f, dict) and f.get("nullable") is True]
    if not nullable:
        return doc

    def filled(answer: Any) -> Any:
        if not isinstance(answer, dict):
            return answer
        return {**answer, **{n: None for n in nullable if n not in answer}}

    doc = dict(doc)
    if isinstance(prompt, dict) and isinstance(prompt.get("examples"), list):
        doc["prompt"] = {**prompt, "examples": [{**ex, "output": filled(ex["output"])}
                                                if isinstance(ex, dict) and "output" in ex else ex
                                                for ex in prompt["examples"]]}
    if isinstance(out.get("fallback"), dict):
        doc["output"] = {**out, "fallback": filled(out["fallback"])}
    return doc


def parse_spec(doc: dict[str, Any], *, base_dir: Path, name: str, source: str = "job") -> JobSpec:
    """Build a :class:`JobSpec` from a parsed TOML document.

    Args:
        doc: the TOML document as a dict; ``[model]`` may be a table or an
            array of tables (``[[model]]``).
        base_dir: folder that relative paths resolve against.
        name: default job name when the document has none.
        source: how to name the document in error messages.

    Raises:
        SpecError: on the first problem of a table's own keys, as one line
            naming the fix (cross-table checks: :func:`llmap.plan.compile_spec`).
            A ``[models]`` table (not llmap's ``[model]``) is one.
    """
    doc = dict(doc)
    if "models" in doc:  # JobSpec's own attribute name: it must not stand in for [model]
        raise SpecError(f"{source}: unknown table [models]; the model is [model] (or one [[model]] table per model, "
                        "for failover and cascades): rename it")
    doc = _nulls_left_out(doc)
    models = doc.pop("model", {})
    if isinstance(models, dict):
        models = [models]
    models = [dict(m) if isinstance(m, dict) else m for m in (models or [{}])]
    ev = doc.get("eval")
    candidates = ev.get("models") if isinstance(ev, dict) else None
    if isinstance(candidates, list):
        ev = doc["eval"] = dict(ev)
        candidates = ev["models"] = [dict(m) if isinstance(m, dict) else m for m in candidates]
    for m in [*models, *(candidates or [])]:  # model_path, like every path in the spec, is relative to the job file
        if isinstance(m, dict) and isinstance(m.get("model_path"), str):
            m["model_path"] = str(base_dir / Path(m["model_path"]).expanduser())
    doc["models"] = models
    kind = doc.get("kind", "map")
    out = doc.get("output")
    if kind in _NEEDS_FIELDS and isinstance(out, dict) and "fields" not in out:
        why = "" if kind == "map" else f" (kind = {kind!r} answers with them)"
        raise SpecError(f"{source}: [output] fields is required{why}; add it to the job file")
    doc.setdefault("name", name)
    doc["base_dir"] = base_dir
    try:
        spec = JobSpec.model_validate(doc)
    except ValidationError as exc:
        raise SpecError(_one_line(exc, source)) from None
    return spec


def read_spec(path: str | Path) -> JobSpec:
    """Read a job file into a :class:`JobSpec` (each table's own keys validated; see :func:`parse_spec`).

    Args:
        path: the TOML job file.

    Raises:
        SpecError: the file is missing, is not valid TOML, or fails validation.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(missing_file("job file", path)) from None
    except OSError as exc:
        raise SpecError(f"cannot read job file {str(path)!r}: {exc.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path.name}: not valid TOML: {exc}; fix the syntax") from None
    return parse_spec(doc, base_dir=path.resolve().parent, name=path.stem, source=path.name)
