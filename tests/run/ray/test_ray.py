"""The Ray executor on a two-node Ray cluster on this machine (marker ``ray``; deselect with -m 'not ray').

One cluster (``ray.cluster_utils.Cluster``: two nodes of one CPU each) serves the whole module,
so the Ray start-up (about 15 s here) is paid once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from _support import LLMAP, await_until, job_toml, people, write_csv
from llmap import Job
from llmap.sim import Simulator

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    from llmap.run.ray.launch import _nodes

    deadline = time.monotonic() + 60  # registered is not yet schedulable: wait until both nodes offer their CPU
    while (len(_nodes()) < 2 or ray.available_resources().get("CPU", 0) < 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    yield c
    ray.shutdown()
    c.shutdown()


def _job(tmp_path: Path, base_url: str, n: int, *, limits: str = "", **kw) -> Path:
    write_csv(tmp_path / "people.csv", people(n))
    job = tmp_path / "job.toml"
    job.write_text(job_toml(base_url, **kw) + limits, encoding="utf-8")  # [limits] is the last table
    return job


def _ledger_rows(tmp_path: Path) -> list[tuple]:
    (path,) = (tmp_path / ".llmap").glob("*.ledger.sqlite")
    with sqlite3.connect(path) as db:
        return db.execute("SELECT key, status, attempts FROM rows ORDER BY key").fetchall()


def _workers() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("llmap-worker-")]


def test_every_row_exactly_once_across_four_workers(cluster, tmp_path, monkeypatch):
    monkeypatch.setattr("llmap.run.ray.executor.LEASE_ROWS", 25)  # 300 rows: a dozen leases over four workers
    from llmap.run.ray.executor import RayExecutor

    nodes = set()
    real = RayExecutor.aclose

    async def aclose(self):  # every worker placed, whether it started first or joined later
        handles = [*self.workers.values(), *(h for h, _ in self.joining.values())]
        nodes.update([await h.node.remote() for h in handles])
        await real(self)

    monkeypatch.setattr(RayExecutor, "aclose", aclose)
    with Simulator(latency_median=0.02) as sim:
        job = _job(tmp_path, sim.base_url, 300, concurrency=16, limits="hedge_tail = false\n")  # no tail copies
        result = Job.from_toml(job).run(executor="ray", workers=4)
        sent = sim.stats()["requests"]
    rows = _ledger_rows(tmp_path)
    assert result.counts["done"] == 300 and result.exit_code == 0
    assert sent == result.requests == 300
    assert [r[1:] for r in rows] == [("done", 1)] * 300
    assert len(nodes) == 2  # the workers are spread over both nodes


def test_the_driver_answers_in_run_duplicates_itself(cluster, tmp_path):
    with Simulator(latency_median=0.05) as sim:
        job = _job(tmp_path, sim.base_url, 60, user="City: {{ city }}.", limits="hedge_tail = false\n")
        result = Job.from_toml(job).run(executor="ray", workers=2)
        sent = sim.stats()["requests"]
    assert result.counts["done"] == 60
    assert sent == 3  # three distinct requests: the other 57 rows wait for them on the driver


def test_a_duplicate_row_is_leased_and_sent_once_even_pages_apart(cluster, tmp_path, monkeypatch):
    """Rows with one input hash: one row goes to a worker, once; the others never leave the driver, whether
    their leader is still being answered or settled pages before (the response cache off: no help there)."""
    from llmap.run.ray.leases import LeaseBook

    monkeypatch.setattr("llmap.run.remote.PAGE_ROWS", 16)  # 200 rows: 13 pages; duplicates 100 rows apart,
    monkeypatch.setattr("llmap.run.ray.executor.LEASE_ROWS", 8)  # and the driver holds fewer rows than that
    leased: list[str] = []
    real = LeaseBook.grant

    def grant(self, worker, keys, now):
        keys = list(keys)
        leased.extend(keys)
        return real(self, worker, keys, now)

    monkeypatch.setattr(LeaseBook, "grant", grant)
    rows = people(100) + [{**r, "id": f"dup{i:03d}"} for i, r in enumerate(people(100))]
    write_csv(tmp_path / "people.csv", rows)
    with Simulator(latency_median=0.01) as sim:
        (tmp_path / "job.toml").write_text(job_toml(sim.base_url) + "hedge_tail = false\n[cache]\nenabled = false\n",
                                           encoding="utf-8")
        result = Job.from_toml(tmp_path / "job.toml").run(executor="ray", workers=2)
        sent = sim.stats()["requests"]
    assert result.counts["done"] == 200
    assert sent == 100 and sorted(leased) == sorted(r["id"] for r in people(100))
    (path,) = (tmp_path / ".llmap").glob("*.ledger.sqlite")
    with sqlite3.connect(path) as db:
        dup = db.execute("SELECT count(*), sum(attempts) FROM rows WHERE key LIKE 'dup%' AND source = 'cache'")
        assert dup.fetchone() == (100, 0)
        assert db.execute("SELECT cached FROM runs").fetchone()[0] == 100


def test_the_workers_look_up_and_write_the_response_cache(cluster, tmp_path, monkeypatch):
    """The driver never opens the response cache: the workers answer its hits and write their answers to it."""
    from llmap.store.cache import ResponseCache

    def no_cache_here(*a, **kw):
        raise AssertionError("the driver opened the response cache")

    monkeypatch.setattr("llmap.engine.ResponseCache", no_cache_here)
    cache_file = tmp_path / "llmap-cache" / "responses.sqlite"  # LLMAP_CACHE_DIR (tests/conftest.py)
    with Simulator(latency_median=0.01) as sim:
        job = _job(tmp_path, sim.base_url, 40, limits="hedge_tail = false\n")
        first = Job.from_toml(job).run(executor="ray", workers=2)
        assert first.counts["done"] == 40 and sim.stats()["requests"] == 40
        with ResponseCache(cache_file) as cache:
            assert cache.stats().entries == 40 and cache.stats().hits == 0  # written by the workers
        second = Job.from_toml(job).run(executor="ray", workers=2, fresh=True)
        sent = sim.stats()["requests"] - 40
    assert second.counts["done"] == 40 and sent == 0
    with ResponseCache(cache_file) as cache:
        assert cache.stats().hits == 40  # each hit counted once, by the worker that served it
    (path,) = (tmp_path / ".llmap").glob("*.ledger.sqlite")
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT cached FROM runs ORDER BY id DESC").fetchone()[0] == 40
        assert {s for (s,) in db.execute("SELECT DISTINCT source FROM rows")} == {"cache"}


def test_a_stored_answer_that_escalates_goes_on_as_a_cascade_in_the_worker(cluster, tmp_path):
    """A cache hit that meets escalate_if is not the row's answer: the worker takes it on to the next model."""
    with Simulator(latency_median=0.01) as sim:
        job = _job(tmp_path, sim.base_url, 30, limits="hedge_tail = false\n")
        text = job.read_text()
        model = text[text.index("[model]"):text.index("[limits]")]
        cheap = model.replace("[model]", "[[model]]") + 'escalate_if = "score < 0.5"\n'
        strong = model.replace("[model]", "[[model]]").replace('name = "sim"', 'name = "strong"')
        job.write_text(text.replace(model, cheap + strong))
        first = Job.from_toml(job).run(executor="ray", workers=2)
        (path,) = (tmp_path / ".llmap").glob("*.ledger.sqlite")
        with sqlite3.connect(path) as db:
            escalated = {k for (k,) in db.execute("SELECT key FROM attempts WHERE outcome = 'escalated'")}
            before = dict(db.execute("SELECT key, output FROM rows"))
        sent = sim.stats()["requests"]
        second = Job.from_toml(job).run(executor="ray", workers=2, fresh=True)
        again = sim.stats()["requests"] - sent
    assert first.counts["done"] == second.counts["done"] == 30 and 0 < len(escalated) < 30
    assert again == len(escalated)  # the strong model's answers are not looked up first (README: not guaranteed)
    with sqlite3.connect(path) as db:
        run = db.execute("SELECT max(id) FROM runs").fetchone()[0]
        tried = db.execute("SELECT key, model, outcome FROM attempts WHERE run = ? ORDER BY id", (run,)).fetchall()
        after = dict(db.execute("SELECT key, output FROM rows"))
    assert after == before  # the same answers, the cheap model's from the cache
    cascaded = {k for k, m, o in tried if m == "openai:strong"}
    assert cascaded == escalated
    assert all((k, "openai:sim", "cache") in tried for k in escalated)


