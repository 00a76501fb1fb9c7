"""The job spec: a TOML file <-> typed, validated objects.

A job spec names the input, the prompt, the output fields and the model.
This module is pure data: :func:`read_spec` and :func:`parse_spec` turn TOML
into pydantic objects and check each table's own keys (types, ranges, unknown
keys), and every problem becomes one :class:`~llmap.errors.SpecError` whose
message names the problem and the fix. Checks across tables (templates
against fields, examples, fallback, ``escalate_if``, the cost cap) and against
the input's header live in :mod:`llmap.plan`; :func:`llmap.plan.load_spec`
runs both.

The contract (docs/job-spec.md has every key, default and unit)::

    name = "district-type"          # optional; default: the file's stem
    [input]   path | sql, key (a column or a list of columns), where, limit, encoding, document_dirs,
              [input.documents]
    [prompt]  system, user, examples
    [output]  path, keep, max_reask, checks, confidence, [output.fields]
    [model]   provider, name, base_url, api_key_env, model_path, temperature, max_tokens, ...
    [limits]  concurrency, rpm, tpm, itpm, otpm, ...
    [batch]   max_requests, max_bytes, poll_s, deadline, retry   (for [model] batch = true)
    [eval]    gold, tolerance, models, sample, seed                (llmap eval, llmap review)
    [fetch]   allow_private, per_host_rpm, per_host_concurrency, max_mb, timeout_s, ...   (document URLs)
    [cascade] guarantee, field, target, delta, label_budget, on_miss, seed   (a cascade with a guarantee)
"""

from llmap.spec.base import FIELD_TYPES
from llmap.spec.cascade import CascadeSpec
from llmap.spec.documents import DocumentSpec, FetchSpec
from llmap.spec.job import JobSpec, parse_spec, read_spec
from llmap.spec.limits import AlertsSpec, BatchSpec, CacheSpec, LimitsSpec
from llmap.spec.model import ModelSpec
from llmap.spec.quality import CheckSpec, EvalSpec
from llmap.spec.sections import Example, FieldSpec, InputSpec, OutputSpec, PerGroup, PromptSpec

__all__ = [
    "AlertsSpec",
    "BatchSpec",
    "CacheSpec",
    "CascadeSpec",
    "CheckSpec",
    "DocumentSpec",
    "EvalSpec",
    "Example",
    "FIELD_TYPES",
    "FetchSpec",
    "FieldSpec",
    "InputSpec",
    "JobSpec",
    "LimitsSpec",
    "ModelSpec",
    "OutputSpec",
    "PerGroup",
    "PromptSpec",
    "parse_spec",
    "read_spec",
]
