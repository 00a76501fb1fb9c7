"""kind = "filter": the map path, exporting only the rows whose boolean field is true, with the counts."""

from __future__ import annotations

import subprocess

import pytest

from _support import LLMAP, people, write_csv
from llmap import Job
from llmap.errors import SpecError
from llmap.sim import Simulator
from operators.conftest import op_job, read_table


def test_filter_writes_only_the_kept_rows_and_counts_both(tmp_path):
    write_csv(tmp_path / "people.csv", people(60))
    with Simulator() as sim:
        job = op_job(tmp_path, sim, "filter", data="people.csv", system="Is the person a customer?",
                     user="{{ name }} of {{ city }}", out="out/f.parquet", keep='keep = ["name"]',
                     fields='customer = { type = "boolean" }\nwhy = { type = "string" }\n')
        run = subprocess.run([*LLMAP, "run", str(job), "-q"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        res = Job.from_toml(job).run()
    out = read_table(tmp_path / "out" / "f.parquet")
    s = res.operator
    assert s["kept"] + s["dropped"] == 60 and s["kept"] == len(out) and 0 < len(out) < 60
    assert all(r["customer"] is True for r in out)
    assert f"filter on customer: {s['kept']:,} kept, {s['dropped']:,} dropped" in run.stderr
    (tmp_path / "out" / "f.parquet").unlink()
    exp = subprocess.run([*LLMAP, "export", str(job)], capture_output=True, text=True, timeout=60)
    assert exp.returncode == 0 and read_table(tmp_path / "out" / "f.parquet") == out  # llmap export filters too


def test_filter_needs_one_boolean_field(tmp_path):
    write_csv(tmp_path / "people.csv", people(3))
    with Simulator() as sim:
        job = op_job(tmp_path, sim, "filter", data="people.csv", system="s", user="{{ name }}", out="out/f.csv",
                     fields='why = { type = "string" }\n')
        with pytest.raises(SpecError, match="boolean field is true, and the fields have none"):
            Job.from_toml(job)
        job = op_job(tmp_path, sim, "filter", data="people.csv", system="s", user="{{ name }}", out="out/f.csv",
                     fields='a = { type = "boolean" }\nb = { type = "boolean" }\n')
        with pytest.raises(SpecError, match=r"several \(a, b\): set \[filter\] field"):
            Job.from_toml(job)
        job = op_job(tmp_path, sim, "filter", data="people.csv", system="s", user="{{ name }}", out="out/f.csv",
                     fields='a = { type = "boolean" }\nb = { type = "string" }\n', tables='[filter]\nfield = "b"\n')
        with pytest.raises(SpecError, match="'b' is a string; it must be a boolean"):
            Job.from_toml(job)
