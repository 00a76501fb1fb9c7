"""What every spec table shares: strict pydantic models, the output field types, the default model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

#: Output field types llmap knows, and the JSON Schema type each compiles to.
FIELD_TYPES: dict[str, str] = {
    "string": "string",
    "integer": "integer",
    "number": "number",
    "boolean": "boolean",
}

#: Default model when the spec has no [model] table: the embedded Gemma 3 270M.
DEFAULT_LOCAL_MODEL = "gemma-3-270m"


class StrictModel(BaseModel):
    """A spec table: unknown keys are errors (``extra="forbid"``) and values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
