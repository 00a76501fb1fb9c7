"""Shared fakes for the control tests: a clock that only moves when told to."""

from __future__ import annotations

import asyncio

import pytest


class FakeTime:
    """A fake monotonic clock and an async sleep that advances it instead of waiting."""

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


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()
