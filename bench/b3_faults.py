"""B3 faults: 2,000 rows against a simulator that fails 30% of requests (500/503) and hangs 2%.

The job sets no limits. The same rows run twice in one benchmark run, each against a fresh
simulator with --latency-median 0.5 --latency-sigma 0.5: once fault-free, once with
--fail-rate 0.3 --hang-rate 0.02. Targets: every row done, each exactly once in the output,
and wall time at most 2 x the fault-free run.

    python bench/b3_faults.py [--rows 2000] [--repeat 3]

With --repeat K both runs are repeated K times (alternating) and the median ratio is the
figure: one unlucky row that fails several times in a row sets a single run's end.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
from _common import run_cli, table, write_job, write_rows_csv

from llmap.sim import start_simulator_process


def one(name: str, csv: Path, tmp: Path, **faults) -> dict:
    with start_simulator_process(latency_median=0.5, latency_sigma=0.5, seed=2, **faults) as sim:
        job = write_job(tmp, name=name, csv=csv, base_urls=[sim.base_url])
        res, wall, _ = run_cli(["run", str(job), "-q"])
        stats = sim.stats()
    out = pq.read_table(tmp / "out" / f"{name}.parquet").to_pylist()
    ids = [r["id"] for r in out]
    with sqlite3.connect(tmp / ".llmap" / f"{name}.ledger.sqlite") as db:  # hedged copies that lost the race
        hedged, hedge_cost = db.execute("SELECT count(*), coalesce(sum(cost_usd), 0) FROM requests "
                                        "WHERE outcome = 'hedged'").fetchone()
    return {"name": name, "exit": res.returncode, "wall_s": wall, "requests": stats["requests"],
            "hedged": hedged, "hedge_cost_usd": hedge_cost,
            "by_status": stats["by_status"], "hung": stats["hung"], "rows_out": len(ids),
            "unique": len(set(ids)), "done": sum(r["_status"] == "done" for r in out), "stderr": res.stderr[-300:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    ratios = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        csv = write_rows_csv(tmp / "rows.csv", args.rows)
        for _ in range(args.repeat):
            clean = one("b3-clean", csv, tmp)
            faulty = one("b3-faults", csv, tmp, fail_rate=0.3, hang_rate=0.02)
            ratios.append(faulty["wall_s"] / clean["wall_s"])
            for name in ("b3-clean", "b3-faults"):  # the next repeat starts from scratch
                (tmp / ".llmap" / f"{name}.ledger.sqlite").unlink(missing_ok=True)
    ratio = statistics.median(ratios)
    ok = (faulty["done"] == args.rows == faulty["unique"] == faulty["rows_out"] and ratio <= 2.0
          and faulty["hedged"] <= 0.02 * faulty["requests"])
    print(table([
        ("rows", f"{args.rows:,}"),
        ("fault-free wall time", f"{clean['wall_s']:.1f} s ({clean['requests']:,} requests)"),
        ("faulty wall time", f"{faulty['wall_s']:.1f} s ({faulty['requests']:,} requests, "
                             f"{faulty['hung']} hung, by status {faulty['by_status']})"),
        ("faulty / fault-free", f"{ratio:.2f} (target <= 2.0)"
                                + (f"; median of {', '.join(f'{r:.2f}' for r in ratios)}" if len(ratios) > 1 else "")),
        ("hedged copies that lost (faulty)", f"{faulty['hedged']:,} = {faulty['hedged'] / faulty['requests']:.2%} "
                                             f"of requests (budget: 2%)"),
        ("rows done", f"{faulty['done']:,} of {args.rows:,} (target: all)"),
        ("rows in output / distinct keys", f"{faulty['rows_out']:,} / {faulty['unique']:,} (target: each once)"),
        ("command", f"python bench/b3_faults.py --rows {args.rows} --repeat {args.repeat}"),
    ], "B3 faults: --fail-rate 0.3 --hang-rate 0.02, latency median 0.5 s, sigma 0.5, no limits"))
    print(json.dumps({"clean": clean, "faulty": faulty, "ratios": ratios, "ratio": ratio, "met": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
