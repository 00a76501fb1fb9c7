"""B20 cluster: 7,500 synthetic news titles in 300 true event families (sizes skewed like news), 5% model noise.

The simulator (own process) knows each title's true family (``--groups``) and answers llmap's cluster steps
from it, each item wrong with probability 5% (a row proposed or assigned to the wrong family or none, a merge
verdict flipped); its ``/v1/embeddings`` puts titles of one family near each other (``--embed-noise``). One
``kind = "cluster"`` job with every [cluster] option at its default, then a rerun. Prints the team's KPIs:

- assignment rate: rows given a family (target > 15%; the team's pipeline: 2.2%);
- adjusted Rand index of the families against the truth (1 = the true partition);
- families created against the 300 true ones, merges made and the merge success rate;
- model calls per row (chat requests; embedding requests separately), and the rerun's requests (target 0).

    python bench/b20_cluster.py [--rows 7500] [--families 300] [--noise 0.05]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
from _common import run_cli, table

from llmap.sim import start_simulator_process
from llmap.sim.datasets import adjusted_rand, titles, write

JOB = """
kind = "cluster"
[input]
path = "titles.csv"
key = "id"
[prompt]
system = "A family is a group of at least 3 titles about the same event, with coherent actors and one theater."
user = "{{{{ text }}}}"
[output]
path = "out/families.parquet"
[model]
provider = "openai"
name = "sim"
base_url = "{base_url}"
[embeddings]
provider = "openai"
name = "sim-embed"
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=7500)
    ap.add_argument("--families", type=int, default=300)
    ap.add_argument("--noise", type=float, default=0.05)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        rows = titles(args.rows, args.families)
        write(rows, tmp / "titles.csv")
        with start_simulator_process(groups=str(tmp / "titles.csv"), group_error_rate=args.noise) as sim:
            (tmp / "job.toml").write_text(JOB.format(base_url=sim.base_url), encoding="utf-8")
            res, wall, _ = run_cli(["run", str(tmp / "job.toml"), "-q"])
            if res.returncode != 0:
                print(res.stderr)
                return 1
            calls = sim.stats()["requests"]
            rerun, _, _ = run_cli(["run", str(tmp / "job.toml"), "-q"])
            again = sim.stats()["requests"] - calls
        summary = next(line for line in res.stderr.splitlines() if "assignment rate" in line)
        out = pq.read_table(tmp / "out" / "families.parquet").to_pylist()
        fams = pq.read_table(tmp / "out" / "families.families.parquet").to_pylist()
        led = tmp / ".llmap" / "job.ledger.sqlite"
        import sqlite3

        with sqlite3.connect(led) as db:
            s = json.loads(db.execute("SELECT summary FROM op_runs ORDER BY run LIMIT 1").fetchone()[0])
        truth = {r["id"]: r["group"] for r in rows}
        ari = adjusted_rand([truth[r["id"]] for r in out], [r["_family"] for r in out])
        assigned = sum(r["_family"] is not None for r in out)
        sizes = sorted((sum(1 for r in rows if r["group"] == g) for g in {r["group"] for r in rows}), reverse=True)
        print(table([
            ("titles, true families", f"{len(rows):,}, {args.families} (largest {sizes[0]}, median "
                                      f"{sizes[len(sizes) // 2]}, smallest {sizes[-1]})"),
            ("model noise", f"{args.noise:.0%} of step items wrong"),
            ("assignment rate", f"{assigned / len(out):.1%} ({assigned:,} of {len(out):,}; target > 15%)"),
            ("adjusted Rand index", f"{ari:.3f}"),
            ("families created / true", f"{len(fams)} / {args.families} ({s.get('families_dissolved', 0)} "
                                        f"dissolved under min_size)"),
            ("windows, proposals", f"{s.get('windows')}, {s.get('proposals')}"),
            ("merges made", f"{s.get('merges')} of {s.get('merge_pairs')} pairs judged "
                            f"({100 * (s.get('merge_success_rate') or 0):.0f}%)"),
            ("model calls per row", f"{calls / len(rows):.3f} ({calls:,} chat requests)"),
            ("embedding requests", f"{s.get('embedding_requests', 0):,} ({s.get('embedded', 0):,} texts)"),
            ("wall time", f"{wall:.1f} s"),
            ("rerun", f"{again} requests (exit {rerun.returncode})"),
        ], "B20 cluster"))
        print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
