"""B11 Anthropic limits learned: how close to Anthropic's RPM does llmap run when it is told nothing?

Simulator (a separate process): /v1/messages with --rpm 3000 --itpm 1000000 --latency-median 0.5
--latency-sigma 0.5. The job sets no [limits]: llmap sends one request first, reads the
anthropic-ratelimit-{requests,input-tokens,output-tokens}-* headers (RFC 3339 resets) from its answer,
paces by the separate request and input-token buckets, and grows concurrency with AIMD.

Targets: wall <= 1.05 x N/(RPM/60), 429s <= 0.5% of requests. The wall time includes llmap's start-up
(Python imports, preflight: about 2 s on a loaded 2-core machine); the dispatch window (first request
sent to last answer, from the ledger) is printed beside it.

    python bench/b11_anthropic_limits.py [--rows 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import tempfile
from pathlib import Path

from _common import run_cli, table, write_rows_csv

from llmap.sim import start_simulator_process

RPM, ITPM = 3000, 1_000_000
KEY = "sk-ant-bench"

JOB = """
name = "b11"
[input]
path = "{csv}"
key = "id"
[prompt]
system = "You tag short notes."
user = "{{{{ title }}}}: {{{{ body }}}}"
[output]
path = "out/b11.parquet"
[output.fields]
topic = {{ type = "string", enum = ["budget", "staff", "transport", "food", "governance", "other"] }}
confidence = {{ type = "number", description = "0 to 1" }}
urgent = {{ type = "boolean" }}
[model]
provider = "anthropic"
name = "claude-haiku-4-5"
base_url = "{url}"
max_tokens = 64
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    args = ap.parse_args()
    os.environ["ANTHROPIC_API_KEY"] = KEY
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        csv = write_rows_csv(tmp / "rows.csv", args.rows)
        with start_simulator_process(rpm=RPM, itpm=ITPM, latency_median=0.5, latency_sigma=0.5, seed=1,
                                     require_key=KEY) as sim:
            job = tmp / "b11.toml"
            job.write_text(JOB.format(csv=csv, url=sim.url), encoding="utf-8")
            res, wall, _ = run_cli(["run", str(job), "-q"])
            stats = sim.stats()
        if res.returncode != 0:
            raise SystemExit(f"b11 failed: {res.stderr}")
        with sqlite3.connect(tmp / ".llmap" / "b11.ledger.sqlite") as db:
            slowest = db.execute("SELECT max(latency_s) FROM rows").fetchone()[0] or 0.0
            done = db.execute("SELECT count(*) FROM rows WHERE status = 'done'").fetchone()[0]
            # the dispatch window: from the first request sent to the last answer (start-up left out)
            first, last = db.execute("SELECT min(t - latency_s), max(t) FROM requests").fetchone()
    requests = stats["requests"]
    n429 = stats["by_status"].get("429", 0)
    ideal = args.rows / (RPM / 60)
    window = last - first
    own = re.search(r"tokens.*?, ([\d.]+) s \(", res.stderr)  # the run's own time, from its summary line
    own_s = float(own.group(1)) if own else float("nan")
    out = {"rows": args.rows, "done": done, "wall_s": wall, "ideal_s": ideal, "ratio": wall / ideal,
           "dispatch_s": window, "dispatch_ratio": window / ideal, "run_s": own_s,
           "requests": requests, "429": n429, "429_pct": 100 * n429 / max(1, requests), "slowest_s": slowest}
    print(table([
        ("rows (done)", f"{args.rows:,} ({done:,})"),
        ("theoretical N/(RPM/60)", f"{ideal:.1f} s"),
        ("wall time (llmap run, incl. start-up)", f"{wall:.1f} s"),
        ("slowest request (ledger latency_s)", f"{slowest:.2f} s"),
        ("wall / theoretical", f"{out['ratio']:.3f} (target <= 1.05)"),
        ("llmap's own run time (summary line: no imports)", f"{own_s:.1f} s = {own_s / ideal:.3f} x theoretical"),
        ("first request sent to last answer", f"{window:.1f} s = {out['dispatch_ratio']:.3f} x theoretical "
                                              "(start-up left out)"),
        ("requests at simulator", f"{requests:,}"),
        ("429 answers", f"{n429:,} = {out['429_pct']:.2f}% (target <= 0.5%)"),
    ], f"B11: /v1/messages --rpm {RPM} --itpm {ITPM:,} --latency-median 0.5 --latency-sigma 0.5, limits not told"))
    print(f"\ncommand: python bench/b11_anthropic_limits.py --rows {args.rows}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
