"""A full disk ends a run with one line (which file, how much is free), exit 1, and progress kept:
the rerun finishes every row and pays for none twice."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from _support import LLMAP, chat_requests, job_toml, people, write_csv
from llmap.cli import app
from llmap.errors import DiskFull
from llmap.sim import Simulator

runner = CliRunner()
FULL = "database or disk is full"
N = 60


def _run(*args):
    res = runner.invoke(app, [*map(str, args)])
    return res.exit_code, (res.stderr or "") + (res.stdout or "")


def _one_error_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmap: error: disk full: cannot write the "), text
    assert "Traceback" not in text and " free there)" in lines[0]
    return lines[0]


class _Failing:
    """A SQLite connection that fails, as on a full disk, the writes ``when(sql, n)`` picks (n: the nth such write)."""

    def __init__(self, db: sqlite3.Connection, when) -> None:
        self._db, self._when, self._seen = db, when, {}

    def __getattr__(self, name):
        return getattr(self._db, name)

    def _check(self, sql: str) -> None:
        head = " ".join(sql.split())[:40]
        self._seen[head] = self._seen.get(head, 0) + 1
        if self._when(head, self._seen[head]):
            raise sqlite3.OperationalError(FULL)

    def execute(self, sql, *args):
        self._check(sql)
        return self._db.execute(sql, *args)

    def executemany(self, sql, *args):
        self._check(sql)
        return self._db.executemany(sql, *args)

    def __enter__(self):
        return self._db.__enter__()

    def __exit__(self, *exc):
        return self._db.__exit__(*exc)


class _Disk:
    """Arm: connections to one SQLite file fail the writes ``when(sql, n)`` picks. Free: writes work again."""

    def __init__(self, monkeypatch) -> None:
        self._mp, self._real = monkeypatch, sqlite3.connect

    def fill(self, name: str, when) -> None:
        real = self._real

        def connect(database, *args, **kwargs):
            db = real(database, *args, **kwargs)
            return _Failing(db, when) if str(database).endswith(name) else db

        self._mp.setattr(sqlite3, "connect", connect)

    def free(self) -> None:
        self._mp.setattr(sqlite3, "connect", self._real)


@pytest.fixture
def disk(monkeypatch) -> _Disk:
    return _Disk(monkeypatch)


@pytest.mark.parametrize("where, when, file", [
    ("planning", lambda sql, n: sql.startswith("INSERT INTO rows"), "ledger"),
    ("a commit", lambda sql, n: sql.startswith("UPDATE rows SET status") and n >= 2, "ledger"),
    ("the end of the run", lambda sql, n: sql.startswith("UPDATE runs SET ended_at"), "ledger"),
    ("the response cache", lambda sql, n: sql.startswith("INSERT INTO responses") and n >= 2, "response cache"),
])
def test_full_disk_at_each_write_says_one_line_and_the_rerun_pays_nothing_twice(where, when, file, make_job,
                                                                                 tmp_path, disk, monkeypatch):
    monkeypatch.setattr("llmap.run.pool.COMMIT_ROWS", 8)  # several commits in a small run
    # rows commit as they settle, the response cache every 0.25 s: the run lasts about 1 s, several cache writes
    with Simulator(latency_median=0.03) as sim:
        job = make_job(N, base_url=sim.base_url, concurrency=2)
        disk.fill("job.ledger.sqlite" if file == "ledger" else "responses.sqlite", when)
        code, text = _run("run", job, "-q")
        assert code == 1, text
        assert f"cannot write the {file} " in _one_error_line(text)
        assert not (tmp_path / "out" / "result.parquet").exists()  # no output from a run that could not finish
        assert not [p for p in (tmp_path / "out").glob("*") if p.name.endswith(".tmp")]
        first = chat_requests(sim)
        assert (first == 0) == (where == "planning")
        assert first < N or where == "the end of the run"

        disk.free()
        code, text = _run("run", job, "-q")
        assert code == 0, text
        assert chat_requests(sim) == N  # answered rows came from the ledger or the cache, none paid twice
        rows = pq.read_table(tmp_path / "out" / "result.parquet").to_pylist()
        assert len(rows) == N and {r["_status"] for r in rows} == {"done"}


def test_full_disk_while_exporting_leaves_no_half_written_output(make_job, tmp_path, monkeypatch, sim):
    job = make_job(5)
    assert _run("run", job, "-q")[0] == 0
    out = tmp_path / "out" / "result.parquet"
    before = out.read_bytes()

    class FullWriter(pq.ParquetWriter):
        def write_batch(self, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("llmap.io.sinks.pq.ParquetWriter", FullWriter)
    for cmd in (["export", job], ["run", job, "-q", "--fresh"]):
        code, text = _run(*cmd)
        assert code == 1, text
        assert "cannot write the output " in _one_error_line(text) and "llmap export" in text
        assert out.read_bytes() == before  # the old output is untouched
        assert sorted(p.name for p in out.parent.iterdir()) == ["result.parquet"]  # the temp file is gone


def test_a_full_disk_on_a_rows_path_stops_the_run_instead_of_failing_rows(make_job, monkeypatch, sim, tmp_path):
    job = make_job(20)

    async def solve(self, *args, **kwargs):  # e.g. a cache write while settling a row
        raise DiskFull("disk full: cannot write the response cache 'x' (0 bytes free there); free some space",
                       path=Path("x"), free_bytes=0)

    monkeypatch.setattr("llmap.run.dispatch.Dispatcher.solve_messages", solve)
    code, text = _run("run", job, "-q")
    assert code == 1 and "cannot write the response cache" in _one_error_line(text)
    assert chat_requests(sim) == 0


# -- the real thing: a small file system -----------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path):
    """A 4 MB tmpfs, when this process may mount one (root, a permissive container); else skip."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_real_full_disk(tiny_fs, tmp_path):
    n = 2000
    with Simulator() as sim:
        write_csv(tiny_fs / "people.csv", people(n))
        job = tiny_fs / "job.toml"
        job.write_text(job_toml(sim.base_url, concurrency=16), encoding="utf-8")
        ballast = tiny_fs / "ballast"
        ballast.write_bytes(b"x" * (shutil.disk_usage(tiny_fs).free - 1000 * 1024))  # leave about 1 MB
        env = {**os.environ, "LLMAP_CACHE_DIR": str(tmp_path / "cache")}  # the cache lives on another disk

        first = subprocess.run([*LLMAP, "run", str(job), "-q"], capture_output=True, text=True, env=env, timeout=120)
        assert first.returncode == 1, first.stderr
        line = _one_error_line(first.stderr)
        assert str(tiny_fs) in line
        assert not (tiny_fs / "out" / "result.parquet").exists()

        exported = subprocess.run([*LLMAP, "export", str(job)], capture_output=True, text=True, env=env, timeout=60)
        if exported.returncode != 0:  # the ledger may hold no plan yet, or the output does not fit
            assert "Traceback" not in exported.stderr and len(exported.stderr.strip().splitlines()) == 1

        ballast.unlink()  # free the space
        rerun = subprocess.run([*LLMAP, "run", str(job), "-q"], capture_output=True, text=True, env=env, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        assert chat_requests(sim) == n  # no row paid twice
        rows = pq.read_table(tiny_fs / "out" / "result.parquet").to_pylist()
        assert len({r["id"] for r in rows}) == n and {r["_status"] for r in rows} == {"done"}
