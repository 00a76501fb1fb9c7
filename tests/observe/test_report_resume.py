"""After a resume, ``llmap report`` says what the run settled (it said "81 / 0 / 0" for a run that settled 58)."""

from __future__ import annotations

from typer.testing import CliRunner

from llmap import Job
from llmap.cli import app
from llmap.observe.html import render_html
from llmap.observe.report import build_run_summary

runner = CliRunner()


def test_a_resumed_run_reports_the_rows_it_settled(make_job, sim, tmp_path):
    job = make_job(20)
    first = Job.from_toml(job).run(limit=5)
    assert first.counts["done"] == 5
    second = Job.from_toml(job).run()
    assert second.counts["done"] == 20 and second.requests == 15
    ledger = Job.from_toml(job).spec.ledger_path
    s2 = build_run_summary(ledger)
    assert s2.run == 2 and s2.done == 20 and s2.settled == {"done": 15, "failed": 0, "fallback": 0}
    s1 = build_run_summary(ledger, 1)
    assert s1.settled["done"] == 5
    assert s2.rows_per_s is not None and s2.wall_s and abs(s2.rows_per_s - 15 / s2.wall_s) < 1e-9
    res = runner.invoke(app, ["report", str(job)], terminal_width=200)
    assert res.exit_code == 0
    assert "settled in this run: done / failed" in res.stdout and "15 / 0" in res.stdout, res.stdout
    assert "rows of the job: done / failed / skipped" in res.stdout and "20 / 0 / 0" in res.stdout
    page = render_html(s2, title="t")
    assert "Settled in this run" in page and "15 done / 0 failed / 0 fallback" in page


def test_a_rerun_that_sends_nothing_settles_nothing(make_job, sim):
    job = make_job(6)
    Job.from_toml(job).run()
    Job.from_toml(job).run()
    s = build_run_summary(Job.from_toml(job).spec.ledger_path)
    assert s.run == 2 and s.done == 6 and s.settled == {"done": 0, "failed": 0, "fallback": 0}


def test_the_html_group_panel_names_the_by_option(make_job, sim):
    job = make_job(6)
    Job.from_toml(job).run()
    ledger = Job.from_toml(job).spec.ledger_path
    page = render_html(build_run_summary(ledger), title="t")
    assert "pass --by COLUMN" in page
    grouped = render_html(build_run_summary(ledger, group_by="name"), title="t")
    assert "<h2>Rows by group (--by name)</h2>" in grouped
