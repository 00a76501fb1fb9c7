"""kind = "cluster" end to end on the simulator's hidden groups: families, KPIs, families table, reruns, increments."""

from __future__ import annotations

import subprocess

import pytest

from _support import LLMAP
from llmap import Job
from llmap.errors import SpecError
from llmap.sim import Simulator
from llmap.sim.datasets import adjusted_rand, titles, write
from llmap.store.ledger import Ledger
from llmap.store.operators import OperatorBook
from operators.conftest import group_stats, op_job, read_table

SYSTEM = "A family is a group of titles about the same event."


@pytest.fixture
def data(tmp_path):
    rows = titles(400, 20, seed=3)
    write(rows, tmp_path / "titles.csv")
    return rows


def _job(tmp_path, sim, **kw):
    return op_job(tmp_path, sim, "cluster", data="titles.csv", system=SYSTEM, out="out/c.parquet",
                  tables=kw.pop("tables", "[cluster]\ncontext_tokens = 3000\npack = 10\n"), **kw)


def test_cluster_finds_the_true_families_and_reports_its_kpis(tmp_path, data):
    with Simulator(groups=str(tmp_path / "titles.csv"), group_error_rate=0.05) as sim:
        job = _job(tmp_path, sim)
        run = subprocess.run([*LLMAP, "run", str(job), "-q"], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert "llmap: cluster: assignment rate" in run.stderr and "families created" in run.stderr
        assert "merges made" in run.stderr
        stats = group_stats(sim)
        assert stats["llmap_cluster_propose"] >= 2  # several windows: the context holds part of the rows
        sent = sim.stats()["requests"]
        again = subprocess.run([*LLMAP, "run", str(job), "-q"], capture_output=True, text=True, timeout=300)
        assert again.returncode == 0
        assert " 0 requests" in again.stderr and sim.stats()["requests"] == sent  # a finished job: nothing sent
        assert group_stats(sim)["embedding_requests"] == stats["embedding_requests"]
    out = read_table(tmp_path / "out" / "c.parquet")
    assert len(out) == 400 and {r["_status"] for r in out} == {"done"}
    truth = {r["id"]: r["group"] for r in data}
    ari = adjusted_rand([truth[r["id"]] for r in out], [r["_family"] for r in out])
    assert ari > 0.9, ari
    assigned = sum(r["_family"] is not None for r in out) / len(out)
    assert assigned > 0.9
    fams = read_table(tmp_path / "out" / "c.families.parquet")
    assert 18 <= len(fams) <= 24  # 20 true families, 5% noise
    assert all(f["size"] >= 3 and f["name"] and f["examples"] for f in fams)
    sizes = {}
    for r in out:
        if r["_family"]:
            sizes[r["_family"]] = sizes.get(r["_family"], 0) + 1
    assert {f["id"]: f["size"] for f in fams} == sizes
    (tmp_path / "out" / "c.families.parquet").unlink()
    exp = subprocess.run([*LLMAP, "export", str(tmp_path / "job.toml")], capture_output=True, text=True, timeout=60)
    assert exp.returncode == 0 and read_table(tmp_path / "out" / "c.families.parquet") == fams
    assert read_table(tmp_path / "out" / "c.parquet") == out


def test_new_rows_join_existing_families_and_only_they_are_asked(tmp_path, data):
    with Simulator(groups=str(tmp_path / "titles.csv")) as sim:
        write(data[:300], tmp_path / "part.csv")
        job = op_job(tmp_path, sim, "cluster", data="part.csv", system=SYSTEM, out="out/c.parquet",
                     tables="[cluster]\ncontext_tokens = 3000\npack = 10\n")
        first = Job.from_toml(job).run()
        assert first.exit_code == 0
        before = {r["id"]: r["_family"] for r in read_table(tmp_path / "out" / "c.parquet")}
        with Ledger(tmp_path / ".llmap" / "job.ledger.sqlite") as led:
            old_families = {f.id for f in OperatorBook(led).families()}
        write(data, tmp_path / "part.csv")  # 100 new rows
        sim.reset_stats()
        second = Job.from_toml(job).run()
        assert second.exit_code == 0
        assert second.operator["pending"] == 100
        assert sim.stats()["requests"] <= 100 // 10 + 15  # the new rows' assignments, and a few windows at most
    after = {r["id"]: r["_family"] for r in read_table(tmp_path / "out" / "c.parquet")}
    assert all(after[k] == v for k, v in before.items() if v is not None)  # old rows keep their families
    truth = {r["id"]: r["group"] for r in data}
    fam_truth = {}
    for k, f in after.items():
        if f in old_families:
            fam_truth.setdefault(f, set()).add(truth[k])
    assert all(len(g) == 1 for g in fam_truth.values())  # new rows went to the right old family (no noise)
    assert sum(f in old_families for k, f in after.items() if k not in before) >= 90


def test_cluster_needs_no_fields_and_refuses_map_only_keys(tmp_path, data):
    with Simulator(groups=str(tmp_path / "titles.csv")) as sim:
        job = _job(tmp_path, sim, fields='x = { type = "string" }')
        with pytest.raises(SpecError, match="writes _family itself"):
            Job.from_toml(job)
        job = _job(tmp_path, sim, tables="[resolve]\nneighbors = 3\n")
        with pytest.raises(SpecError, match=r"\[resolve\] is set but kind = 'cluster'"):
            Job.from_toml(job)
        job = _job(tmp_path, sim)
        job.write_text(job.read_text().replace('[prompt]\n', '[prompt]\npack = 5\n'))
        with pytest.raises(SpecError, match="packs its own steps"):
            Job.from_toml(job)
