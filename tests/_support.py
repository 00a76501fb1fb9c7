"""Helpers shared by the tests: data files, job files, simulator counts."""

from __future__ import annotations

import asyncio
import csv
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from llmap.providers.base import Completion

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DISTRICTS = SHARED_DATA / "districts_2023_24_nces.csv"

#: The CLI, run with the same interpreter as the tests.
LLMAP = [sys.executable, "-m", "llmap"]
#: ``[limits]`` lines for tests whose rows retry: every backoff at most 10 ms (the policy is tested in tests/control).
FAST_BACKOFF = "backoff_base_s = 0.01\nbackoff_cap_s = 0.01"
#: ``[limits]`` line for tests that retry at once (a Retry-After still applies).
NO_BACKOFF = "backoff_base_s = 0"

def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def people(n: int) -> list[dict]:
    return [{"id": f"p{i:04d}", "name": f"Person {i}", "city": ["Laramie", "Casper", "Cody"][i % 3], "age": 20 + i % 50}
            for i in range(n)]


def job_toml(base_url: str, *, input_path: str = "people.csv", extra_input: str = "", user: str | None = None,
             keep: str = '["name"]', fields: str | None = None, model_extra: str = "", concurrency: int = 4,
             output: str = "out/result.parquet", top: str = "", prompt_extra: str = "", limits_extra: str = "") -> str:
    user = user or "Name: {{ name }}; city: {{ city }}."
    fields = fields or textwrap.dedent('''\
        kind = { type = "string", enum = ["a", "b", "c"] }
        score = { type = "number", description = "0 to 1" }
        ''')
    return (
        f"{top}\n"
        f"[input]\npath = \"{input_path}\"\nkey = \"id\"\n{extra_input}\n"
        f"[prompt]\nsystem = \"You sort people.\"\nuser = \"{user}\"\n{prompt_extra}\n"
        f"[output]\npath = \"{output}\"\nkeep = {keep}\n[output.fields]\n{fields}\n"
        f"[model]\nprovider = \"openai\"\nname = \"sim\"\nbase_url = \"{base_url}\"\n{model_extra}\n"
        f"[limits]\nconcurrency = {concurrency}\n{limits_extra}\n"
    )


def chat_requests(sim) -> int:
    """Chat completion requests the simulator has received."""
    return int(sim.stats()["requests"])


class ScriptedProvider:
    """A provider that answers from a script, for re-ask and failover tests."""

    max_concurrency = 4
    discovering = False
    structured = None

    def __init__(self, label: str, answers) -> None:
        self.label = label
        self.answers = answers
        self.requests: list = []

    async def check(self) -> None:
        return None

    async def complete(self, request):
        self.requests.append(request)
        a = self.answers(len(self.requests), request)
        if isinstance(a, Exception):
            raise a
        return Completion(a, 10, 5, 0.0)

    async def aclose(self) -> None:
        return None


def with_providers(monkeypatch, providers):
    """Make the engine use these providers, in [[model]] order, instead of building real ones."""
    it = iter(providers)
    monkeypatch.setattr("llmap.engine.make_provider", lambda spec, concurrency: next(it))


class FakeTime:
    """A fake monotonic clock and an async sleep that advances it instead of waiting.

    Pass ``clock`` and ``sleep`` where llmap (or the simulator) takes them; ``sleeps`` records every wait asked for.
    """

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # let other tasks run, as a real sleep would


def wait_until(done: Callable[[], object], what: str, timeout: float = 30.0, every: float = 0.02) -> None:
    """Poll ``done()`` every ``every`` seconds until it is truthy; fail naming ``what`` after ``timeout`` seconds.

    What tests use instead of a fixed sleep: they wait for the state they need, and no longer than that.
    """
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting until {what}")
        time.sleep(every)


async def await_until(done: Callable[[], object], what: str, timeout: float = 30.0, every: float = 0.01) -> None:
    """:func:`wait_until` inside an event loop: the loop runs while the test waits."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting until {what}")
        await asyncio.sleep(every)


async def loop_turns(n: int = 50) -> None:
    """Let every ready task of the running event loop run ``n`` steps (no time passes)."""
    for _ in range(n):
        await asyncio.sleep(0)
