"""The whole job (:class:`JobSpec`) and the TOML entry points :func:`parse_spec` / :func:`read_spec`."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from llmap.errors import SpecError
from llmap.providers.params import answer_params
from llmap.spec.base import StrictModel
from llmap.spec.documents import FetchSpec
from llmap.spec.limits import AlertsSpec, BatchSpec, CacheSpec, LimitsSpec
from llmap.spec.model import ModelSpec
from llmap.spec.sections import InputSpec, OutputSpec, PromptSpec


class JobSpec(StrictModel):
    """A whole job. ``base_dir`` (not a TOML key) is the job file's folder."""

    name: str
    input: InputSpec
    prompt: PromptSpec
    output: OutputSpec
    models: list[ModelSpec] = Field(min_length=1)
    limits: LimitsSpec = LimitsSpec()
    cache: CacheSpec = CacheSpec()
    alerts: AlertsSpec = AlertsSpec()
    batch: BatchSpec = BatchSpec()
    fetch: FetchSpec = FetchSpec()
    ledger: str | None = None
    base_dir: Path = Path(".")

    @property
    def model(self) -> ModelSpec:
        """The primary model (the first of ``models``)."""
        return self.models[0]

    def resolve(self, p: str) -> Path:
        """A path from the spec, resolved against the job file's folder."""
        path = Path(p).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    @property
    def output_path(self) -> Path:
        return self.resolve(self.output.path)

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
        if self.input.documents:  # only when set, so existing ledgers keep their hashes
            doc["documents"] = {k: v.model_dump() for k, v in self.input.documents.items()}
            doc["images"] = [m.takes_images for m in self.models]
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _loc(err: dict) -> str:
    parts = [str(p) for p in err.get("loc", ())]
    if not parts:
        return "the job"
    if parts[0] == "models":
        parts = ["model", *parts[2:]] if len(parts) > 1 and parts[1].isdigit() else ["model", *parts[1:]]
    table = parts[:-1]
    return f"[{'.'.join(table)}] {parts[-1]}" if table else parts[-1]


def _one_line(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    where = _loc(err)
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        loc = [str(p) for p in err["loc"]]
        table = ".".join(p for p in loc[:-1] if not p.isdigit()).replace("models", "model") or "top level"
        return (f"{source}: unknown key {loc[-1]!r} in [{table}]; "
                "check its spelling against README.md's job spec, or remove it")
    if kind == "missing":
        return f"{source}: {where} is required; add it to the job file"
    msg = err.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    return f"{source}: {where}: {msg}"


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
    """
    doc = dict(doc)
    models = doc.pop("model", {})
    if isinstance(models, dict):
        models = [models]
    models = [dict(m) if isinstance(m, dict) else m for m in (models or [{}])]
    for m in models:  # model_path, like every path in the spec, is relative to the job file
        if isinstance(m, dict) and isinstance(m.get("model_path"), str):
            m["model_path"] = str(base_dir / Path(m["model_path"]).expanduser())
    doc["models"] = models
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
        raise SpecError(f"job file {str(path)!r} does not exist; check the path") from None
    except OSError as exc:
        raise SpecError(f"cannot read job file {str(path)!r}: {exc.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path.name}: not valid TOML: {exc}; fix the syntax") from None
    return parse_spec(doc, base_dir=path.resolve().parent, name=path.stem, source=path.name)
