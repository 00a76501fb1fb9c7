"""`llmap run`'s summary line keeps the format scripts read (issue 17): counts, requests, tokens, seconds, rows/s."""

from __future__ import annotations

import os
import re
import subprocess

from _support import LLMAP, job_toml, people, write_csv

SUMMARY = re.compile(r"llmap: (?P<done>[\d,]+) done, (?P<failed>[\d,]+) failed, (?P<skipped>[\d,]+) skipped, "
                     r"(?P<pending>[\d,]+) pending of (?P<rows>[\d,]+) rows; (?P<requests>[\d,]+) requests "
                     r"\((?P<retries>[\d,]+) retries, (?P<limited>[\d,]+) rate-limited\), (?P<tokens>[\d,]+) tokens, "
                     r"(?P<seconds>[\d.]+) s \((?P<rate>[\d,.]+) rows/s\)")


def test_the_summary_line_keeps_its_format(tmp_path, sim):
    write_csv(tmp_path / "people.csv", people(7))
    job = tmp_path / "job.toml"
    job.write_text(job_toml(sim.base_url), encoding="utf-8")
    env = {**os.environ, "LLMAP_CACHE_DIR": str(tmp_path / "cache")}
    res = subprocess.run([*LLMAP, "run", str(job)], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("llmap: ") and "pending of" in ln]
    assert len(lines) == 1, res.stderr
    m = SUMMARY.fullmatch(lines[0])
    assert m is not None, lines[0]
    counts = (m["done"], m["failed"], m["skipped"], m["pending"], m["rows"], m["requests"])
    assert counts == ("7", "0", "0", "0", "7", "7")
    assert int(m["tokens"].replace(",", "")) > 0 and float(m["rate"].replace(",", "")) > 0
