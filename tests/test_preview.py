"""``llmap run JOB --preview N``: N sampled rows, a readable table, and not one byte changed in the job's folder."""

from __future__ import annotations

import os
from pathlib import Path

from typer.testing import CliRunner

from _support import chat_requests, people, write_csv
from llmap import Job
from llmap.cli import app
from llmap.preview import preview

runner = CliRunner()


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under ``folder`` but the response cache: its bytes, mtime and mode."""
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "llmap-cache"]
        for f in files:
            p = Path(root) / f
            st = p.stat()
            out[str(p.relative_to(folder))] = (p.read_bytes(), st.st_mtime_ns, st.st_mode)
    return out


def test_preview_shows_sampled_rows_and_leaves_the_job_folder_as_it_was(make_job, sim, tmp_path):
    job = make_job(30)
    assert runner.invoke(app, ["run", str(job), "--limit", "10"]).exit_code == 0
    sent = chat_requests(sim)
    before = _snapshot(tmp_path)
    assert any(k.endswith(".ledger.sqlite") for k in before)
    res = runner.invoke(app, ["run", str(job), "--preview", "5"], terminal_width=160)
    assert res.exit_code == 0, res.output
    assert _snapshot(tmp_path) == before  # the ledger, its lock, the output: not one byte, not one mtime
    table = res.stdout
    header = next(ln for ln in table.splitlines() if "inputs" in ln)
    assert all(col in header for col in ("key", "inputs", "answer"))
    assert table.count("name: Person") == 5 and table.count("city: ") == 5
    assert table.count("kind: ") == 5 and table.count("score: ") == 5
    keys = [k for k in (f"p{i:04d}" for i in range(30)) if k in table]
    assert len(keys) == 5 and keys != [f"p{i:04d}" for i in range(5)]  # sampled, not the first five
    assert "preview of 5 sampled rows (seed 0)" in res.stderr and "nothing written" in res.stderr
    assert chat_requests(sim) - sent <= 5
    again = runner.invoke(app, ["run", str(job), "--preview", "5"], terminal_width=160)
    assert again.exit_code == 0 and [k for k in keys if k in again.stdout] == keys  # the same seed, the same rows
    assert chat_requests(sim) - sent <= 5 and "5 from the response cache" in again.stderr
    other = runner.invoke(app, ["run", str(job), "--preview", "5", "--seed", "7"], terminal_width=160)
    assert [k for k in (f"p{i:04d}" for i in range(30)) if k in other.stdout] != keys
    assert _snapshot(tmp_path) == before


def test_preview_of_a_job_never_run_creates_nothing(make_job, sim, tmp_path):
    job = make_job(12)
    before = _snapshot(tmp_path)
    res = runner.invoke(app, ["run", str(job), "--preview", "3"])
    assert res.exit_code == 0, res.output
    assert _snapshot(tmp_path) == before and not (tmp_path / ".llmap").exists() and not (tmp_path / "out").exists()


def test_preview_samples_after_where_and_shows_failures(make_job, sim, tmp_path):
    job = make_job(20, extra_input="where = \"city = 'Cody'\"", user="Name: {{ name.upper() }}; city: {{ city }}.")
    rows = people(20)
    rows[2]["name"] = ""  # p0002 is in Cody: its template fails
    write_csv(tmp_path / "people.csv", rows)
    spec = Job.from_toml(job).spec
    p = preview(spec, 50, seed=1)
    assert len(p.rows) == 6 and all(r.inputs["city"] == "Cody" for r in p.rows)  # every Cody row, in input order
    assert [r.seq for r in p.rows] == sorted(r.seq for r in p.rows)
    bad = [r for r in p.rows if r.status == "failed"]
    assert [r.key for r in bad] == ["p0002"] and "NULL in this row" in bad[0].error
    res = runner.invoke(app, ["run", str(job), "--preview", "50"], terminal_width=200)
    assert res.exit_code == 1 and "failed: [prompt] user template failed" in res.stdout


def test_a_one_line_preview_keeps_no_ledger(tmp_path, sim, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "people.csv", people(9))
    res = runner.invoke(app, ["run", "people.csv", "--prompt", "{{ name }}", "--field", "kind=enum:a,b",
                              "--model", "sim", "--base-url", sim.base_url, "--preview", "4"])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / ".llmap").exists() and not (tmp_path / "out").exists()
    assert "preview of 4 sampled rows" in res.stderr


def test_preview_refuses_options_that_need_a_ledger(make_job, sim):
    job = make_job(3)
    for extra in (["--fresh"], ["--detach"], ["--executor", "ray"]):
        res = runner.invoke(app, ["run", str(job), "--preview", "2", *extra])
        assert res.exit_code == 2 and "--preview" in res.stderr


def test_a_batch_job_previews_in_real_time(make_job, sim):
    job = make_job(6, model_extra="batch = true", top="")
    job.write_text(job.read_text() + "\n[batch]\npoll_s = 1\n")
    res = runner.invoke(app, ["run", str(job), "--preview", "3"])
    assert res.exit_code == 0, res.output
    assert "asked in real time" in res.stderr and chat_requests(sim) == 3
