"""The HTML run report: figures read from a real ledger, and a page that opens offline."""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from _support import FAST_BACKOFF
from llmap import Job
from llmap.errors import SpecError
from llmap.observe.html import render_html, write_html_report
from llmap.observe.report import build_run_summary
from llmap.sim import Simulator
from llmap.store.ledger import Ledger, PlannedRow, RowResult

PLOTS = ("throughput", "latency", "errors", "models", "groups")
N = 40


@pytest.fixture
def ledger(make_job) -> Iterator[Path]:
    """A ledger of one real run over N rows against a simulator that answers 500/503 a fifth of the time.

    The simulator stays up for the test, so the job can run again.
    """
    with Simulator(fail_rate=0.2, seed=1) as sim:
        job = make_job(N, base_url=sim.base_url, keep='["name", "city"]', limits_extra=FAST_BACKOFF,
                       model_extra="price_in = 1.0\nprice_out = 2.0")
        res = Job.from_toml(job).run()
        assert res.counts["done"] == N
        yield job.parent / ".llmap" / "job.ledger.sqlite"


def _q(path: Path, sql: str, *args):
    db = sqlite3.connect(path)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def _svgs(page: str) -> dict[str, str]:
    """data-plot -> the whole ``<svg>`` element."""
    return {m.group(1): m.group(0) for m in re.finditer(r'<svg class="plot" data-plot="(\w+)".*?</svg>', page, re.S)}


def _marks(svg: str) -> int:
    return len(re.findall(r'<(?:rect|path|polyline)\b[^>]*class="mark[ "]', svg))


def test_summary_figures_match_the_ledger(ledger):
    s = build_run_summary(ledger)
    (run,) = _q(ledger, "SELECT id, done, requests, ended_at - started_at, prompt_tokens, cost_usd, retries FROM runs")
    assert s.run == run[0] == 1 and s.run_ids == [1] and s.exit_reason == "complete"
    assert s.done == run[1] == N == _q(ledger, "SELECT count(*) FROM rows WHERE status = 'done'")[0][0]
    assert s.requests == run[2] and s.logged_requests == _q(ledger, "SELECT count(*) FROM requests")[0][0]
    # requests sent but never answered (a hedged copy cancelled when the other won) are not in the log
    assert s.logged_requests <= s.requests and s.logged_requests > N
    assert s.retries == run[6] > 0 and s.prompt_tokens == run[4] > 0
    assert run[5] > 0 and s.cost_usd == pytest.approx(run[5])
    assert s.wall_s == pytest.approx(run[3]) and s.rows_per_s == pytest.approx(N / run[3])
    errors = dict(_q(ledger, "SELECT outcome, count(*) FROM requests WHERE outcome != '200' GROUP BY outcome"))
    assert {k: sum(v) for k, v in s.errors.items()} == errors and s.errors_total == sum(errors.values()) > 0
    assert s.error_rate == pytest.approx(s.errors_total / s.logged_requests)
    # a short run: throughput per second; rate x time covered gives back every answered row
    assert s.throughput_bucket_s == 1 and len(s.throughput) == max(1, math.ceil(s.span_s))
    covered = [min(s.throughput_bucket_s, s.span_s - i) for i in range(len(s.throughput))]
    answered = _q(ledger, "SELECT sum(pack_size) FROM requests WHERE outcome = '200'")[0][0]
    assert sum(r * c for r, c in zip(s.throughput, covered, strict=True)) == pytest.approx(answered)
    assert answered >= N  # a hedged copy may be answered too
    assert sum(c for _, _, c in s.latency_bins) == answered and 15 <= len(s.latency_bins) <= 25
    assert all(lo < hi for lo, hi, _ in s.latency_bins)
    assert s.latency_quantiles["p50"] <= s.latency_quantiles["p99"] <= s.latency_quantiles["max"]
    (m,) = s.models
    assert m.model == "openai:sim" and m.requests == s.logged_requests
    assert m.prompt_tokens == _q(ledger, "SELECT sum(prompt_tokens) FROM requests")[0][0]
    assert m.cost_usd == pytest.approx((m.prompt_tokens * 1.0 + m.completion_tokens * 2.0) / 1e6)


