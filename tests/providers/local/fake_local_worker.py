"""A stand-in for llmap.providers.local.worker that speaks its protocol without a model.

The last user message decides what a "complete" request does:
``crash`` kills this process with SIGSEGV, ``abort`` with SIGABRT, ``slow`` waits
(up to 10 s) until the request is cancelled, ``hang`` sleeps 30 s whatever happens,
``context`` answers a context error, ``later`` is answered only after the next
request (replies out of order), ``crashlater`` crashes on the next request;
anything else is echoed back as ``{"echo": <text>, "pid": <pid>}``.
Requests with ``logprobs`` get one ``[char, -0.1]`` pair per character of the content.
FAKE_CRASH_AT=ping makes the preflight generation crash. Every request is
appended to $FAKE_LOG (one JSON line each), cancels included.
"""

import json
import os
import signal
import sys
import threading
import time

cancelled: set = set()
inbox: list = []
deferred: list = []
crash_next = False
cond = threading.Condition()
log = os.environ.get("FAKE_LOG")
out = sys.stdout


def record(msg: dict) -> None:
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({**msg, "pid": os.getpid()}) + "\n")


def reader() -> None:
    for line in sys.stdin:
        msg = json.loads(line)
        record(msg)
        with cond:
            if msg.get("op") == "cancel":
                cancelled.add(msg["target"])
            else:
                inbox.append(msg)
            cond.notify_all()
    with cond:
        inbox.append(None)
        cond.notify_all()


def reply(obj: dict) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def handle(msg: dict) -> dict:
    op = msg["op"]
    if op == "load":
        return {"ok": True, "pid": os.getpid(), "n_threads": msg["n_threads"]}
    if op == "ping":
        if os.environ.get("FAKE_CRASH_AT") == "ping":
            os.kill(os.getpid(), signal.SIGSEGV)
        return {"ok": True, "latency_s": 0.0}
    text = msg["messages"][-1]["content"]
    if crash_next or text == "crash":
        sys.stderr.write("ggml.c:1234: GGML_ASSERT(fake) failed\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSEGV)
    if text == "abort":
        os.abort()
    if text == "context":
        return {"error": {"kind": "context", "message": "Requested tokens (9000) exceed context window of 2048"}}
    if text == "hang":
        time.sleep(30)
    if text == "slow":
        deadline = time.monotonic() + 10
        with cond:
            while msg["id"] not in cancelled and time.monotonic() < deadline:
                cond.wait(0.05)
        if msg["id"] in cancelled:
            return {"cancelled": True}
    content = " " + json.dumps({"echo": text, "pid": os.getpid()}) + "\n"
    out = {"content": content, "prompt_tokens": 3, "completion_tokens": 2, "latency_s": 0.0,
           "finish_reason": "length" if text == "long" else "stop"}
    if msg.get("logprobs"):
        out["logprobs"] = [[c, -0.1] for c in content]
    return out


threading.Thread(target=reader, daemon=True).start()
while True:
    with cond:
        while not inbox:
            cond.wait()
        msg = inbox.pop(0)
    if msg is None:
        break
    if msg.get("op") == "complete" and msg["messages"][-1]["content"] in ("later", "crashlater"):
        deferred.append(msg)
        crash_next = crash_next or msg["messages"][-1]["content"] == "crashlater"
        continue
    r = handle(msg)
    r["id"] = msg["id"]
    reply(r)
    for d in deferred:
        r = handle(d)
        r["id"] = d["id"]
        reply(r)
    deferred.clear()
