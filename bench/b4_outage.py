"""B4 outage: the primary model goes down for 20 s; the backup serves; traffic returns after.

Two simulator processes (latency median 0.2 s): the primary with --outage 5:25 (every request
503 from 5 s to 25 s after it starts), the backup healthy. The job lists both as [[model]] and
runs in this process so breaker changes are timestamped as they happen.

Targets: all rows done; the primary's breaker opens within 2 s of the outage's start; the
backup serves during the outage; traffic returns to the primary after it.

    python bench/b4_outage.py [--rows 3000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import table, write_job, write_rows_csv

from llmap import Job
from llmap.observe.progress import NullProgress
from llmap.sim import start_simulator_process

OUTAGE = (5.0, 25.0)


class Timeline(NullProgress):
    """Records breaker messages with wall-clock times."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str]] = []

    def message(self, text: str) -> None:
        self.events.append((time.time(), text))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t, \
            start_simulator_process(latency_median=0.2, latency_sigma=0.3, outage=OUTAGE, seed=4) as primary, \
            start_simulator_process(latency_median=0.2, latency_sigma=0.3, seed=5) as backup:
        tmp = Path(t)
        csv = write_rows_csv(tmp / "rows.csv", args.rows)
        job = write_job(tmp, name="b4", csv=csv, base_urls=[primary.base_url, backup.base_url],
                        limits="concurrency = 16")
        timeline = Timeline()
        t_start = time.time()
        res = Job.from_toml(job).run(progress=timeline)
        wall = time.time() - t_start
        p, b = primary.stats(), backup.stats()
    out_start = p["started_at"] + OUTAGE[0]
    opened = [ts for ts, m in timeline.events if "opened" in m and "m0" in m]
    closed = [ts for ts, m in timeline.events if "closed" in m and "m0" in m]
    open_delay = (opened[0] - out_start) if opened else float("nan")
    # per-second 200 answers, aligned to each simulator's own start
    b_offset = b["started_at"] - p["started_at"]
    backup_during = sum(n for s, n in enumerate(b["admitted_per_second"])
                        if OUTAGE[0] <= s + b_offset < OUTAGE[1])
    primary_after = sum(p["admitted_per_second"][int(OUTAGE[1]) + 1:])
    first_back = next((s for s, n in enumerate(p["admitted_per_second"]) if s > OUTAGE[1] and n > 0), None)
    met = (res.counts["done"] == args.rows and 0 <= open_delay <= 2.0 and backup_during > 0 and primary_after > 0)
    print(table([
        ("rows", f"{args.rows:,}; done {res.counts['done']:,}, failed {res.counts['failed']:,}"),
        ("wall time", f"{wall:.1f} s"),
        ("outage (primary clock)", f"{OUTAGE[0]:.0f} s to {OUTAGE[1]:.0f} s"),
        ("breaker opened after outage start", f"{open_delay:.2f} s (target <= 2 s)"),
        ("breaker closed again at", f"{closed[-1] - p['started_at']:.1f} s" if closed else "never"),
        ("backup answers during the outage", f"{backup_during:,} (target > 0)"),
        ("primary answers after the outage", f"{primary_after:,}, from second {first_back} (target > 0)"),
        ("primary 200s per second", str(p["admitted_per_second"])),
        ("backup 200s per second", str(b["admitted_per_second"])),
        ("command", f"python bench/b4_outage.py --rows {args.rows}"),
    ], "B4 outage: primary --outage 5:25, backup healthy, latency median 0.2 s"))
    print(json.dumps({"open_delay_s": open_delay, "backup_during": backup_during, "primary_after": primary_after,
                      "done": res.counts["done"], "met": met}))
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
