"""``llmap status --failed``, the run's failure hint, and report/export details a new user met."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from _support import people, write_csv
from llmap.cli import app

runner = CliRunner()


def _failing_job(make_job, tmp_path):
    job = make_job(6, user="Name: {{ name.upper() }}; city: {{ city }}.")
    rows = people(6)
    rows[2]["name"] = rows[4]["name"] = ""  # NULL: the template fails on these rows alone
    write_csv(tmp_path / "people.csv", rows)
    return job


def test_the_failure_hint_points_at_a_command_that_lists_failed_rows(make_job, sim, tmp_path):
    job = _failing_job(make_job, tmp_path)
    res = runner.invoke(app, ["run", str(job)])
    assert res.exit_code == 1
    assert f"llmap status {job} --failed" in res.stderr, res.stderr
    listed = runner.invoke(app, ["status", str(job), "--failed"])
    assert listed.exit_code == 0, listed.output
    assert "2 failed rows" in listed.stdout and "p0002" in listed.stdout and "p0004" in listed.stdout
    assert "p0001" not in listed.stdout and "NULL in this" in listed.stdout
    data = json.loads(runner.invoke(app, ["status", str(job), "--failed", "--json"]).stdout)
    assert data["failed"] == 2 and [r["key"] for r in data["rows"]] == ["p0002", "p0004"]
    assert all("template failed" in r["error"] for r in data["rows"])
    counts = runner.invoke(app, ["status", str(job)])
    assert f"llmap status {job} --failed" in counts.stdout


def test_status_failed_with_no_failures_says_so(make_job, sim):
    job = make_job(3)
    assert runner.invoke(app, ["run", str(job)]).exit_code == 0
    res = runner.invoke(app, ["status", str(job), "--failed"])
    assert res.exit_code == 0 and "no failed rows" in res.stdout


def test_output_paths_print_normalised(make_job, sim, tmp_path):
    # "output: .../mist/../out/anth.csv" was printed as written
    (tmp_path / "mist").mkdir()
    job = make_job(3, output="../out/anth.csv")
    moved = tmp_path / "mist" / "job.toml"
    text = job.read_text().replace('path = "people.csv"', 'path = "../people.csv"')
    moved.write_text(text)
    res = runner.invoke(app, ["run", str(moved)])
    assert res.exit_code == 0, res.output
    assert f"output: {tmp_path / 'out' / 'anth.csv'}" in res.stdout, res.stdout
    assert ".." not in res.stdout
    exp = runner.invoke(app, ["export", str(moved), "--output", str(tmp_path / "mist" / ".." / "again.csv")])
    assert f"output: {tmp_path / 'again.csv'} (3 rows)" in exp.stdout


def test_report_does_not_cut_model_names():
    # "openai:gpt-4…" beside "openai:gpt-4o" on an 80-column terminal
    import io

    from rich.console import Console

    from llmap.cli.inspect import model_table
    from llmap.observe.report import ModelLine

    lines = [ModelLine("openai:gpt-4o-mini", settled=17_000, from_cache=1_200, escalated=3_000,
                       prompt_tokens=12_345_678, completion_tokens=2_345_678, cost_usd=12.3456),
             ModelLine("openai:gpt-4o", settled=3_000, prompt_tokens=2_345_678, completion_tokens=345_678,
                       cost_usd=45.678)]
    for width in (80, 120):
        buf = io.StringIO()
        Console(file=buf, width=width).print(model_table(lines, title="t", width=width))
        text = buf.getvalue()
        assert "openai:gpt-4o-mini" in text and "openai:gpt-4o " in text and "…" not in text, text
        assert "12,345,678" in text and "45.6780" in text and max(len(ln) for ln in text.splitlines()) <= width
