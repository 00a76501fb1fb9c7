"""The operator tables: ``[cluster]``, ``[resolve]``, ``[reduce]``, ``[filter]`` and ``[embeddings]``.

A job's top-level ``kind`` picks what it does with its rows (:data:`KINDS`):
``"map"`` (the default: one answer per row), ``"cluster"`` (rows into families
the model names), ``"resolve"`` (rows that mean the same entity), ``"reduce"``
(one answer per group of rows) or ``"filter"`` (keep the rows whose boolean
field is true). Each operator reads its own table; every key has a default,
so a cluster job needs none of them. The operators themselves live in
:mod:`llmap.operators`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from llmap.spec.base import StrictModel

__all__ = ["KINDS", "ClusterSpec", "EmbeddingsSpec", "FilterSpec", "ReduceSpec", "ResolveSpec"]

#: Every job kind; ``"map"`` is the default.
KINDS = ("map", "cluster", "resolve", "reduce", "filter")

#: Context tokens assumed for a remote model when the job does not say (``context_tokens``).
DEFAULT_REMOTE_CONTEXT = 16_000


class EmbeddingsSpec(StrictModel):
    """``[embeddings]``: the model that embeds rows (cluster windows and candidates, resolve blocking).

    Attributes:
        provider: ``"local"`` (default: all-MiniLM-L6-v2 run by onnxruntime in this process, shipped by the
            ``local`` extra; nothing is downloaded) or ``"openai"`` (any OpenAI-compatible ``/v1/embeddings``).
        name: the model; default ``"all-MiniLM-L6-v2"`` for ``local``; required for ``openai``
            (e.g. ``"text-embedding-3-small"``).
        base_url: ``openai`` only; default the first ``[model]``'s ``base_url`` when it is an ``openai`` model,
            else ``https://api.openai.com/v1``.
        api_key_env: ``openai`` only; default the first ``[model]``'s when it is an ``openai`` model.
        batch: texts per embeddings request (default 256).
        price_in: USD per million input tokens (default 0), counted in the run's cost and ``max_cost_usd``.
        timeout_s: read timeout per request, seconds (default 60).
    """

    provider: Literal["local", "openai"] = "local"
    name: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    batch: int = Field(default=256, ge=1, le=2048)
    price_in: float = Field(default=0.0, ge=0)
    timeout_s: float = Field(default=60.0, gt=0)


class ClusterSpec(StrictModel):
    """``[cluster]``: rows into families the model names and describes.

    Attributes:
        min_size: a family with fewer rows than this after assignment is dissolved (its rows get
            ``_family`` null); default 3.
        max_families: keep at most this many families, the largest (default: no cap).
        context_tokens: the model's context window, tokens; windows of rows and their answers are sized
            to it. Default: ``[model] n_ctx`` for ``local``, else 16,000.
        window_share: the share of ``context_tokens`` a window's rows may fill (the rest holds the
            instructions and the answer); default 0.45.
        candidates: how many nearest families (by embedding) a row is offered when it is assigned;
            default 8.
        merge_neighbors: how many nearest families (by embedding) each proposed family is compared with
            for a merge; default 4.
        merge_min_similarity: cosine similarity below which two families are never compared; default 0.5.
        pack: rows per assignment request and family pairs per merge request; default 20.
        families_path: where the families table is written; default ``<output stem>.families<ext>``
            beside ``[output] path``.
    """

    min_size: int = Field(default=3, ge=1)
    max_families: int | None = Field(default=None, ge=1)
    context_tokens: int | None = Field(default=None, ge=256)
    window_share: float = Field(default=0.45, gt=0.05, lt=0.9)
    candidates: int = Field(default=8, ge=1, le=100)
    merge_neighbors: int = Field(default=4, ge=1, le=50)
    merge_min_similarity: float = Field(default=0.5, ge=-1.0, le=1.0)
    pack: int = Field(default=20, ge=1, le=200)
    families_path: str | None = None


class ResolveSpec(StrictModel):
    """``[resolve]``: rows that mean the same entity get the same ``_entity``.

    Attributes:
        neighbors: nearest neighbours (by embedding) per row that become candidate pairs; default 10.
            All pairs are never compared.
        threshold: cosine similarity a candidate pair needs to be judged: a number, or ``"auto"``
            (default): a seeded sample of candidate pairs is judged first, and the threshold is set so that
            ``target_recall`` of the pairs judged the same lie above it (DocETL's blocking rule).
        target_recall: the share of same-entity candidate pairs the auto threshold keeps; default 0.95.
        sample: candidate pairs judged to set the auto threshold; default 200.
        pack: pairs per request; default 10.
        show: merges shown in the report; default 10.
    """

    neighbors: int = Field(default=10, ge=1, le=200)
    threshold: float | Literal["auto"] = "auto"
    target_recall: float = Field(default=0.95, gt=0, le=1)
    sample: int = Field(default=200, ge=10)
    pack: int = Field(default=10, ge=1, le=200)
    show: int = Field(default=10, ge=0)

    @field_validator("threshold")
    @classmethod
    def _similarity(cls, v: float | str) -> float | str:
        if isinstance(v, int | float) and not -1.0 <= v <= 1.0:
            raise ValueError("threshold is a cosine similarity from -1 to 1, or \"auto\"")
        return v


class ReduceSpec(StrictModel):
    """``[reduce]``: one answer per group of rows (a SQL ``GROUP BY``), with the ``[output.fields]``.

    Attributes:
        by: the input columns whose values make a group; default none (every row is one group).
        context_tokens: the model's context window, tokens; default ``[model] n_ctx`` for ``local``,
            else 16,000. A group whose rows do not fit in one request is reduced hierarchically: chunk
            summaries, then summaries of summaries, then the answer.
        chunk_share: the share of ``context_tokens`` one chunk's rows may fill; default 0.5.
        summary_tokens: the most tokens one chunk's summary may take; default ``context_tokens / 8``.
    """

    by: list[str] = []
    context_tokens: int | None = Field(default=None, ge=256)
    chunk_share: float = Field(default=0.5, gt=0.05, lt=0.9)
    summary_tokens: int | None = Field(default=None, ge=16)


class FilterSpec(StrictModel):
    """``[filter]``: keep the rows whose boolean ``field`` the model says is true.

    Attributes:
        field: the ``[output.fields]`` boolean that decides; default the only boolean field.
    """

    field: str | None = None
