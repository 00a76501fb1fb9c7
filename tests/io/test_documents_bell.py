"""The bell-schedule test set: one job over the notes as a text column, and over the same notes as PDFs with
a text layer, as scans inside PDFs (OCR) and as HTML pages served from 127.0.0.1.

The simulator's answer is seeded by the row's last user message, so a document whose extracted text is the
note gets the note's answer: equal answers mean llmap extracted exactly the note. Every job runs without the
response cache, so each answer comes from the simulator, and a rerun's zero requests come from the ledger.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

pytest.importorskip("pypdf")
pytest.importorskip("trafilatura")

from _documents import PageServer, bell_rows, html_page, pdf_with_text, scanned_pdf  # noqa: E402
from _support import chat_requests  # noqa: E402
from llmap import Job  # noqa: E402
from llmap.io.extract import missing_libraries  # noqa: E402
from llmap.sim import Simulator  # noqa: E402


def _job(base: Path, sim: Simulator, column: str, *, name: str, documents: str = "", fetch: str = "") -> Path:
    job = base / f"{name}.toml"
    job.write_text(f"""
name = "{name}"
[input]
path = "notes.csv"
key = "id"
{documents}
[prompt]
system = "You read a school's bell schedule notes and report its daily instructional minutes."
user = "Bell schedule notes:\\n{{{{ {column} }}}}"
[output]
path = "out/{name}.jsonl"
[output.fields]
minutes = {{ type = "integer", description = "instructional minutes per day" }}
basis = {{ type = "string" }}
[model]
provider = "openai"
name = "sim"
base_url = "{sim.base_url}"
[cache]
enabled = false
[limits]
concurrency = 8
{fetch}
""", encoding="utf-8")
    return job


def _answers(job: Path) -> dict[str, tuple]:
    import json

    out = {}
    for line in (job.parent / "out" / f"{Path(job).stem}.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        out[str(r["id"])] = (r["_status"], r["minutes"], r["basis"], r["_error"])
    return out


def _write_set(base: Path, rows: list[dict], server: PageServer | None, *, scans: bool = False) -> None:
    """notes.csv (id, note, pdf, scan, url) and the documents it points to."""
    (base / "pdf").mkdir(parents=True, exist_ok=True)
    (base / "scan").mkdir(exist_ok=True)
    table = []
    for i, r in enumerate(rows):
        key = f"{i:03d}"
        (base / "pdf" / f"{key}.pdf").write_bytes(pdf_with_text([[r["notes"]]]))
        if scans:
            (base / "scan" / f"{key}.pdf").write_bytes(scanned_pdf([[r["notes"]]]))
        if server is not None:
            server.pages[f"/schedules/{key}.html"] = _page(r)
        table.append({"id": key, "note": r["notes"], "pdf": f"pdf/{key}.pdf", "scan": f"scan/{key}.pdf",
                      "url": server.url(f"/schedules/{key}.html") if server is not None else ""})
    with open(base / "notes.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)


def _page(r: dict):
    from _documents import Page

    return Page(html_page(r["district_name"], r["notes"]), headers={"Content-Type": "text/html; charset=utf-8"},
                etag=f'"{abs(hash(r["notes"]))}"')


def test_pdfs_and_html_pages_get_the_text_columns_answers_and_a_rerun_costs_nothing(tmp_path: Path) -> None:
    rows = bell_rows()
    with Simulator() as sim, PageServer() as server:
        _write_set(tmp_path, rows, server)
        text = _job(tmp_path, sim, "note", name="text")
        pdf = _job(tmp_path, sim, "pdf", name="pdf", documents='[input.documents]\npdf = { kind = "pdf" }')
        web = _job(tmp_path, sim, "url", name="web", documents='[input.documents]\nurl = { kind = "html" }',
                   fetch="[fetch]\nallow_private = true\nper_host_rpm = 60000  # our own test server")

        unique = len({r["notes"] for r in rows})  # identical notes share one request (in-run dedup)
        assert Job.from_toml(text).run().counts["done"] == len(rows)
        before = chat_requests(sim)
        res = Job.from_toml(pdf).run()
        assert res.counts["done"] == len(rows) and chat_requests(sim) - before == unique
        res = Job.from_toml(web).run()
        assert res.counts["done"] == len(rows), _answers(web)
        assert server.hits.get("/robots.txt") == 1  # read once for the host (404: no rules)
        assert server.total_hits() == len(rows)  # every page once: the preflight's pages were not fetched again

        want = _answers(text)
        for job in (pdf, web):
            got = _answers(job)
            same = sum(got[k] == want[k] for k in want)
            assert same == len(rows), [(k, want[k], got[k]) for k in want if got[k] != want[k]][:3]

        # a rerun: no model request, no fetch
        hits, before = server.total_hits(robots=True), chat_requests(sim)
        for job in (pdf, web):
            res = Job.from_toml(job).run()
            assert res.requests == 0 and res.counts["done"] == len(rows)
        assert chat_requests(sim) == before and server.total_hits(robots=True) == hits

        # touching a file changes nothing; changing one re-asks that row only; a renamed identical file is not asked
        os.utime(tmp_path / "pdf" / "001.pdf", ns=(1, 1))
        (tmp_path / "pdf" / "002.pdf").write_bytes(pdf_with_text([[rows[2]["notes"] + " Updated for spring."]]))
        (tmp_path / "pdf" / "003.pdf").rename(tmp_path / "pdf" / "003-renamed.pdf")
        table = (tmp_path / "notes.csv").read_text(encoding="utf-8").replace("pdf/003.pdf", "pdf/003-renamed.pdf")
        (tmp_path / "notes.csv").write_text(table, encoding="utf-8")
        res = Job.from_toml(pdf).run()
        assert res.requests == 1 and res.counts["done"] == len(rows)
        assert _answers(pdf)["002"] != want["002"] and _answers(pdf)["003"] == want["003"]


@pytest.mark.ocr
@pytest.mark.timeout(1200)
def test_scans_read_by_ocr_get_the_text_columns_answers(tmp_path: Path) -> None:
    if missing_libraries("pdf"):
        pytest.skip(f"needs {missing_libraries('pdf')}")
    import shutil

    if shutil.which("tesseract") is None:
        pytest.skip("needs Tesseract (Debian: apt-get install tesseract-ocr)")
    rows = bell_rows()
    with Simulator() as sim:
        _write_set(tmp_path, rows, None, scans=True)
        text = _job(tmp_path, sim, "note", name="text")
        scan = _job(tmp_path, sim, "scan", name="scan", documents='[input.documents]\nscan = { kind = "pdf" }')
        Job.from_toml(text).run()
        res = Job.from_toml(scan).run()
        assert res.counts["done"] == len(rows)
        want, got = _answers(text), _answers(scan)
        differ = [rows[int(k)]["notes"] for k in want if got[k] != want[k]]
        share = 1 - len(differ) / len(rows)
        print(f"OCR'd scans: {len(rows) - len(differ)}/{len(rows)} rows = {share:.1%} got the text column's answer")
        assert share >= 0.95, differ
