"""Runs and rollback: every run has an id, the ledger keeps each row's earlier state, ``llmap rollback`` puts
back the state before a run with no request, the cost history unchanged, and the export following."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from _support import chat_requests, job_toml, people, write_csv
from llmap import Job
from llmap.cli import app
from llmap.sim import Simulator
from llmap.store.lock import LedgerLock

runner = CliRunner()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def llmap(*args: str):
    return runner.invoke(app, list(args))


def ledger_db(job: Path) -> sqlite3.Connection:
    return sqlite3.connect(job.parent / ".llmap" / "job.ledger.sqlite")


@pytest.mark.parametrize("ext", ["parquet", "csv"])
def test_rollback_after_a_changed_prompt_gives_the_first_export_byte_for_byte_with_no_request(make_job, sim, ext):
    job = make_job(40, output=f"out/r.{ext}")
    first = Job.from_toml(job).run()
    before = sha(first.output_path)
    job.write_text(job.read_text().replace("Name: {{ name }}", "Person: {{ name }}"))
    second = Job.from_toml(job).run()
    assert second.requests == 40 and sha(second.output_path) != before
    costs = ledger_db(job).execute("SELECT id, requests, cost_usd, prompt_tokens FROM runs ORDER BY id").fetchall()
    sent = chat_requests(sim)
    listed = json.loads(llmap("runs", str(job), "--json").stdout)
    assert [r["run_id"] for r in listed] == [1, 2]  # oldest first
    assert listed[1]["changed"] == 40 and listed[1]["settled"] == 40 and listed[1]["models"] == ["openai:sim"]
    assert listed[0]["prompt_hash"] != listed[1]["prompt_hash"]
    out = llmap("rollback", str(job), "2")  # CliRunner's stdin is no terminal: no question asked
    assert out.exit_code == 0, out.output
    assert "rolled back run 2: 0 requests" in out.stdout
    assert chat_requests(sim) == sent
    assert sha(first.output_path) == before
    # the cost history stays; the run is marked
    db = ledger_db(job)
    assert db.execute("SELECT id, requests, cost_usd, prompt_tokens FROM runs ORDER BY id").fetchall() == costs
    listed = json.loads(llmap("runs", str(job), "--json").stdout)
    assert listed[1]["rolled_back_at"] is not None and listed[0]["rolled_back_at"] is None
    again = llmap("rollback", str(job), "2")
    assert again.exit_code == 2 and "rolled back already" in again.stderr


def test_rollback_undoes_a_fresh_run_new_rows_and_later_runs_too(make_job, sim, tmp_path):
    job = make_job(30, output="out/r.jsonl")
    first = Job.from_toml(job).run()
    before = first.output_path.read_bytes()
    write_csv(tmp_path / "people.csv", people(45))  # 15 new rows
    Job.from_toml(job).run()
    Job.from_toml(job).run(fresh=True)  # forgets every row, then answers all from the cache
    assert len(first.output_path.read_text().splitlines()) == 45
    out = llmap("rollback", str(job), "2", "--yes")
    assert out.exit_code == 0, out.output
    assert "rolled back runs 3, 2" in out.stdout
    assert first.output_path.read_bytes() == before
    rows = ledger_db(job).execute("SELECT count(*), count(DISTINCT plan) FROM rows").fetchone()
    assert rows == (30, 1)
    # the next run with the same input answers the 15 rows again, from the cache
    write_csv(tmp_path / "people.csv", people(30))
    sent = chat_requests(sim)
    assert Job.from_toml(job).run().requests == 0 and chat_requests(sim) == sent


def test_rollback_refuses_while_a_run_holds_the_ledger(make_job):
    job = make_job(5)
    Job.from_toml(job).run()
    lock = LedgerLock(job.parent / ".llmap" / "job.ledger.sqlite", job="job")
    assert lock.try_acquire()
    try:
        out = llmap("rollback", str(job), "1")
        assert out.exit_code == 75 and "holds its ledger" in out.stderr
    finally:
        lock.release()
    assert ledger_db(job).execute("SELECT count(*) FROM rows").fetchone()[0] == 5  # nothing changed


def test_rolling_back_the_first_run_leaves_no_row_and_no_output_write(make_job):
    job = make_job(5)
    Job.from_toml(job).run()
    out = llmap("rollback", str(job), "1")
    assert out.exit_code == 0 and "no row left" in out.stdout
    assert ledger_db(job).execute("SELECT count(*) FROM rows").fetchone()[0] == 0
    missing = llmap("rollback", str(job), "7")
    assert missing.exit_code == 2 and "run 7 not found" in missing.stderr


def test_runs_lists_each_run_with_its_figures(make_job):
    job = make_job(6)
    Job.from_toml(job).run()
    Job.from_toml(job).run()
    table = llmap("runs", str(job))
    assert table.exit_code == 0 and "openai:sim" in table.stdout
    listed = json.loads(llmap("runs", str(job), "--json").stdout)
    assert [(r["run_id"], r["settled"], r["changed"], r["requests"]) for r in listed] == [(1, 6, 0, 6), (2, 0, 0, 0)]
    assert all(len(r["spec_hash"]) == 64 and len(r["prompt_hash"]) == 64 for r in listed)


def test_rollback_waits_for_open_provider_batches(tmp_path):
    with Simulator(batch_time=30) as sim:
        write_csv(tmp_path / "people.csv", people(4))
        job = tmp_path / "job.toml"
        job.write_text(job_toml(sim.base_url, model_extra="batch = true\nprice_in = 1\nprice_out = 1\n")
                       + "[batch]\npoll_s = 0.05\n", encoding="utf-8")
        res = Job.from_toml(job).run(detach=True)
        assert res.detached and res.batches
        out = llmap("rollback", str(job), "1")
    assert out.exit_code == 2 and "may still answer rows" in out.stderr and "llmap batch cancel" in out.stderr
