"""SIGKILL of llmap's own process in the middle of each operator, then a rerun: no call whose answer was committed
is sent again, and the output is the output of an uninterrupted run."""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import time

import pytest

from _support import LLMAP, people, write_csv
from llmap.sim import Simulator
from llmap.sim.datasets import entities, titles, write
from operators.conftest import group_stats, op_job, read_table

CONCURRENCY = 2


def _count(ledger, sql: str) -> int:
    if not ledger.exists():
        return 0
    try:
        with sqlite3.connect(ledger) as db:
            return db.execute(sql).fetchone()[0]
    except sqlite3.OperationalError:
        return 0  # the schema is not there yet


def _setup(kind: str, folder, sim):
    """The data (in ``folder``) and the job of ``kind``; returns (job, progress SQL, output, extra outputs)."""
    if kind == "cluster":
        write(titles(300, 15, seed=8), folder / "data.csv")
        job = op_job(folder, sim, kind, data="data.csv", system="Titles about one event.", out="out/o.parquet",
                     tables="[cluster]\ncontext_tokens = 2000\npack = 5\n", concurrency=CONCURRENCY)
        return job, "SELECT count(*) FROM op_steps", ["o.parquet", "o.families.parquet"]
    if kind == "resolve":
        write(entities(250, seed=8), folder / "data.csv")
        job = op_job(folder, sim, kind, data="data.csv", system="Company names.", out="out/o.parquet",
                     tables="[resolve]\npack = 4\nsample = 80\n", concurrency=CONCURRENCY)
        return job, "SELECT count(*) FROM op_steps", ["o.parquet"]
    if kind == "reduce":
        with open(folder / "data.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "region", "note"])
            for i in range(500):
                w.writerow([i, ["north", "south"][i % 2], f"Order {i}: {i % 9 + 1} widgets, paid on delivery"])
        job = op_job(folder, sim, kind, data="data.csv", system="Summarize the orders.", user="{{ note }}",
                     out="out/o.parquet", fields='summary = { type = "string" }\n', concurrency=CONCURRENCY,
                     tables='[reduce]\nby = ["region"]\ncontext_tokens = 300\n')
        return job, "SELECT count(*) FROM op_steps", ["o.parquet"]
    write_csv(folder / "data.csv", people(200))
    job = op_job(folder, sim, "filter", data="data.csv", system="Customers?", user="{{ name }} of {{ city }}",
                 out="out/o.parquet", fields='customer = { type = "boolean" }\n', concurrency=CONCURRENCY,
                 keep='keep = ["name"]')
    return job, "SELECT count(*) FROM rows WHERE status = 'done'", ["o.parquet"]


@pytest.mark.parametrize("kind", ["cluster", "resolve", "reduce", "filter"])
def test_sigkill_mid_operator_then_rerun_repeats_no_call_and_writes_the_same_output(tmp_path, kind):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir()
    broken.mkdir()
    ledger = broken / ".llmap" / "job.ledger.sqlite"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # an uninterrupted run, on a simulator of its own
    groups = kind in ("cluster", "resolve")  # the hidden truth the simulator answers from
    with Simulator(groups=str(whole / "data.csv") if groups else None, latency_median=0.02) as sim:
        job, progress_sql, outputs = _setup(kind, whole, sim)
        run = subprocess.run([*LLMAP, "run", str(job), "-q"], capture_output=True, text=True, timeout=300,
                             env={**env, "LLMAP_CACHE_DIR": str(whole / "cache")})
        assert run.returncode == 0, run.stderr
        sent_whole = sim.stats()["requests"]
        emb_whole = group_stats(sim).get("embedding_requests", 0)
        steps_whole = _count(whole / ".llmap" / "job.ledger.sqlite", progress_sql)
    # the same job killed midway, then run again
    with Simulator(groups=str(broken / "data.csv") if groups else None, latency_median=0.02) as sim:
        job, _, _ = _setup(kind, broken, sim)
        benv = {**env, "LLMAP_CACHE_DIR": str(broken / "cache")}
        proc = subprocess.Popen([*LLMAP, "run", str(job), "-q"], env=benv, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while _count(ledger, progress_sql) < 0.4 * steps_whole and time.monotonic() < deadline \
                and proc.poll() is None:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # llmap's own process, not a shell
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
        sent_before = sim.stats()["requests"]
        committed = _count(ledger, "SELECT count(*) FROM requests WHERE outcome = '200' AND path IS NULL")
        assert 0 < committed < sent_whole, "the kill should land in the middle of the operator"
        assert sent_before - committed <= CONCURRENCY  # only the requests in flight were lost
        rerun = subprocess.run([*LLMAP, "run", str(job), "-q"], capture_output=True, text=True, timeout=300,
                               env=benv)
        assert rerun.returncode == 0, rerun.stderr
        sent_again = sim.stats()["requests"] - sent_before
        assert sent_again == sent_whole - committed  # nothing answered and committed is asked again
        stats = group_stats(sim)
        assert stats["bodies_repeated"] <= sent_before - committed
        assert stats.get("embedding_requests", 0) <= emb_whole + 4  # at most the embedding requests in flight
    for name in outputs:
        assert read_table(broken / "out" / name) == read_table(whole / "out" / name), name