def test_a_worker_crashing_mid_lease_still_settles_every_row_exactly_once(cluster, tmp_path, monkeypatch):
    monkeypatch.setattr("llmap.run.ray.executor.LEASE_ROWS", 15)
    with Simulator(latency_median=0.2) as sim:
        job = Job.from_toml(_job(tmp_path, sim.base_url, 240, concurrency=16, limits="hedge_tail = false\n"))
        out: dict = {}
        t = threading.Thread(target=lambda: out.setdefault("r", job.run(executor="ray", workers=3)))
        t.start()
        deadline = time.monotonic() + 60
        while (sim.stats()["requests"] < 40 or len(_workers()) < 3) and time.monotonic() < deadline:
            time.sleep(0.05)
        victim = ray.get_actor(sorted(_workers())[0], namespace="llmap")
        pid = ray.get(victim.__ray_call__.remote(lambda self: os.getpid()))
        os.kill(pid, signal.SIGKILL)  # the worker's process dies with leases half settled
        t.join(120)
        sent = sim.stats()["requests"]
    result = out["r"]
    assert result.counts["done"] == 240 and result.counts["pending"] == 0
    (path,) = (tmp_path / ".llmap").glob("*.ledger.sqlite")
    with sqlite3.connect(path) as db:
        committed = db.execute("SELECT key, count(*) FROM attempts GROUP BY key").fetchall()
        assert len(committed) == 240 and {n for _, n in committed} == {1}  # each row committed once
        assert [s for (s,) in db.execute("SELECT status FROM rows")] == ["done"] * 240
    assert sent > 240  # the dead worker's rows in flight were sent again, and still committed once