def test_every_plot_is_drawn_with_marks_and_the_summary_table(ledger):
    page = render_html(build_run_summary(ledger, group_by="city"), title="People run")
    svgs = _svgs(page)
    assert sorted(svgs) == sorted(PLOTS)
    for kind, svg in svgs.items():
        assert _marks(svg) >= 1, kind
        assert "no data" not in svg, kind
        assert "<title>" in svg and '<line class="axis"' in svg, kind  # a title and an axis each
    assert page.index('<table class="summary">') < page.index("<svg")
    for label in ("Done", "Failed", "Skipped", "Cached", "Requests", "429s", "Retries", "Prompt tokens",
                  "Cost", "Wall time", "Rows / s", "Exit reason"):
        assert f"<th>{label}</th>" in page, label
    assert f'<th>Done</th><td class="n">{N}</td>' in page


def test_page_is_self_contained_and_escaped(ledger):
    page = render_html(build_run_summary(ledger), title='<script>alert("x")</script> & co')
    assert "<script" not in page and "&lt;script&gt;" in page and "&amp; co" in page
    assert "http://" not in page and "https://" not in page
    assert not re.search(r'\s(?:src|href|xlink:href)\s*=', page)
    assert not re.search(r'=\s*"[^"]*(?:http|//)', page)  # no attribute points anywhere
    assert "@import" not in page and "url(" not in page and "@font-face" not in page
    assert page.startswith("<!DOCTYPE html>") and page.count("<style>") == 1


def test_errors_plot_has_a_series_per_5xx_class(ledger):
    s = build_run_summary(ledger)
    assert {"500", "503"} <= set(s.errors)
    assert len({len(v) for v in s.errors.values()}) == 1  # one time axis for every series
    svg = _svgs(render_html(s, title="t"))["errors"]
    for outcome in ("500", "503"):
        assert f">{outcome} ({sum(s.errors[outcome])})</text>" in svg  # legend entry
        assert svg.count(f"<title>{outcome}: ") >= 1  # bars of that class


def test_group_plot_counts_match_the_ledger(ledger):
    s = build_run_summary(ledger, group_by="city")
    want = {}
    for city, status, n in _q(ledger, "SELECT json_extract(data, '$.city'), status, count(*) FROM rows "
                                      "GROUP BY 1, 2"):
        want.setdefault(city, {})[status] = n
    got = {g: {k: v for k, v in c.items() if v} for g, c in s.groups}
    assert got == want and sum(want["Laramie"].values()) == 14
    svg = _svgs(render_html(s, title="t"))["groups"]
    for city, counts in want.items():
        assert f">{city}</text>" in svg and f"<title>{city}: {counts['done']} done</title>" in svg


def test_group_by_a_column_the_ledger_does_not_store_gives_no_groups_and_a_note(ledger):
    s = build_run_summary(ledger, group_by="age")
    assert s.groups == [] and any("'age' is not stored" in n and "city" in n for n in s.notes)
    svg = _svgs(render_html(s, title="t"))["groups"]
    assert "no data" in svg and _marks(svg) == 0


def test_missing_run_or_ledger_is_a_spec_error(ledger, tmp_path):
    with pytest.raises(SpecError, match=r"run 7 not found in .*; runs are 1\.\.1"):
        build_run_summary(ledger, run=7)
    with pytest.raises(SpecError, match="no ledger at"):
        build_run_summary(tmp_path / "nope.ledger.sqlite")
    junk = tmp_path / "junk.sqlite"
    sqlite3.connect(junk).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(SpecError, match="not an llmap ledger"):
        build_run_summary(junk)


