"""The worker pool end to end against the simulator: per-row failures, supervision, dedup with packs,
batched cache lookups, clean shutdown (issue 9's review defects; each test failed before its fix)."""

from __future__ import annotations

import asyncio
import sqlite3

import pyarrow.parquet as pq
import pytest

from _support import await_until, chat_requests, people, write_csv
from llmap import Job
from llmap.store.answers import AnswerCache
from llmap.store.cache import CacheEntry, ResponseCache


def _rows(path):
    return pq.read_table(path).to_pylist()


def _packed(job, n):
    job.write_text(job.read_text().replace("[output]", f"pack = {n}\n\n[output]"))


def test_a_template_error_fails_that_row_and_the_run_goes_on(make_job, sim, tmp_path):
    job = make_job(user="{{ name.upper() }} from {{ city }}", concurrency=4)
    rows = people(20)
    for r in rows[:12]:
        r["name"] = ""  # read back as NULL by DuckDB
    write_csv(tmp_path / "people.csv", rows)
    res = Job.from_toml(job).run()
    assert res.counts["failed"] == 12 and res.counts["done"] == 8
    assert chat_requests(sim) == 8
    failed = [r for r in _rows(res.output_path) if r["_status"] == "failed"]
    assert all("has no attribute 'upper'" in r["_error"] and "NULL in this row: name" in r["_error"] for r in failed)


def test_a_template_that_fails_on_every_row_the_same_way_stops_the_run(make_job, sim):
    job = make_job(30, user="{{ name.missing_method() }}", concurrency=2)
    res = Job.from_toml(job).run()
    assert res.exit_code == 1 and "fails the same way on every row" in res.stop_reason
    assert res.counts["failed"] <= 4 and chat_requests(sim) == 0  # the rest stay pending


def test_a_dead_helper_task_stops_the_run_with_its_error(make_job, sim, monkeypatch):
    job = make_job(40, concurrency=2)
    sim.reconfigure(latency_median=0.05)

    async def broken_watchdog(self):
        await await_until(lambda: self.stats.requests > 0, "the run has sent a request")  # dies mid-run
        raise RuntimeError("simulated: the timeout watchdog died")

    monkeypatch.setattr("llmap.run.dispatch.Dispatcher.watchdog", broken_watchdog)
    with pytest.raises(RuntimeError, match="watchdog died"):
        asyncio.run(asyncio.wait_for(Job.from_toml(job).arun(), timeout=30))
    assert chat_requests(sim) < 40  # stopped early, not after every row


def test_duplicates_inside_packs_are_sent_once(make_job, sim, tmp_path):
    """40 rows with 10 unique inputs at pack = 10: one request carrying 10 items."""
    job = make_job(1, concurrency=4)
    base = people(10)
    write_csv(tmp_path / "people.csv", [{**base[i % 10], "id": f"d{i:04d}"} for i in range(40)])
    _packed(job, 10)
    res = Job.from_toml(job).run()
    assert res.counts["done"] == 40
    assert chat_requests(sim) == 1
    out = _rows(res.output_path)
    assert sum(r["_source"] == "cache" for r in out) == 30
    answers = {}
    for r in out:  # every duplicate got its twin's answer
        answers.setdefault(r["name"], set()).add((r["kind"], r["score"]))
    assert all(len(v) == 1 for v in answers.values())
    with sqlite3.connect(job.parent / ".llmap" / "job.ledger.sqlite") as db:
        assert db.execute("SELECT cached FROM runs").fetchone()[0] == 30


def test_estimate_counts_packed_duplicates_like_the_run(make_job, sim, tmp_path):
    from llmap.observe.estimate.rows import estimate

    job = make_job(1)
    base = people(25)
    write_csv(tmp_path / "people.csv", [{**base[i % 25], "id": f"d{i:04d}"} for i in range(100)])
    _packed(job, 10)
    est = estimate(Job.from_toml(job).spec)
    res = Job.from_toml(job).run()
    assert est.requests == 3 == chat_requests(sim)  # ceil(25 unique / 10)
    assert res.counts["done"] == 100


def test_a_pack_error_unrelated_to_the_pack_is_not_bisected(make_job, sim):
    """A 404 costs one request per pack, not 2N - 1: the rows fail with the server's words."""
    job = make_job(10, concurrency=1)
    job.write_text(job.read_text().replace('name = "sim"', 'name = "missing-model-x"'))
    _packed(job, 10)
    res = Job.from_toml(job).run()
    assert res.counts["failed"] == 10
    assert chat_requests(sim) == 1
    assert all("does not exist" in r["_error"] for r in _rows(res.output_path))


