"""B6 scale: a 1,000,000-row CSV through `llmap run` against the zero-latency simulator.

Target: peak RSS of the llmap process under 300 MB; reports rows/s. The simulator runs in
its own process. Peak RSS is the child's ru_maxrss.

    python bench/b6_scale.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import run_cli, table, write_job, write_rows_csv

from llmap.sim import start_simulator_process


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t, start_simulator_process() as sim:
        tmp = Path(t)
        t0 = time.perf_counter()
        csv = write_rows_csv(tmp / "rows.csv", args.rows)
        gen_s = time.perf_counter() - t0
        job = write_job(tmp, name="b6", csv=csv, base_urls=[sim.base_url])
        res, wall, peak_mb = run_cli(["run", str(job), "-q"], timeout=7200)
        stats = sim.stats()
        out_bytes = (tmp / "out" / "b6.parquet").stat().st_size if res.returncode == 0 else 0
    met = res.returncode == 0 and peak_mb < 300 and stats["requests"] == args.rows
    print(table([
        ("rows", f"{args.rows:,} (synthetic CSV written in {gen_s:.1f} s)"),
        ("exit code", str(res.returncode)),
        ("wall time (llmap run, incl. plan and export)", f"{wall:.1f} s"),
        ("rows/s", f"{args.rows / wall:,.0f}"),
        ("peak RSS of llmap", f"{peak_mb:.0f} MB (target < 300 MB)"),
        ("requests at simulator", f"{stats['requests']:,}"),
        ("output parquet", f"{out_bytes / 1e6:.1f} MB"),
        ("summary line", res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ""),
        ("command", f"python bench/b6_scale.py --rows {args.rows}"),
    ], "B6 scale: zero-latency simulator"))
    print(json.dumps({"rows": args.rows, "wall_s": round(wall, 1), "rows_per_s": round(args.rows / wall, 1),
                      "peak_rss_mb": round(peak_mb, 1), "met": met}))
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
