"""End-to-end runs against the simulator: output, ledger, resume, re-ask, failover."""

from __future__ import annotations

import json
import sqlite3

import pyarrow.parquet as pq
import pytest

from _support import NO_BACKOFF, ScriptedProvider, chat_requests, people, with_providers, write_csv
from llmap import Job
from llmap.errors import AnswerInvalid
from llmap.io.sinks import export_job
from llmap.observe.progress import CountingProgress
from llmap.observe.status import job_status


def test_run_writes_every_row_once_with_valid_fields(make_job, sim):
    job_path = make_job(30)
    progress = CountingProgress()
    res = Job.from_toml(job_path).run(progress=progress)
    assert res.exit_code == 0
    assert res.counts == {"pending": 0, "done": 30, "failed": 0, "skipped": 0, "fallback": 0}
    assert chat_requests(sim) == 30
    t = pq.read_table(res.output_path)
    assert t.column_names == ["id", "name", "kind", "score", "_status", "_error", "_model", "_source", "_confidence",
                              "_raw"]
    rows = t.to_pylist()
    assert [r["id"] for r in rows] == [p["id"] for p in people(30)]
    assert all(r["kind"] in ("a", "b", "c") and isinstance(r["score"], float) for r in rows)
    assert {r["_status"] for r in rows} == {"done"}
    assert {r["_model"] for r in rows} == {"openai:sim"}
    # progress only ever counts committed rows, and ends at the total
    assert progress.started.total == 30
    assert progress.advances[-1] == (30, 0, 0)
    assert res.prompt_tokens > 0 and res.completion_tokens > 0