def test_killing_a_worker_mid_run_hands_its_rows_to_the_others(cluster, tmp_path, monkeypatch):
    monkeypatch.setattr("llmap.run.ray.executor.LEASE_ROWS", 20)
    with Simulator(latency_median=0.2) as sim:
        job = Job.from_toml(_job(tmp_path, sim.base_url, 240, concurrency=16))
        out: dict = {}
        t = threading.Thread(target=lambda: out.setdefault("r", job.run(executor="ray", workers=4)))
        t.start()
        deadline = time.monotonic() + 60
        while (sim.stats()["requests"] < 30 or len(_workers()) < 4) and time.monotonic() < deadline:
            time.sleep(0.05)
        victim = sorted(_workers())[0]
        ray.kill(ray.get_actor(victim, namespace="llmap"))
        t.join(120)
    result = out["r"]
    assert result.counts["done"] == 240 and result.counts["pending"] == 0
    assert [r[1] for r in _ledger_rows(tmp_path)] == ["done"] * 240


def test_sigkill_of_the_driver_then_a_rerun_finishes_the_job(cluster, tmp_path):
    with Simulator(latency_median=0.1) as sim:
        job = _job(tmp_path, sim.base_url, 300, concurrency=8)
        cmd = [*LLMAP, "run", str(job), "-q", "--executor", "ray", "--workers", "2",
               "--ray-address", cluster.address]
        env = {**os.environ, "LLMAP_CACHE_DIR": str(tmp_path / "cache")}
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 90
        done = 0
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            try:
                done = sum(1 for r in _ledger_rows(tmp_path) if r[1] == "done")
            except (ValueError, sqlite3.Error):
                continue
            if done >= 40:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        rows = _ledger_rows(tmp_path)
        pending = sum(1 for r in rows if r[1] == "pending")
        assert 0 < pending < 300
        before, quiet_since = sim.stats()["requests"], time.monotonic()
        while time.monotonic() - quiet_since < 1.0 and time.monotonic() < deadline + 30:  # the killed run's
            time.sleep(0.1)  # workers end with it; requests they had in flight land first
            now = sim.stats()["requests"]
            if now != before:
                before, quiet_since = now, time.monotonic()
        rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert rerun.returncode == 0, rerun.stderr
        sent = sim.stats()["requests"] - before
    assert [r[1] for r in _ledger_rows(tmp_path)] == ["done"] * 300
    # The rerun sent only rows left pending: all of them, but those whose answers the killed run's workers had
    # written to the response cache before the driver committed them (found there, not paid for again).
    (path,) = (tmp_path / ".llmap").glob("*.ledger.sqlite")
    with sqlite3.connect(path) as db:
        run = db.execute("SELECT max(id) FROM runs").fetchone()[0]
        from_cache = db.execute("SELECT count(*) FROM attempts WHERE run = ? AND outcome = 'cache'", (run,)).fetchone()
    assert sent + from_cache[0] == pending and sent <= pending


def test_four_workers_hold_one_rpm_budget(cluster, tmp_path, monkeypatch):
    monkeypatch.setattr("llmap.run.ray.executor.LEASE_ROWS", 5)  # every worker gets rows
    with Simulator(latency_median=0.01) as sim:
        job = _job(tmp_path, sim.base_url, 40, concurrency=16, model_extra="rpm = 600")  # 10 requests/s
        result = Job.from_toml(job).run(executor="ray", workers=4)
    (path,) = (tmp_path / ".llmap").glob("*.ledger.sqlite")
    with sqlite3.connect(path) as db:
        times = [t for (t,) in db.execute("SELECT t FROM requests ORDER BY t")]
    assert result.counts["done"] == 40 and len(times) == 40
    # One budget: a second's worth (10) at once, then 10/s: 30 more take >= 3 s. Four budgets: 0.75 s.
    assert times[-1] - times[0] >= 2.7


