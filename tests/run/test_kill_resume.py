"""SIGKILL a run midway; the rerun requests only rows not yet done and the output has every row once."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import time

import pyarrow.parquet as pq
import pytest

from _support import LLMAP, chat_requests, job_toml, people, write_csv
from llmap.sim import Simulator

N = 200


def _done(ledger) -> int:
    if not ledger.exists():
        return 0
    try:
        with sqlite3.connect(ledger) as db:
            return db.execute("SELECT count(*) FROM rows WHERE status = 'done'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0  # schema not created yet


def test_sigkill_midway_then_rerun_finishes_without_repeats(make_job, tmp_path):
    with Simulator(latency_median=0.03) as sim:
        job = make_job(N, base_url=sim.base_url, concurrency=4)
        ledger = tmp_path / ".llmap" / "job.ledger.sqlite"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([*LLMAP, "run", str(job), "-q"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while _done(ledger) < 40 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        done_before = _done(ledger)
        sent_before = chat_requests(sim)
        assert 40 <= done_before < N, "the kill should land midway"
        assert not (tmp_path / "out" / "result.parquet").exists()  # no half-written output

        rerun = subprocess.run([*LLMAP, "run", str(job), "-q"], capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        assert chat_requests(sim) - sent_before == N - done_before
        rows = pq.read_table(tmp_path / "out" / "result.parquet").to_pylist()
        ids = [r["id"] for r in rows]
        assert len(ids) == N and len(set(ids)) == N
        assert {r["_status"] for r in rows} == {"done"}
        assert "output:" in rerun.stdout


def test_sigterm_and_ctrl_c_keep_progress(make_job, tmp_path):
    with Simulator(latency_median=0.03) as sim:
        job = make_job(N, base_url=sim.base_url, concurrency=4)
        ledger = tmp_path / ".llmap" / "job.ledger.sqlite"
        for sig in (signal.SIGINT, signal.SIGTERM):
            before = _done(ledger)
            proc = subprocess.Popen([*LLMAP, "run", str(job), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            deadline = time.monotonic() + 60
            while _done(ledger) < before + 30 and time.monotonic() < deadline:
                time.sleep(0.02)
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 130, err
            assert "run the same command again to continue" in err
            # what the engine committed equals what was answered, minus the in-flight rows it abandoned
            assert _done(ledger) >= before + 30
        total_sent = chat_requests(sim)
        done = _done(ledger)
        rerun = subprocess.run([*LLMAP, "run", str(job), "-q"], capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0
        assert chat_requests(sim) - total_sent == N - done


@pytest.mark.parametrize("cache", ["true", "false"])
def test_sigkill_at_random_moments_pays_again_only_for_requests_in_flight(tmp_path, cache):
    """An answer received is an answer kept: after a SIGKILL of llmap's own process at a random moment,
    the first run's requests whose answers the ledger lacks are at most those in flight (concurrency)."""
    rng = random.Random(18 if cache == "true" else 81)
    n, concurrency = 500, 16
    with Simulator(latency_median=0.004, latency_sigma=0.5, seed=3) as sim:
        for trial in range(5):
            folder = tmp_path / f"{cache}-{trial}"
            folder.mkdir()
            write_csv(folder / "people.csv", people(n))
            toml = job_toml(sim.base_url, concurrency=concurrency)
            (folder / "job.toml").write_text(toml + f"hedge_tail = false\n[cache]\nenabled = {cache}\n",
                                             encoding="utf-8")
            ledger = folder / ".llmap" / "job.ledger.sqlite"
            env = {**os.environ, "LLMAP_CACHE_DIR": str(folder / "cache")}
            sim.reset_stats()
            proc = subprocess.Popen([*LLMAP, "run", str(folder / "job.toml"), "-q"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            target = rng.randrange(20, n - 150)  # kill once this many rows are done: a random moment of the run
            deadline = time.monotonic() + 60
            while _done(ledger) < target and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.001)
            os.kill(proc.pid, signal.SIGKILL)  # llmap's own process (no shell around it)
            proc.wait(timeout=10)
            assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
            done_before, sent_before = _done(ledger), chat_requests(sim)
            assert done_before < n, "the kill should land before the end"
            rerun = subprocess.run([*LLMAP, "run", str(folder / "job.toml"), "-q"], env=env, capture_output=True,
                                   text=True, timeout=120)
            assert rerun.returncode == 0, rerun.stderr
            sent_again = chat_requests(sim) - sent_before
            assert sent_again <= n - done_before  # one request per row left, at most
            paid_twice = sent_before + sent_again - n
            assert paid_twice <= concurrency, (trial, target, done_before, sent_before, sent_again)
            rows = pq.read_table(folder / "out" / "result.parquet").to_pylist()
            assert len({r["id"] for r in rows}) == n and {r["_status"] for r in rows} == {"done"}
