"""The ``[cascade]`` table: a cascade with a guarantee (see :mod:`llmap.spec`, and docs/cascade.md).

Its checks against the rest of the job (two ``[[model]]`` tables, the field, confidence) live in
:func:`llmap.plan.compile_spec`; the statistics in :mod:`llmap.control.guarantee`; the run in
:mod:`llmap.run.guaranteed`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field

from llmap.spec.base import StrictModel

__all__ = ["CascadeSpec"]


class CascadeSpec(StrictModel):
    """``[cascade]``: the first ``[[model]]`` (the proxy) answers every row; a seeded sample goes to the last (the
    oracle); the rows whose ``_confidence`` is below the threshold the sample proves safe go to the oracle too.

    Args (TOML keys):
        guarantee: what is promised about the final answers, against the oracle's: ``"agreement"`` (the share of
            rows whose ``field`` equals the oracle's), ``"precision"`` or ``"recall"`` (of a boolean ``field``:
            true is positive).
        field: the output field the promise is about; default: the job's only field (required with several).
        target: the promised rate, in (0, 1), e.g. 0.95.
        delta: the probability, in (0, 1), that the promise fails (default 0.05): the target is met with
            probability at least ``1 - delta``.
        label_budget: rows the oracle answers in the sample (default 400); a larger sample proves a lower
            threshold (more rows kept) and costs more oracle calls.
        on_miss: when no threshold meets the target within the budget: ``"stop"`` (default: the run stops with
            a message, the sampled rows done, the others pending) or ``"escalate_all"`` (every row goes to the
            oracle).
        seed: the sample's seed (default 0): the same rows and seed draw the same sample.
    """

    guarantee: Literal["agreement", "precision", "recall"] = "agreement"
    field: str | None = None
    target: float = Field(gt=0, lt=1)
    delta: float = Field(default=0.05, gt=0, lt=1)
    label_budget: int = Field(default=400, ge=1)
    on_miss: Literal["escalate_all", "stop"] = "stop"
    seed: int = 0

    def decision_key(self, request_fingerprint: str, field: str) -> str:
        """What a stored threshold is valid for: the requests (prompt, fields, models) and every key that shapes
        the decision (``on_miss`` does not: it says what to do with a miss, not what a miss is)."""
        doc = {"requests": request_fingerprint, "guarantee": self.guarantee, "field": field, "target": self.target,
               "delta": self.delta, "label_budget": self.label_budget, "seed": self.seed}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
