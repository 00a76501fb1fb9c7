"""The local provider's process boundary, against a fake worker (no model, no llama.cpp needed)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from _support import await_until
from llmap import errors as E
from llmap.providers.base import Request
from llmap.providers.local.provider import LocalProvider, crash_message, reinstall_command
from llmap.spec import ModelSpec

FAKE = [sys.executable, str(Path(__file__).with_name("fake_local_worker.py"))]


@pytest.fixture
def provider_factory(tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    log = tmp_path / "worker.log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    made: list[LocalProvider] = []

    def make(processes: int = 1) -> LocalProvider:
        spec = ModelSpec(provider="local", name="fake", model_path=str(tmp_path / "m.gguf"))
        p = LocalProvider(spec, processes=processes, command=FAKE)
        made.append(p)
        return p

    make.log = log  # type: ignore[attr-defined]
    return make


def _req(text: str, key: str = "r1") -> Request:
    return Request([{"role": "user", "content": text}], {"type": "object"}, 0.0, 16, row_key=key)


def _received(log: Path, text: str) -> bool:
    """The fake worker has read a request whose last message is ``text`` (it logs each one as it arrives)."""
    return log.exists() and any(m["op"] == "complete" and m["messages"][-1]["content"] == text
                                for m in map(json.loads, log.read_text().splitlines()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_answers_come_from_a_child_process(provider_factory):
    p = provider_factory()
    await p.check()
    try:
        comp = await p.complete(_req("hello"))
        assert json.loads(comp.content)["echo"] == "hello"
        assert json.loads(comp.content)["pid"] != os.getpid()
        assert (comp.prompt_tokens, comp.completion_tokens) == (3, 2)
    finally:
        await p.aclose()


async def test_a_native_crash_is_one_fatal_line_naming_the_fix(provider_factory):
    p = provider_factory()
    await p.check()
    try:
        with pytest.raises(E.LocalModelCrashed) as info:
            await p.complete(_req("crash", key="row-7"))
    finally:
        await p.aclose()
    exc = info.value
    assert isinstance(exc, E.FatalProviderError)  # stops the run; the row stays pending
    assert exc.signal == signal.SIGSEGV and exc.row_key == "row-7"
    msg = str(exc)
    assert "\n" not in msg
    assert "crashed with SIGSEGV" in msg and "GGML_ASSERT(fake) failed" in msg
    assert reinstall_command() in msg and "--no-cache-dir" in msg and "-DGGML_NATIVE=OFF" in msg


async def test_abort_is_reported_by_its_signal(provider_factory):
    p = provider_factory()
    await p.check()
    try:
        with pytest.raises(E.LocalModelCrashed, match="crashed with SIGABRT"):
            await p.complete(_req("abort"))
    finally:
        await p.aclose()


async def test_a_crash_in_preflight_is_a_spec_error_before_any_row(provider_factory, monkeypatch):
    monkeypatch.setenv("FAKE_CRASH_AT", "ping")
    p = provider_factory(processes=2)
    with pytest.raises(E.SpecError, match="crashed with SIGSEGV.*no row was sent") as info:
        await p.check()
    assert "\n" not in str(info.value)
    assert p.pids == []  # nothing left running
    ops = [json.loads(x)["op"] for x in provider_factory.log.read_text().splitlines()]
    assert "complete" not in ops


async def test_a_cancelled_request_never_answers_the_next_one(provider_factory):
    p = provider_factory()
    await p.check()
    try:
        slow = asyncio.create_task(p.complete(_req("slow", key="a")))
        await await_until(lambda: _received(provider_factory.log, "slow"), "the worker has the request", 10)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        comp = await asyncio.wait_for(p.complete(_req("next", key="b")), 5)
        assert json.loads(comp.content)["echo"] == "next"
    finally:
        await p.aclose()
    msgs = [json.loads(x) for x in provider_factory.log.read_text().splitlines()]
    slow_id = next(m["id"] for m in msgs if m["op"] == "complete" and m["messages"][-1]["content"] == "slow")
    assert {"op": "cancel", "target": slow_id} in [{k: m[k] for k in ("op", "target")} for m in msgs
                                                   if m["op"] == "cancel"]


async def test_concurrency_runs_that_many_processes_and_splits_the_cores(provider_factory, monkeypatch):
    monkeypatch.setattr("llmap.providers.local.provider.cores", lambda: 4)
    p = provider_factory(processes=2)
    assert (p.processes, p.n_threads, p.max_concurrency) == (2, 2, 2 * p.sequences)
    await p.check()
    try:
        pids = set(p.pids)
        assert len(pids) == 2
        answers = await asyncio.gather(*(p.complete(_req(f"q{i}")) for i in range(6)))
        assert {json.loads(a.content)["pid"] for a in answers} <= pids
    finally:
        await p.aclose()
    loads = [json.loads(x) for x in provider_factory.log.read_text().splitlines()]
    assert [m["n_threads"] for m in loads if m["op"] == "load"] == [2, 2]
    assert not any(_alive(pid) for pid in pids)  # closing leaves no child running


def test_concurrency_is_capped_at_one_process_per_core(provider_factory, monkeypatch):
    monkeypatch.setattr("llmap.providers.local.provider.cores", lambda: 2)
    p = provider_factory(processes=16)
    assert (p.processes, p.n_threads) == (2, 1)


async def test_worker_errors_map_to_llmap_errors(provider_factory):
    p = provider_factory()
    await p.check()
    try:
        with pytest.raises(E.ContextTooLong, match="exceed context window"):
            await p.complete(_req("context"))
        comp = await p.complete(_req("still alive"))
        assert json.loads(comp.content)["echo"] == "still alive"
    finally:
        await p.aclose()


def test_crash_messages_by_signal():
    assert "SIGILL" in crash_message(-signal.SIGILL) and "instruction this CPU does not have" in crash_message(-4)
    assert "out-of-memory" in crash_message(-signal.SIGKILL)
    assert "exited with code 1" in crash_message(1, "Traceback ...")


async def test_a_process_that_dies_while_idle_fails_the_next_request(provider_factory):
    p = provider_factory()
    await p.check()
    try:
        (pid,) = p.pids
        os.kill(pid, signal.SIGSEGV)
        await await_until(lambda: not p.pids, "the provider has seen its process die", 10)
        with pytest.raises(E.LocalModelCrashed, match="crashed with SIGSEGV"):
            await p.complete(_req("hello"))
    finally:
        await p.aclose()


async def test_a_cancelled_request_that_never_answers_is_killed_and_the_process_replaced(provider_factory,
                                                                                        monkeypatch):
    monkeypatch.setattr("llmap.providers.local.provider.CANCEL_GRACE_S", 0.3)
    p = provider_factory()
    await p.check()
    try:
        (first,) = p.pids
        hung = asyncio.create_task(p.complete(_req("hang")))
        await await_until(lambda: _received(provider_factory.log, "hang"), "the worker has the request", 10)
        hung.cancel()
        with pytest.raises(asyncio.CancelledError):
            await hung
        comp = await asyncio.wait_for(p.complete(_req("after")), 10)
        answer = json.loads(comp.content)
        assert answer["echo"] == "after" and answer["pid"] != first
        assert not _alive(first)
    finally:
        await p.aclose()


async def test_several_requests_in_flight_on_one_process_each_get_their_own_reply(provider_factory):
    p = provider_factory(processes=1)
    await p.check()
    try:
        # the fake answers "later" only after the request behind it: both must be in flight at once
        later = asyncio.create_task(p.complete(_req("later", key="a")))
        await asyncio.sleep(0.2)
        assert not later.done()
        now = await asyncio.wait_for(p.complete(_req("now", key="b")), 5)
        assert json.loads(now.content)["echo"] == "now"
        assert json.loads((await asyncio.wait_for(later, 5)).content)["echo"] == "later"
    finally:
        await p.aclose()


async def test_a_crash_fails_every_request_in_flight_with_its_own_row(provider_factory):
    p = provider_factory(processes=1)
    await p.check()
    try:
        first = asyncio.create_task(p.complete(_req("crashlater", key="a")))
        await asyncio.sleep(0.2)
        second = asyncio.create_task(p.complete(_req("x", key="b")))
        errors = await asyncio.gather(first, second, return_exceptions=True)
    finally:
        await p.aclose()
    assert all(isinstance(e, E.LocalModelCrashed) and "crashed with SIGSEGV" in str(e) for e in errors), errors
    assert [e.row_key for e in errors] == ["a", "b"]


async def test_logprobs_and_stop_reason_come_through_trimmed_like_the_content(provider_factory):
    p = provider_factory()
    await p.check()
    try:
        asked = await p.complete(Request([{"role": "user", "content": "hi"}], None, 0.0, 16, logprobs=True))
        plain = await p.complete(_req("hi"))
        cut = await p.complete(_req("long"))
    finally:
        await p.aclose()
    assert asked.content == plain.content and asked.content.startswith("{") and asked.content.endswith("}")
    assert "".join(t for t, _ in asked.logprobs) == asked.content  # the reply's leading space and newline are cut
    assert all(lp == -0.1 for _, lp in asked.logprobs)
    assert plain.logprobs is None
    assert (plain.stop_reason, cut.stop_reason) == (None, "max_tokens")


def test_trim_logprobs_cuts_whitespace_across_tokens():
    from llmap.providers.local.provider import trim_logprobs

    toks = [(" ", -1.0), (" {", -0.5), ("a", -0.2), ("} ", -0.3), ("\n", -0.4)]
    assert trim_logprobs(toks, " " + " {a} \n") == (("{", -0.5), ("a", -0.2), ("}", -0.3))
    assert trim_logprobs([("x", -0.1)], "x") == (("x", -0.1),)
