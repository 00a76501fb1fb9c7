"""llmap.observe.estimate.rows: rows, requests, tokens, USD and time of a run, without sending anything."""

from __future__ import annotations

import io
import math
import sqlite3
from pathlib import Path

import pytest
from rich.console import Console

from _support import chat_requests, people, write_csv
from llmap import Job
from llmap.observe.estimate.rows import estimate
from llmap.observe.estimate.table import estimate_text, format_estimate
from llmap.prompt.render import Renderer
from llmap.prompt.schema import OutputSchema
from llmap.store.answers import AnswerCache

PRICED = "price_in = 2.0\nprice_out = 8.0\nmax_tokens = 50"


def _chars(job_path: Path, rows: list[dict]) -> int:
    """Characters of the rendered messages of ``rows``, as the dispatcher sends them."""
    spec = Job.from_toml(job_path).spec
    r = Renderer.from_spec(spec.prompt)
    return sum(len(m["content"]) for row in rows for m in r.messages(row))


def _cache_file(tmp_path: Path) -> Path:
    return tmp_path / "llmap-cache" / "responses.sqlite"


def _other_job(job: Path, name: str) -> Path:
    other = job.parent / f"{name}.toml"
    other.write_text(job.read_text().replace('path = "out/result.parquet"', f'path = "out/{name}.parquet"'))
    return other


def test_before_any_run_every_row_is_to_request_and_nothing_is_sent(make_job, sim, tmp_path):
    job = make_job(20, model_extra=PRICED)
    est = estimate(Job.from_toml(job).spec)
    assert (est.rows, est.done, est.skipped, est.cached, est.duplicates, est.to_request) == (20, 0, 0, 0, 0, 20)
    assert est.requests == 20 and not est.ledger_found
    assert est.completion_source == "max_tokens" and est.completion_tokens == 20 * 50
    assert est.chars_per_token == 4.0 and est.chars_per_token_source == "default"
    chars = _chars(job, people(20))
    assert est.prompt_chars == chars and est.prompt_tokens == math.ceil(chars / 4.0)
    assert est.cost_usd == pytest.approx((est.prompt_tokens * 2.0 + 20 * 50 * 8.0) / 1e6)
    assert est.cost_upper_usd == est.cost_usd and len(est.models) == 1
    assert est.elapsed_s > 0
    assert chat_requests(sim) == 0
    # read-only: neither the ledger nor the response cache is created
    assert not (tmp_path / ".llmap").exists() and not _cache_file(tmp_path).exists()


def test_after_a_run_done_rows_are_not_requested_and_usage_comes_from_the_ledger(make_job, sim, tmp_path):
    job = make_job(20, model_extra=PRICED)
    Job.from_toml(job).run()
    sent = chat_requests(sim)
    assert sent == 20
    est = estimate(Job.from_toml(job).spec)
    assert chat_requests(sim) == sent
    assert (est.rows, est.done, est.to_request, est.requests) == (20, 20, 0, 0)
    assert est.ledger_found and est.completion_source == "past runs" and est.latency_source == "past runs"
    assert est.chars_per_token_source == "ledger (20 done rows)"
    db = sqlite3.connect(job.parent / ".llmap" / "job.ledger.sqlite")
    ct, n = db.execute("SELECT sum(completion_tokens), count(*) FROM requests WHERE outcome = '200'").fetchone()
    pt = db.execute("SELECT sum(prompt_tokens) FROM rows").fetchone()[0]
    assert est.models[0].completion_per_row == pytest.approx(ct / n)
    assert est.chars_per_token == pytest.approx(_chars(job, people(20)) / pt)
    assert est.cost_usd == 0.0 and est.time_s == 0.0


def test_one_changed_row_is_the_only_row_to_request(make_job, sim, tmp_path):
    job = make_job(20)
    Job.from_toml(job).run()
    rows = people(20)
    rows[7]["name"] = "Someone Else"
    rows[8]["age"] = 99  # not read by the template: still done
    write_csv(tmp_path / "people.csv", rows)
    est = estimate(Job.from_toml(job).spec)
    assert (est.done, est.to_request, est.requests) == (19, 1, 1)
    assert est.chars_per_token_source == "ledger (20 done rows)"  # the changed row's past tokens calibrate too
    assert est.prompt_chars == _chars(job, [rows[7]])
    assert chat_requests(sim) == 20


