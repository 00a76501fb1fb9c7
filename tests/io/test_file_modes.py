"""Output and export files honour the umask (they were 0600 whatever it was, beside a 0644 ledger)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from llmap import Job
from llmap.cli import app


@pytest.fixture
def set_umask() -> Iterator:
    old = os.umask(0o022)
    os.umask(old)

    def _set(mask: int) -> None:
        os.umask(mask)

    yield _set
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
@pytest.mark.parametrize("suffix", ["parquet", "csv", "jsonl"])
def test_output_and_export_files_get_the_mode_the_umask_gives(make_job, sim, tmp_path, set_umask, mask, mode,
                                                            suffix):
    set_umask(mask)
    res = Job.from_toml(make_job(3, output=f"out/r.{suffix}")).run()
    assert _mode(res.output_path) == mode
    again = tmp_path / f"again.{suffix}"
    r = CliRunner().invoke(app, ["export", str(tmp_path / "job.toml"), "--output", str(again)])
    assert r.exit_code == 0 and _mode(again) == mode


def test_umask_reads_without_changing_it(set_umask):
    from llmap.io.sinks import umask

    set_umask(0o027)
    assert umask() == 0o027 and umask() == 0o027


def test_the_html_report_gets_the_mode_the_umask_gives(make_job, sim, tmp_path, set_umask):
    set_umask(0o027)
    job = make_job(3)
    Job.from_toml(job).run()
    r = CliRunner().invoke(app, ["report", str(job), "--html", str(tmp_path / "r.html")])
    assert r.exit_code == 0 and _mode(tmp_path / "r.html") == 0o640
