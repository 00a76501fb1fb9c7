"""B1 known limits / B2 unknown limits: how close to the provider's RPM does llmap run?

Simulator: --rpm 3000 --tpm 1000000 --latency-median 0.5 --latency-sigma 0.5 --burst-s 1 (a separate
process): S1's latency spread, and buckets that hold one second's worth (50 requests), as Anthropic says
a per-minute limit may be enforced, while the headers still say ``limit: 3000``; ``--burst-s 60`` gives
the old simulator whose buckets hold the whole minute (a client that over-sends in its first second
goes unpunished there). B1 tells the job the limits ([limits] rpm, tpm); B2 tells it nothing (llmap
learns them from the x-ratelimit-* headers, and adapts concurrency with AIMD). B2b is B2 with a fixed
``[limits] concurrency = 100`` and 2,000 rows: without a first request alone, its first wave of 100
requests went out before any header was read; with one, its answer's ``remaining`` (49, not 3,000) is
the burst that may follow.

Targets: B1 wall <= 1.05 x N/(RPM/60) + the slowest request, 429s <= 0.5% of requests;
         B2 wall <= 1.15 x N/(RPM/60), 429s <= 3%;
         B2b wall <= 1.05 x N/(RPM/60), 429s <= 0.5%.

    python bench/b1_b2_limits.py [--rows 3000] [--only b1|b2|b2b] [--burst-s 1]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
from pathlib import Path

from _common import run_cli, table, write_job, write_rows_csv

from llmap.sim import start_simulator_process

RPM, TPM = 3000, 1_000_000


def one(name: str, rows: int, csv: Path, tmp: Path, limits: str, burst_s: float) -> dict:
    with start_simulator_process(rpm=RPM, tpm=TPM, latency_median=0.5, latency_sigma=0.5, seed=1,
                                 burst_s=burst_s) as sim:
        job = write_job(tmp, name=name, csv=csv, base_urls=[sim.base_url], limits=limits)
        res, wall, _ = run_cli(["run", str(job), "-q"])
        stats = sim.stats()
    with sqlite3.connect(tmp / ".llmap" / f"{name}.ledger.sqlite") as db:
        slowest = db.execute("SELECT max(latency_s) FROM rows").fetchone()[0] or 0.0
    if res.returncode != 0:
        raise SystemExit(f"{name} failed: {res.stderr}")
    requests = stats["requests"]
    n429 = stats["by_status"].get("429", 0)
    ideal = rows / (RPM / 60)
    completion = stats["tokens"]["completion"] / max(1, stats["by_status"].get("200", 1))
    return {"name": name, "rows": rows, "wall_s": wall, "ideal_s": ideal, "ratio": wall / ideal, "requests": requests,
            "429": n429, "429_pct": 100 * n429 / max(1, requests), "completion_tokens_avg": completion,
            "slowest_s": slowest}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--only", choices=["b1", "b2", "b2b"])
    ap.add_argument("--b2b-rows", type=int, default=2000)
    ap.add_argument("--burst-s", type=float, default=1.0,
                    help="seconds of refill the simulator's buckets hold (1: 50 requests; 60: the whole minute)")
    args = ap.parse_args()
    out = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        csv = write_rows_csv(tmp / "rows.csv", args.rows)
        if args.only in (None, "b1"):
            out.append(one("b1-known", args.rows, csv, tmp, f"rpm = {RPM}\ntpm = {TPM}", args.burst_s))
        if args.only in (None, "b2"):
            out.append(one("b2-unknown", args.rows, csv, tmp, "", args.burst_s))
        if args.only in (None, "b2b"):
            csv_b = write_rows_csv(tmp / "rows-b2b.csv", args.b2b_rows)
            out.append(one("b2b-unknown-c100", args.b2b_rows, csv_b, tmp, "concurrency = 100", args.burst_s))
    for r in out:
        strict = r["name"].startswith(("b1", "b2b"))
        target = 1.05 if strict else 1.15
        limit429 = 0.5 if strict else 3.0
        print(table([
            ("rows", f"{r['rows']:,}"),
            ("theoretical N/(RPM/60)", f"{r['ideal_s']:.1f} s"),
            ("wall time (llmap run, incl. start-up)", f"{r['wall_s']:.1f} s"),
            ("slowest request (ledger latency_s)", f"{r['slowest_s']:.2f} s"),
            ("wall / theoretical", f"{r['ratio']:.3f} (target <= {target}"
                                   + (f" + slowest request: wall <= {1.05 * r['ideal_s'] + r['slowest_s']:.1f} s)"
                                      if r["name"].startswith("b1") else ")")),
            ("requests at simulator", f"{r['requests']:,}"),
            ("429 answers", f"{r['429']:,} = {r['429_pct']:.2f}% (target <= {limit429}%)"),
            ("completion tokens per answer (avg)", f"{r['completion_tokens_avg']:.1f}"),
        ], f"{r['name']}: simulator --rpm {RPM} --tpm {TPM} --latency-median 0.5 --latency-sigma 0.5 "
           f"--burst-s {args.burst_s:g}"))
        print()
    print(f"command: python bench/b1_b2_limits.py --rows {args.rows} --b2b-rows {args.b2b_rows} "
          f"--burst-s {args.burst_s:g}"
          + (f" --only {args.only}" if args.only else ""))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
