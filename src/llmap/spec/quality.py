"""The quality keys: ``[output] checks``, ``[output] confidence`` and the ``[eval]`` table (see :mod:`llmap.spec`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from llmap.spec.base import StrictModel
from llmap.spec.model import ModelSpec


class CheckSpec(StrictModel):
    """One ``[output] checks`` entry: a rule across fields that every answer must meet.

    Args (TOML keys):
        sql: a DuckDB SQL boolean expression over the row's input columns (every column of the
            input, the key included, with its input type) and the answer's fields (typed as
            ``escalate_if`` types them), e.g. ``"region != 'LATAM' OR country IN ('BR', 'MX')"``.
            An answer for which it is false is re-asked with ``message``; NULL passes, as in a
            SQL ``CHECK`` constraint. Bound at preflight: an unknown column is an error (exit 2).
        message: what is wrong, in words the model (the re-ask) and a person (the row's
            ``_error``) read, e.g. ``"a LATAM region needs a Latin American country"``.
    """

    sql: str = Field(min_length=1)
    message: str = Field(min_length=1)


#: ``[output] confidence``: ``"auto"``, on, off, or the fields it covers.
ConfidenceSetting = Literal["auto"] | bool | list[str]


class EvalSpec(StrictModel):
    """``[eval]``: where the true answers come from, and the models ``llmap eval --models`` may compare.

    Args (TOML keys):
        gold: output field -> input column holding its true value (``{ kind = "true_kind" }``).
            The columns are read with the rows and kept in the ledger; ``llmap eval`` compares the
            answers with them (labels imported with ``llmap label`` win over them for the same row
            and field).
        tolerance: number field -> the absolute difference that still counts as right for
            ``llmap eval``'s "within tolerance" share (``--tolerance`` overrides it for every field).
        models: candidate models for ``llmap eval --models NAME,...``, written as ``[[model]]``
            tables (``name``, ``provider``, ``base_url``, prices...). A name not found here or in
            ``[[model]]`` is the first model with that name.
        sample: rows ``llmap eval --models`` runs when ``--sample`` is not given (default: every
            labelled row).
        seed: the seed of ``llmap eval --models``'s and ``llmap review``'s sampling (default 0).
    """

    gold: dict[str, str] = {}
    tolerance: dict[str, float] = {}
    models: list[ModelSpec] = []
    sample: int | None = Field(default=None, gt=0)
    seed: int = 0

    @field_validator("tolerance")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, t in v.items() if t < 0]
        if bad:
            raise ValueError(f"tolerance for {bad[0]!r} must be >= 0")
        return v

    @field_validator("models", mode="before")
    @classmethod
    def _tables(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v
