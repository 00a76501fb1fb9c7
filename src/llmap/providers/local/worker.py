"""The embedded model's child process: ``python -m llmap.providers.local.worker``.

llama.cpp runs here, not in llmap's process, so a native crash (SIGSEGV,
SIGILL, abort) kills this process only; :mod:`llmap.providers.local.provider` turns
its death into a one-line error and keeps the run's ledger intact.

Protocol: one JSON object per line (JSON strings escape newlines, so a line
is a frame), requests on stdin, replies on stdout. Every request carries an
``id`` and gets exactly one reply with the same ``id``:

* ``{"op": "load", "model_path", "n_ctx", "n_threads", "prefix_reuse"}`` ->
  ``{"ok": true, "pid"}``: load the GGUF file.
* ``{"op": "ping"}`` -> ``{"ok": true, "latency_s"}``: one tiny generation
  (the preflight: a build that crashes on this CPU crashes here).
* ``{"op": "complete", "messages", "schema", "temperature", "max_tokens"}`` ->
  ``{"content", "prompt_tokens", "completion_tokens", "latency_s"}``.
* ``{"op": "cancel", "target"}`` (no reply of its own): the request ``target``
  stops at its next token and answers ``{"cancelled": true}``.
* ``{"op": "stats"}`` -> ``{"counters", "timers"}`` of the model (benchmarks).

A failed request answers ``{"error": {"kind", "message"}}``; ``kind`` is
``load``, ``context`` (prompt over ``n_ctx``), ``bad_request`` or ``runtime``.
The process exits when stdin closes, or when its parent dies (Linux).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import sys
import threading
import time
from typing import Any, BinaryIO, TextIO

__all__ = ["main"]

#: Largest batch llama.cpp is set up for, in tokens: a prompt block (16) plus a draft (12)
#: fits; prompts longer than this are split. Smaller than llama-cpp-python's 512, it keeps
#: the logits and compute buffers (262,144 floats per output row) small.
BATCH = 64


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Worker:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.llm: Any = None
        self.cancelled: set[int] = set()
        self.current: int | None = None
        self._write = threading.Lock()

    def reply(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        with self._write:
            self.out.write(line)
            self.out.flush()

    def is_cancelled(self) -> bool:
        return self.current in self.cancelled

    # -- ops ------------------------------------------------------------------
    def load(self, msg: dict[str, Any]) -> dict[str, Any]:
        import llama_cpp

        from llmap.providers.local.model import FastLlama

        llama_cpp.llama_log_set(_quiet_log(), None)  # llama.cpp's C logs stay off the terminal
        try:
            self.llm = FastLlama(
                model_path=msg["model_path"], n_ctx=int(msg["n_ctx"]), n_threads=int(msg["n_threads"]),
                n_threads_batch=int(msg["n_threads"]), verbose=False, n_batch=BATCH, n_ubatch=BATCH,
                prefix_reuse=bool(msg.get("prefix_reuse", True)), cancelled=self.is_cancelled,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            return {"error": {"kind": "load", "message": str(exc) or type(exc).__name__}}
        return {"ok": True, "pid": os.getpid()}

    def ping(self, msg: dict[str, Any]) -> dict[str, Any]:
        t0 = time.monotonic()
        self.llm.create_completion("The capital of France is", max_tokens=2, temperature=0.0)
        return {"ok": True, "latency_s": time.monotonic() - t0}

    def complete(self, msg: dict[str, Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "messages": msg["messages"],
            "temperature": float(msg.get("temperature", 0.0)),
            "max_tokens": int(msg.get("max_tokens", 256)),
        }
        if msg.get("schema") is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": msg["schema"]}
        t0 = time.monotonic()
        out = self.llm.create_chat_completion(**kwargs)
        usage = out.get("usage") or {}
        return {
            "content": out["choices"][0]["message"]["content"] or "",
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens") or 0),
            "latency_s": time.monotonic() - t0,
        }

    def stats(self, msg: dict[str, Any]) -> dict[str, Any]:
        llm = self.llm
        return {"counters": dict(getattr(llm, "counters", {})), "timers": dict(getattr(llm, "timers", {}))}

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "load":
            return self.load(msg)
        if self.llm is None:
            return {"error": {"kind": "bad_request", "message": f"{op!r} before 'load'"}}
        if op not in ("ping", "complete", "stats"):
            return {"error": {"kind": "bad_request", "message": f"unknown op {op!r}"}}
        self.current = msg.get("id")
        try:
            if self.is_cancelled():
                return {"cancelled": True}
            result = getattr(self, op)(msg)
            return {"cancelled": True} if self.is_cancelled() else result
        except ValueError as exc:  # llama-cpp-python raises ValueError for a prompt over n_ctx
            text = str(exc)
            kind = "context" if "context" in text.lower() else "bad_request"
            return {"error": {"kind": kind, "message": text}}
        except RuntimeError as exc:  # llama_decode returned non-zero (e.g. no KV cache slot)
            return {"error": {"kind": "runtime", "message": str(exc)}}
        finally:
            self.cancelled.discard(self.current)  # type: ignore[arg-type]
            self.current = None


def _reader(stream: BinaryIO, inbox: queue.Queue, worker: _Worker) -> None:
    for raw in stream:
        line = raw.decode("utf-8", "replace").strip()
        if not line:
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            worker.reply({"error": {"kind": "bad_request", "message": f"not JSON: {line[:80]!r}"}})
            continue
        if msg.get("op") == "cancel":
            worker.cancelled.add(msg.get("target"))
        else:
            inbox.put(msg)
    inbox.put(None)  # stdin closed: the parent is done with us


def main() -> int:
    """Serve requests until stdin closes; returns the exit code."""
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        return 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    # The protocol owns the real stdout; anything native code prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    worker = _Worker(out)
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(sys.stdin.buffer, inbox, worker), daemon=True).start()
    while True:
        msg = inbox.get()
        if msg is None:
            return 0
        reply = worker.handle(msg)
        reply["id"] = msg.get("id")
        try:
            worker.reply(reply)
        except BrokenPipeError:
            return 0


def _quiet_log() -> Any:
    """A llama.cpp log callback that drops every message (kept alive on the function)."""
    import ctypes

    import llama_cpp

    cb = getattr(_quiet_log, "cb", None)
    if cb is None:
        @llama_cpp.llama_log_callback
        def cb(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            return None

        _quiet_log.cb = cb  # type: ignore[attr-defined]
    return cb


if __name__ == "__main__":
    sys.exit(main())
