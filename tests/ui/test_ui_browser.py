"""The live page in a real headless Chromium (Debian's package, driven over the DevTools protocol).

It follows a running job on the simulator, filters the table, shows a row's attempts, writes labels from the
review view with the keyboard (eval counts them), stops a run, keeps a ``<script>`` row inert, and answers 403
without its token. Screenshots of the live page during the Wyoming job and of the review view are saved into the
folder the test prints (``LLMAP_UI_SCREENSHOTS`` chooses it).
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from ui_browser import Chromium, chromium_path
from ui_support import SCRIPT, add_labels_table

from _support import DISTRICTS, LLMAP, wait_until
from llmap.engine import Job
from llmap.sim import Simulator

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(chromium_path() is None, reason="needs Debian's chromium (apt-get install chromium)")]

KINDS = '["city", "county", "charter", "regional", "technical", "other"]'


@pytest.fixture
async def browser(tmp_path):
    b = await Chromium(tmp_path / "chromium-profile").start()
    yield b
    await b.close()


@pytest.fixture(scope="session")
def shots(tmp_path_factory) -> Path:
    where = Path(os.environ.get("LLMAP_UI_SCREENSHOTS") or tmp_path_factory.mktemp("ui-screenshots"))
    where.mkdir(parents=True, exist_ok=True)
    return where


def wyoming_job(tmp_path: Path, base_url: str, *, concurrency: int = 2) -> Path:
    """The Wyoming job (examples/districts.toml) on the simulator: the 61 WY districts of ../shared/data, or 61
    districts like them where that folder is absent."""
    if DISTRICTS.exists():
        source = f'path = "{DISTRICTS}"\nwhere = "state = \'WY\'"'
    else:
        with open(tmp_path / "wy.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["district_id", "district_name", "state", "enrollment"])
            for i in range(61):
                w.writerow([5600000 + i, f"{['Albany', 'Big Horn', 'Campbell', 'Carbon'][i % 4]} County SD #{i}",
                            "WY", 100 + 37 * i])
        source = 'path = "wy.csv"'
    job = tmp_path / "districts.toml"
    job.write_text(f"""name = "district-type"
[input]
{source}
key = "district_id"
[prompt]
system = "You classify US public school districts. Answer with JSON only."
user = "District: {{{{ district_name }}}} ({{{{ state }}}}), {{{{ enrollment | int }}}} students."
[output]
path = "out/district_type.parquet"
keep = ["district_name", "state"]
[output.fields]
kind = {{ type = "string", enum = {KINDS} }}
confidence = {{ type = "number", description = "0 to 1" }}
[model]
provider = "openai"
name = "sim"
base_url = "{base_url}"
[limits]
concurrency = {concurrency}
""", encoding="utf-8")
    return job


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "LLMAP_CACHE_DIR": str(tmp_path / "cache")}


def _ledger(job: Path) -> Path:
    """The Wyoming job's ledger (its name is ``district-type``)."""
    return job.parent / ".llmap" / "district-type.ledger.sqlite"


def _planned(ledger: Path) -> bool:
    if not ledger.exists():
        return False
    try:
        db = sqlite3.connect(f"{ledger.resolve().as_uri()}?mode=ro", uri=True)
        try:
            return db.execute("SELECT count(*) FROM rows").fetchone()[0] > 0
        finally:
            db.close()
    except sqlite3.Error:
        return False


async def count(b: Chromium, status: str) -> int:
    return int((await b.text(f"#count-{status}")).replace(",", ""))


async def test_the_live_counts_follow_a_job_running_in_another_process(tmp_path, serve, browser, shots):
    with Simulator(latency_median=0.3) as sim:
        job = wyoming_job(tmp_path, sim.base_url)
        ledger = _ledger(job)
        run = subprocess.Popen([*LLMAP, "run", str(job), "-q"], env=_env(tmp_path), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: _planned(ledger), "the run has planned its rows")
            with serve(job) as (_state, url):
                await browser.goto(url)
                await browser.js("window.notReloaded = true")
                assert await count(browser, "total") == 61
                seen = set()
                deadline = time.monotonic() + 90
                shot = None
                while True:
                    done = await count(browser, "done")
                    seen.add(done)
                    if shot is None and 15 <= done <= 45:
                        await browser.wait("document.querySelectorAll('#timeline rect').length > 0", "the timeline")
                        shot = await browser.screenshot(shots / "live-wyoming.png")
                    if done == 61:
                        break
                    assert time.monotonic() < deadline, f"the page's done count stayed at {done}"
                    await browser.js("new Promise(r => setTimeout(r, 100))")
                assert await browser.js("window.notReloaded === true")  # updated in place, never reloaded
                assert len([n for n in seen if 0 < n < 61]) >= 3, f"too few live steps seen: {sorted(seen)}"
                assert shot is not None
                pill = await browser.text("#run-state")
                assert run.wait(timeout=60) == 0
                await browser.wait("!document.getElementById('run-state').textContent.startsWith('running')",
                                   "the page sees the run end")
                assert "running" in pill or "complete" in pill
                await browser.screenshot(shots / "live-wyoming-done.png")
                assert browser.errors == [] and browser.dialogs == []
        finally:
            if run.poll() is None:
                run.kill()
    print(f"\nscreenshots of the live page: {shots}")


