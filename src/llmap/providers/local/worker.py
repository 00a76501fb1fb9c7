"""The embedded model's child process: ``python -m llmap.providers.local.worker``.

llama.cpp runs here, not in llmap's process, so a native crash (SIGSEGV,
SIGILL, abort) kills this process only; :mod:`llmap.providers.local.provider` turns
its death into a one-line error and keeps the run's ledger intact.

Protocol: one JSON object per line (JSON strings escape newlines, so a line
is a frame), requests on stdin, replies on stdout. Every request carries an
``id`` and gets exactly one reply with the same ``id``; several requests may
be in flight, and replies come in the order requests finish:

* ``{"op": "load", "model_path", "n_ctx", "n_threads", "prefix_reuse", "sequences"}``
  -> ``{"ok": true, "pid"}``: load the GGUF file; decode up to ``sequences``
  rows together (default 1).
* ``{"op": "ping"}`` -> ``{"ok": true, "latency_s"}``: one tiny generation
  (the preflight: a build that crashes on this CPU crashes here).
* ``{"op": "complete", "messages", "schema", "temperature", "max_tokens", "logprobs"}``
  -> ``{"content", "prompt_tokens", "completion_tokens", "latency_s", "finish_reason"}``,
  plus ``"logprobs": [[token text, logprob], ...]`` when asked (greedy requests only).
  ``finish_reason`` is ``"stop"`` or ``"length"`` (``max_tokens`` reached).
* ``{"op": "cancel", "target"}`` (no reply of its own): the request ``target``
  stops at its next token and answers ``{"cancelled": true}``.
* ``{"op": "stats"}`` -> ``{"counters", "timers"}`` of the decoder (benchmarks).

A failed request answers ``{"error": {"kind", "message"}}``; ``kind`` is
``load``, ``context`` (prompt over ``n_ctx``), ``bad_request`` or ``runtime``.
The process exits when stdin closes, or when its parent dies (Linux).

Requests at temperature 0 are decoded together by
:class:`~llmap.providers.local.decoder.BatchDecoder`; others go one at a time
through llama-cpp-python's own sampling, when no batch is in flight.
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
from collections import deque
from typing import Any, BinaryIO, TextIO

__all__ = ["BATCH", "main"]

#: Most tokens in one llama_decode call: a step's decoding rows, drafts and prompt chunks.
BATCH = 256
#: Most tokens with logits in one step (262,144 floats each): one per row, plus drafts.
OUTPUTS = 64
#: Cells of the KV cache per sequence beyond ``n_ctx``, for the rows decoded beside the first.
CELLS_PER_SEQUENCE = 256


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Fail(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _Worker:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.llm: Any = None
        self.decoder: Any = None
        self.n_ctx = 0
        self.inbox: queue.Queue = queue.Queue()
        self.cancelled: set[Any] = set()  # written by the reader thread
        self.started: dict[Any, tuple[str, float]] = {}  # request id -> (op, start time)
        self.fallback: deque[tuple[dict[str, Any], Any]] = deque()
        self.running: Any = None  # the id of the fallback request in progress
        self.gbnf: dict[str, str] = {}  # schema (canonical JSON) -> grammar
        self._write = threading.Lock()

    def reply(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        with self._write:
            self.out.write(line)
            self.out.flush()

    # -- loop -----------------------------------------------------------------
    def serve(self) -> int:
        """Answer requests until stdin closes; returns the exit code."""
        while True:
            if self.decoder is not None:
                self.decoder.hold = bool(self.fallback)  # drain the batch, then run those alone
            busy = self.decoder is not None and not self.decoder.idle
            try:
                msgs = [self.inbox.get(block=not busy and not self.fallback)]
            except queue.Empty:
                msgs = []
            while True:
                try:
                    msgs.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            for msg in msgs:
                if msg is None:
                    return 0  # stdin closed: the parent is done with us
                self.dispatch(msg)
            if self.decoder is not None:
                self.decoder.hold = bool(self.fallback)
            try:
                if self.decoder is not None and not self.decoder.idle:
                    try:
                        ended = self.decoder.step()
                    except Exception as exc:  # a bug, not llama.cpp: fail these rows, keep the process
                        ended = self.decoder.abort(f"{type(exc).__name__}: {exc}")
                    for fin in ended:
                        self.finished(fin)
                elif self.fallback:
                    msg, prepared = self.fallback.popleft()
                    self.answer(msg, lambda m=msg, p=prepared: self.sample(m, p))
            except BrokenPipeError:
                return 0

    def dispatch(self, msg: dict[str, Any]) -> None:
        op, rid = msg.get("op"), msg.get("id")
        if op == "cancel":
            self.cancel(msg.get("target"))
        elif op == "load":
            self.answer(msg, lambda: self.load(msg))
        elif self.llm is None:
            self.reply({"id": rid, "error": {"kind": "bad_request", "message": f"{op!r} before 'load'"}})
        elif op == "stats":
            self.reply({"id": rid, "counters": dict(self.decoder.counters), "timers": dict(self.decoder.timers)})
        elif op == "ping":
            self.started[rid] = ("ping", time.monotonic())
            self.answer(msg, lambda: self.submit_ping(msg))
        elif op == "complete":
            self.started[rid] = ("complete", time.monotonic())
            self.answer(msg, lambda: self.submit(msg))
        else:
            self.reply({"id": rid, "error": {"kind": "bad_request", "message": f"unknown op {op!r}"}})

    def answer(self, msg: dict[str, Any], work: Any) -> None:
        """Run ``work``; reply with what it returns (None: the reply comes later) or the error it raised."""
        rid = msg.get("id")
        try:
            out = work()
        except _Fail as exc:
            out = {"error": {"kind": exc.kind, "message": str(exc)}}
        except ValueError as exc:  # llama-cpp-python raises ValueError for a prompt over n_ctx
            kind = "context" if "context" in str(exc).lower() else "bad_request"
            out = {"error": {"kind": kind, "message": str(exc)}}
        except RuntimeError as exc:  # llama_decode returned non-zero (e.g. no KV cache slot)
            out = {"error": {"kind": "runtime", "message": str(exc)}}
        if out is not None:
            self.started.pop(rid, None)
            self.cancelled.discard(rid)
            self.reply({**out, "id": rid})

    def cancel(self, rid: Any) -> None:
        if rid == self.running:
            return  # the fallback in progress sees self.cancelled at its next token
        for i, (msg, _) in enumerate(self.fallback):
            if msg.get("id") == rid:
                del self.fallback[i]
                self.started.pop(rid, None)
                self.reply({"id": rid, "cancelled": True})
                return
        if self.decoder is not None:
            fin = self.decoder.cancel(rid)
            if fin is not None:
                self.finished(fin)

    # -- ops ------------------------------------------------------------------
    def load(self, msg: dict[str, Any]) -> dict[str, Any]:
        import llama_cpp

        from llmap.providers.local.decoder import BatchDecoder
        from llmap.providers.local.drafting import DRAFT_MAX
        from llmap.providers.local.model import GrammarChoice, Grammars, load_model

        llama_cpp.llama_log_set(_quiet_log(), None)  # llama.cpp's C logs stay off the terminal
        self.n_ctx = int(msg["n_ctx"])
        sequences = max(1, int(msg.get("sequences", 1)))
        # one row of n_ctx tokens (and a draft) always fits; each further row gets CELLS_PER_SEQUENCE
        cells = self.n_ctx + DRAFT_MAX + 1 + (sequences - 1) * min(self.n_ctx, CELLS_PER_SEQUENCE)
        outputs = max(OUTPUTS, sequences)
        try:
            self.llm = load_model(msg["model_path"], n_ctx=cells, n_threads=int(msg["n_threads"]),
                                  sequences=sequences, n_batch=BATCH, n_ubatch=BATCH, n_outputs=outputs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise _Fail("load", str(exc) or type(exc).__name__) from None
        self.grammars = Grammars(self.llm)
        self.scratch = GrammarChoice.scratch(self.llm)
        self.decoder = BatchDecoder(self.llm, sequences=sequences, kv_cells=cells, n_batch=BATCH, n_outputs=outputs,
                                    prefix_reuse=bool(msg.get("prefix_reuse", True)))
        return {"ok": True, "pid": os.getpid()}

    def submit_ping(self, msg: dict[str, Any]) -> None:
        from llmap.providers.local.decoder import Job
        from llmap.providers.local.model import GrammarChoice

        tokens = self.llm.tokenize(b"The capital of France is", add_bos=True, special=False)
        self.decoder.submit(Job(msg.get("id"), tokens, GrammarChoice(None, self.scratch), max_tokens=2))

    def prepare(self, msg: dict[str, Any]) -> tuple[Any, int, str | None]:
        """The request's prompt, its ``max_tokens`` within ``n_ctx``, and its grammar (GBNF) or None.

        Raises:
            _Fail: the prompt does not fit ``n_ctx`` (``context``), or the schema has no grammar (``bad_request``).
        """
        from llmap.prompt.grammar import schema_to_gbnf
        from llmap.providers.local.model import chat_prompt

        prompt = chat_prompt(self.llm, msg["messages"])
        n = len(prompt.tokens)
        if n >= self.n_ctx:
            raise _Fail("context", f"Requested tokens ({n}) exceed context window of {self.n_ctx}")
        max_tokens = int(msg.get("max_tokens") or 0)
        max_tokens = self.n_ctx - n if max_tokens <= 0 else min(max_tokens, self.n_ctx - n)
        gbnf = None
        if msg.get("schema") is not None:
            key = json.dumps(msg["schema"], sort_keys=True)
            gbnf = self.gbnf.get(key)
            if gbnf is None:
                try:
                    gbnf = schema_to_gbnf(msg["schema"])
                except (ValueError, TypeError, KeyError):  # as llama-cpp-python does: any JSON, validated after
                    from llama_cpp.llama_grammar import JSON_GBNF

                    gbnf = JSON_GBNF
                self.gbnf[key] = gbnf
        return prompt, max_tokens, gbnf

    def submit(self, msg: dict[str, Any]) -> None:
        from llmap.providers.local.decoder import Job
        from llmap.providers.local.model import GrammarChoice, forced_text_findable

        prompt, max_tokens, gbnf = self.prepare(msg)
        if float(msg.get("temperature", 0.0)) != 0.0:
            self.fallback.append((msg, (prompt, max_tokens, gbnf)))
            return
        smpl = self.grammars.sampler(gbnf) if gbnf is not None else None
        self.decoder.submit(Job(msg.get("id"), prompt.tokens, GrammarChoice(smpl, self.scratch, gbnf), max_tokens,
                                stop=prompt.stop, stopping=prompt.stopping_criteria,
                                logprobs=bool(msg.get("logprobs")), json_end=gbnf is not None,
                                jump=gbnf is not None and forced_text_findable(gbnf)))

    def finished(self, fin: Any) -> None:
        op, t0 = self.started.pop(fin.rid, ("complete", time.monotonic()))
        self.cancelled.discard(fin.rid)
        if fin.finish == "cancelled":
            out: dict[str, Any] = {"cancelled": True}
        elif fin.error is not None:
            out = {"error": {"kind": "runtime", "message": fin.error}}
        elif op == "ping":
            out = {"ok": True, "latency_s": time.monotonic() - t0}
        else:
            out = {"content": fin.text, "prompt_tokens": fin.prompt_tokens,
                   "completion_tokens": fin.completion_tokens, "latency_s": time.monotonic() - t0,
                   "finish_reason": fin.finish}
            if fin.tokens and fin.tokens[0][1] is not None:
                out["logprobs"] = [[text, lp] for text, lp in fin.tokens]
        self.reply({**out, "id": fin.rid})

    def sample(self, msg: dict[str, Any], prepared: Any) -> dict[str, Any]:
        """A request at temperature > 0: llama-cpp-python's own sampling, alone on the model."""
        from llama_cpp import LlamaGrammar, StoppingCriteriaList

        prompt, max_tokens, gbnf = prepared
        rid = msg.get("id")
        t0 = self.started.get(rid, ("complete", time.monotonic()))[1]
        self.decoder.reset()  # llama-cpp-python's loop uses sequence 0 and its own bookkeeping
        self.llm.n_tokens = 0
        criteria = [lambda ids, logits: rid in self.cancelled]
        if prompt.stopping_criteria is not None:
            criteria.append(prompt.stopping_criteria)
        self.running = rid
        try:
            out = self.llm.create_completion(
                prompt=prompt.tokens, temperature=float(msg["temperature"]), max_tokens=max_tokens,
                stop=[s.decode("utf-8") for s in prompt.stop], stopping_criteria=StoppingCriteriaList(criteria),
                grammar=LlamaGrammar.from_string(gbnf, verbose=False) if gbnf is not None else None,
                top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.0,
            )
        finally:
            self.running = None
            self.decoder.reset()
            self.llm.n_tokens = 0
        if rid in self.cancelled:
            return {"cancelled": True}
        usage = out.get("usage") or {}
        return {"content": out["choices"][0]["text"] or "", "prompt_tokens": int(usage.get("prompt_tokens") or 0),
                "completion_tokens": int(usage.get("completion_tokens") or 0),
                "latency_s": time.monotonic() - t0, "finish_reason": out["choices"][0].get("finish_reason")}


def _reader(stream: BinaryIO, worker: _Worker) -> None:
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
        worker.inbox.put(msg)
    worker.inbox.put(None)  # stdin closed: the parent is done with us


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
    threading.Thread(target=_reader, args=(sys.stdin.buffer, worker), daemon=True).start()
    return worker.serve()


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
