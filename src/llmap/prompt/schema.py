"""Output fields -> JSON Schema (sent with each request) and a pydantic validator.

Every answer is validated before it counts. An answer that fails is re-asked
with :func:`reask_message` appended to the conversation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError, create_model

from llmap.errors import AnswerInvalid, SpecError
from llmap.spec import FIELD_TYPES, Example, FieldSpec

__all__ = ["OutputSchema", "check_examples", "check_fallback", "reask_message"]

_PY_TYPES: dict[str, Any] = {"string": str, "integer": int, "number": float, "boolean": StrictBool}


def _json_schema(fields: Mapping[str, FieldSpec]) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for name, f in fields.items():
        p: dict[str, Any] = {"type": FIELD_TYPES[f.type]}
        if f.enum is not None:
            p["enum"] = list(f.enum)
        if f.description:
            p["description"] = f.description
        props[name] = p
    return {
        "type": "object",
        "properties": props,
        "required": list(fields),
        "additionalProperties": False,
    }


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _model(fields: Mapping[str, FieldSpec]) -> type[BaseModel]:
    defs: dict[str, Any] = {}
    for name, f in fields.items():
        t = _PY_TYPES[f.type]
        if f.enum is not None:
            t = Literal[tuple(f.enum)]  # type: ignore[valid-type]
        defs[name] = (t, ...)
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

        Raises:
            AnswerInvalid: the text is not JSON or does not match the fields;
                ``detail`` says what to fix and is used for the re-ask.
        """
        try:
            obj = self._model.model_validate_json(content)
        except ValidationError as exc:
            raise AnswerInvalid(_describe(exc, content)) from None
        return obj.model_dump()


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
        try:
            schema.validate(json.dumps(ex.output))
        except AnswerInvalid as exc:
            raise SpecError(
                f"{source}: [prompt] examples #{i}: output does not match [output.fields] ({exc.detail}); fix the example"
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
