"""B21 resolve: company names written 1 to 5 ways (most once), 5% model noise, against the true duplicates.

The simulator (own process) knows each name's true entity (``--groups``) and judges llmap's candidate pairs
from it, each verdict flipped with probability 5%; its ``/v1/embeddings`` puts an entity's spellings near each
other. One ``kind = "resolve"`` job with every [resolve] option at its default, then a rerun. Prints:

- pair recall against the true duplicate pairs (target >= 0.95) and pair precision;
- model calls as a share of all pairs (target <= 5%), pairs judged, the auto threshold;
- entities found against the true ones; the rerun's requests (target 0).

    python bench/b21_resolve.py [--entities 2500] [--noise 0.05]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
from _common import run_cli, table

from llmap.sim import start_simulator_process
from llmap.sim.datasets import entities, pair_scores, write

JOB = """
kind = "resolve"
[input]
path = "names.csv"
key = "id"
[prompt]
system = "Rows are company names with their city and registry number."
user = "{{{{ text }}}}"
[output]
path = "out/entities.parquet"
keep = ["text"]
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
    ap.add_argument("--entities", type=int, default=2500)
    ap.add_argument("--noise", type=float, default=0.05)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        rows = entities(args.entities)
        write(rows, tmp / "names.csv")
        with start_simulator_process(groups=str(tmp / "names.csv"), group_error_rate=args.noise) as sim:
            (tmp / "job.toml").write_text(JOB.format(base_url=sim.base_url), encoding="utf-8")
            res, wall, _ = run_cli(["run", str(tmp / "job.toml"), "-q"])
            if res.returncode != 0:
                print(res.stderr)
                return 1
            calls = sim.stats()["requests"]
            rerun, _, _ = run_cli(["run", str(tmp / "job.toml"), "-q"])
            again = sim.stats()["requests"] - calls
        out = pq.read_table(tmp / "out" / "entities.parquet").to_pylist()
        with sqlite3.connect(tmp / ".llmap" / "job.ledger.sqlite") as db:
            s = json.loads(db.execute("SELECT summary FROM op_runs ORDER BY run LIMIT 1").fetchone()[0])
        truth = {r["id"]: r["group"] for r in rows}
        recall, precision, true_pairs = pair_scores([truth[r["id"]] for r in out], [r["_entity"] for r in out])
        n = len(out)
        all_pairs = n * (n - 1) // 2
        print(table([
            ("names, true entities", f"{n:,}, {len(set(truth.values())):,} ({true_pairs:,} true duplicate pairs)"),
            ("model noise", f"{args.noise:.0%} of verdicts flipped"),
            ("pair recall", f"{recall:.3f} (target >= 0.95)"),
            ("pair precision", f"{precision:.3f}"),
            ("entities found", f"{s['entities']:,}"),
            ("candidate pairs", f"{s['candidates']:,} (10 nearest neighbours per row)"),
            ("auto threshold", f"{s['threshold']:.3f} from {s['sampled']} sampled pairs ({s['sample_same']} same)"),
            ("pairs judged", f"{s['judged']:,} of {all_pairs:,} ({s['judged'] / all_pairs:.3%})"),
            ("model calls / all pairs", f"{calls / all_pairs:.4%} ({calls:,} chat requests; target <= 5%)"),
            ("embedding requests", f"{s.get('embedding_requests', 0):,}"),
            ("wall time", f"{wall:.1f} s"),
            ("rerun", f"{again} requests (exit {rerun.returncode})"),
        ], "B21 resolve"))
        print(next(line for line in res.stderr.splitlines() if "entities from" in line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
