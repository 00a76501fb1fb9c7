"""llmap: map an LLM prompt over every row of a dataset: structured, fast, cheap, resumable.

Public API::

    import llmap
    llmap.Job.from_toml("job.toml").run()
    llmap.map(rows, prompt="Classify: {{ text }}", fields={"label": "string"})
    await llmap.amap(rows, ...)   # in Jupyter or async code
"""

from llmap.api import amap, map
from llmap.engine import Job, RunResult
from llmap.errors import (
    AnswerInvalid,
    AuthError,
    BadRequest,
    FatalProviderError,
    InputError,
    LedgerLocked,
    LlmapError,
    ProviderError,
    RateLimited,
    RunInterrupted,
    SpecError,
    TerminalError,
    TransientError,
)
from llmap.plan import load_spec
from llmap.spec import JobSpec, ModelSpec

__version__ = "0.1.0"

__all__ = [
    "AnswerInvalid",
    "AuthError",
    "BadRequest",
    "FatalProviderError",
    "InputError",
    "Job",
    "JobSpec",
    "LedgerLocked",
    "LlmapError",
    "ModelSpec",
    "ProviderError",
    "RateLimited",
    "RunInterrupted",
    "RunResult",
    "SpecError",
    "TerminalError",
    "TransientError",
    "__version__",
    "amap",
    "load_spec",
    "map",
]
