"""The page over HTTP: the token on every route, anti-CSRF, the Host check, strict headers, no secret in any
answer, the landing page's first paint, and the actions' answers."""

from __future__ import annotations

import json
import sqlite3

import aiohttp
import pyarrow.parquet as pq
import pytest
from ui_support import SCRIPT, add_labels_table, make_old

from llmap.engine import Job

GETS = ["", "static/app.js", "static/app.css", "api/meta", "api/summary", "api/rows", "api/row?key=p0001",
        "api/review", "api/eval", "api/requeue?what=failed"]
POSTS = ["api/label", "api/stop", "api/requeue", "api/rollback"]


async def fetch(method, url, **kw):
    async with aiohttp.ClientSession() as s, s.request(method, url, allow_redirects=False, **kw) as r:
        return r.status, await r.text(), r.headers


async def test_every_route_answers_403_without_its_token(people_job, serve):
    job = people_job(5)
    await Job.from_toml(job).arun()
    with serve(job) as (state, url):
        root = url.rsplit("/", 2)[0]  # http://127.0.0.1:P
        for path in GETS:
            assert (await fetch("GET", url + path))[0] == 200, path
            for bad in (f"{root}/{path}", f"{root}/{state.token[:-1]}x/{path}", f"{root}/x/{state.token}/{path}"):
                status, text, headers = await fetch("GET", bad)
                assert status == 403 and "token" in text, bad
                assert headers["Content-Security-Policy"].startswith("default-src 'none'")
        for path in POSTS:
            for bad in (f"{root}/{path}", f"{root}/{state.token}x/{path}"):
                assert (await fetch("POST", bad, json={}))[0] == 403
        assert (await fetch("GET", f"{root}/{state.token}"))[0] == 200  # the page, no redirect
        assert (await fetch("GET", f"{root}/favicon.ico"))[0] == 403