def test_a_context_length_error_is_bisected(make_job, sim):
    job = make_job(8, concurrency=1)
    sim.reconfigure(context_chars=400)  # a pack of 8 rows is too long (~520 chars); packs of 4 fit (~330)
    _packed(job, 8)
    res = Job.from_toml(job).run()
    assert res.counts["done"] == 8
    assert chat_requests(sim) == 3  # 1 pack of 8 (too long), then 2 packs of 4


def test_nothing_of_the_run_is_left_running_when_arun_returns(make_job, sim):
    job = make_job(300, concurrency=8)
    sim.reconfigure(drop_item_rate=0.5, latency_median=0.05, seed=3)  # damaged packs: regroup timers, tasks
    _packed(job, 10)

    async def main():
        run = asyncio.create_task(Job.from_toml(job).arun())
        # mid-run: packs are in flight, and those that came back damaged leave rows waiting to be regrouped
        await await_until(lambda: chat_requests(sim) >= 4, "four packs are sent")
        run.cancel()
        with pytest.raises(BaseException):  # noqa: B017 - RunInterrupted or CancelledError
            await run
        for _ in range(3):
            await asyncio.sleep(0)
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        loop = asyncio.get_running_loop()
        timers = [h for h in loop._scheduled if not h.cancelled()]  # noqa: SLF001 - the test's point
        return others, timers

    others, timers = asyncio.run(main())
    assert others == []
    assert timers == []


def test_a_closed_provider_does_not_reopen_its_session(make_job, sim):
    from llmap.errors import ProviderError
    from llmap.providers.base import Request
    from llmap.providers.openai import OpenAIProvider
    from llmap.spec import ModelSpec

    async def main():
        p = OpenAIProvider(ModelSpec(provider="openai", name="sim", base_url=sim.base_url))
        req = Request([{"role": "user", "content": "hi"}], None, 0, 16)
        await p.complete(req)
        await p.aclose()
        with pytest.raises(ProviderError, match="closed"):
            await p.complete(req)
        return p.http._session  # noqa: SLF001 - the test is about this

    assert asyncio.run(main()) is None


def test_cache_hits_are_looked_up_a_page_at_a_time(make_job, sim, tmp_path, monkeypatch):
    job = make_job(1200, concurrency=16)
    Job.from_toml(job).run()
    assert chat_requests(sim) == 1200
    queries: list[int] = []
    get_many = ResponseCache.get_many

    def counting(self, keys, **kw):
        keys = list(keys)
        queries.append(len(keys))
        return get_many(self, keys, **kw)

    monkeypatch.setattr(ResponseCache, "get_many", counting)
    res = Job.from_toml(job).run(fresh=True)
    assert res.counts["done"] == 1200 and chat_requests(sim) == 1200
    assert len(queries) <= 4  # 1,200 rows in pages of 512, not one query per row
    with sqlite3.connect(tmp_path / "llmap-cache" / "responses.sqlite") as db:
        assert db.execute("SELECT sum(hits) FROM responses").fetchone()[0] == 1200


async def test_a_busy_cache_file_defers_writes_instead_of_blocking(tmp_path):
    cache = ResponseCache(tmp_path / "c.sqlite")
    answers = AnswerCache(cache)
    answers.lead("k1")
    answers.resolve("k1", CacheEntry("k1", "m", {"a": 1}))
    other = sqlite3.connect(tmp_path / "c.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writing
    try:
        assert answers.flush() == 0  # deferred at once, not after a 10 s busy wait
        assert answers.peek("k1") is not None  # still answered from memory
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert answers.flush() == 1
    assert cache.get_many(["k1"])["k1"].output == {"a": 1}
    cache.close()


def test_a_request_that_fails_twice_fails_its_waiting_duplicates_unsent(make_job, sim, tmp_path):
    job = make_job(1, concurrency=1)
    job.write_text(job.read_text().replace('name = "sim"', 'name = "bad-request-x"'))
    base = people(1)
    write_csv(tmp_path / "people.csv", [{**base[0], "id": f"d{i:04d}"} for i in range(6)])
    res = Job.from_toml(job).run()
    assert res.counts["failed"] == 6
    assert chat_requests(sim) == 2  # the first row, then one that took over; the other four wait and share it
    errors = [r["_error"] for r in _rows(res.output_path)]
    assert sum("failed twice" in e for e in errors) == 4
