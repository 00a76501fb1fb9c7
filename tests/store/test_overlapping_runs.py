"""Two runs of one job never pay twice: the second is refused (exit 75) or waits (--wait-lock);
status, export, report and estimate work while a run holds the ledger, and never write it."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from _support import LLMAP, await_until, chat_requests, job_toml
from llmap import Job
from llmap.cli import app
from llmap.errors import LedgerLocked
from llmap.sim import Simulator
from llmap.store.lock import LedgerLock, lock_path

runner = CliRunner()


def _done(ledger: Path) -> int:
    try:
        with sqlite3.connect(f"{ledger.as_uri()}?mode=ro", uri=True) as db:
            return db.execute("SELECT count(*) FROM rows WHERE status = 'done'").fetchone()[0]
    except sqlite3.Error:
        return 0


def _wait_for(cond, proc, timeout=60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _same_ledger_other_server(tmp_path: Path, base_url: str) -> Path:
    """A second job file for the same job (same name, same ledger) that talks to another simulator."""
    other = tmp_path / "other.toml"
    other.write_text(job_toml(base_url, top='name = "job"'), encoding="utf-8")
    return other


def test_second_run_is_refused_while_readers_work_and_sigkill_frees_the_lock(make_job, tmp_path):
    with Simulator(latency_median=0.05) as slow, Simulator() as other:
        job = make_job(300, base_url=slow.base_url, concurrency=1)
        ledger = tmp_path / ".llmap" / "job.ledger.sqlite"
        first = subprocess.Popen([*LLMAP, "run", str(job), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        try:
            _wait_for(lambda: _done(ledger) >= 5, first)

            # a second run (same job and ledger, another server) and every reader, all at once
            cmds = [["run", str(_same_ledger_other_server(tmp_path, other.base_url)), "-q"]]
            cmds += [[c, str(job), *more] for c, *more in (["status"], ["export", "-o", str(tmp_path / "snap.csv")],
                                                            ["report"], ["estimate"])]
            procs = [subprocess.Popen([*LLMAP, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for cmd in cmds]
            results = [(p, *p.communicate(timeout=60)) for p in procs]
            assert first.poll() is None, "the others must have run during the run"

            second, _, err = results[0]
            assert second.returncode == 75, err
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert len(lines) == 1, err
            assert f"pid {first.pid}" in lines[0] and "holds its ledger" in lines[0]
            assert "nothing was sent" in lines[0] and "--wait-lock" in lines[0]
            assert chat_requests(other) == 0
            for cmd, (p, _, err) in zip(cmds[1:], results[1:], strict=True):
                assert p.returncode == 0, (cmd, err)
            assert (tmp_path / "snap.csv").is_file()
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
        # the kernel released the dead run's lock: the next run is not refused
        after = subprocess.run([*LLMAP, "run", str(job), "-q", "--limit", "3"], capture_output=True, text=True,
                               timeout=60)
        assert after.returncode == 0, after.stderr


def test_wait_lock_waits_then_runs_and_no_row_is_paid_twice(make_job, tmp_path):
    n = 150
    with Simulator(latency_median=0.05) as sim:
        job = make_job(n, base_url=sim.base_url, concurrency=2)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        first = subprocess.Popen([*LLMAP, "run", str(job), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env)
        lock = lock_path(tmp_path / ".llmap" / "job.ledger.sqlite")
        _wait_for(lambda: lock.exists() and lock.stat().st_size > 0, first)  # the first run holds the lock
        second = subprocess.Popen([*LLMAP, "run", str(job), "-q", "--wait-lock"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
        _, err1 = first.communicate(timeout=120)
        _, err2 = second.communicate(timeout=120)
        assert first.returncode == 0, err1
        assert second.returncode == 0, err2
        assert f"holds its ledger (pid {first.pid}" in err2 and "waiting for it to finish" in err2
        assert chat_requests(sim) == n  # the second run found every row done


async def test_python_api_takes_the_same_lock(make_job, tmp_path):
    with Simulator(latency_median=0.05) as sim:
        job_file = make_job(40, base_url=sim.base_url, concurrency=2)
        first = asyncio.create_task(Job.from_toml(job_file).arun())
        await await_until((tmp_path / ".llmap" / "job.ledger.sqlite").exists, "the first run has made its ledger")
        with pytest.raises(LedgerLocked, match="holds its ledger"):
            await Job.from_toml(job_file).arun()
        waited = await Job.from_toml(job_file).arun(wait_lock=True)
        assert first.done() and (await first).counts["done"] == 40
        assert waited.requests == 0 and waited.counts["done"] == 40
        assert chat_requests(sim) == 40


def _files(ledger: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in ledger.parent.iterdir() if p.name.startswith(ledger.name)}


def test_readers_never_lock_nor_write_the_ledger(make_job, tmp_path):
    job = make_job(12)
    assert runner.invoke(app, ["run", str(job), "-q"]).exit_code == 0
    ledger = tmp_path / ".llmap" / "job.ledger.sqlite"
    holder = sqlite3.connect(ledger, isolation_level=None)  # a run in the middle of a commit
    holder.execute("PRAGMA busy_timeout = 0")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("UPDATE rows SET attempts = attempts WHERE 0")
    lock = LedgerLock(ledger, job="job")
    assert lock.try_acquire()  # and it holds the job's lock
    before = _files(ledger)
    try:
        for cmd in (["status"], ["status", "--by", "city"], ["export", "-o", str(tmp_path / "again.jsonl")],
                    ["report"], ["estimate"], ["run", "--if-changed"]):
            t0 = time.monotonic()
            res = runner.invoke(app, [cmd[0], str(job), *cmd[1:]])
            assert res.exit_code == 0, (cmd, res.output)
            assert time.monotonic() - t0 < 4, f"{cmd} waited for the writer"
        assert _files(ledger) == before
    finally:
        lock.release()
        holder.execute("ROLLBACK")
        holder.close()
