"""Rate limits, retries, breaker, failover and budget caps, end to end against the simulator.

Every job here sets a backoff of at most 10 ms (`FAST_BACKOFF`): rows retry without waiting; the policy itself
is unit-tested in tests/control."""

from __future__ import annotations

import contextlib
import json
import urllib.request

import pyarrow.parquet as pq
import pytest

from _support import FAST_BACKOFF, ScriptedProvider, chat_requests, with_providers
from llmap import Job
from llmap.errors import AuthError
from llmap.sim import Simulator


def _drain(sim: Simulator, n: int) -> None:
    body = json.dumps({"model": "sim", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}).encode()
    for _ in range(n):
        req = urllib.request.Request(f"{sim.base_url}/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with contextlib.suppress(urllib.error.HTTPError):
            urllib.request.urlopen(req, timeout=5).read()


def _rows(path):
    return pq.read_table(path).to_pylist()


def test_429_retry_after_pauses_the_lane_and_every_row_finishes(make_job):
    with Simulator(rpm=30) as sim:  # refills a request every 2 s: still empty when the job starts on a slow machine
        _drain(sim, 30)  # the server's bucket is now empty: the job's first requests get 429
        before = sim.stats()["by_status"].get("429", 0)
        job = make_job(6, base_url=sim.base_url, concurrency=4, limits_extra=FAST_BACKOFF)
        res = Job.from_toml(job).run()
        assert res.counts["done"] == 6 and res.exit_code == 0
        got_429 = sim.stats()["by_status"].get("429", 0) - before
        assert got_429 >= 1 and res.rate_limited == got_429
        # one pause for the whole lane: no 429 storm (at most the requests that were in flight, plus a few)
        assert got_429 <= 10


def test_hung_requests_are_abandoned_and_retried(make_job):
    with Simulator(hang_rate=0.25, seed=7) as sim:
        job = make_job(24, base_url=sim.base_url, model_extra="timeout_s = 1.0", concurrency=8,
                       limits_extra=FAST_BACKOFF)
        res = Job.from_toml(job).run()
        assert res.counts["done"] == 24
        assert sim.stats()["hung"] >= 1 and chat_requests(sim) > 24
        ids = [r["id"] for r in _rows(res.output_path)]
        assert len(ids) == len(set(ids)) == 24


def test_malformed_and_5xx_answers_are_retried(make_job):
    with Simulator(malformed_rate=0.2, fail_rate=0.2, seed=3) as sim:
        job = make_job(40, base_url=sim.base_url, limits_extra=FAST_BACKOFF)
        res = Job.from_toml(job).run()
        assert res.counts["done"] == 40 and res.retries > 0
        by = sim.stats()["by_status"]
        assert sum(int(v) for k, v in by.items() if k.startswith("5")) >= 1 and sim.stats()["malformed"] >= 1


def test_terminal_error_fails_the_row_at_once(make_job):
    # 2 rows: below the 3 identical refusals that make a configuration error (tests/test_structured.py)
    with Simulator() as sim:
        job = make_job(2, base_url=sim.base_url, limits_extra=FAST_BACKOFF)
        job.write_text(job.read_text().replace('name = "sim"', 'name = "bad-request-model"'))
        res = Job.from_toml(job).run()
        assert res.counts["failed"] == 2 and res.exit_code == 1
        assert chat_requests(sim) == 2  # no retries on a 400
        assert all(r["_error"].startswith("BadRequest: HTTP 400") for r in _rows(res.output_path))


def test_quota_exhausted_stops_the_run_and_keeps_progress(make_job):
    with Simulator(quota_tokens=400) as sim:
        job = make_job(60, base_url=sim.base_url, concurrency=1, limits_extra=FAST_BACKOFF)
        res = Job.from_toml(job).run()
        assert res.exit_code == 1 and "quota" in res.stop_reason.lower()
        assert res.counts["done"] > 0 and res.counts["pending"] > 0 and res.counts["failed"] == 0
        sent = chat_requests(sim)
        assert sent <= res.counts["done"] + 2  # stopped at once, not one request per remaining row


def test_auth_error_mid_run_stops_with_one_message(make_job, monkeypatch):
    job = make_job(20, concurrency=1, limits_extra=FAST_BACKOFF)
    p = ScriptedProvider("openai:sim", lambda n, r: AuthError("HTTP 401: key revoked") if n > 3
                         else '{"kind": "a", "score": 0.5}')
    with_providers(monkeypatch, [p])
    res = Job.from_toml(job).run()
    assert res.exit_code == 1 and "key revoked" in res.stop_reason
    assert res.counts["done"] == 3 and res.counts["pending"] == 17 and len(p.requests) == 4


def test_budget_cap_stops_dispatch_and_rerun_continues(make_job):
    with Simulator() as sim:
        job = make_job(40, base_url=sim.base_url, concurrency=1, limits_extra=FAST_BACKOFF)
        job.write_text(job.read_text().replace("concurrency = 1", "concurrency = 1\nmax_tokens = 600"))
        res = Job.from_toml(job).run()
        assert res.exit_code == 1 and "limits.max_tokens" in res.stop_reason
        done = res.counts["done"]
        assert 0 < done < 40 and res.prompt_tokens + res.completion_tokens >= 600
        assert chat_requests(sim) == done  # in-flight finished, nothing sent after the cap
        job.write_text(job.read_text().replace("max_tokens = 600", ""))
        res2 = Job.from_toml(job).run()
        assert res2.counts["done"] == 40 and chat_requests(sim) == 40


def test_cost_cap_uses_model_prices(make_job):
    with Simulator() as sim:
        job = make_job(40, base_url=sim.base_url, concurrency=1,
                       model_extra="price_in = 1000.0\nprice_out = 1000.0", limits_extra=FAST_BACKOFF)
        job.write_text(job.read_text().replace("concurrency = 1", "concurrency = 1\nmax_cost_usd = 0.5"))
        res = Job.from_toml(job).run()
        assert "max_cost_usd" in res.stop_reason and res.cost_usd >= 0.5
        assert res.cost_usd == pytest.approx((res.prompt_tokens + res.completion_tokens) * 1000 / 1e6)


def _two_models(job, backup_url: str) -> None:
    text = job.read_text()
    model = text[text.index("[model]"):text.index("[limits]")]
    backup = model.replace('name = "sim"', 'name = "backup"').split("base_url")[0] + f'base_url = "{backup_url}"\n'
    job.write_text(text.replace(model, model.replace("[model]", "[[model]]") + backup.replace("[model]", "[[model]]")))


def test_failover_when_primary_is_down(make_job):
    with Simulator(fail_rate=1.0) as primary, Simulator() as backup:
        job = make_job(30, base_url=primary.base_url, concurrency=4, limits_extra=FAST_BACKOFF)
        _two_models(job, backup.base_url)
        res = Job.from_toml(job).run()
        assert res.counts["done"] == 30
        assert {r["_model"] for r in _rows(res.output_path)} == {"openai:backup"}
        assert chat_requests(backup) == 30
        # the breaker opened: the primary saw far fewer than 30 rows x 10 attempts
        assert chat_requests(primary) < 60


def test_fallback_answer_for_rows_no_model_answers(make_job):
    # 2 rows: 3 identical refusals would be a configuration error that stops the run instead
    with Simulator() as sim:
        job = make_job(2, base_url=sim.base_url, limits_extra=FAST_BACKOFF)
        text = job.read_text().replace('name = "sim"', 'name = "missing-model-x"')
        job.write_text(text.replace('keep = ["name"]', 'keep = ["name"]\nfallback = { kind = "c", score = 0.0 }'))
        res = Job.from_toml(job).run()
        assert res.counts["fallback"] == 2 and res.exit_code == 0
        rows = _rows(res.output_path)
        assert {(r["_status"], r["kind"], r["score"]) for r in rows} == {("fallback", "c", 0.0)}
        assert all("404" in r["_error"] for r in rows)


def test_invalid_fallback_is_a_spec_error(make_job):
    from llmap.errors import SpecError

    job = make_job(1)
    job.write_text(job.read_text().replace('keep = ["name"]', 'keep = ["name"]\nfallback = { kind = "zzz" }'))
    with pytest.raises(SpecError, match="fallback does not match"):
        Job.from_toml(job)


def test_rate_limits_learned_from_headers_pace_the_run(make_job):
    with Simulator(rpm=600, tpm=1_000_000) as sim:  # the job sets no limits
        job = make_job(30, base_url=sim.base_url, concurrency=8, limits_extra=FAST_BACKOFF)
        res = Job.from_toml(job).run()
        assert res.counts["done"] == 30 and sim.stats()["by_status"].get("429", 0) == 0
