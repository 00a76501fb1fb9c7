"""B7 cache and dedup: 10,000 rows with 30% duplicate inputs.

Three runs of one job against the zero-latency simulator (own process), with a fresh
response cache:
  1. first run: requests sent must equal the number of unique inputs (dedup);
  2. immediate rerun: 0 requests (done rows with unchanged inputs are not asked again);
  3. after changing 1% of the rows: requests must equal that 1%.

Tail hedging is off (``hedge_tail = false``): its second copies of stragglers are
requests on purpose (B3 measures them), and would hide a duplicate paid twice here.

    python bench/b7_cache.py [--rows 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from _common import run_cli, table, write_job

from llmap.sim import start_simulator_process


def write_dupes(path: Path, n: int, dup_share: float, changed: set[int] = frozenset()) -> int:
    """Rows whose last ``dup_share`` repeat earlier texts; returns the number of unique texts."""
    unique = round(n * (1 - dup_share))
    with open(path, "w", encoding="utf-8") as f:
        f.write("id,title,body\n")
        for i in range(n):
            j = i if i < unique else (i * 7919) % unique
            body = f"note {j} about the district budget and the bus schedule"
            if i in changed:
                body += f" (revised in row {i})"
            f.write(f"r{i:06d},Item {j},{body}\n")
    return unique


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000)
    args = ap.parse_args()
    n = args.rows
    with tempfile.TemporaryDirectory() as t, start_simulator_process() as sim:
        tmp = Path(t)
        os.environ["LLMAP_CACHE_DIR"] = str(tmp / "cache")  # a fresh cache, inherited by the llmap child
        csv = tmp / "rows.csv"
        unique = write_dupes(csv, n, 0.30)
        job = write_job(tmp, name="b7", csv=csv, base_urls=[sim.base_url], limits="hedge_tail = false")
        figures = []
        for label, expected in (("first run", unique), ("immediate rerun", 0)):
            sim.reset_stats()
            res, wall, _ = run_cli(["run", str(job), "-q"])
            figures.append((label, sim.stats()["requests"], expected, wall, res.returncode))
        changed = set(range(0, n, 100))  # 1% of rows, spread out, none among the duplicated tail's sources
        write_dupes(csv, n, 0.30, changed)
        sim.reset_stats()
        res, wall, _ = run_cli(["run", str(job), "-q"])
        figures.append(("after changing 1% of rows", sim.stats()["requests"], len(changed), wall, res.returncode))
    met = all(req == exp and rc == 0 for _, req, exp, _, rc in figures)
    print(table([(f"{label}", f"{req:,} requests (target {exp:,}), {wall:.1f} s, exit {rc}")
                 for label, req, exp, wall, rc in figures]
                + [("rows / unique inputs", f"{n:,} / {unique:,}"),
                   ("command", f"python bench/b7_cache.py --rows {n}")],
                "B7 cache and dedup: zero-latency simulator"))
    print(json.dumps({"runs": [{"run": lb, "requests": r, "target": e, "wall_s": round(w, 2)}
                               for lb, r, e, w, _ in figures], "met": met}))
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