def test_a_run_without_requests_shows_no_data_and_reading_never_writes(ledger):
    job = ledger.parent.parent / "job.toml"
    assert Job.from_toml(job).run().requests == 0  # every row already done: nothing sent
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ledger.parent.iterdir()}
    s = build_run_summary(ledger)
    assert s.run == 2 and s.run_ids == [1, 2] and s.requests == 0 and s.done == N
    assert s.throughput == [0.0] and s.latency_bins == [] and s.errors == {}
    svgs = _svgs(render_html(s, title="t"))
    for kind in ("throughput", "latency", "errors", "models"):
        assert "no data" in svgs[kind] and _marks(svgs[kind]) == 0, kind
    assert build_run_summary(ledger, run=1).requests > 0
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ledger.parent.iterdir()}
    # the database is untouched; a read-only WAL reader may leave SQLite's empty -wal and its -shm behind
    assert {k: v for k, v in after.items() if k in before} == before
    assert set(after) - set(before) <= {"job.ledger.sqlite-wal", "job.ledger.sqlite-shm"}
    wal = ledger.parent / "job.ledger.sqlite-wal"
    assert "job.ledger.sqlite-wal" in before or not wal.exists() or wal.stat().st_size == 0


def test_long_run_buckets_adapt_and_groups_are_capped(tmp_path):
    path = tmp_path / "big.ledger.sqlite"
    rng = random.Random(5)
    with Ledger(path) as led:
        run = led.start_run("spec")
        start = led.connection.execute("SELECT started_at FROM runs").fetchone()[0]
        led.plan(run, [PlannedRow(f"k{i}", i, "h", json.dumps({"g": f"group {i % 45}"})) for i in range(900)])
        reqs = [(start + rng.uniform(0, 3000), "openai:m", rng.choice(["200", "200", "429", "RequestTimeout"]),
                 rng.uniform(0.01, 5), 10, 5, 1) for _ in range(2000)]
        led.record([RowResult(f"k{i}", "done", {}) for i in range(800)], run_id=run, requests=reqs)
        led.end_run(run, exit_reason="complete", requests=2000, prompt_tokens=20000, completion_tokens=10000)
        led.connection.execute("UPDATE runs SET ended_at = started_at + 3000")
    s = build_run_summary(path, group_by="g")
    assert len(s.throughput) <= 600 and s.throughput_bucket_s >= 5
    assert all(len(v) <= 120 for v in s.errors.values()) and s.error_bucket_s >= 25
    assert set(s.errors) == {"429", "RequestTimeout"}
    assert sum(map(sum, s.errors.values())) == sum(1 for r in reqs if r[2] != "200")
    assert len(s.groups) == 45
    assert s.models[0].cost_usd is None and any("request log" in n for n in s.notes)  # no by_model recorded
    out = write_html_report(path, tmp_path / "out" / "report.html", group_by="g")
    page = out.read_text(encoding="utf-8")
    svg = _svgs(page)["groups"]
    assert "top 30 of 45 groups" in svg and len(re.findall(r">group \d+</text>", svg)) == 30
    assert "minutes since the run started" in _svgs(page)["throughput"]
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temp file left


def test_write_html_report_replaces_the_file(ledger, tmp_path):
    out = tmp_path / "r.html"
    out.write_text("old", encoding="utf-8")
    assert write_html_report(ledger, out, run=1, title="My run") == out
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<title>My run</title>" in page
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    with pytest.raises(SpecError):
        write_html_report(ledger, tmp_path / "r2.html", run=3)
    assert not (tmp_path / "r2.html").exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium on PATH")
def test_report_renders_in_headless_chromium(ledger, tmp_path):
    out = write_html_report(ledger, tmp_path / "report.html", group_by="city")
    png = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1200,2400",
         out.resolve().as_uri()],
        check=True, capture_output=True, timeout=90,
    )
    assert png.is_file() and png.stat().st_size > 10_000
