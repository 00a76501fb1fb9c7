"""B13 batch: 20,000 rows through the OpenAI Batch API of the simulator, at a request cap of 5,000 per batch
and 3% failed requests.

The simulator runs in its own process with ``--batch-max-requests 5000 --batch-fail-rate 0.03
--batch-time 3``; the job keeps ``[batch] max_requests`` at its default (50,000), so the first batch
is refused for its size and split in two until the halves fit. Two runs, one per ``[batch] retry``:

- ``retry = "batch"``: failed requests go in the next batch. Target: lines submitted = unique rows
  + failed lines, nothing else; cost = 0.5 x real time (failed requests are not billed);
- ``retry = "realtime"``: failed requests finish in real time. Target: lines = unique rows;
  cost = (0.5 + 0.5 x retried share) x real time.

"Real time" is the same answered tokens at the model's full prices. Wall time is mostly the
simulator's batch time and llmap's poll interval (0.25 s here), not llmap's own work.

    python bench/b13_batch.py [--rows 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import tempfile
from pathlib import Path

from _common import run_cli, table, write_job, write_rows_csv

from llmap.sim import start_simulator_process

CAP, FAIL, PRICE_IN, PRICE_OUT = 5000, 0.03, 0.15, 0.60


def one(retry: str, rows: int, tmp: Path) -> dict:
    csv = write_rows_csv(tmp / "rows.csv", rows)
    os.environ["LLMAP_CACHE_DIR"] = str(tmp / f"cache-{retry}")  # no answers from the other run
    with start_simulator_process(batch_max_requests=CAP, batch_fail_rate=FAIL, batch_time=3.0, seed=13) as sim:
        job = write_job(tmp, name=f"b13-{retry}", csv=csv, base_urls=[sim.base_url],
                        model_extra=f"batch = true\nprice_in = {PRICE_IN}\nprice_out = {PRICE_OUT}")
        job.write_text(job.read_text() + f'\n[batch]\npoll_s = 0.25\nretry = "{retry}"\n')
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        res, wall, _ = run_cli(["run", str(job), "-q"])
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # only the llmap child was reaped in between
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        stats = sim.stats()
    if res.returncode != 0:
        raise SystemExit(f"b13 {retry} failed: {res.stderr}")
    with sqlite3.connect(tmp / ".llmap" / f"b13-{retry}.ledger.sqlite") as db:
        cost, pt, ct = db.execute("SELECT sum(cost_usd), sum(prompt_tokens), sum(completion_tokens) FROM requests "
                                  "WHERE outcome = '200'").fetchone()
        done = db.execute("SELECT count(*) FROM rows WHERE status = 'done'").fetchone()[0]
        refused = db.execute("SELECT count(*) FROM batches WHERE status = 'failed'").fetchone()[0]
    b = stats["batches"]
    realtime_cost = (pt * PRICE_IN + ct * PRICE_OUT) / 1e6
    retried = b["failed_lines"] / rows
    return {"retry": retry, "rows": rows, "done": done, "created": b["created"], "refused": refused,
            "lines": b["lines"], "failed_lines": b["failed_lines"], "lines_target": rows + (
                b["failed_lines"] if retry == "batch" else 0), "realtime_requests": stats["requests"],
            "custom_ids_repeated": b["custom_ids_repeated"], "bodies_repeated": b["bodies_repeated"],
            "wall_s": wall, "llmap_cpu_s": cpu, "cost_usd": cost, "realtime_cost_usd": realtime_cost,
            "cost_ratio": cost / realtime_cost, "ratio_target": 0.5 if retry == "batch" else 0.5 + 0.5 * retried}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000)
    args = ap.parse_args()
    out = []
    with tempfile.TemporaryDirectory() as t:
        for retry in ("batch", "realtime"):
            out.append(one(retry, args.rows, Path(t)))
    for r in out:
        print(table([
            ("rows done", f"{r['done']:,} of {r['rows']:,}"),
            ("batches created", f"{r['created']} accepted, {r['refused']} refused for size (each split in two)"),
            ("lines submitted", f"{r['lines']:,} (target {r['lines_target']:,}: {r['rows']:,} unique rows"
                                + (f" + {r['failed_lines']:,} failed" if r["retry"] == "batch" else "") + ")"),
            ("failed requests", f"{r['failed_lines']:,} ({100 * r['failed_lines'] / r['rows']:.1f}%); "
                                f"{r['realtime_requests']:,} real-time requests"),
            ("custom ids repeated", f"{r['custom_ids_repeated']} (request bodies sent again: "
                                    f"{r['bodies_repeated']:,}, the retried ones)"),
            ("wall time", f"{r['wall_s']:.1f} s, of which llmap's CPU {r['llmap_cpu_s']:.1f} s (the rest: "
                          "the simulated batch time, polls, the simulator)"),
            ("cost / real time", f"{r['cost_ratio']:.3f} (target {r['ratio_target']:.3f}): ${r['cost_usd']:.4f} "
                                 f"against ${r['realtime_cost_usd']:.4f}"),
        ], f"B13 batch, retry = \"{r['retry']}\": cap {CAP:,} requests per batch, {FAIL:.0%} failed requests"))
        print()
    print(f"command: python bench/b13_batch.py --rows {args.rows}")
    print(json.dumps(out))
    met = all(r["done"] == r["rows"] and r["lines"] == r["lines_target"] and r["custom_ids_repeated"] == 0
              and abs(r["cost_ratio"] - r["ratio_target"]) < 0.01 for r in out)
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