def test_duplicates_and_empty_rows_are_counted_and_match_a_real_run(make_job, sim, tmp_path):
    job = make_job(1)
    base = people(10)
    rows = [{**base[i % 10], "id": f"d{i:04d}"} for i in range(25)]  # 10 unique, 15 repeats
    rows += [{"id": "e0", "name": "", "city": "", "age": 1}, {"id": "e1", "name": "", "city": "", "age": 2}]
    write_csv(tmp_path / "people.csv", rows)
    est = estimate(Job.from_toml(job).spec)
    assert (est.rows, est.skipped, est.duplicates, est.to_request) == (27, 2, 15, 10)
    assert est.prompt_chars == _chars(job, base)
    assert chat_requests(sim) == 0
    res = Job.from_toml(job).run()
    assert chat_requests(sim) == est.requests == 10 and res.counts["skipped"] == 2


def test_different_inputs_that_render_the_same_request_are_duplicates(make_job, sim, tmp_path):
    job = make_job(1, user="Name: {{ name | lower }}; city: {{ city }}.")
    rows = people(6) + [{**p, "id": f"u{i}", "name": p["name"].upper()} for i, p in enumerate(people(4))]
    write_csv(tmp_path / "people.csv", rows)
    est = estimate(Job.from_toml(job).spec)
    assert (est.duplicates, est.to_request) == (4, 6)
    Job.from_toml(job).run()
    assert chat_requests(sim) == 6


def test_cache_hits_from_another_job_are_counted_read_only(make_job, sim, tmp_path):
    job = make_job(12)
    rows = people(12)
    rows[0]["name"] = 'Zoë "Quoted" Ünïcode ☃'  # the fast cache key must escape like request_key
    write_csv(tmp_path / "people.csv", rows)
    Job.from_toml(job).run()
    assert chat_requests(sim) == 12
    other = _other_job(job, "other")
    db = sqlite3.connect(_cache_file(tmp_path))
    hits_before = db.execute("SELECT sum(hits), count(*) FROM responses").fetchone()
    est = estimate(Job.from_toml(other).spec)
    assert (est.done, est.cached, est.to_request, est.requests) == (0, 12, 0, 0)
    assert "response cache" in est.cache_source
    assert db.execute("SELECT sum(hits), count(*) FROM responses").fetchone() == hits_before  # no hit counted
    Job.from_toml(other).run()
    assert chat_requests(sim) == 12  # the run agrees: the cache answered every row


def test_cache_hits_when_the_system_prompt_reads_a_column(make_job, sim, tmp_path):
    job = make_job(6)
    job.write_text(job.read_text().replace('system = "You sort people."', 'system = "You sort people of {{ city }}."'))
    Job.from_toml(job).run()
    est = estimate(Job.from_toml(_other_job(job, "other")).spec)
    assert (est.cached, est.to_request) == (6, 0)


def test_expired_and_disabled_cache_entries_are_not_hits(make_job, sim, tmp_path):
    job = make_job(5)
    Job.from_toml(job).run()
    other = _other_job(job, "other")
    other.write_text(other.read_text() + '\n[cache]\nttl = "1h"\n')
    assert estimate(Job.from_toml(other).spec).cached == 5
    db = sqlite3.connect(_cache_file(tmp_path))
    db.execute("UPDATE responses SET created_at = created_at - 7200 WHERE rowid IN (SELECT rowid FROM responses "
               "LIMIT 2)")
    db.commit()
    assert (estimate(Job.from_toml(other).spec).cached, estimate(Job.from_toml(other).spec).to_request) == (3, 2)
    off = _other_job(job, "off")
    off.write_text(off.read_text() + "\n[cache]\nenabled = false\n")
    est = estimate(Job.from_toml(off).spec)
    assert (est.cached, est.to_request) == (0, 5) and "enabled = false" in est.cache_source


