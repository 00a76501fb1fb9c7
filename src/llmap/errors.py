"""llmap's one exception tree.

Everything llmap raises on purpose derives from :class:`LlmapError`. Third-party
errors (aiohttp, llama.cpp, DuckDB, SQLite) are mapped into this tree at one
boundary each (``providers/base.py`` for model calls, ``io/sources.py`` for
input), with ``raise ... from exc`` so the original stays in ``__cause__``.

::

    LlmapError
    ├── SpecError                 bad job spec or input; exit code 2, nothing sent
    │   └── InputError            unreadable input, missing column, duplicate key
    ├── ProviderError             a model call failed (attrs: model, row_key, attempt, status)
    │   ├── TransientError        worth retrying with backoff
    │   │   ├── RateLimited       429; ``retry_after`` seconds when the server said so
    │   │   ├── Overloaded        503 / 529 / 5xx
    │   │   ├── RequestTimeout    connect or read timeout, 408
    │   │   ├── ConnectionFailed  refused / reset connection
    │   │   └── MalformedResponse 200 with a body that is not a chat completion
    │   └── TerminalError         retrying cannot help this row
    │       ├── BadRequest        400 / 404 / 422
    │       │   ├── ContextTooLong
    │       │   ├── AnswerCut     answers stop at max_tokens (raise [model] max_tokens)
    │       │   ├── ModelLeftOut  the model refused every request the same way; rows fail over
    │       │   └── BatchTooLarge a batch API refused a batch for its size: llmap splits it in two
    │       └── FatalProviderError  every row would hit it: stop the run (exit 1)
    │           ├── AuthError       401 / 403
    │           ├── QuotaExhausted  insufficient_quota
    │           └── LocalModelCrashed  the embedded model's process died (SIGSEGV, SIGILL, abort)
    ├── AnswerInvalid             the answer does not validate against the fields
    ├── RenderError               a template failed on one row's values; that row fails, the run goes on
    ├── DocumentError             a row's document cannot be read or fetched; that row fails, the run goes on
    ├── EventLoopRunning          a sync call (llmap.map, Job.run) inside a running event loop
    ├── LedgerLocked              another run of the job holds its ledger; nothing sent (exit 75)
    ├── DiskFull                  a write of the ledger, cache or output found the disk full (exit 1)
    └── RunInterrupted            Ctrl-C / SIGTERM; progress is kept (exit 130)

Exit codes used by the CLI: 0 every row done or skipped, 1 some rows failed
or a fatal provider error or :class:`DiskFull` stopped the run, 2 :class:`SpecError`, 75
:class:`LedgerLocked` (sysexits' EX_TEMPFAIL: try again later), 130
:class:`RunInterrupted`.
"""

from __future__ import annotations

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
    "LedgerLocked",
    "LlmapError",
    "LocalModelCrashed",
    "MalformedResponse",
    "ModelLeftOut",
    "Overloaded",
    "ProviderError",
    "QuotaExhausted",
    "RateLimited",
    "RenderError",
    "RequestTimeout",
    "RunInterrupted",
    "SpecError",
    "TerminalError",
    "TransientError",
]


class LlmapError(Exception):
    """Root of every error llmap raises on purpose."""


class SpecError(LlmapError):
    """The job spec is invalid. Raised before any request is sent; CLI exit code 2.

    The message is one line that names the problem and the fix.
    """

    exit_code = 2


class InputError(SpecError):
    """The input cannot be used: unreadable file, missing column, duplicate key."""


class ProviderError(LlmapError):
    """A model call failed.

    Attributes:
        model: the model name the request was sent to, if known.
        row_key: the key of the row (or first row of a pack) the request served.
        attempt: 1-based attempt number of the failed request.
        status: the HTTP status code, or ``None`` for non-HTTP failures.
    """

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        row_key: str | None = None,
        attempt: int | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.model = model
        self.row_key = row_key
        self.attempt = attempt
        self.status = status
        #: requests refused for their shape before this error (``llmap.providers.base.Refusal``)
        self.refusals: tuple = ()


class TransientError(ProviderError):
    """Retrying later may succeed (rate limit, overload, timeout, 5xx, bad body)."""


class RateLimited(TransientError):
    """HTTP 429. ``retry_after`` is the server's Retry-After in seconds, or None."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class Overloaded(TransientError):
    """HTTP 5xx or 529: the server is overloaded or broken right now."""


class RequestTimeout(TransientError):
    """The connect or read timeout expired (or the server answered 408)."""


class ConnectionFailed(TransientError):
    """The connection was refused, reset or closed before an answer came."""


class MalformedResponse(TransientError):
    """HTTP 200 whose body is not a well-formed chat completion."""


class TerminalError(ProviderError):
    """Retrying cannot help this row: fail it at once with this error."""


class BadRequest(TerminalError):
    """HTTP 400 / 404 / 422: the request itself is wrong (bad model name, bad params)."""


class ContextTooLong(BadRequest):
    """The prompt does not fit the model's context window."""


