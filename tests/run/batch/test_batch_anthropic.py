"""Anthropic Message Batches end to end, and what report, status and estimate say about batch runs."""

from __future__ import annotations

import json
import sqlite3
import urllib.request

import pytest

from _support import FakeTime, job_toml, people, write_csv
from llmap.engine import Job
from llmap.observe.estimate.rows import estimate
from llmap.observe.html import write_html_report
from llmap.observe.report import build_run_summary, model_report
from llmap.sim import Simulator


def claude_job(tmp, sim, n, *, batch="", prompt="", model=""):
    write_csv(tmp / "people.csv", people(n))
    toml = job_toml(sim.url, prompt_extra=prompt,
                    model_extra="batch = true\nprice_in = 3.0\nprice_out = 15.0\n" + model)
    toml = toml.replace('provider = "openai"', 'provider = "anthropic"').replace('name = "sim"', 'name = "claude-sim"')
    job = tmp / "job.toml"
    job.write_text(toml + "[batch]\npoll_s = 0.05\n" + batch)
    return job


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")


def test_an_anthropic_batch_end_to_end_with_a_failure_retried_in_real_time(tmp_path):
    with Simulator(batch_time=0.3, batch_fail_rate=0.2, seed=4, require_key="sk-ant-test") as sim:
        job = claude_job(tmp_path, sim, 15)
        res = Job.from_toml(job).run()
        assert res.exit_code == 0 and res.counts["done"] == 15
        st = sim.stats()
        failed = st["batches"]["failed_lines"]
        assert failed > 0 and st["requests"] == failed  # the errored ones went to /v1/messages
        assert st["batches"]["lines"] == 15 and st["by_model"] == {"claude-sim": failed}
        with sqlite3.connect(tmp_path / ".llmap" / "job.ledger.sqlite") as db:
            provider, pid = db.execute("SELECT provider, provider_id FROM batches").fetchone()
            lines = [c for (c,) in db.execute("SELECT custom_id FROM batch_lines")]
            tag = db.execute("SELECT tag FROM batches").fetchone()[0]
        assert provider == "anthropic" and pid.startswith("msgbatch_")
        assert all(c.startswith(f"{tag}-") and len(c) <= 64 for c in lines)  # the tag is the custom ids' prefix
        # The answers are the forced tool's input, validated like real-time ones.
        req = urllib.request.Request(sim.url + f"/v1/messages/batches/{pid}/results",
                                     headers={"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"})
        with urllib.request.urlopen(req, timeout=10) as r:
            first = json.loads(r.read().splitlines()[0])
        assert first["custom_id"].startswith(tag)


def test_anthropic_packs_in_a_batch(tmp_path):
    with Simulator(batch_time=0.2) as sim:
        res = Job.from_toml(claude_job(tmp_path, sim, 12, prompt="pack = 4")).run()
        assert res.counts["done"] == 12 and sim.stats()["batches"]["lines"] == 3


def test_report_estimate_and_cost_split_by_path(tmp_path):
    with Simulator(batch_time=0.3, batch_window=0.15) as sim:  # half expires: half by batch, half real time
        job = claude_job(tmp_path, sim, 10)
        spec = Job.from_toml(job).spec
        est = estimate(spec)
        assert est.batch_cost_usd == pytest.approx(0.5 * est.cost_usd) and est.batch_cost_usd > 0
        res = Job.from_toml(job).run()
        assert res.counts["done"] == 10
        summary = build_run_summary(spec.ledger_path)
        (nb, cb), (nr, cr) = summary.by_path["batch"], summary.by_path["realtime"]
        assert nb == 10 and nr == 5  # 5 answered + 5 expired lines; 5 rows in real time
        assert cb + cr == pytest.approx(res.cost_usd)
        with sqlite3.connect(spec.ledger_path) as db:
            pt, ct = db.execute("SELECT sum(prompt_tokens), sum(completion_tokens) FROM requests "
                                "WHERE path = 'batch'").fetchone()
        assert cb == pytest.approx(0.5 * (pt * 3.0 + ct * 15.0) / 1e6)
        lines, _ = model_report(spec)
        assert lines[0].cost_usd == pytest.approx(res.cost_usd, rel=0.05)  # batch rows at their batch price
        write_html_report(spec.ledger_path, tmp_path / "r.html")
        assert "Requests (cost) by path" in (tmp_path / "r.html").read_text()


def test_find_by_time_and_size_waits_while_several_batches_could_be_it(tmp_path):
    import asyncio
    import time

    from llmap.providers.anthropic import AnthropicProvider
    from llmap.providers.base import Request
    from llmap.providers.batch.anthropic import AnthropicBatches
    from llmap.spec import ModelSpec

    async def go(sim):
        api = AnthropicBatches(AnthropicProvider(ModelSpec(provider="anthropic", name="claude-sim", base_url=sim.url)))
        try:
            def lines(tag):
                return [api.line(f"{tag}-{i}", Request([{"role": "user", "content": f"{tag} {i}"}], None, 0.0, 16))
                        for i in range(3)]

            t0 = time.time()
            mine = await api.create("lmmine", lines("lmmine"), job="j")
            other = await api.create("lmother", lines("lmother"), job="j")  # another client's, same size, same time
            assert (await api.find("lmmine", created_at=t0, requests=3, known=set())).maybe
            one = await api.find("lmmine", created_at=t0, requests=3, known={other.provider_id})
            assert one.state is not None and one.state.provider_id == mine.provider_id  # one left: taken
            assert (await api.find("lmmine", created_at=t0, requests=4, known=set())).state is None  # size differs
            clock.advance(0.35)  # past batch_time (0.3 s): both ended, the custom ids' tag decides
            ended = await api.find("lmmine", created_at=t0, requests=3, known=set())
            assert ended.state is not None and ended.state.provider_id == mine.provider_id and not ended.maybe
        finally:
            await api.provider.aclose()

    clock = FakeTime()  # the simulator's batches move on only when the test moves this clock
    with Simulator(batch_time=0.3, clock=clock.clock, sleep=clock.sleep) as sim:
        asyncio.run(go(sim))
