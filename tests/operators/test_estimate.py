"""llmap estimate for the operators: what it predicts against what a run sends, sending nothing itself."""

from __future__ import annotations

import csv
import subprocess

from _support import LLMAP
from llmap import Job
from llmap.operators.estimate import estimate_operator
from llmap.sim import Simulator
from llmap.sim.datasets import titles, write
from operators.conftest import group_stats, op_job, read_table


def test_cluster_estimate_windows_and_assignments_match_a_run(tmp_path):
    write(titles(400, 20, seed=3), tmp_path / "t.csv")
    with Simulator(groups=str(tmp_path / "t.csv")) as sim:
        job = op_job(tmp_path, sim, "cluster", data="t.csv", system="Events.", out="out/c.parquet",
                     tables="[cluster]\ncontext_tokens = 3000\npack = 10\n")
        est = estimate_operator(Job.from_toml(job).spec)
        assert sim.stats()["requests"] == 0 and not (tmp_path / ".llmap").exists()  # nothing sent or written
        res = Job.from_toml(job).run()
        stats = group_stats(sim)
        assert abs(est.steps["propose"][0] - stats["llmap_cluster_propose"]) <= 1
        assert est.steps["assign"][0] == stats["llmap_cluster_assign"] == 40
        assert est.steps["merge"][0] >= stats.get("llmap_cluster_merge", 0)  # an upper bound
        assert estimate_operator(Job.from_toml(job).spec).to_work == 0 and res.exit_code == 0  # all done now


def test_reduce_estimate_bounds_the_run_and_export_writes_the_groups(tmp_path):
    with open(tmp_path / "s.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "region", "note"])
        for i in range(300):
            w.writerow([i, ["a", "b", "c"][i % 3], f"Order {i}: {i % 9} widgets paid on delivery"])
    with Simulator() as sim:
        job = op_job(tmp_path, sim, "reduce", data="s.csv", system="Sum up.", user="{{ note }}", out="out/r.csv",
                     fields='summary = { type = "string" }\n',
                     tables='[reduce]\nby = ["region"]\ncontext_tokens = 400\n')
        est = estimate_operator(Job.from_toml(job).spec)
        res = Job.from_toml(job).run()
    assert est.steps["answer"][0] == 3 and res.requests <= est.requests  # summaries at their longest bound it
    first = read_table(tmp_path / "out" / "r.csv")
    (tmp_path / "out" / "r.csv").unlink()
    exp = subprocess.run([*LLMAP, "export", str(job)], capture_output=True, text=True, timeout=60)
    assert exp.returncode == 0, exp.stderr
    assert read_table(tmp_path / "out" / "r.csv") == first and [r["region"] for r in first] == ["a", "b", "c"]
    shown = subprocess.run([*LLMAP, "estimate", str(job)], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "kind = reduce" in shown.stdout and "already done" in shown.stdout
