"""Output fields -> JSON Schema (sent with each request) and a pydantic validator.

Every answer is validated before it counts. An answer that fails is re-asked
with :func:`reask_message` appended to the conversation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    TypeAdapter,
    ValidationError,
    create_model,
)

from llmap.errors import AnswerInvalid, SpecError
from llmap.prompt.pattern import portable_pattern
from llmap.spec import FIELD_TYPES, Example, FieldSpec

__all__ = ["OutputSchema", "check_examples", "check_fallback", "check_fields", "cut_message", "reask_message"]

_PY_TYPES: dict[str, Any] = {"string": str, "integer": int, "number": float, "boolean": StrictBool}


def _constraints(f: FieldSpec) -> dict[str, Any]:
    """The field's constraints in JSON Schema's words (``minLength``, ``pattern``...)."""
    c: dict[str, Any] = {}
    if f.minimum is not None:
        c["minimum"] = f.minimum
    if f.maximum is not None:
        c["maximum"] = f.maximum
    if f.min_length is not None:
        c["minLength"] = f.min_length
    if f.max_length is not None:
        c["maxLength"] = f.max_length
    if f.pattern is not None:
        c["pattern"] = portable_pattern(f.pattern)
    return c


def field_schema(f: FieldSpec) -> dict[str, Any]:
    """One field's JSON Schema.

    A ``nullable`` field with no other constraint is ``{"type": [T, "null"]}``
    (OpenAI strict mode's spelling of "may be null"). With an ``enum`` or a
    constraint it is ``{"anyOf": [{"type": T, ...constraints}, {"type":
    "null"}]}``, also accepted in strict mode: llama-cpp-python 0.3.36's
    grammar converter turns a type list into a bare union and drops the
    ``enum`` and constraints beside it, while it keeps them inside ``anyOf``.
    """
    typed: dict[str, Any] = {"type": FIELD_TYPES[f.type]}
    if f.enum is not None:
        typed["enum"] = list(f.enum)
    typed.update(_constraints(f))
    if f.nullable:
        if len(typed) == 1:
            p: dict[str, Any] = {"type": [typed["type"], "null"]}
        else:
            p = {"anyOf": [typed, {"type": "null"}]}
    else:
        p = typed
    if f.description:
        p["description"] = f.description
    return p


def _json_schema(fields: Mapping[str, FieldSpec]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {name: field_schema(f) for name, f in fields.items()},
        "required": list(fields),
        "additionalProperties": False,
    }


class _Closed(BaseModel):
    # python-re: the same regex engine that checked the pattern when the job was loaded
    model_config = ConfigDict(extra="forbid", regex_engine="python-re")


def _py_type(f: FieldSpec, *, enum: bool = True) -> Any:
    """The pydantic type of one field: base type or Literal, constraints, Optional when nullable."""
    t = _PY_TYPES[f.type]
    c = _constraints(f)
    if enum and f.enum is not None:  # check_fields proved every enum value meets the constraints
        t, c = Literal[tuple(f.enum)], {}  # type: ignore[valid-type]
    bounds = {"ge": c.get("minimum"), "le": c.get("maximum"), "min_length": c.get("minLength"),
              "max_length": c.get("maxLength"), "pattern": c.get("pattern")}
    bounds = {k: v for k, v in bounds.items() if v is not None}
    if bounds:
        t = Annotated[t, Field(**bounds)]
    if f.nullable:
        t = t | None
    return t


def _model(fields: Mapping[str, FieldSpec]) -> type[BaseModel]:
    defs: dict[str, Any] = {name: (_py_type(f), ...) for name, f in fields.items()}
    return create_model("Answer", __base__=_Closed, **defs)


class OutputSchema:
    """The answer contract for one job.

    Attributes:
        json_schema: a JSON Schema object (``type: object``, every field
            required, no extra properties), as sent in OpenAI's
            ``response_format`` and used for llama.cpp's grammar.
        names: the field names, in spec order.
    """

    def __init__(self, fields: Mapping[str, FieldSpec]) -> None:
        self.fields = dict(fields)
        self.names: tuple[str, ...] = tuple(fields)
        self.field_types: dict[str, str] = {n: f.type for n, f in fields.items()}
        self.json_schema = _json_schema(fields)
        self._model = _model(fields)

    def validate(self, content: str) -> dict[str, Any]:
        """Parse and validate one answer.

        Args:
            content: the completion text; must be one JSON object.

        Returns:
            field name -> value, in spec order (integers as int, numbers as float).

        A raw control character (a newline) inside a JSON string is taken
        as it is (``json.loads(strict=False)``): the answer is unambiguous,
        and llama-cpp-python 0.3.36's schema-to-grammar converter lets the
        embedded model write one (its ``char`` rule is ``[^"\\]``).

        Raises:
            AnswerInvalid: the text is not JSON or does not match the fields;
                ``detail`` says what to fix and is used for the re-ask.
        """
        try:
            obj = self._model.model_validate_json(content)
        except ValidationError as exc:
            lenient = _with_raw_controls(content) if exc.errors()[0].get("type") == "json_invalid" else None
            if lenient is None:
                raise AnswerInvalid(_describe(exc, content)) from None
            try:
                obj = self._model.model_validate(lenient)
            except ValidationError as exc2:
                raise AnswerInvalid(_describe(exc2, content)) from None
        return obj.model_dump()


def _with_raw_controls(content: str) -> Any:
    """``content`` parsed as JSON that allows raw control characters in strings, or None when it is not that."""
    if not any(ord(c) < 0x20 for c in content):
        return None
    try:
        return json.loads(content, strict=False)
    except ValueError:
        return None


def _describe(exc: ValidationError, content: str) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(p) for p in e["loc"]) or "answer"
        if e["type"] == "json_invalid":
            snippet = content[:80].replace("\n", " ")
            parts.append(f"the answer is not valid JSON ({e['msg']}): {snippet!r}")
        else:
            parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def reask_message(detail: str, schema: Mapping[str, Any]) -> dict[str, str]:
    """The user turn appended after an invalid answer, naming the validation error."""
    return {
        "role": "user",
        "content": (
            f"Your answer was invalid: {detail}. Reply with only a JSON object that matches "
            f"this JSON Schema: {json.dumps(schema, separators=(',', ':'))}"
        ),
    }


def cut_message(max_tokens: int) -> dict[str, str]:
    """The user turn that re-asks an answer cut at ``max_tokens`` (asked once; a second cut fails the row)."""
    return {"role": "user", "content": f"Your previous answer was cut off at the limit of {max_tokens} tokens. "
                                       "Answer again, complete and shorter: keep every field brief."}


def check_examples(fields: Mapping[str, FieldSpec], examples: Sequence[Example], *, source: str = "job") -> None:
    """Check that every few-shot example's output satisfies the fields.

    Raises:
        SpecError: an example's output would fail validation; a model shown a
            wrong example learns the wrong shape.
    """
    if not examples:
        return
    schema = OutputSchema(fields)
    for i, ex in enumerate(examples, 1):
        missing = [n for n in fields if n not in ex.output]
        if missing:
            raise SpecError(
                f"{source}: [prompt] examples #{i}: output lacks {missing[0]!r}; give it a value, or, to show the "
                f"model a \"not stated\" answer, mark the field nullable = true and leave it out (TOML has no null: "
                "a nullable field left out of an example means null)"
            )
        try:
            schema.validate(json.dumps(ex.output))
        except AnswerInvalid as exc:
            raise SpecError(
                f"{source}: [prompt] examples #{i}: output does not match [output.fields] ({exc.detail}); "
                "fix the example"
            ) from None


def _check_constraints(f: FieldSpec) -> str | None:
    """What is wrong with a field's constraints, with the fix, or None."""
    numeric = f.type in ("integer", "number")
    for key in ("minimum", "maximum"):
        if getattr(f, key) is not None and not numeric:
            return f"{key} applies to integer and number fields, not {f.type}; drop it or change the type"
    for key in ("min_length", "max_length", "pattern"):
        if getattr(f, key) is not None and f.type != "string":
            return f"{key} applies to string fields, not {f.type}; drop it or change the type"
    if f.minimum is not None and f.maximum is not None and f.minimum > f.maximum:
        return f"minimum {f.minimum:g} is greater than maximum {f.maximum:g}; swap them"
    if f.min_length is not None and f.max_length is not None and f.min_length > f.max_length:
        return f"min_length {f.min_length} is greater than max_length {f.max_length}; swap them"
    if f.pattern is not None:
        try:
            portable_pattern(f.pattern)
        except ValueError as exc:
            return str(exc)
    return None


def check_fields(fields: Mapping[str, FieldSpec], *, source: str = "job") -> None:
    """Check each field's constraints, and that every ``enum`` value meets them.

    Raises:
        SpecError: a constraint on a type it does not apply to (``minimum`` on
            a string), ``minimum > maximum``, ``min_length > max_length``, a
            ``pattern`` that does not compile or that llama.cpp's grammar cannot
            express; or an enum value that breaks the constraints or has the
            wrong type (no answer could use it).
    """
    for name, f in fields.items():
        problem = _check_constraints(f)
        if problem is not None:
            raise SpecError(f"{source}: [output.fields] {name}: {problem}")
        if f.enum is None:
            continue
        adapter = TypeAdapter(_py_type(f, enum=False), config=ConfigDict(regex_engine="python-re"))
        for value in f.enum:
            try:
                adapter.validate_python(value)
            except ValidationError as exc:
                msg = exc.errors()[0]["msg"]
                raise SpecError(
                    f"{source}: [output.fields] {name}: enum value {value!r} does not fit the field ({msg}); "
                    "fix the value or the constraint"
                ) from None


def check_fallback(fields: Mapping[str, FieldSpec], fallback: Mapping[str, Any], *, source: str = "job") -> None:
    """Check that ``[output] fallback`` is a valid answer.

    Raises:
        SpecError: it would fail validation against the fields.
    """
    try:
        OutputSchema(fields).validate(json.dumps(fallback))
    except AnswerInvalid as exc:
        raise SpecError(
            f"{source}: [output] fallback does not match [output.fields] ({exc.detail}); give a value for every field"
        ) from None
