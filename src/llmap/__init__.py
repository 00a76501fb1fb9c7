"""llmap: map an LLM prompt over every row of a dataset: structured, fast, cheap, resumable.

Public API::

    import llmap
    llmap.Job.from_toml("job.toml").run()
    llmap.map(rows, prompt="Classify: {{ text }}", fields={"label": "string"})
    await llmap.amap(rows, ...)   # in Jupyter or async code

Every error llmap raises on purpose is exported here, under :class:`LlmapError` (the tree is drawn in
:mod:`llmap.errors`); :class:`Progress` is what a custom ``Job.run(progress=...)`` reporter implements.
"""

import typing as _typing
from importlib import import_module as _import_module
from importlib import metadata as _metadata

from llmap.errors import (
    AnswerCut,
    AnswerInvalid,
    AuthError,
    BadRequest,
    BatchTooLarge,
    ConnectionFailed,
    ContextTooLong,
    DiskFull,
    DocumentError,
    EventLoopRunning,
    FatalProviderError,
    InputError,
    LedgerLocked,
    LlmapError,
    LocalModelCrashed,
    MalformedResponse,
    ModelLeftOut,
    Overloaded,
    ProviderError,
    QuotaExhausted,
    RateLimited,
    RenderError,
    RequestTimeout,
    RunInterrupted,
    SpecError,
    TerminalError,
    TransientError,
)

#: The rest of the public API, imported on first use (``llmap.Job``, ``from llmap import map``): the package's
#: own processes (the embedded model's worker, Ray workers) import ``llmap.<module>`` without paying for the
#: engine's imports (about 0.5 s).
_LAZY = {"amap": "llmap.api", "map": "llmap.api", "Job": "llmap.engine", "Prepared": "llmap.engine",
         "RunResult": "llmap.engine", "Progress": "llmap.observe.progress", "Tally": "llmap.observe.progress",
         "load_spec": "llmap.plan", "JobSpec": "llmap.spec", "ModelSpec": "llmap.spec"}

if _typing.TYPE_CHECKING:
    from llmap.api import amap, map
    from llmap.engine import Job, Prepared, RunResult
    from llmap.observe.progress import Progress, Tally
    from llmap.plan import load_spec
    from llmap.spec import JobSpec, ModelSpec


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'llmap' has no attribute {name!r}")
    value = getattr(_import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


try:
    __version__ = _metadata.version("llmap")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AnswerCut",
    "AnswerInvalid",
    "AuthError",
    "BadRequest",
    "BatchTooLarge",
    "ConnectionFailed",
    "ContextTooLong",
    "DiskFull",
    "DocumentError",
    "EventLoopRunning",
    "FatalProviderError",
    "InputError",
    "Job",
    "JobSpec",
    "LedgerLocked",
    "LlmapError",
    "LocalModelCrashed",
    "MalformedResponse",
    "ModelLeftOut",
    "ModelSpec",
    "Overloaded",
    "Prepared",
    "Progress",
    "ProviderError",
    "QuotaExhausted",
    "RateLimited",
    "RenderError",
    "RequestTimeout",
    "RunInterrupted",
    "RunResult",
    "SpecError",
    "Tally",
    "TerminalError",
    "TransientError",
    "__version__",
    "amap",
    "load_spec",
    "map",
]
