"""One embedded-model child process and its pipes, with several requests in flight.

:class:`ModelProcess` writes requests to the child's stdin as JSON lines and
one reader task matches every reply line to the request with its ``id``, so a
process decodes several rows together (see
:mod:`llmap.providers.local.worker` for the protocol). When the child dies,
every request still waiting gets the error at once:
:class:`~llmap.errors.LocalModelCrashed` for a crash (SIGSEGV, SIGILL,
abort), :class:`~llmap.errors.Overloaded` (retried) when llmap killed it itself
because a cancelled request never stopped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import shlex
import signal
import sys
from typing import Any

from llmap import errors as E

__all__ = ["CLOSE_GRACE_S", "PORTABLE_CMAKE_ARGS", "ModelProcess", "crash_message", "reinstall_command"]

#: Seconds to wait for a child to exit after its stdin closes, before it is killed.
CLOSE_GRACE_S = 2.0
#: The compile flags of a portable llama.cpp build: no AMX or AVX-512 (not on every CPU), baseline AVX2/FMA/F16C.
PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"


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
                "out-of-memory killer, lower [limits] concurrency (one model process per core) or free memory")
    if sig is not None:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        why = ("an instruction this CPU does not have" if sig == signal.SIGILL
               else "usually a llama-cpp-python build for CPU features this machine lacks, such as AMX")
        return (f"the embedded model's process crashed with {name} in llama.cpp{said}: {why}; reinstall "
                f"llama-cpp-python portably: {reinstall_command()}")
    return (f"the embedded model's process exited with code {returncode}{said}; check that llama-cpp-python "
            f"imports and runs, or reinstall it portably: {reinstall_command()}")


class ModelProcess:
    """One model process: spawn it, send requests, read the replies, see it die.

    Args:
        index: its position in the provider's pool.
        command: the worker's command line.
    """

    def __init__(self, index: int, command: list[str]) -> None:
        self.index = index
        self.command = command
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._stderr_task: asyncio.Task | None = None
        self._reader: asyncio.Task | None = None
        self._next_id = 0
        #: request id -> (future of its reply, row key)
        self.waiting: dict[int, tuple[asyncio.Future, str | None]] = {}
        #: requests holding one of this process's slots (the provider counts them)
        self.load = 0
        #: held while the process starts, so that one request starts it and the others wait
        self.lock = asyncio.Lock()
        #: the error of a death nobody was waiting on (it crashed while idle), for the next request
        self.died: E.ProviderError | None = None
        #: True once we killed it ourselves (a cancelled request that never answered): restart on next use
        self.killed = False
        self._closing = False
        self.label = ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and not (
            self._reader is not None and self._reader.done())

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
        self.label = label
        self.stderr_tail.clear()
        self.killed = self._closing = False
        self.died = None
        self.proc = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=env, limit=64 * 1024 * 1024,
        )
        self._stderr_task = asyncio.create_task(self._drain_stderr(self.proc))
        self._reader = asyncio.create_task(self._read(self.proc))
        try:
            reply = await self.call({"op": "load", **load})
            if "error" in reply:
                raise E.SpecError(
                    f"cannot load model {load['model_path']!r}: {reply['error']['message']}; check it is a GGUF file")
            await self.call({"op": "ping"})
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

    def send(self, msg: dict[str, Any], *, row_key: str | None = None) -> tuple[int, asyncio.Future]:
        """Write one request; returns its id and the future of its reply.

        Raises:
            LocalModelCrashed: the process is dead already (or Overloaded, when we killed it).
        """
        proc = self.proc
        if proc is None or not self.alive:
            raise self.died or E.LocalModelCrashed(crash_message(proc.returncode if proc else None),
                                                   model=self.label, row_key=row_key)
        assert proc.stdin is not None
        self._next_id += 1
        rid = self._next_id
        fut = asyncio.get_running_loop().create_future()
        self.waiting[rid] = (fut, row_key)
        with contextlib.suppress(Exception):  # a dead pipe: the reader fails the future
            proc.stdin.write((json.dumps({**msg, "id": rid}, ensure_ascii=False) + "\n").encode("utf-8"))
        return rid, fut

    async def call(self, msg: dict[str, Any], *, row_key: str | None = None) -> dict[str, Any]:
        """Send one request and wait for its reply.

        Raises:
            LocalModelCrashed: the process died before answering.
        """
        _, fut = self.send(msg, row_key=row_key)
        await self.flush()
        return await fut

    async def flush(self) -> None:
        """Wait until the child's stdin buffer drains (never raises: a dead pipe shows on the reader)."""
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(Exception):
                await self.proc.stdin.drain()

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        """Hand each reply line to its request; when the pipe ends, fail every request still waiting."""
        assert proc.stdout is not None
        with contextlib.suppress(Exception):
            while line := await proc.stdout.readline():
                try:
                    reply = json.loads(line)
                except ValueError:
                    self.stderr_tail.append(line.decode("utf-8", "replace").rstrip())
                    continue
                entry = self.waiting.pop(reply.get("id"), None) if isinstance(reply, dict) else None
                if entry is not None and not entry[0].done():
                    entry[0].set_result(reply)
        await self._died(proc)

    async def _died(self, proc: asyncio.subprocess.Process) -> None:
        try:
            code = await asyncio.wait_for(proc.wait(), CLOSE_GRACE_S)
        except TimeoutError:
            proc.kill()
            code = await proc.wait()
        if self._stderr_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._stderr_task), 1.0)
        waiting, self.waiting = self.waiting, {}
        for fut, key in waiting.values():
            if not fut.done():
                fut.set_exception(self._error(code, key))
        if not self._closing and not self.killed:
            self.died = self._error(code, None)  # the next request on it says so (a crash stops the run)

    def _error(self, code: int | None, row_key: str | None) -> E.ProviderError:
        if self.killed:
            return E.Overloaded(f"{self.label}: the model process was restarted (a cancelled request did not stop)",
                                model=self.label, row_key=row_key)
        if self._closing:
            return E.Overloaded(f"{self.label}: the model process was closed", model=self.label, row_key=row_key)
        last = self.stderr_tail[-1] if self.stderr_tail else ""
        sig = -code if code is not None and code < 0 else None
        return E.LocalModelCrashed(crash_message(code, last), signal=sig, returncode=code, model=self.label,
                                   row_key=row_key)

    def cancel(self, rid: int) -> None:
        """Ask the child to stop request ``rid`` at its next token (it then answers ``cancelled``)."""
        proc = self.proc
        if proc is None or proc.stdin is None or not self.alive or rid not in self.waiting:
            return
        with contextlib.suppress(Exception):
            proc.stdin.write((json.dumps({"op": "cancel", "target": rid}) + "\n").encode("utf-8"))

    def kill(self) -> None:
        """Kill the child (a cancelled request it never answered); the next request starts a fresh one."""
        if self.proc is not None and self.proc.returncode is None:
            self.killed = True
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    async def close(self) -> None:
        """Close stdin (the child exits), wait up to :data:`CLOSE_GRACE_S` seconds, then kill it."""
        proc = self.proc
        if proc is None:
            return
        self._closing = True
        if proc.returncode is None:
            with contextlib.suppress(Exception):
                proc.stdin.close()  # type: ignore[union-attr]
            try:
                await asyncio.wait_for(proc.wait(), CLOSE_GRACE_S)
            except (TimeoutError, asyncio.CancelledError):
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._reader, CLOSE_GRACE_S + 2)
            self._reader = None
        if self._stderr_task is not None:
            self._stderr_task.cancel()
            with contextlib.suppress(BaseException):
                await self._stderr_task
            self._stderr_task = None
        self.proc = None
