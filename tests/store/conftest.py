"""Shared helpers for the store tests: a clock that moves only when told to."""

from __future__ import annotations

import pytest


class FakeClock:
    """Clock seconds that advance only through :meth:`advance` (no sleeping in tests)."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
