"""Shared fixtures: a simulator on 127.0.0.1, job files written into tmp_path, a fake clock.

With ``LLMAP_REQUIRE_LOCAL_MODEL=1`` (set by ``.ci/run``), a test marked
``local_model``, ``real_server``, ``ray``, ``ocr`` or ``browser`` that skips (say, because
llama-cpp-python, Ray, Tesseract or Chromium is missing) fails instead: CI must run them for real.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from _support import FakeTime, job_toml, people, write_csv
from llmap.sim import Simulator


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator() as s:
        yield s


@pytest.fixture
def make_job(tmp_path: Path, sim: Simulator):
    """Write people.csv (n rows) and job.toml into tmp_path; return the job path."""

    def _make(n: int = 20, **kw) -> Path:
        write_csv(tmp_path / "people.csv", people(n))
        job = tmp_path / "job.toml"
        job.write_text(job_toml(kw.pop("base_url", sim.base_url), **kw), encoding="utf-8")
        return job

    return _make


@pytest.fixture
def fake_time() -> FakeTime:
    """A clock that only moves when told to, and a sleep that moves it (see :class:`_support.FakeTime`)."""
    return FakeTime()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each test gets its own response cache; never the real user cache.
    monkeypatch.setenv("LLMAP_CACHE_DIR", str(tmp_path / "llmap-cache"))


_MUST_RUN = ("local_model", "real_server", "ray", "ocr", "browser")


def _require() -> bool:
    return os.environ.get("LLMAP_REQUIRE_LOCAL_MODEL", "") not in ("", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _require() and any(item.get_closest_marker(m) for m in _MUST_RUN):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, but LLMAP_REQUIRE_LOCAL_MODEL=1 requires it to run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # A module-level skip (pytest.importorskip) skips a whole file before its tests exist.
    outcome = yield
    report = outcome.get_result()
    path = getattr(collector, "path", None)
    if not (report.skipped and _require() and path is not None and path.suffix == ".py"):
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    if any(f"mark.{m}" in text for m in _MUST_RUN):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"{path.name} skipped, but LLMAP_REQUIRE_LOCAL_MODEL=1 requires it to run: {reason}"
