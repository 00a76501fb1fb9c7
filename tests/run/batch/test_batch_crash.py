"""Batches outlive the process: SIGKILL, a crash while creating, Ctrl-C, --detach, llmap batch cancel."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from _support import LLMAP, job_toml, people, write_csv
from llmap import errors as E
from llmap.engine import Job
from llmap.observe.progress import CountingProgress
from llmap.sim import Simulator
from llmap.store.batches import BatchBook


def make(tmp: Path, base_url: str, n: int, *, batch: str = "", model: str = "") -> Path:
    write_csv(tmp / "people.csv", people(n))
    job = tmp / "job.toml"
    job.write_text(job_toml(base_url, model_extra="batch = true\n" + model) + "[batch]\npoll_s = 0.05\n" + batch)
    return job


def batches(tmp: Path) -> list[tuple]:
    path = tmp / ".llmap" / "job.ledger.sqlite"
    if not path.exists():
        return []
    try:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT id, state, provider_id, cancel FROM batches ORDER BY id").fetchall()
    except sqlite3.OperationalError:
        return []  # not migrated yet


def wait_open(tmp: Path, n: int, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and (proc is None or proc.poll() is None):
        if sum(1 for _, state, pid, _ in batches(tmp) if state == "open" and pid) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} open batches: {batches(tmp)}")


def test_sigkill_after_submission_then_the_rerun_submits_nothing_again(tmp_path):
    with Simulator(batch_time=5.0) as sim:
        job = make(tmp_path, sim.base_url, 40, batch="max_requests = 20\n")
        proc = subprocess.Popen([*LLMAP, "run", str(job), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_open(tmp_path, 2, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        before = sim.stats()["batches"]
        assert before["created"] == 2 and before["expired"] == 0
        assert not (tmp_path / "out" / "result.parquet").exists()

        rerun = subprocess.run([*LLMAP, "run", str(job), "-q"], capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        st = sim.stats()["batches"]
        assert st["created"] == 2  # no new batch
        assert st["lines"] == 40 and st["custom_ids"] == 40  # every custom id submitted exactly once
        assert st["custom_ids_repeated"] == 0 and st["bodies_repeated"] == 0
        assert sim.stats()["requests"] == 0
        with sqlite3.connect(tmp_path / ".llmap" / "job.ledger.sqlite") as db:
            assert db.execute("SELECT count(*) FROM requests WHERE path = 'batch'").fetchone()[0] == 40  # once each
            assert {s for (s,) in db.execute("SELECT state FROM batches")} == {"collected"}
        rows = pq.read_table(tmp_path / "out" / "result.parquet").to_pylist()
        assert len({r["id"] for r in rows}) == 40 and {r["_status"] for r in rows} == {"done"}


class Crash(BaseException):
    """The process dying between the create request's answer and the commit of the provider's id."""


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_batch_created_just_before_a_crash_is_found_and_never_submitted_again(tmp_path, monkeypatch, provider):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    with Simulator(batch_time=1.0) as sim:
        if provider == "openai":
            job = make(tmp_path, sim.base_url, 12)
        else:
            job = make(tmp_path, sim.url, 12)
            job.write_text(job.read_text().replace('provider = "openai"', 'provider = "anthropic"')
                           .replace('name = "sim"', 'name = "claude-sim"'))
        real = BatchBook.opened

        def crash(self, *a, **kw):
            raise Crash

        monkeypatch.setattr(BatchBook, "opened", crash)
        with pytest.raises(Crash):
            Job.from_toml(job).run()
        assert [(state, pid) for _, state, pid, _ in batches(tmp_path)] == [("intent", None)]
        assert sim.stats()["batches"]["created"] == 1  # the provider made it; the ledger never heard its id

        monkeypatch.setattr(BatchBook, "opened", real)
        progress = CountingProgress()
        res = Job.from_toml(job).run(progress=progress)
        assert res.exit_code == 0 and res.counts["done"] == 12
        st = sim.stats()["batches"]
        assert st["created"] == 1 and st["lines"] == 12 and st["custom_ids_repeated"] == 0
        assert any("was created before the last run stopped: found it" in m for m in progress.messages)


def test_an_intent_never_created_is_dropped_and_its_rows_go_in_a_new_batch(tmp_path, monkeypatch):
    from llmap.providers.batch.openai import OpenAIBatches

    monkeypatch.setattr("llmap.run.batch.runner.RECONCILE_GRACE_S", 0.0)
    real = OpenAIBatches.create
    calls = []

    async def refused_once(self, tag, lines, *, job):
        calls.append(tag)
        if len(calls) == 1:  # no answer: whether it was created is unknown until llmap looks
            raise E.ConnectionFailed("connection reset", model=self.label)
        return await real(self, tag, lines, job=job)

    monkeypatch.setattr(OpenAIBatches, "create", refused_once)
    with Simulator(batch_time=0.2) as sim:
        progress = CountingProgress()
        res = Job.from_toml(make(tmp_path, sim.base_url, 8)).run(progress=progress)
        assert res.exit_code == 0 and res.counts["done"] == 8
        assert sim.stats()["batches"]["created"] == 1 and len(calls) == 2
        assert [state for _, state, _, _ in batches(tmp_path)] == ["dropped", "collected"]
        assert any("never created at the provider" in m for m in progress.messages)


def test_detach_status_cancel_and_the_next_run_collects(tmp_path):
    with Simulator(batch_time=30.0, batch_cancel_time=0.1) as sim:
        job = make(tmp_path, sim.base_url, 10)
        r = subprocess.run([*LLMAP, "run", str(job), "--detach", "-q"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "batch: batch_sim" in r.stdout and "running at the provider" in r.stderr
        s = subprocess.run([*LLMAP, "status", str(job), "--json"], capture_output=True, text=True, timeout=60)
        doc = json.loads(s.stdout)
        assert doc["batches"][0]["rows"] == 10 and doc["batches"][0]["state"] == "open"
        table = subprocess.run([*LLMAP, "status", str(job)], capture_output=True, text=True, timeout=60).stdout
        assert "batches (newest first" in table and "batch_sim" in table
        c = subprocess.run([*LLMAP, "batch", "cancel", str(job)], capture_output=True, text=True, timeout=60)
        assert c.returncode == 0, c.stderr
        assert "cancelling" in c.stdout
        assert batches(tmp_path)[0][3] == "user"
        sim.reconfigure(batch_time=0.2)
        rerun = subprocess.run([*LLMAP, "run", str(job), "-q"], capture_output=True, text=True, timeout=60)
        assert rerun.returncode == 0, rerun.stderr
        st = sim.stats()["batches"]
        assert st["cancelled"] == 1 and st["created"] == 2 and st["custom_ids_repeated"] == 0


def test_a_cancel_during_a_run_stops_it_and_ctrl_c_says_the_batches_keep_running(tmp_path):
    with Simulator(batch_time=30.0, batch_cancel_time=0.1) as sim:
        job = make(tmp_path, sim.base_url, 6)
        out: dict = {}
        t = threading.Thread(target=lambda: out.setdefault("res", Job.from_toml(job).run()))
        t.start()
        wait_open(tmp_path, 1)
        c = subprocess.run([*LLMAP, "batch", "cancel", str(job)], capture_output=True, text=True, timeout=60)
        assert c.returncode == 0, c.stderr
        t.join(timeout=60)
        res = out["res"]
        assert res.exit_code == 1 and "llmap batch cancel" in res.stop_reason and res.counts["pending"] == 6

        sim.reconfigure(batch_time=30.0)
        proc = subprocess.Popen([*LLMAP, "run", str(job), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        wait_open(tmp_path, 1, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130
        assert "1 batch keep running at the provider" in err and "llmap batch cancel" in err