def test_keyless_input_matches_the_ledger_by_row_number(make_job, sim, tmp_path):
    job = make_job(8)
    job.write_text(job.read_text().replace('key = "id"\n', ""))
    Job.from_toml(job).run()
    est = estimate(Job.from_toml(job).spec)
    assert (est.done, est.to_request) == (8, 0)
    assert estimate(Job.from_toml(job).spec, limit=3).rows == 3


def test_where_and_limit_bound_the_rows(make_job, sim):
    job = make_job(30, extra_input="where = \"city = 'Cody'\"\nlimit = 7")
    est = estimate(Job.from_toml(job).spec)
    assert est.rows == est.to_request == 7


def test_time_follows_the_tightest_limit(make_job, sim):
    job = make_job(20, concurrency=4)
    est = estimate(Job.from_toml(job).spec)
    assert est.time_bound == "concurrency" and est.latency_source == "assumed"
    assert est.time_s == pytest.approx(20 * 1.0 / 4)  # 1.0 s per request assumed, 4 in flight
    job.write_text(job.read_text() + "rpm = 60\n")
    est = estimate(Job.from_toml(job).spec)
    assert est.time_bound == "rpm" and est.time_s == pytest.approx(20.0)
    job.write_text(job.read_text() + "tpm = 600\n")
    est = estimate(Job.from_toml(job).spec)
    assert est.time_bound == "tpm"
    assert est.time_s == pytest.approx((est.prompt_tokens + est.completion_tokens) / 10)


def test_pack_divides_requests_not_tokens(make_job, sim):
    job = make_job(23)
    plain = estimate(Job.from_toml(job).spec)
    job.write_text(job.read_text().replace("[output]", "pack = 5\n[output]", 1))
    est = estimate(Job.from_toml(job).spec)
    assert est.requests == 5 and est.to_request == 23 and est.prompt_tokens == plain.prompt_tokens
    assert any("pack = 5" in n for n in est.notes)


def test_cascade_costs_the_next_model_as_if_every_row_escalated(make_job, sim):
    job = make_job(10, model_extra=PRICED)
    text = job.read_text()
    model = text[text.index("[model]"):text.index("[limits]")]
    cheap = model.replace("[model]", "[[model]]") + 'escalate_if = "score < 0.5"\n'
    strong = (model.replace("[model]", "[[model]]").replace('name = "sim"', 'name = "strong"')
              .replace("price_in = 2.0", "price_in = 20.0"))
    job.write_text(text.replace(model, cheap + strong))
    est = estimate(Job.from_toml(job).spec)
    assert [m.label for m in est.models] == ["openai:sim", "openai:strong"]
    strong_cost = (est.prompt_tokens * 20.0 + 10 * 50 * 8.0) / 1e6
    assert est.models[1].cost_usd == pytest.approx(strong_cost)
    assert est.cost_upper_usd == pytest.approx(est.cost_usd + strong_cost)


def _local(job: Path, limits: str = "") -> Path:
    text = job.read_text()
    model = text[text.index("[model]"):]
    job.write_text(text.replace(model, f'[model]\nprovider = "local"\nmodel_path = "missing.gguf"\n{limits}'))
    return job


def test_local_model_is_not_loaded(make_job, sim, tmp_path, monkeypatch):
    monkeypatch.setattr("llmap.providers.local.provider.cores", lambda: 2)
    job = _local(make_job(4))
    est = estimate(Job.from_toml(job).spec)  # a run would fail preflight: the model file is missing
    assert est.to_request == 4 and est.time_s == pytest.approx(4 * 5.0 / (2 * 16))


