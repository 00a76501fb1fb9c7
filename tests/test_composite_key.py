"""Composite keys: ``key = ["district_id", "grade_level"]`` identifies a row by several columns."""

from __future__ import annotations

import csv

import pyarrow.parquet as pq
from typer.testing import CliRunner

from _support import chat_requests, job_toml
from llmap import Job
from llmap.cli import app

runner = CliRunner()


def _bells(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["district_id", "grade_level", "notes"])
        w.writeheader()
        w.writerows(rows)


ROWS = [{"district_id": d, "grade_level": g, "notes": f"{d} {g} bell at 8:{i:02d}"}
        for i, (d, g) in enumerate([(634920, "elementary"), (634920, "middle"), (634920, "high"),
                                    (1201590, "elementary"), (1201590, "high")])]


def _job(tmp_path, sim, key='["district_id", "grade_level"]'):
    _bells(tmp_path / "bells.csv", ROWS)
    text = job_toml(sim.base_url, input_path="bells.csv", user="{{ notes }}", keep='["notes"]')
    job = tmp_path / "job.toml"
    job.write_text(text.replace('key = "id"', f"key = {key}"))
    return job


def test_a_composite_key_identifies_rows_by_several_columns(tmp_path, sim):
    job = _job(tmp_path, sim)
    res = Job.from_toml(job).run()
    assert res.exit_code == 0 and res.counts["done"] == 5 and chat_requests(sim) == 5
    out = pq.read_table(res.output_path).to_pylist()
    assert [(r["district_id"], r["grade_level"]) for r in out] == [(r["district_id"], r["grade_level"]) for r in ROWS]
    # resume by identity: a changed note re-asks that row only, wherever it moved
    rows = list(reversed(ROWS))
    rows[0] = {**rows[0], "notes": "changed"}
    _bells(tmp_path / "bells.csv", rows)
    res = Job.from_toml(job).run()
    assert res.exit_code == 0 and chat_requests(sim) == 6


def test_a_key_that_is_not_unique_names_the_repeated_pair(tmp_path, sim):
    job = _job(tmp_path, sim, key='"district_id"')
    res = runner.invoke(app, ["run", str(job)])
    assert res.exit_code == 2 and "'634920' appears 3 times" in res.stderr and "key = [...]" in res.stderr
    job = _job(tmp_path, sim)
    _bells(tmp_path / "bells.csv", ROWS + [ROWS[1]])
    res = runner.invoke(app, ["run", str(job)])
    assert res.exit_code == 2 and "'(634920, middle)' appears 2 times" in res.stderr, res.stderr
    assert chat_requests(sim) == 0


def test_an_empty_part_of_a_composite_key_is_an_error(tmp_path, sim):
    job = _job(tmp_path, sim)
    _bells(tmp_path / "bells.csv", [*ROWS, {"district_id": 5, "grade_level": "", "notes": "x"}])
    res = runner.invoke(app, ["run", str(job)])
    assert res.exit_code == 2 and "a column of key ['district_id', 'grade_level'] is empty in 1 row" in res.stderr


def test_status_by_a_column_of_the_input_works_with_a_composite_key(tmp_path, sim):
    job = _job(tmp_path, sim)
    Job.from_toml(job).run()
    res = runner.invoke(app, ["status", str(job), "--by", "district_id", "--json"])
    assert res.exit_code == 0, res.output
    import json

    groups = {g["group"]: g["done"] for g in json.loads(res.stdout)["groups"]}
    assert groups == {634920: 3, 1201590: 2}
