"""Live Prometheus metrics: the collector's exposition, the server, and a scrape during a simulator run."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from _support import wait_until
from llmap import Job
from llmap.control.breaker import BreakerState
from llmap.control.lanes import Lane
from llmap.errors import Overloaded, RateLimited, SpecError
from llmap.observe.metrics import RunMetrics, serve_metrics
from llmap.observe.progress import Tally
from llmap.run.stats import DispatchStats
from llmap.sim import Simulator
from llmap.spec import LimitsSpec, ModelSpec


class _Provider:
    max_concurrency = 64

    def __init__(self, label: str) -> None:
        self.label = label


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Exposition text -> {(sample name, labels): value}."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _exposition(metrics: RunMetrics) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    return generate_latest(registry).decode()


def _live_objects():
    stats = DispatchStats(prompt_tokens=1200, completion_tokens=340, cost_usd=0.25, rate_limited=3, retries=5)
    for _ in range(7):
        stats.log("openai:a", None, 0.1, 10, 5, 1)
    for _ in range(3):
        stats.log("openai:a", RateLimited("slow down", status=429), 0.1, 0, 0, 1)
    stats.log("openai:b", Overloaded("busy", status=503), 0.1, 0, 0, 1)
    tally = Tally(total=50, done=20, failed=2, skipped=1, fallback=4, cache_hits=6)
    now = 1000.0
    limits = LimitsSpec(concurrency=8, rpm=600, tpm=90000)
    lane_a = Lane(0, _Provider("openai:a"), ModelSpec(provider="openai", name="a"), limits, clock=lambda: now)
    lane_b = Lane(1, _Provider("openai:b"), ModelSpec(provider="openai", name="b"), LimitsSpec(concurrency=2),
                  clock=lambda: now)
    lane_a.in_flight = 5
    lane_b.probing = False  # mid-run: its first answer came back before the outage
    for _ in range(10):
        lane_b.breaker.record_failure(now)
    return stats, tally, [lane_a, lane_b]


def test_exposition_has_every_family_with_its_labels():
    stats, tally, lanes = _live_objects()
    assert lanes[1].breaker.state_at(1000.0) is BreakerState.OPEN
    text = _exposition(RunMetrics(job="people", stats_fn=lambda: stats, tally_fn=lambda: tally,
                                  lanes_fn=lambda: lanes))
    s = _samples(text)
    job = {"job": "people"}
    for status, n in {"done": 20, "failed": 2, "skipped": 1, "fallback": 4, "pending": 23}.items():
        assert _value(s, "llmap_rows", status=status, **job) == n, status
    assert _value(s, "llmap_rows_total", **job) == 50
    assert _value(s, "llmap_requests_total", model="openai:a", outcome="200", **job) == 7
    assert _value(s, "llmap_requests_total", model="openai:a", outcome="429", **job) == 3
    assert _value(s, "llmap_requests_total", model="openai:b", outcome="503", **job) == 1
    assert "# TYPE llmap_requests_total counter" in text or "# TYPE llmap_requests counter" in text
    assert _value(s, "llmap_tokens_total", kind="prompt", **job) == 1200
    assert _value(s, "llmap_tokens_total", kind="completion", **job) == 340
    assert _value(s, "llmap_cost_usd_total", **job) == 0.25
    assert _value(s, "llmap_cache_hits_total", **job) == 6
    assert _value(s, "llmap_rate_limited_total", **job) == 3
    assert _value(s, "llmap_retries_total", **job) == 5
    assert _value(s, "llmap_in_flight", model="openai:a", **job) == 5
    assert _value(s, "llmap_in_flight", model="openai:b", **job) == 0
    assert _value(s, "llmap_concurrency_limit", model="openai:a", **job) == 8
    assert _value(s, "llmap_concurrency_limit", model="openai:b", **job) == 2
    assert _value(s, "llmap_rpm_limit", model="openai:a", **job) == 600
    assert _value(s, "llmap_tpm_limit", model="openai:a", **job) == 90000
    # no limit known for b: no sample rather than a made-up one
    assert _value(s, "llmap_rpm_limit", model="openai:b", **job) is None
    assert _value(s, "llmap_tpm_limit", model="openai:b", **job) is None
    for model, current in (("openai:a", "closed"), ("openai:b", "open")):
        for state in ("closed", "open", "half_open"):
            assert _value(s, "llmap_breaker_state", model=model, state=state, **job) == (state == current)
    # every sample carries the job label
    assert all(dict(labels).get("job") == "people" for _, labels in s)


def test_scrape_reads_live_objects_and_does_not_move_the_breaker():
    stats, tally, lanes = _live_objects()
    clock = [1000.0]
    lanes[1].breaker.clock = lambda: clock[0]
    changes = []
    lanes[1].breaker.on_change = lambda old, new: changes.append(new)
    metrics = RunMetrics(job="j", stats_fn=lambda: stats, tally_fn=lambda: tally, lanes_fn=lambda: lanes)
    stats.log("openai:a", None, 0.1, 10, 5, 1)
    tally.done += 3
    clock[0] += 60  # past the cooldown: the next call would probe
    s = _samples(_exposition(metrics))
    assert _value(s, "llmap_requests_total", job="j", model="openai:a", outcome="200") == 8
    assert _value(s, "llmap_rows", job="j", status="done") == 23
    assert _value(s, "llmap_rows", job="j", status="pending") == 20
    assert _value(s, "llmap_breaker_state", job="j", model="openai:b", state="half_open") == 1
    assert _value(s, "llmap_breaker_state", job="j", model="openai:b", state="open") == 0
    assert changes == []  # reported as half-open, but the engine's breaker was not touched


def test_before_the_run_starts_families_have_no_samples():
    metrics = RunMetrics(job="j", stats_fn=lambda: None, tally_fn=lambda: None, lanes_fn=lambda: [])
    s = _samples(_exposition(metrics))
    assert not [k for k in s if k[0].startswith("llmap_")]


def _scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return _samples(r.read().decode())


def test_serve_metrics_picks_a_port_and_stop_frees_it():
    stats, tally, lanes = _live_objects()
    metrics = RunMetrics(job="j", stats_fn=lambda: stats, tally_fn=lambda: tally, lanes_fn=lambda: lanes)
    port, stop = serve_metrics(metrics, 0)
    try:
        assert port > 0
        s = _scrape(port)
        assert _value(s, "llmap_rows_total", job="j") == 50
        # only this collector: no process/platform/gc collectors of the global registry
        assert {name for name, _ in s if not name.startswith("llmap_")} == set()
    finally:
        stop()
    stop()  # a second stop is harmless
    with pytest.raises(urllib.error.URLError):
        _scrape(port)
    port2, stop2 = serve_metrics(metrics, port)  # the port is free again
    stop2()
    assert port2 == port


def test_port_in_use_is_a_spec_error_naming_the_fix():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        metrics = RunMetrics(job="j", stats_fn=lambda: None, tally_fn=lambda: None, lanes_fn=lambda: [])
        with pytest.raises(SpecError) as err:
            serve_metrics(metrics, port)
    assert str(err.value) == f"--metrics-port {port} is in use; choose another port"


def test_scraping_during_a_simulator_run_sees_the_counters_move(make_job, monkeypatch):
    import llmap.engine

    live: dict = {}
    run_pool = llmap.engine.run_pool

    async def recording_run_pool(ledger, run_id, dispatcher, stats, tally, progress, **kw):
        live.update(stats=stats, tally=tally, lanes=dispatcher.lanes)
        await run_pool(ledger, run_id, dispatcher, stats, tally, progress, **kw)

    # the engine binds run_pool at import, so patch its name there
    monkeypatch.setattr(llmap.engine, "run_pool", recording_run_pool)
    metrics = RunMetrics(job="people", stats_fn=lambda: live.get("stats"), tally_fn=lambda: live.get("tally"),
                         lanes_fn=lambda: live.get("lanes", []))
    port, stop = serve_metrics(metrics, 0)

    def ok(s):
        return _value(s, "llmap_requests_total", job="people", model="openai:sim", outcome="200") or 0

    def done(s):
        return _value(s, "llmap_rows", job="people", status="done") or 0

    def scrape_until(cond, what: str):
        scrapes = []
        wait_until(lambda: scrapes.append(_scrape(port)) or cond(scrapes[-1]), what, timeout=10, every=0.05)
        return scrapes[-1]

    with Simulator(latency_median=0.05) as sim:
        job_path = make_job(200, base_url=sim.base_url, concurrency=4)
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(res=Job.from_toml(job_path).run()))
        try:
            worker.start()
            first = scrape_until(lambda s: done(s) >= 8, "8 rows are done")
            second = scrape_until(lambda s: done(s) > done(first) and ok(s) > ok(first), "the counters move on")
            mid_run = worker.is_alive()
            worker.join(timeout=20)
            after = _scrape(port)
        finally:
            worker.join(timeout=20)
            stop()
    assert result["res"].exit_code == 0
    assert mid_run, "the run ended before the second scrape"
    assert 0 < ok(first) < ok(second) < ok(after)
    assert ok(after) >= 200  # hedged copies in the tail may add a few
    assert 0 < done(first) < done(second) < done(after) == 200
    assert _value(after, "llmap_rows", job="people", status="pending") == 0
    assert _value(after, "llmap_rows_total", job="people") == 200
    assert _value(second, "llmap_concurrency_limit", job="people", model="openai:sim") == 4
    assert _value(after, "llmap_tokens_total", job="people", kind="prompt") > 0
