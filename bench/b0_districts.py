"""B0: all 17,842 NCES districts through `llmap run` against the zero-latency simulator.

Prints rows/s and the peak RSS of the llmap process (target: under 300 MB),
then checks with `llmap status --by state` that every row is done.

    python bench/b0_districts.py            # needs ../shared/data beside the repo

The simulator runs in its own process so it does not share llmap's CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _common import SHARED_DATA, run_cli, table

from llmap.sim import start_simulator_process

JOB = """
name = "b0-districts"
[input]
path = "{path}"
key = "district_id"
[prompt]
system = "You classify US public school districts."
user = "District: {{{{ district_name }}}} ({{{{ state }}}}), {{{{ enrollment }}}} students."
[output]
path = "out/b0.parquet"
keep = ["district_name", "state"]
[output.fields]
kind = {{ type = "string", enum = ["city", "county", "charter", "regional", "technical", "other"] }}
confidence = {{ type = "number", description = "0 to 1" }}
[model]
provider = "openai"
name = "sim"
base_url = "{base_url}"
[limits]
concurrency = {concurrency}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    data = SHARED_DATA / "districts_2023_24_nces.csv"
    if not data.is_file():
        print(f"skipped: {data} is absent (the benchmark needs ../shared/data beside the repo)")
        return 0
    with tempfile.TemporaryDirectory() as tmp, start_simulator_process() as sim:
        job = Path(tmp) / "b0.toml"
        job.write_text(JOB.format(path=data, base_url=sim.base_url, concurrency=args.concurrency))
        res, wall, peak_mb = run_cli(["run", str(job), "-q"])
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            return 1
        stats = sim.stats()
        status = json.loads(run_cli(["status", str(job), "--by", "state", "--json"])[0].stdout)
        groups = status["groups"]
        done_everywhere = status["total"]["done"] == 17842 and all(
            g["pending"] == 0 and g["failed"] == 0 and g["skipped"] == 0 for g in groups
        )
        rows = 17842
        print(table([
            ("rows", f"{rows:,}"),
            ("wall time (llmap run, incl. start-up)", f"{wall:.1f} s"),
            ("rows/s", f"{rows / wall:,.0f}"),
            ("peak RSS of llmap", f"{peak_mb:.0f} MB (target < 300 MB)"),
            ("requests at simulator", f"{stats['requests']:,}"),
            ("status --by state: every row done", "yes" if done_everywhere else "NO"),
            ("status --by state", f"{len(groups)} states, {status['total']}"),
            ("command", f"python bench/b0_districts.py --concurrency {args.concurrency}"),
        ], "B0 districts: 17,842 rows, zero-latency simulator"))
        print(json.dumps({"rows_per_s": round(rows / wall, 1), "peak_rss_mb": round(peak_mb, 1),
                          "all_done": done_everywhere}))
        return 0 if done_everywhere and peak_mb < 300 else 1


if __name__ == "__main__":
    raise SystemExit(main())
