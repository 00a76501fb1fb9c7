"""Fixtures of the page's tests: a job with a ``<script>`` row, and a served page."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from ui_support import SCRIPT

from llmap.plan import load_spec
from llmap.ui.server import UiOptions, UiState, UiThread


@pytest.fixture
def serve():
    """Serve a job's page from a thread: ``with serve(job_path, by=...) as (state, url): ...``."""
    threads: list[UiThread] = []

    @contextlib.contextmanager
    def _serve(job: Path, **options) -> Iterator[tuple[UiState, str]]:
        state = UiState(load_spec(job), UiOptions(**options))
        thread = UiThread(state)
        threads.append(thread)
        url = thread.start()
        try:
            yield state, url
        finally:
            thread.stop()

    yield _serve
    for t in threads:
        t.stop()



@pytest.fixture
def people_job(tmp_path, sim):
    """``people_job(n, **job_toml options)``: people.csv (row p0001's name is a ``<script>`` tag) and job.toml."""
    from _support import job_toml, people, write_csv

    def _make(n: int = 20, **kw) -> Path:
        rows = people(n)
        rows[1]["name"] = SCRIPT
        write_csv(tmp_path / "people.csv", rows)
        job = tmp_path / "job.toml"
        job.write_text(job_toml(kw.pop("base_url", sim.base_url), keep='["name", "city"]', **kw), encoding="utf-8")
        return job

    return _make