def test_a_retry_after_seen_by_one_worker_pauses_every_worker(cluster):
    from llmap.plan import spec_from_dict
    from llmap.run.ray.budget import BudgetLink, budget_actor

    spec = spec_from_dict({"input": {"sql": "SELECT 1 AS x"}, "prompt": {"user": "{{ x }}"},
                           "output": {"path": "out.parquet", "fields": {"y": {"type": "string"}}},
                           "model": {"provider": "openai", "name": "pause-test", "base_url": "http://127.0.0.1:9"},
                           "limits": {"rpm": 60000}},
                          base_dir=Path.cwd(), name="pause-test")
    actor = budget_actor(spec, workers=2, name=f"pause-test-{os.getpid()}")

    async def scenario() -> float:
        a, b = (BudgetLink(w, 0, sync=actor.sync.remote, watch=actor.watch.remote) for w in ("a", "b"))
        await a.start()
        await b.start()
        await b.acquire(10)  # b holds a grant of its own now
        a.pause_for(2.0)  # a 429 with Retry-After: 2 on worker a
        t0 = time.monotonic()
        await await_until(lambda: b.view.paused_s > 0, "b's watch hears of a's pause", 5)
        await b.acquire(10)
        waited = time.monotonic() - t0
        await a.aclose()
        await b.aclose()
        return waited

    waited = asyncio.run(scenario())
    limits = ray.get(actor.limits.remote(0))
    ray.kill(actor)
    assert 1.2 <= waited <= 5.0  # the 2 s pause, heard by b; the upper bound leaves room for a loaded CI machine
    assert limits["rpm"] == 60000


def test_map_batches_returns_status_columns_and_never_crashes_a_task(cluster, tmp_path):
    import llmap.ray as lray

    rows = [{"id": i, "name": f"Person {i}", "city": "Cody"} for i in range(40)]
    rows[3]["name"] = "x" * 100  # too long for the server: a 400 for this row alone
    with Simulator(latency_median=0.01, context_chars=60) as sim:
        ds = ray.data.from_items(rows)
        out = lray.map_batches(ds, prompt="Name: {{ name }}; city: {{ city }}.",
                               fields={"kind": {"type": "string", "enum": ["a", "b", "c"]}},
                               model={"provider": "openai", "name": "sim", "base_url": sim.base_url,
                                      "max_tokens": 32}, concurrency=2, batch_size=10)
        got = sorted(out.take_all(), key=lambda r: r["id"])
    assert len(got) == 40
    assert {r["_status"] for r in got if r["id"] != 3} == {"done"}
    assert got[3]["_status"] == "failed" and got[3]["_error"]
    assert all(r["kind"] in ("a", "b", "c") for r in got if r["_status"] == "done")
    assert json.dumps(got[0], default=str)


def test_real_time_batch_and_ray_write_identical_output_files(cluster, tmp_path, monkeypatch):
    """The three ways of settling rows share the settle stage: one job, three executors, one output file."""
    rows = people(30) + [{**r, "id": f"dup{i}"} for i, r in enumerate(people(30)[:6])]  # in-run duplicates
    outputs = {}
    with Simulator(batch_time=0.2) as sim:
        for how in ("realtime", "batch", "ray"):
            folder = tmp_path / how
            folder.mkdir()
            monkeypatch.setenv("LLMAP_CACHE_DIR", str(folder / "cache"))  # no answer carried over between them
            write_csv(folder / "people.csv", rows)
            toml = job_toml(sim.base_url, output="out/result.jsonl", keep='["name", "city"]',
                            model_extra="batch = true\n" if how == "batch" else "")
            batch = "[batch]\npoll_s = 0.05\n" if how == "batch" else ""
            (folder / "job.toml").write_text(toml + "hedge_tail = false\n" + batch, encoding="utf-8")
            res = Job.from_toml(folder / "job.toml").run(executor="ray" if how == "ray" else "local",
                                                         workers=2 if how == "ray" else None)
            assert res.exit_code == 0 and res.counts["done"] == 36, how
            assert res.requests == 30, how  # each unique request once, whatever the executor
            outputs[how] = (folder / "out" / "result.jsonl").read_bytes()
    assert outputs["realtime"] == outputs["batch"] == outputs["ray"]
    sources = [json.loads(line)["_source"] for line in outputs["realtime"].splitlines()]
    assert sources.count("cache") == 6 and sources.count("model") == 30