async def test_a_filter_narrows_the_table_and_a_row_shows_its_attempts(tmp_path, people_job, serve, browser):
    job = people_job(30)
    await Job.from_toml(job).arun()
    db = sqlite3.connect(job.parent / ".llmap" / "job.ledger.sqlite")
    db.execute("UPDATE rows SET status = 'failed', output = NULL, error = 'Overloaded: 503 from openai:sim', "
               "updated_at = updated_at + 1 WHERE key IN ('p0004', 'p0009', 'p0017')")
    db.commit()
    with serve(job) as (_state, url):
        await browser.goto(url)
        rows = "[...document.querySelectorAll('#rows-table tbody tr')]"
        assert await browser.js(f"{rows}.length") == 30
        await browser.wait("document.getElementById('f-error').options.length > 1", "the error classes arrive")
        await browser.js("const s = document.getElementById('f-status'); s.value = 'failed';"
                         "s.dispatchEvent(new Event('change'))")
        await browser.wait(f"{rows}.length === 3", "the table shows the failed rows only")
        assert await browser.js(f"{rows}.map(r => r.dataset.key)") == ["p0004", "p0009", "p0017"]
        assert await browser.text("#pg-info") == "rows 1–3 of 3"
        await browser.click("#f-clear")
        await browser.wait(f"{rows}.length === 30", "the filter cleared")
        await browser.type("#f-q", "Casper")
        await browser.click("#f-apply")
        await browser.wait(f"{rows}.length === 10", "the search narrows to Casper's rows")
        assert set(await browser.js(f"{rows}.map(r => r.cells[3].textContent)")) == {"Casper"}
        await browser.click("#rows-table tbody tr[data-key='p0001']")
        await browser.wait("!document.getElementById('detail').hidden", "the row's detail opens")
        answers = await browser.js("[...document.querySelectorAll('#detail-answers tbody tr')]"
                                   ".map(r => [...r.cells].map(c => c.textContent))")
        assert len(answers) == 1 and answers[0][1] == "openai:sim" and answers[0][2] == "done"
        prompt = await browser.js("[...document.querySelectorAll('#detail-body .msg pre')].map(p => p.textContent)")
        assert prompt == ["You sort people.", f"Name: {SCRIPT}; city: Casper."]
        assert browser.errors == []


async def test_a_script_in_a_row_is_shown_as_text_and_runs_nothing(people_job, serve, browser):
    job = people_job(5)
    await Job.from_toml(job).arun()
    with serve(job) as (_state, url):
        await browser.goto(url)
        await browser.wait("document.getElementById('requests').rows.length > 0", "the live figures")
        cell = "document.querySelector(\"#rows-table tr[data-key='p0001']\").cells[2]"
        assert await browser.js(f"{cell}.textContent") == SCRIPT
        assert await browser.js(f"{cell}.children.length") == 0
        await browser.click("#rows-table tbody tr[data-key='p0001']")
        await browser.wait("!document.getElementById('detail').hidden", "the row's detail opens")
        await browser.type("#f-q", "script")
        await browser.click("#f-apply")
        await browser.wait("document.querySelectorAll('#rows-table tbody tr').length === 1", "the search finds it")
        assert await browser.js("document.scripts.length") == 2  # app.js and the boot data, nothing else
        assert await browser.js("typeof window.alert === 'function' && document.title.startsWith('llmap')")
        assert browser.dialogs == [] and browser.errors == []


async def test_without_its_token_every_request_is_refused(people_job, serve, browser):
    job = people_job(2)
    await Job.from_toml(job).arun()
    with serve(job) as (state, url):
        root = url.rsplit("/", 2)[0]
        await browser.goto(root + "/")
        assert "403" in await browser.js("document.body.textContent")
        await browser.goto(url)
        got = await browser.js(f"""Promise.all(["/", "/api/summary", "/static/app.js", "/{state.token}/api/summary"]
            .map(p => fetch(p).then(r => r.status)))""")
        assert got == [403, 403, 403, 200]
        posted = await browser.js("fetch('api/stop', {method: 'POST', body: '{}'}).then(r => r.status)")
        assert posted == 403  # no anti-CSRF token