class AnswerCut(BadRequest):
    """The answer stopped at ``max_tokens`` (Anthropic ``stop_reason = "max_tokens"``) and again after a
    re-ask: the row fails with this error on that model. The same cut on a model's first requests is a
    configuration error (:mod:`llmap.control.misconfig`): raise ``[model] max_tokens``."""


class ModelLeftOut(BadRequest):
    """The model was left out of the run (it refused every request the same way, see
    :mod:`llmap.control.misconfig`): raised, without a request, for a row that was waiting to send
    to it, so the row fails over to the next model."""


class BatchTooLarge(BadRequest):
    """A batch API refused a batch for its size (too many requests or bytes, at upload or at validation):
    llmap submits it again as two halves (see :mod:`llmap.run.batch.runner`)."""


class FatalProviderError(TerminalError):
    """Every row would hit this error: the run stops (exit 1), progress is kept."""


class AuthError(FatalProviderError):
    """HTTP 401 / 403: the API key is missing, wrong or lacks permission."""


class QuotaExhausted(FatalProviderError):
    """The account has no quota left (OpenAI ``insufficient_quota``)."""


class LocalModelCrashed(FatalProviderError):
    """The embedded model's child process died (a native crash or a kill signal).

    llama.cpp runs in a child process (:mod:`llmap.providers.local.worker`),
    so llmap itself survives: the row stays pending and the run stops with
    this one-line message, which names the fix (usually: reinstall
    llama-cpp-python with portable CPU flags).

    Attributes:
        signal: the signal number that killed the process, or None.
        returncode: the process's exit status (negative for a signal).
    """

    def __init__(self, message: str, *, signal: int | None = None, returncode: int | None = None,
                 **kw) -> None:
        super().__init__(message, **kw)
        self.signal = signal
        self.returncode = returncode


class AnswerInvalid(LlmapError):
    """The model's answer does not validate against the output fields.

    Attributes:
        detail: the validation error text that is appended to a re-ask.
    """

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class EventLoopRunning(LlmapError, RuntimeError):
    """A blocking call (:func:`llmap.map`, :meth:`llmap.Job.run`) was made inside a running event loop.

    Jupyter and async code already run a loop, which a blocking call cannot
    nest; the message names the awaitable to use instead (``await
    llmap.amap(...)``, ``await job.arun(...)``). Also a ``RuntimeError``, as
    :func:`asyncio.run` raises in that case.
    """


class LedgerLocked(LlmapError):
    """Another run of the same job holds the job's ledger lock; this run sent nothing.

    CLI exit code 75 (``EX_TEMPFAIL`` in sysexits.h: a temporary failure, try
    again later): not 2, since the job is fine, and not 1, since no row failed.

    Attributes:
        holder: who holds it (:class:`llmap.store.lock.Holder`: pid, host,
            start time), or None when the lock file does not say yet.
        lock_path: the lock file beside the ledger.
    """

    exit_code = 75

    def __init__(self, message: str, *, holder: object = None, lock_path: object = None) -> None:
        super().__init__(message)
        self.holder = holder
        self.lock_path = lock_path


class DiskFull(LlmapError):
    """A write of llmap's own files (ledger, response cache, output) found the disk full.

    What was committed before stays committed (SQLite rolls the failed
    transaction back whole) and the export never leaves a half-written file;
    the message names the file, the free space and the fix. CLI exit code 1.

    Attributes:
        path: the file that could not be written.
        free_bytes: bytes free on its file system when the write failed, or None.
    """

    exit_code = 1

    def __init__(self, message: str, *, path: object = None, free_bytes: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.free_bytes = free_bytes


class RenderError(LlmapError):
    """A prompt template failed on one row's values (e.g. ``{{ name.upper() }}`` on a NULL name).

    Only that row fails (its ``_error`` holds this message); the run goes on.

    Attributes:
        template: which template failed (``"system"`` or ``"user"``).
        null_columns: the row's template variables that were NULL or missing.
    """

    def __init__(self, message: str, *, template: str = "user", null_columns: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.template = template
        self.null_columns = null_columns


class DocumentError(LlmapError):
    """A row's document (``[input.documents]``) cannot be read: a missing file, an encrypted or corrupt PDF,
    a 404, a page over ``[fetch] max_mb``, a path outside the allowed folders, a URL that is not http(s) or
    that points to a private address.

    Only that row fails (its ``_error`` holds this one-line message, naming the file or URL and the cause);
    the run goes on. Fetch errors are classed like a model's: a 429, a 5xx, a timeout or a refused
    connection is retried within ``[fetch] max_attempts`` and then sets ``transient`` (the next run tries
    again); a 404 or a refusal is not retried.

    Attributes:
        source: the path or URL as the row gave it.
        column: the document column, when known.
        transient: a later try may succeed (the server was busy or unreachable).
    """

    def __init__(self, message: str, *, source: str | None = None, column: str | None = None,
                 transient: bool = False) -> None:
        super().__init__(message)
        self.source = source
        self.column = column
        self.transient = transient


class RunInterrupted(LlmapError):
    """The run was interrupted (Ctrl-C, SIGTERM); completed rows are kept. Exit 130."""

    exit_code = 130