def test_the_embedded_model_runs_16_rows_together_in_each_model_process(make_job, sim, monkeypatch):
    # The run keeps 16 requests in flight per model process (batched decoding): 2 processes by default,
    # [limits] concurrency when set, at most one per core. The estimate once said 1 (a bell job's 2.0 min
    # estimate ran in 55 s), then one per process (batched decoding made that 16 times too slow).
    monkeypatch.setattr("llmap.providers.local.provider.cores", lambda: 4)
    est = estimate(Job.from_toml(_local(make_job(8))).spec)
    assert est.concurrency == 32 and "2 model processes" in est.concurrency_source
    assert "16 rows decoded together" in est.concurrency_source
    assert est.time_s == pytest.approx(8 * 5.0 / 32)
    est = estimate(Job.from_toml(_local(make_job(8), "[limits]\nconcurrency = 3\n")).spec)
    assert est.concurrency == 48 and "[limits] concurrency" in est.concurrency_source
    monkeypatch.setattr("llmap.providers.local.provider.cores", lambda: 1)
    assert estimate(Job.from_toml(_local(make_job(8))).spec).concurrency == 16


def test_no_prices_are_asked_for_the_embedded_model(make_job, sim):
    est = estimate(Job.from_toml(_local(make_job(3))).spec)
    text = estimate_text(est)
    assert "price_in" not in text and "no charge" in text, text
    remote = estimate_text(estimate(Job.from_toml(make_job(3)).spec))
    assert "set [model] price_in and price_out" in remote  # a remote model without prices still is asked


def test_prompt_tokens_come_from_the_ledgers_history_after_the_prompt_changed(make_job, sim, monkeypatch):
    # A ledger whose runs answered every row with another prompt still tells the model's characters per token:
    # the bell job's estimate said 12,733 prompt tokens (4 characters per token) where its runs had used 23,340.
    from _support import ScriptedProvider, with_providers

    job = _local(make_job(10))
    answer = lambda n, req: '{"kind": "a", "score": 0.5}'  # noqa: E731
    with_providers(monkeypatch, [ScriptedProvider("local:gemma-3-270m", answer)])
    Job.from_toml(job).run()  # 10 prompt tokens per row, as the scripted provider reports
    job.write_text(job.read_text().replace("Name: {{ name }}", "Person: {{ name }}"))
    est = estimate(Job.from_toml(job).spec)
    assert est.done == 0 and est.to_request == 10
    assert est.chars_per_token_source == "ledger (10 done rows)"
    assert est.prompt_tokens == pytest.approx(100, abs=1)


def test_fast_request_keys_equal_the_dispatchers(make_job, sim, tmp_path):
    from llmap.observe.estimate.rows import _RequestKeys

    job = make_job(3)
    spec = Job.from_toml(job).spec
    r = Renderer.from_spec(spec.prompt)
    schema = OutputSchema(spec.output.fields).json_schema
    keys = _RequestKeys(r, spec.model, schema, spec.prompt.system)
    keys._verify = 0  # no safety net: the fast path alone must agree
    for row in [*people(3), {"name": "a\u2028b\\\"\n", "city": None}]:
        want = AnswerCache.key(spec.model, r.messages(row), schema)
        assert keys(row)[0] == want
    assert keys.fast


def test_format_estimate_shows_figures_and_sources(make_job, sim):
    job = make_job(20, model_extra=PRICED)
    est = estimate(Job.from_toml(job).spec)
    out = io.StringIO()
    Console(file=out, width=200).print(format_estimate(est))
    text = out.getvalue()
    assert "rows to request" in text and "max_tokens" in text and f"${est.cost_usd:,.4f}" in text
    plain = estimate_text(est)
    assert "rows to request" in plain and "assumed" in plain and "20" in plain


def test_values_that_change_in_the_ledgers_json_are_keyed_as_the_run_sends_them(make_job, sim, tmp_path):
    # The dispatcher renders rows read back from the ledger's JSON: a map column becomes a list of lists.
    job = make_job(1, user="{{ name }} on {{ day }} with {{ tags }}")
    sql = ("SELECT 'p' || i AS id, 'Person ' || i AS name, DATE '2024-01-01' + i::INTEGER AS day, "
           "MAP {'k': i} AS tags FROM range(5) t(i)")
    job.write_text(job.read_text().replace('path = "people.csv"', f'sql = "{sql}"'))
    Job.from_toml(job).run()
    assert chat_requests(sim) == 5
    est = estimate(Job.from_toml(_other_job(job, "other")).spec)
    assert (est.cached, est.to_request) == (5, 0)