async def test_review_with_the_keyboard_writes_labels_that_eval_counts(tmp_path, serve, browser, shots, sim):
    job = wyoming_job(tmp_path, sim.base_url, concurrency=4)
    await Job.from_toml(job).arun()
    ledger = _ledger(job)
    add_labels_table(ledger)
    with serve(job) as (_state, url):
        await browser.goto(url + "#review")
        await browser.wait("document.getElementById('rv-field').options.length > 0", "the review form")
        await browser.js("document.getElementById('rv-n').value = 12")
        await browser.click("#rv-draw")
        await browser.wait("!!document.getElementById('review-answer')", "the first row to review")
        first = await browser.js("document.querySelector('#review-card h3').firstChild.textContent")
        answer = await browser.text("#review-answer")
        await browser.key("y")
        await browser.wait(f"document.querySelector('#review-card h3')?.firstChild.textContent !== '{first}'",
                           "the next row after y")
        second = await browser.js("document.querySelector('#review-card h3').firstChild.textContent")
        await browser.key("n")
        await browser.wait("!document.getElementById('review-choices').hidden", "the choices after n")
        await browser.screenshot(shots / "review.png")
        await browser.key("6")  # the sixth class: "other"
        await browser.wait(f"document.querySelector('#review-card h3')?.firstChild.textContent !== '{second}'",
                           "the next row after 6")
        await browser.key("s")
        await browser.wait("document.getElementById('review-progress').textContent.startsWith('row 4 of 12')",
                           "row 4 after a skip")
        db = sqlite3.connect(ledger)
        labels = dict(((k, f), json.loads(v)) for k, f, v in db.execute("SELECT key, field, value FROM labels"))
        assert labels == {(first, "kind"): answer, (second, "kind"): "other"}
        await browser.click("nav a[data-view='eval']")
        await browser.wait("!!document.querySelector('#eval .accuracy')", "eval's figures")
        text = await browser.js("document.querySelector(\"#eval [data-field='kind']\").textContent")
        right = 1 + (db.execute("SELECT json_extract(output, '$.kind') FROM rows WHERE key = ?",
                                (second,)).fetchone()[0] == "other")
        assert f"{right} of 2 labelled rows" in text
        assert await browser.js("document.querySelectorAll('#eval table.confusion td.hit, #eval table.confusion "
                                "td.miss').length") >= 1
        await browser.screenshot(shots / "eval.png")
        assert browser.errors == []
    if "eval" in subprocess.run([*LLMAP, "--help"], capture_output=True, text=True).stdout.split("Commands")[-1]:
        r = subprocess.run([*LLMAP, "eval", str(job), "--json"], capture_output=True, text=True, env=_env(tmp_path))
        assert r.returncode == 0 and "kind" in r.stdout  # the labels written from the page, in `llmap eval`
    print(f"\nscreenshots of the review and eval views: {shots}")


async def test_the_stop_button_stops_a_run_like_ctrl_c(tmp_path, serve, browser):
    with Simulator(latency_median=0.5) as sim:
        job = wyoming_job(tmp_path, sim.base_url, concurrency=1)
        ledger = _ledger(job)
        run = subprocess.Popen([*LLMAP, "run", str(job), "-q"], env=_env(tmp_path), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: _planned(ledger), "the run has planned its rows")
            with serve(job) as (_state, url):
                await browser.goto(url)
                await browser.wait("!document.getElementById('act-stop').disabled", "the stop button for a run")
                await browser.wait("Number(document.getElementById('count-done').textContent) > 0", "a row done")
                await browser.click("#act-stop")
                await browser.wait("document.getElementById('confirm').open", "the confirmation")
                assert "SIGTERM" in await browser.text("#confirm-text")
                await browser.click("#confirm-ok")
                assert run.wait(timeout=30) == 130
                assert "interrupted" in run.stderr.read()
                await browser.wait("document.getElementById('message').textContent.includes('sent SIGTERM')",
                                   "the page says what it did")
        finally:
            if run.poll() is None:
                run.kill()
    db = sqlite3.connect(ledger)
    counts = dict(db.execute("SELECT status, count(*) FROM rows GROUP BY status"))
    assert counts.get("done", 0) >= 1 and counts.get("pending", 0) >= 1 and sum(counts.values()) == 61
