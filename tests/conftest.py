"""Shared fixtures: a simulator on 127.0.0.1, job files written into tmp_path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from _support import job_toml, people, write_csv
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


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each test gets its own response cache; never the real user cache.
    monkeypatch.setenv("LLMAP_CACHE_DIR", str(tmp_path / "llmap-cache"))
