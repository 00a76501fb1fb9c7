"""``[output] checks`` and ``_raw`` through whole runs: a broken check is re-asked and fixed, or the row fails
naming it with the model's last answer; identical rows are checked on their own columns; preflight refuses an
unknown column (exit 2, nothing sent)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from _support import ScriptedProvider, chat_requests, with_providers, write_csv
from llmap import Job
from llmap.cli import app

MESSAGE = "a LATAM region needs a Latin American country"
JOB = '''
[input]
path = "d.csv"
key = "id"
[prompt]
user = "Name: {{{{ name }}}}"
[output]
path = "out.jsonl"
max_reask = 2
checks = [{{ sql = "output.region != 'LATAM' OR country IN ('BR', 'MX')", message = "{message}" }}]
[output.fields]
region = {{ type = "string", enum = ["LATAM", "APAC", "EMEA"] }}
[model]
provider = "openai"
name = "sim"
base_url = "{base_url}"
'''

ROWS = [{"id": "1", "name": "fine", "country": "BR"}, {"id": "2", "name": "fixable", "country": "ID"},
        {"id": "3", "name": "stubborn", "country": "ID"}, {"id": "4", "name": "twin", "country": "BR"},
        {"id": "5", "name": "twin", "country": "ID"}]


def _answers(n, request):
    user = next(m["content"] for m in request.messages if m["role"] == "user")
    reasked = any(m["role"] == "assistant" for m in request.messages)
    if "fixable" in user and reasked:
        return '{"region": "APAC"}'
    return '{"region": "LATAM"}'


def _job(tmp_path: Path, base_url: str = "http://127.0.0.1:9/v1") -> Path:
    write_csv(tmp_path / "d.csv", ROWS)
    job = tmp_path / "job.toml"
    job.write_text(JOB.format(base_url=base_url, message=MESSAGE), encoding="utf-8")
    return job


def test_a_broken_check_is_reasked_and_fixed_or_fails_naming_it_with_the_last_raw_answer(tmp_path, monkeypatch):
    provider = ScriptedProvider("openai:sim", _answers)
    with_providers(monkeypatch, [provider])
    res = Job.from_toml(_job(tmp_path)).run()
    rows = {str(r["id"]): r for r in map(json.loads, res.output_path.read_text().splitlines())}
    assert rows["1"]["_status"] == "done" and rows["1"]["region"] == "LATAM" and rows["1"]["_raw"] is None
    assert rows["2"]["_status"] == "done" and rows["2"]["region"] == "APAC"  # fixed by the re-ask
    stubborn = rows["3"]
    assert stubborn["_status"] == "failed" and stubborn["region"] is None
    assert stubborn["_error"].startswith("CheckFailed: a LATAM region needs a Latin American country (check ")
    assert "after 2 re-asks" in stubborn["_error"]
    assert stubborn["_raw"] == '{"region": "LATAM"}'  # what came back, for a person to see
    # identical requests, checked on each row's own columns: the BR twin takes the answer, the ID twin cannot
    assert rows["4"]["_status"] == "done" and rows["4"]["region"] == "LATAM"
    assert rows["5"]["_status"] == "failed" and rows["5"]["_error"].startswith("CheckFailed")
    by_name = {}
    for req in provider.requests:
        user = next(m["content"] for m in req.messages if m["role"] == "user")
        by_name[user] = by_name.get(user, 0) + 1
    assert by_name["Name: fixable"] == 2 and by_name["Name: stubborn"] == 3 and by_name["Name: fine"] == 1
    assert by_name["Name: twin"] == 1 + 3  # one answer shared by the BR twin; the ID twin asks and is re-asked
    assert res.exit_code == 1


def test_a_check_on_an_unknown_column_is_refused_before_any_request(tmp_path, sim):
    job = _job(tmp_path, sim.base_url)
    job.write_text(job.read_text().replace("country IN", "contry IN"))
    out = CliRunner().invoke(app, ["run", str(job), "--quiet"])
    assert out.exit_code == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "[output] checks #1" in lines[0] and "unknown column 'contry'" in lines[0]
    assert "did you mean 'country'?" in lines[0]
    assert chat_requests(sim) == 0


def test_checks_see_their_columns_through_the_simulator_and_a_new_check_meets_done_rows(tmp_path, sim):
    job = _job(tmp_path, sim.base_url)
    text = job.read_text()
    job.write_text(text.replace("checks = [", "checks_off = [").replace("checks_off", "# checks"))
    first = Job.from_toml(job).run()
    assert first.counts["done"] == 5
    answers = {str(r["id"]): r["region"] for r in map(json.loads, first.output_path.read_text().splitlines())}
    job.write_text(text)  # the check now applies to the done rows too: they are checked (from the cache)
    second = Job.from_toml(job).run()
    rows = {str(r["id"]): r for r in map(json.loads, second.output_path.read_text().splitlines())}
    for key, row in rows.items():
        country = next(r["country"] for r in ROWS if r["id"] == key)
        if row["_status"] == "done":
            assert row["region"] != "LATAM" or country in ("BR", "MX")
        else:
            assert row["_error"].startswith("CheckFailed") and json.loads(row["_raw"])["region"] == "LATAM"
    broke = [k for k, v in answers.items() if v == "LATAM" and next(r["country"] for r in ROWS if r["id"] == k) == "ID"]
    assert all(rows[k]["_status"] == "failed" or rows[k]["region"] != "LATAM" for k in broke)
