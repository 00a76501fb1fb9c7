"""Operator steps: kept in the ledger by content (no response cache needed), failures not kept, caps obeyed."""

from __future__ import annotations

from llmap import Job
from llmap.sim import Simulator
from llmap.sim.datasets import entities, titles, write
from llmap.store.ledger import Ledger
from llmap.store.operators import OperatorBook
from operators.conftest import group_stats, op_job


def test_steps_are_answered_from_the_ledger_without_the_response_cache(tmp_path):
    write(entities(150, seed=2), tmp_path / "n.csv")
    with Simulator(groups=str(tmp_path / "n.csv")) as sim:
        job = op_job(tmp_path, sim, "resolve", data="n.csv", system="Names.", out="out/e.csv",
                     tables="[cache]\nenabled = false\n")
        first = Job.from_toml(job).run()
        assert first.exit_code == 0 and first.requests > 0
        sent, emb = sim.stats()["requests"], group_stats(sim)["embedding_requests"]
        again = Job.from_toml(job).run(fresh=True)  # every row pending again; the steps are in the ledger
        assert again.exit_code == 0 and again.requests == 0 and sim.stats()["requests"] == sent
        assert group_stats(sim)["embedding_requests"] == emb  # the vectors too
    with Ledger(tmp_path / ".llmap" / "job.ledger.sqlite") as led:
        assert OperatorBook(led).step_counts()["judge"] == first.operator["judged"]


def test_a_budget_cap_stops_the_operator_and_the_next_run_pays_only_the_rest(tmp_path):
    write(titles(300, 15, seed=9), tmp_path / "t.csv")
    with Simulator(groups=str(tmp_path / "t.csv")) as sim:
        job = op_job(tmp_path, sim, "cluster", data="t.csv", system="Events.", out="out/c.csv",
                     tables="[cluster]\ncontext_tokens = 2000\npack = 5\n")
        job.write_text(job.read_text().replace('name = "sim"\n', 'name = "sim"\nprice_in = 1.0\nprice_out = 1.0\n')
                       .replace("[limits]\n", "[limits]\nmax_cost_usd = 0.05\n"))
        capped = Job.from_toml(job).run()
        assert capped.exit_code == 1 and "max_cost_usd" in capped.stop_reason
        assert capped.counts["pending"] == 300  # nothing half-written: the rows wait for the rest
        with Ledger(tmp_path / ".llmap" / "job.ledger.sqlite") as led:
            kept = sum(OperatorBook(led).step_counts().values())
        assert kept > 0
        job.write_text(job.read_text().replace("max_cost_usd = 0.05", "max_cost_usd = 100"))
        before = sim.stats()["requests"]
        done = Job.from_toml(job).run()
        assert done.exit_code == 0 and done.counts["done"] == 300
        assert sim.stats()["requests"] - before == done.requests
    with Ledger(tmp_path / ".llmap" / "job.ledger.sqlite") as led:
        total = sum(OperatorBook(led).step_counts().values())
    assert total - kept <= done.requests * 5  # the second run's steps were new ones (packs of 5)
    assert capped.requests + done.requests <= total  # no step paid twice (a pack answers several)