def test_ledger_holds_row_state(make_job):
    job_path = make_job(5)
    Job.from_toml(job_path).run()
    db = sqlite3.connect(job_path.parent / ".llmap" / "job.ledger.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = db.execute(
        "SELECT key, input_hash, status, attempts, output, prompt_tokens, completion_tokens, latency_s, model, "
        "error, created_at, updated_at FROM rows ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == ["p0000", "p0001", "p0002", "p0003", "p0004"]
    for r in rows:
        assert r[2] == "done" and r[3] == 1 and json.loads(r[4])["kind"] in "abc"
        assert r[5] > 0 and r[6] > 0 and r[7] >= 0 and r[8] == "openai:sim" and r[9] is None
        assert len(r[1]) == 64 and r[10] <= r[11]


def test_rerun_sends_nothing_and_fresh_starts_over(make_job, sim):
    job_path = make_job(12)
    Job.from_toml(job_path).run()
    assert chat_requests(sim) == 12
    res = Job.from_toml(job_path).run()
    assert chat_requests(sim) == 12  # every row done with the same input hash
    assert res.counts["done"] == 12 and res.requests == 0
    res = Job.from_toml(job_path).run(fresh=True)  # the ledger starts over; the response cache answers
    assert chat_requests(sim) == 12 and res.counts["done"] == 12
    assert {r["_source"] for r in pq.read_table(res.output_path).to_pylist()} == {"cache"}
    job_path.write_text(job_path.read_text() + "\n[cache]\nenabled = false\n")
    Job.from_toml(job_path).run(fresh=True)
    assert chat_requests(sim) == 24


def test_changed_row_and_changed_prompt_are_requested_again(make_job, sim, tmp_path):
    job_path = make_job(10)
    Job.from_toml(job_path).run()
    rows = people(10)
    rows[3]["name"] = "Someone Else"
    rows[4]["age"] = 99  # not read by the template: no new request
    write_csv(tmp_path / "people.csv", rows)
    Job.from_toml(job_path).run()
    assert chat_requests(sim) == 11
    job_path.write_text(job_path.read_text().replace("You sort people.", "You sort people well."))
    Job.from_toml(job_path).run()
    assert chat_requests(sim) == 21


def test_limit_and_where_shape_the_plan(make_job, sim):
    job_path = make_job(30, extra_input="where = \"city = 'Cody'\"")
    res = Job.from_toml(job_path).run(limit=4)
    assert sum(res.counts.values()) == 4 and chat_requests(sim) == 4
    t = pq.read_table(res.output_path).to_pylist()
    assert [r["id"] for r in t] == ["p0002", "p0005", "p0008", "p0011"]


def test_rows_with_empty_inputs_are_skipped_with_a_reason(make_job, sim, tmp_path):
    job_path = make_job(3)
    rows = people(3)
    rows[1]["name"] = ""
    rows[1]["city"] = ""
    write_csv(tmp_path / "people.csv", rows)
    res = Job.from_toml(job_path).run()
    assert res.counts == {"pending": 0, "done": 2, "failed": 0, "skipped": 1, "fallback": 0}
    out = pq.read_table(res.output_path).to_pylist()
    assert out[1]["_status"] == "skipped" and "empty" in out[1]["_error"]
    assert chat_requests(sim) == 2 and res.exit_code == 0


def test_no_key_uses_row_number(make_job, sim, tmp_path):
    job_path = make_job(5)
    job_path.write_text(job_path.read_text().replace('key = "id"\n', ""))
    res = Job.from_toml(job_path).run()
    t = pq.read_table(res.output_path)
    assert t.column("_row").to_pylist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_formats_in_and_out(make_job, sim, tmp_path, ext):
    import pyarrow as pa
    import pyarrow.csv as pacsv

    table = pa.Table.from_pylist(people(6))
    src = tmp_path / f"people_in.{ext}"
    if ext == "jsonl":
        src.write_text("".join(json.dumps(r) + "\n" for r in people(6)))
    elif ext == "csv":
        pacsv.write_csv(table, src)
    else:
        pq.write_table(table, src)
    job_path = make_job(1, input_path=src.name, output=f"out/r.{ext}")
    res = Job.from_toml(job_path).run()
    assert res.counts["done"] == 6
    text = res.output_path.read_text() if ext != "parquet" else None
    if ext == "jsonl":
        lines = [json.loads(x) for x in text.splitlines()]
        assert [x["id"] for x in lines] == [p["id"] for p in people(6)] and lines[0]["_status"] == "done"
    elif ext == "csv":
        assert text.splitlines()[0] == ('"id","name","kind","score","_status","_error","_model","_source",'
                                        '"_confidence","_raw"')
        assert len(text.splitlines()) == 7
    else:
        assert pq.read_table(res.output_path).num_rows == 6


def test_sql_input_pre_aggregates(tmp_path, sim):
    write_csv(tmp_path / "people.csv", people(30))
    job = tmp_path / "agg.toml"
    job.write_text(f'''
[input]
sql = "SELECT city AS id, count(*) AS n, avg(age) AS mean_age FROM read_csv('people.csv') GROUP BY city ORDER BY city"
key = "id"
[prompt]
user = "City {{{{ id }}}} has {{{{ n }}}} people, mean age {{{{ mean_age }}}}."
[output]
path = "out/agg.jsonl"
keep = ["n"]
[output.fields]
fact = {{ type = "string" }}
[model]
provider = "openai"
name = "sim"
base_url = "{sim.base_url}"
''')
    res = Job.from_toml(job).run()
    lines = [json.loads(x) for x in res.output_path.read_text().splitlines()]
    assert [(x["id"], x["n"]) for x in lines] == [("Casper", 10), ("Cody", 10), ("Laramie", 10)]
    assert chat_requests(sim) == 3


def test_status_by_stored_and_unstored_column(make_job):
    job_path = make_job(9)
    job = Job.from_toml(job_path)
    job.run()
    rep = job_status(job.spec, "city")  # read by the template: stored in the ledger
    assert {g: c["done"] for g, c in rep.groups.items()} == {"Casper": 3, "Cody": 3, "Laramie": 3}
    rep = job_status(job.spec, "age")  # not stored: read from the input
    assert sum(c["done"] for c in rep.groups.values()) == 9 and len(rep.groups) == 9


def test_export_again_to_another_format(make_job, tmp_path):
    job_path = make_job(4)
    job = Job.from_toml(job_path)
    job.run()
    path, n = export_job(job.spec, tmp_path / "again.jsonl")
    assert n == 4
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["p0000", "p0001", "p0002", "p0003"]


def test_invalid_answer_is_reasked_with_the_error(make_job, monkeypatch):
    job_path = make_job(1)
    bad_then_good = ScriptedProvider("openai:sim", lambda n, r: '{"kind": "z", "score": 0.5}' if n == 1
                                     else '{"kind": "a", "score": 0.5}')
    with_providers(monkeypatch, [bad_then_good])
    res = Job.from_toml(job_path).run()
    assert res.counts["done"] == 1
    second = bad_then_good.requests[1].messages
    assert second[-2] == {"role": "assistant", "content": '{"kind": "z", "score": 0.5}'}
    assert "kind" in second[-1]["content"] and "invalid" in second[-1]["content"]


def test_row_fails_after_max_reask(make_job, monkeypatch):
    job_path = make_job(1)
    job_path.write_text(job_path.read_text().replace('keep = ["name"]', 'keep = ["name"]\nmax_reask = 1'))
    always_bad = ScriptedProvider("openai:sim", lambda n, r: "not json")
    with_providers(monkeypatch, [always_bad])
    res = Job.from_toml(job_path).run()
    assert res.counts["failed"] == 1 and res.exit_code == 1 and len(always_bad.requests) == 2
    row = pq.read_table(res.output_path).to_pylist()[0]
    assert row["_status"] == "failed" and "not valid JSON" in row["_error"]


def test_schema_sent_and_answers_validated():
    from llmap.prompt.schema import OutputSchema
    from llmap.spec import FieldSpec

    s = OutputSchema({"kind": FieldSpec(type="string", enum=["x"]), "n": FieldSpec(type="integer"),
                      "ok": FieldSpec(type="boolean", description="yes?")})
    assert s.json_schema == {
        "type": "object",
        "properties": {"kind": {"type": "string", "enum": ["x"]}, "n": {"type": "integer"},
                       "ok": {"type": "boolean", "description": "yes?"}},
        "required": ["kind", "n", "ok"],
        "additionalProperties": False,
    }
    assert s.validate('{"kind": "x", "n": 3, "ok": true}') == {"kind": "x", "n": 3, "ok": True}
    for bad in ['{"kind": "y", "n": 3, "ok": true}', '{"kind": "x", "n": 3}',
                '{"kind": "x", "n": 3, "ok": true, "z": 1}', '{"kind": "x", "n": "three", "ok": true}', "[]"]:
        with pytest.raises(AnswerInvalid):
            s.validate(bad)


def test_failover_to_second_model_and_recorded(make_job, monkeypatch):
    from llmap.errors import BadRequest

    job_path = make_job(3)
    text = job_path.read_text()
    job_path.write_text(text.replace("[model]", "[[model]]") + text[text.index("[model]"):].replace(
        "[model]", "[[model]]").replace('name = "sim"', 'name = "backup"').split("[limits]")[0])
    primary = ScriptedProvider("openai:sim", lambda n, r: BadRequest("HTTP 404: no such model"))
    backup = ScriptedProvider("openai:backup", lambda n, r: '{"kind": "b", "score": 1.0}')
    with_providers(monkeypatch, [primary, backup])
    res = Job.from_toml(job_path).run()
    assert res.counts["done"] == 3
    assert {r["_model"] for r in pq.read_table(res.output_path).to_pylist()} == {"openai:backup"}


def test_transient_errors_are_retried(make_job, monkeypatch):
    from llmap.errors import Overloaded

    job_path = make_job(2, limits_extra=NO_BACKOFF)
    flaky = ScriptedProvider("openai:sim", lambda n, r: Overloaded("HTTP 503") if n <= 2
                             else '{"kind": "c", "score": 0.1}')
    with_providers(monkeypatch, [flaky])
    res = Job.from_toml(job_path).run()
    assert res.counts["done"] == 2 and len(flaky.requests) == 4
