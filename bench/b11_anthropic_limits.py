"""B11 Anthropic limits learned: how close to Anthropic's RPM does llmap run when it is told nothing?

Simulator (a separate process): /v1/messages with --rpm 3000 --itpm 1000000 --burst-s 1, written from
Anthropic's rate-limit reference: token buckets that may enforce a per-minute limit over one second
("a rate of 60 requests per minute (RPM) might be enforced as 1 request per second"), so ``remaining``
is at most 50 while ``limit`` says 3000. The job sets no limits: llmap sends one request first, reads
the anthropic-ratelimit-{requests,input-tokens,output-tokens}-* headers (RFC 3339 resets) from its
answer, paces by the separate request and input-token buckets, bursts no more than the server said
remains, and grows concurrency with AIMD. Two cases:

* b11:  2,000 rows, latency median 0.5 s, sigma 0.5, AIMD concurrency.
* b11b: 1,000 rows, latency 0.1 s, 5% of requests answered 529 overloaded_error, [limits]
        concurrency = 32 (the case that found wave 2's 2.1% of 429s).

Targets: wall <= 1.05 x N/(RPM/60), 429s <= 0.5% of requests. The wall time includes llmap's start-up
(Python imports, preflight: about 2 s on a loaded 2-core machine); the dispatch window (first request
sent to last answer, from the ledger) is printed beside it.

    python bench/b11_anthropic_limits.py [--rows 2000] [--only b11|b11b] [--burst-s 1]
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
{limits}"""


def one(name: str, rows: int, tmp: Path, burst_s: float) -> dict:
    """Run one case; the simulator and the job as the module docstring says."""
    csv = write_rows_csv(tmp / f"{name}.csv", rows)
    sim_kw: dict = {"rpm": RPM, "itpm": ITPM, "seed": 1, "require_key": KEY, "burst_s": burst_s}
    if name == "b11b":
        sim_kw.update(latency_median=0.1, overload_rate=0.05)
        limits = "[limits]\nconcurrency = 32\n"
    else:
        sim_kw.update(latency_median=0.5, latency_sigma=0.5)
        limits = ""
    with start_simulator_process(**sim_kw) as sim:
        job = tmp / f"{name}.toml"
        text = JOB.format(csv=csv, url=sim.url, limits=limits)
        job.write_text(text.replace('"b11"', f'"{name}"').replace("out/b11.", f"out/{name}."), encoding="utf-8")
        res, wall, _ = run_cli(["run", str(job), "-q"])
        stats = sim.stats()
    if res.returncode != 0:
        raise SystemExit(f"{name} failed: {res.stderr}")
    with sqlite3.connect(tmp / ".llmap" / f"{name}.ledger.sqlite") as db:
        slowest = db.execute("SELECT max(latency_s) FROM rows").fetchone()[0] or 0.0
        done = db.execute("SELECT count(*) FROM rows WHERE status = 'done'").fetchone()[0]
        # the dispatch window: from the first request sent to the last answer (start-up left out)
        first, last = db.execute("SELECT min(t - latency_s), max(t) FROM requests").fetchone()
    requests = stats["requests"]
    n429 = stats["by_status"].get("429", 0)
    ideal = rows / (RPM / 60)
    window = last - first
    own = re.search(r"tokens.*?, ([\d.]+) s \(", res.stderr)  # the run's own time, from its summary line
    own_s = float(own.group(1)) if own else float("nan")
    return {"name": name, "rows": rows, "done": done, "wall_s": wall, "ideal_s": ideal, "ratio": wall / ideal,
            "dispatch_s": window, "dispatch_ratio": window / ideal, "run_s": own_s, "requests": requests,
            "429": n429, "429_pct": 100 * n429 / max(1, requests), "529": stats["by_status"].get("529", 0),
            "slowest_s": slowest}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000, help="rows of b11 (b11b has 1,000)")
    ap.add_argument("--only", choices=["b11", "b11b"])
    ap.add_argument("--burst-s", type=float, default=1.0,
                    help="seconds of refill the simulator's buckets hold (1: 50 requests; 60: the whole minute)")
    args = ap.parse_args()
    os.environ["ANTHROPIC_API_KEY"] = KEY
    out = []
    with tempfile.TemporaryDirectory() as t:
        for name, rows in (("b11", args.rows), ("b11b", 1000)):
            if args.only in (None, name):
                out.append(one(name, rows, Path(t), args.burst_s))
    for r in out:
        ideal = r["ideal_s"]
        title = (f"{r['name'].upper()}: /v1/messages --rpm {RPM} --itpm {ITPM:,} --burst-s {args.burst_s:g} "
                 + ("--latency-median 0.5 --latency-sigma 0.5" if r["name"] == "b11"
                    else "--latency-median 0.1 --overload-rate 0.05, concurrency 32") + ", limits not told")
        print(table([
            ("rows (done)", f"{r['rows']:,} ({r['done']:,})"),
            ("theoretical N/(RPM/60)", f"{ideal:.1f} s"),
            ("wall time (llmap run, incl. start-up)", f"{r['wall_s']:.1f} s"),
            ("slowest request (ledger latency_s)", f"{r['slowest_s']:.2f} s"),
            ("wall / theoretical", f"{r['ratio']:.3f} (target <= 1.05)"),
            ("llmap's own run time (summary line: no imports)",
             f"{r['run_s']:.1f} s = {r['run_s'] / ideal:.3f} x theoretical"),
            ("first request sent to last answer", f"{r['dispatch_s']:.1f} s = {r['dispatch_ratio']:.3f} x theoretical "
                                                  "(start-up left out)"),
            ("requests at simulator (529s)", f"{r['requests']:,} ({r['529']:,})"),
            ("429 answers", f"{r['429']:,} = {r['429_pct']:.2f}% (target <= 0.5%)"),
        ], title))
        print()
    print(f"command: python bench/b11_anthropic_limits.py --rows {args.rows} --burst-s {args.burst_s:g}"
          + (f" --only {args.only}" if args.only else ""))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
