"""The pool's remote mode (RemotePool) in this process: what the Ray driver does, without a Ray cluster.

A fake :class:`~llmap.run.remote.RemoteRows` stands in for the Ray executor: it settles the rows it
is handed with the shared steps, as a Ray worker does, and records which rows it was handed.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from types import SimpleNamespace

import pytest

from _support import people, write_csv
from llmap import Job
from llmap.observe.progress import NullProgress, Tally
from llmap.run.remote import RemotePool
from llmap.run.rows import PendingRow, RowSteps
from llmap.run.stats import DispatchStats
from llmap.store.answers import AnswerCache
from llmap.store.ledger import Encoded, Ledger, PlannedRow, RowResult

pytest.importorskip("ray")  # --executor ray is checked for Ray before anything runs; no cluster is started here


class FakeRemote:
    """Settles each list of rows here with :class:`RowSteps` (render, key, solve); ``fail(key)`` may fail a row."""

    queue_items = 2

    def __init__(self, dispatcher, fail=None) -> None:
        self.steps = RowSteps(dispatcher)
        self.fail = fail or (lambda key: None)
        self.handed: list[str] = []
        self.workers = {"fake": None}
        self.size = 1

    async def run(self, todo, settle) -> None:
        while (rows := await todo.get()) is not None:
            self.handed += [r.key for r in rows]
            ready, failed = self.steps.prepare([PendingRow(r.key, r.data) for r in rows], look_ahead=False,
                                               keyed=True)
            results = {res.key: res for res, _ in failed}
            for r, res in zip(ready, await asyncio.gather(*(self.steps.solve([r]) for r in ready)), strict=True):
                error = self.fail(r.key)
                results[r.key] = RowResult(r.key, "failed", error=error) if error else res[0]
            settle(Encoded.of([results[r.key] for r in rows]), rows, [res.key for res, _ in failed])

    async def aclose(self) -> None:
        return None


@pytest.fixture
def remote(monkeypatch):
    """Run ``executor="ray"`` jobs on a :class:`FakeRemote`; returns the list of remotes made (set ``.fail``)."""
    made: list[FakeRemote] = []
    options = SimpleNamespace(fail=None)

    class FakeLaunch:
        def __init__(self, spec, *, workers, address="auto") -> None:
            pass

        async def executor(self, dispatcher, stats):
            made.append(FakeRemote(dispatcher, options.fail))
            return made[-1]

        async def abandon(self) -> None:
            return None

    monkeypatch.setattr("llmap.run.ray.launch.Launch", FakeLaunch)
    return SimpleNamespace(made=made, options=options)


def _ledger(folder):
    (path,) = (folder / ".llmap").glob("*.ledger.sqlite")
    return sqlite3.connect(path)


def test_each_input_is_handed_out_once_and_the_output_equals_a_local_runs(remote, sim, tmp_path):
    rows = people(60)
    outputs = {}
    for how in ("local", "remote"):
        folder = tmp_path / how
        folder.mkdir()
        write_csv(folder / "people.csv", rows)
        from _support import job_toml

        (folder / "job.toml").write_text(job_toml(sim.base_url, user="City: {{ city }}.", output="out/r.jsonl")
                                         + "hedge_tail = false\n", encoding="utf-8")
        before = sim.stats()["requests"]
        res = Job.from_toml(folder / "job.toml").run(executor="ray" if how == "remote" else "local")
        assert res.counts["done"] == 60 and sim.stats()["requests"] - before == 3, how
        outputs[how] = (folder / "out" / "r.jsonl").read_bytes()
        with _ledger(folder) as db:
            assert db.execute("SELECT cached FROM runs").fetchone()[0] == 57, how
            assert db.execute("SELECT count(*) FROM attempts").fetchone()[0] == 60, how
    (fake,) = remote.made
    assert len(fake.handed) == 3  # one row per input: the 57 identical rows never left the driver
    assert outputs["local"] == outputs["remote"]
    sources = [json.loads(line)["_source"] for line in outputs["remote"].splitlines()]
    assert sources.count("cache") == 57 and sources.count("model") == 3


def test_a_failed_leader_hands_its_request_to_one_identical_row(remote, make_job, sim):
    job = make_job(12, user="City: {{ city }}.")  # 3 inputs, 4 rows each
    first = {"p0000"}  # the leader of Laramie fails; the next Laramie row takes over and is answered
    remote.options.fail = lambda key: "simulated: 500" if key in first else None
    res = Job.from_toml(job).run(executor="ray")
    assert res.counts == {"pending": 0, "done": 11, "failed": 1, "skipped": 0, "fallback": 0}
    (fake,) = remote.made
    assert fake.handed == ["p0000", "p0001", "p0002", "p0003"]  # three leaders, then one promoted row


def test_an_input_whose_request_fails_twice_fails_the_rest_unsent(remote, make_job, sim):
    job = make_job(12, user="City: {{ city }}.")
    remote.options.fail = lambda key: "simulated: 500" if key in ("p0000", "p0003") else None
    res = Job.from_toml(job).run(executor="ray")
    assert res.counts["failed"] == 4 and res.counts["done"] == 8
    (fake,) = remote.made
    assert len(fake.handed) == 4
    with _ledger(job.parent) as db:
        errors = [e for (e,) in db.execute("SELECT error FROM rows WHERE status = 'failed' ORDER BY key")]
    assert errors[:2] == ["simulated: 500"] * 2
    assert errors[2:] == ["an identical row's request failed twice: simulated: 500"] * 2


def test_a_template_error_fails_the_identical_rows_alike_unsent(remote, make_job, sim, tmp_path):
    job = make_job(user="{{ name.upper() }} from {{ city }}")
    rows = people(20)
    for r in rows:
        r["name"] = ""  # read back as NULL by DuckDB: every row fails on its own values
        r["city"] = "Cody"
    write_csv(tmp_path / "people.csv", rows)
    res = Job.from_toml(job).run(executor="ray")
    assert res.counts["failed"] == 20 and sim.stats()["requests"] == 0
    (fake,) = remote.made
    assert len(fake.handed) == 1  # one input: one row rendered, its error given to the 19 others
    with _ledger(tmp_path) as db:
        errors = {e for (e,) in db.execute("SELECT error FROM rows")}
    assert len(errors) == 1 and "has no attribute 'upper'" in errors.pop()


def test_quotas_per_group_hold_in_remote_mode(remote, make_job, sim):
    job = make_job(30)
    job.write_text(job.read_text().replace('key = "id"', 'key = "id"\nper_group = { column = "city", n = 2 }'))
    res = Job.from_toml(job).run(executor="ray")
    assert res.counts["done"] == 6 and res.counts["skipped"] == 24
    assert len(remote.made[0].handed) == 6


# -- the driver's bookkeeping, step by step -------------------------------------------------------------------
def _pool(tmp_path, *, escalate_if=(None,)):
    ledger = Ledger(tmp_path / "l.sqlite")
    run_id = ledger.start_run("fp")
    ledger.plan(run_id, [PlannedRow(f"k{i}", i, "same" if i < 3 else f"h{i}", "{}") for i in range(5)])
    lane = SimpleNamespace(max_in_flight=4, label="openai:sim", in_flight=0, limit=4)
    dispatcher = SimpleNamespace(answers=AnswerCache(None), lanes=[lane],
                                 settler=SimpleNamespace(escalate_if=list(escalate_if)))
    pool = RemotePool(ledger, run_id, dispatcher, DispatchStats(), Tally(total=5), NullProgress(),
                      remote=SimpleNamespace(queue_items=8))
    rows = [PendingRow(key, data, None, None, None, None, False, h)
            for _, key, data, h in ledger.pending(run_id, after_seq=-1, limit=10, hashes=True)]
    return pool, ledger, rows


def _done(key, output=None):
    output = output or {"kind": "a"}
    return RowResult(key, "done", output, None, 1, 10, 2, 0.1, "openai:sim", "model",
                     [("openai:sim", "done", output, 10, 2)])


def _status(ledger):
    return ledger.connection.execute("SELECT key, status, source, output FROM rows ORDER BY key").fetchall()


def test_rows_paged_after_their_leader_settled_are_answered_from_memory(tmp_path):
    async def scenario():
        pool, ledger, rows = _pool(tmp_path)
        await pool.take_page(rows[:1])  # k0 leads input "same"
        assert pool.todo.get_nowait() == [rows[0]]
        pool.settle_encoded(Encoded.of([_done("k0")]), [rows[0]])
        await pool.take_page(rows[1:])  # k1 and k2 have k0's input: answered here, not handed out
        assert [r.key for r in pool.todo.get_nowait()] == ["k3", "k4"]
        pool.flush(last=True)
        return ledger, pool

    ledger, pool = asyncio.run(scenario())
    got = {k: (s, src) for k, s, src, _ in _status(ledger)}
    assert got["k1"] == got["k2"] == ("done", "cache") and got["k0"] == ("done", "model")
    assert got["k3"] == ("pending", None)
    assert pool.answers.hits == 2 and pool.tally.done == 3


def test_with_escalate_if_a_remembered_answer_is_not_reused_on_the_driver(tmp_path):
    async def scenario():
        pool, ledger, rows = _pool(tmp_path, escalate_if=(object(), None))
        await pool.take_page(rows[:1])
        pool.todo.get_nowait()
        pool.settle_encoded(Encoded.of([_done("k0")]), [rows[0]])
        await pool.take_page(rows[1:2])  # goes to the workers: a stored answer may escalate, which they judge
        return pool.todo.get_nowait()

    assert [r.key for r in asyncio.run(scenario())] == ["k1"]


def test_identical_rows_wait_and_get_the_leaders_answer_once_it_settles(tmp_path):
    async def scenario():
        pool, ledger, rows = _pool(tmp_path)
        await pool.take_page(rows)
        assert [r.key for r in pool.todo.get_nowait()] == ["k0", "k3", "k4"]  # k1, k2 wait for k0
        assert pool.n_waiting == 2
        pool.settle_encoded(Encoded.of([_done("k0", {"kind": "b"})]), [rows[0]])
        pool.flush(last=True)
        return ledger, pool

    ledger, pool = asyncio.run(scenario())
    got = {k: (s, src, out) for k, s, src, out in _status(ledger)}
    assert got["k1"] == got["k2"] == ("done", "cache", '{"kind": "b"}')
    assert pool.n_waiting == 0 and pool.outstanding == 2  # k3, k4 still out
    attempts = ledger.connection.execute("SELECT key, outcome FROM attempts ORDER BY key").fetchall()
    assert attempts == [("k0", "done"), ("k1", "cache"), ("k2", "cache")]