async def test_the_landing_page_shows_counts_and_the_first_rows_as_text(people_job, serve):
    job = people_job(60)
    await Job.from_toml(job).arun()
    with serve(job) as (_state, url):
        status, html, headers = await fetch("GET", url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert '<b id="count-done">60</b>' in html and '<b id="count-total">60</b>' in html
    assert html.count('<tr data-key="') == 50  # the first page, in the HTML itself
    assert "<td>Person 0</td>" in html and "<td>Laramie</td>" in html  # keep columns
    assert SCRIPT not in html.split('id="boot"')[0]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    boot = html.split('<script type="application/json" id="boot">', 1)[1].split("</script>", 1)[0]
    assert "<script>" not in boot and json.loads(boot)["first"]["rows"][1]["data"]["name"] == SCRIPT
    for header in ("X-Frame-Options", "X-Content-Type-Options", "Referrer-Policy"):
        assert header in headers
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert "unsafe-inline" not in headers["Content-Security-Policy"]


async def test_a_foreign_host_header_is_refused(people_job, serve):
    job = people_job(3)
    await Job.from_toml(job).arun()
    with serve(job) as (state, url):
        assert (await fetch("GET", url, headers={"Host": f"evil.example:{state.port}"}))[0] == 403
        assert (await fetch("GET", url, headers={"Host": f"localhost:{state.port}"}))[0] == 200
    with serve(job, allow_remote=True) as (state, url):
        assert (await fetch("GET", url, headers={"Host": f"evil.example:{state.port}"}))[0] == 200


async def test_actions_need_the_anti_csrf_token_from_the_same_origin(people_job, serve):
    job = people_job(3)
    await Job.from_toml(job).arun()
    with serve(job) as (state, url):
        origin = url.rsplit("/", 2)[0]
        assert (await fetch("POST", url + "api/stop", json={}))[0] == 403
        assert (await fetch("POST", url + "api/stop", json={}, headers={"X-CSRF-Token": "nope"}))[0] == 403
        evil = {"X-CSRF-Token": state.csrf, "Origin": "http://evil.example"}
        assert (await fetch("POST", url + "api/stop", json={}, headers=evil))[0] == 403
        site = {"X-CSRF-Token": state.csrf, "Sec-Fetch-Site": "cross-site"}
        assert (await fetch("POST", url + "api/stop", json={}, headers=site))[0] == 403
        ok = {"X-CSRF-Token": state.csrf, "Origin": origin}
        status, text, _ = await fetch("POST", url + "api/stop", json={}, headers=ok)
        assert status == 409 and "no run of this job is going" in text  # through the guard; nothing to stop
        assert (await fetch("GET", url + "api/stop"))[0] == 405  # actions are POSTs


async def test_api_keys_never_reach_the_page(people_job, serve, monkeypatch):
    key = "sk-live-0123456789abcdef"
    monkeypatch.setenv("SIM_API_KEY", key)
    job = people_job(4, model_extra='api_key_env = "SIM_API_KEY"')
    await Job.from_toml(job).arun()
    db = sqlite3.connect(job.parent / ".llmap" / "job.ledger.sqlite")
    db.execute("UPDATE rows SET status = 'failed', output = NULL, updated_at = updated_at + 1, error = ? "
               "WHERE key = 'p0002'", (f"AuthError: 401 for key {key}; sent Authorization: Bearer {key}",))
    db.execute("UPDATE rows SET error = 'BadRequest: header Authorization: Bearer abcdefghijkl rejected', "
               "updated_at = updated_at + 1 WHERE key = 'p0003'")
    db.commit()
    with serve(job) as (_state, url):
        answers = [await fetch("GET", url + p) for p in ("", "api/row?key=p0002", "api/row?key=p0003", "api/rows",
                                                         "api/summary", "api/rows?q=AuthError")]
    for status, text, _ in answers:
        assert status == 200 and key not in text and "abcdefghijkl" not in text
    assert "Bearer ***" in answers[1][1] and "key ***" in answers[1][1] and "Bearer ***" in answers[2][1]


async def test_labels_need_the_labels_table_then_land_in_it(people_job, serve):
    job = people_job(6)
    await Job.from_toml(job).arun()
    ledger = job.parent / ".llmap" / "job.ledger.sqlite"
    make_old(ledger)  # a ledger from before the quality work: no labels table, no rows' history
    with serve(job) as (state, url):
        h = {"X-CSRF-Token": state.csrf}
        status, text, _ = await fetch("POST", url + "api/label", json={"key": "p0001", "field": "kind", "value": "a"},
                                      headers=h)
        assert status == 409 and "no labels yet" in text
        meta = json.loads((await fetch("GET", url + "api/meta"))[1])
        assert not meta["labels"]["enabled"] and not meta["rollback"]["enabled"] and meta["rollback"]["why"]
        refused = await fetch("POST", url + "api/rollback", json={"run": 1}, headers=h)
        assert refused[0] == 409 and "keeps no row history" in refused[1]
    add_labels_table(ledger)
    with serve(job) as (state, url):
        h = {"X-CSRF-Token": state.csrf}
        ok = await fetch("POST", url + "api/label", json={"key": "p0001", "field": "kind", "value": "c"}, headers=h)
        assert ok[0] == 200
        assert (await fetch("POST", url + "api/label", json={"key": "nope", "field": "kind", "value": "c"},
                            headers=h))[0] == 404
        assert (await fetch("POST", url + "api/label", json={"key": "p0001", "field": "x", "value": 1},
                            headers=h))[0] == 400
        assert (await fetch("POST", url + "api/label", data="not json", headers=h))[0] == 400
        row = json.loads((await fetch("GET", url + "api/row?key=p0001"))[1])
        assert row["labels"]["kind"]["value"] == "c" and row["labels"]["kind"]["source"] == "ui"
        ev = json.loads((await fetch("GET", url + "api/eval"))[1])
        assert ev["fields"]["kind"]["n"] == 1
        assert ev["fields"]["kind"]["correct"] == (1 if row["output"]["kind"] == "c" else 0)
    assert sqlite3.connect(ledger).execute("SELECT value, source FROM labels").fetchall() == [('"c"', "ui")]


async def test_requeue_says_what_it_will_do_then_does_it(people_job, serve, sim):
    job = people_job(12)
    await Job.from_toml(job).arun()
    ledger = job.parent / ".llmap" / "job.ledger.sqlite"
    db = sqlite3.connect(ledger)
    db.execute("UPDATE rows SET status = 'failed', output = NULL, error = 'Overloaded: 503', "
               "updated_at = updated_at + 1 WHERE key IN ('p0003', 'p0004')")
    db.commit()
    with serve(job) as (state, url):
        h = {"X-CSRF-Token": state.csrf}
        preview = json.loads((await fetch("GET", url + "api/requeue?what=failed"))[1])
        assert preview["rows"] == 2 and "next `llmap run`" in preview["text"]
        city = json.loads((await fetch("GET", url + "api/requeue?status=done&q=Cody"))[1])
        assert city["rows"] == 4  # p0002, p0005, p0008 and p0011 live in Cody
        status, text, _ = await fetch("POST", url + "api/requeue", json={"status": "done", "q": "Cody"}, headers=h)
        assert status == 200 and json.loads(text)["rows"] == 4
        bad = await fetch("POST", url + "api/requeue", json={"status": "nope"}, headers=h)
        assert bad[0] == 400 and "status must be one of" in bad[1]
        rb = await fetch("POST", url + "api/rollback", json={"run": 9}, headers=h)
        assert rb[0] == 409 and "run 9 not found" in rb[1]
    counts = dict(db.execute("SELECT status, count(*) FROM rows GROUP BY status"))
    assert counts == {"done": 6, "failed": 2, "pending": 4}
    before = sim.stats()["requests"]
    await Job.from_toml(job).arun()
    assert dict(db.execute("SELECT status, count(*) FROM rows GROUP BY status")) == {"done": 12}
    assert sim.stats()["requests"] == before  # as the confirmation says: unchanged requests come from the cache


async def test_rollback_from_the_page_puts_the_rows_back_as_the_first_run_left_them(people_job, serve, sim):
    job = people_job(8)
    await Job.from_toml(job).arun()
    db = sqlite3.connect(job.parent / ".llmap" / "job.ledger.sqlite")
    first = db.execute("SELECT key, status, output FROM rows ORDER BY key").fetchall()
    job.write_text(job.read_text().replace("Name: {{ name }}", "Person: {{ name }}"), encoding="utf-8")
    await Job.from_toml(job).arun()  # run 2: the changed prompt asks every row again
    assert db.execute("SELECT max(id) FROM runs").fetchone()[0] == 2
    assert db.execute("SELECT key, status, output FROM rows ORDER BY key").fetchall() != first
    sent = sim.stats()["requests"]
    with serve(job) as (state, url):
        h = {"X-CSRF-Token": state.csrf}
        meta = json.loads((await fetch("GET", url + "api/meta"))[1])
        assert meta["rollback"]["enabled"] and meta["rollback"]["why"] is None
        status, text, _ = await fetch("POST", url + "api/rollback", json={"run": 2}, headers=h)
        said = json.loads(text)["message"]
        assert status == 200 and "rolled back run 2: 0 requests" in said and "output written again" in said
        again = await fetch("POST", url + "api/rollback", json={"run": 2}, headers=h)
        assert again[0] == 409 and "rolled back already" in again[1]
    assert db.execute("SELECT key, status, output FROM rows ORDER BY key").fetchall() == first
    assert sim.stats()["requests"] == sent  # a rollback sends nothing
    exported = {r["id"]: r["kind"] for r in pq.read_table(job.parent / "out" / "result.parquet").to_pylist()}
    assert exported == {k: json.loads(o)["kind"] for k, _, o in first}  # the output follows at once


@pytest.mark.parametrize("params,message", [("status=zzz", "status must be one of"), ("sort=nope", "cannot sort")])
async def test_a_bad_filter_is_a_400_with_its_reason(people_job, serve, params, message):
    job = people_job(3)
    await Job.from_toml(job).arun()
    with serve(job) as (_state, url):
        status, text, _ = await fetch("GET", url + "api/rows?" + params)
    assert status == 400 and message in json.loads(text)["error"]


async def test_by_a_column_the_ledger_does_not_keep_is_a_one_line_error(people_job, serve):
    from llmap.errors import SpecError

    job = people_job(3)
    await Job.from_toml(job).arun()
    with pytest.raises(SpecError, match="--by 'age': the ledger keeps only the columns .*add 'age' to"), serve(
            job, by="age"):
        pass
    with serve(job, by="city") as (_state, url):
        meta = json.loads((await fetch("GET", url + "api/meta"))[1])
        assert meta["group"] == "city"
        rows = json.loads((await fetch("GET", url + 'api/rows?group="Cody"'))[1])
        assert [r["key"] for r in rows["rows"]] == ["p0002"]


def test_the_redactor_hides_secrets_and_keeps_json_valid():
    from llmap.spec import ModelSpec
    from llmap.ui.safety import Redactor, secrets_of

    m = ModelSpec(provider="openai", name="x", base_url="http://h/v1", api_key_env="MY_KEY",
                  headers={"X-Org": "${ORG_SECRET}", "X-Plain": "visible"})
    found = secrets_of([m], {"MY_KEY": "key-123456", "ORG_SECRET": "org-abcdef", "OPENAI_API_KEY": "sk-zzzzzzzz",
                             "OTHER": "not-a-secret"})
    assert sorted(found) == ["key-123456", "org-abcdef", "sk-zzzzzzzz"]
    r = Redactor(found)
    data = r.data({"e": ["key-123456 and org-abcdef", {"x": "x-api-key: abcdefgh1", "n": float("nan")}],
                   "ok": "not-a-secret", "auth": "Authorization: Basic dXNlcjpwYXNz"})
    assert data == {"e": ["*** and ***", {"x": "x-api-key: ***", "n": "nan"}], "ok": "not-a-secret",
                    "auth": "Authorization: Basic ***"}
    json.dumps(data, allow_nan=False)
