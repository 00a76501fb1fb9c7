"""B14 one budget across Ray workers / B15 the Ray executor's overhead.

B14: simulator --rpm 3000 --tpm 1000000 --latency-median 0.5 --latency-sigma 0.5 (a separate
process); the job states the limits ([limits] rpm, tpm), as B1 does. 4,000 rows with
``--executor ray`` on 1 worker, then on 4 workers (one budget actor for the cluster).
Targets: wall / ideal <= 1.05 for both (ideal = N / (RPM / 60) = 80 s), 429s <= 0.5% of
requests, and the 4-worker run's busiest 60 s no busier than the limit the 1-worker run respects.

B15: simulator at zero latency and no limit; rows/s of the local executor against
``--executor ray`` with 1 and 2 workers, on the same machine.

Both connect to one local Ray (2 CPUs, no dashboard) first, so Ray's own start (about 10 s here)
is not in the figures; starting the workers is (it is part of every run).

    python bench/b14_b15_ray.py [--only b14|b15] [--rows 4000] [--b15-rows 10000]
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import tempfile
import time
from pathlib import Path

from _common import table, write_job, write_rows_csv

from llmap import Job
from llmap.sim import start_simulator_process

RPM, TPM = 3000, 1_000_000


def _requests(ledger: Path) -> list[float]:
    with sqlite3.connect(ledger) as db:
        return [t for (t,) in db.execute("SELECT t FROM requests ORDER BY t")]


def _busiest_minute(times: list[float]) -> int:
    """The most requests answered in any 60 s window."""
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - 60.0:
            j += 1
        best = max(best, i - j + 1)
    return best


def one(name: str, csv: Path, tmp: Path, *, executor: str, workers: int | None, sim_kw: dict, limits: str) -> dict:
    with start_simulator_process(**sim_kw) as sim:
        job = write_job(tmp, name=name, csv=csv, base_urls=[sim.base_url], limits=limits)
        t0, epoch0, cpu0 = time.perf_counter(), time.time(), time.process_time()
        result = Job.from_toml(job).run(executor=executor, workers=workers)
        wall, epoch1, cpu = time.perf_counter() - t0, time.time(), time.process_time() - cpu0
        stats = sim.stats()
    times = _requests(tmp / ".llmap" / f"{name}.ledger.sqlite")
    if result.exit_code != 0:
        raise SystemExit(f"{name} failed: {result.counts} {result.stop_reason}")
    n429 = stats["by_status"].get("429", 0)
    return {"name": name, "rows": result.counts["done"], "wall_s": wall, "span_s": times[-1] - times[0],
            "requests": stats["requests"], "429": n429, "429_pct": 100 * n429 / max(1, stats["requests"]),
            "busiest_60s": _busiest_minute(times), "before_s": times[0] - epoch0, "after_s": epoch1 - times[-1],
            "driver_cpu_us": 1e6 * cpu / max(1, result.counts["done"])}


def b14(rows: int, tmp: Path) -> list[tuple[str, str]]:
    csv = write_rows_csv(tmp / "b14.csv", rows)
    sim_kw = {"rpm": RPM, "tpm": TPM, "latency_median": 0.5, "latency_sigma": 0.5, "seed": 1}
    ideal = rows / (RPM / 60)
    out = []
    for w in (1, 4):
        r = one(f"b14-w{w}", csv, tmp, executor="ray", workers=w, sim_kw=sim_kw, limits=f"rpm = {RPM}\ntpm = {TPM}")
        out.append((f"B14 {w} worker{'s' if w > 1 else ''}",
                    f"{r['rows']:,} rows, wall {r['wall_s']:.1f} s (ideal {ideal:.0f} s) = {r['wall_s'] / ideal:.3f}; "
                    f"first to last answer {r['span_s']:.1f} s = {r['span_s'] / ideal:.3f} (first answer after "
                    f"{r['before_s']:.1f} s, end {r['after_s']:.1f} s after the last); "
                    f"{r['requests']:,} requests, 429s {r['429']} ({r['429_pct']:.2f}%); "
                    f"busiest 60 s: {r['busiest_60s']:,} requests (limit {RPM:,})"))
    return out


def b15(rows: int, tmp: Path) -> list[tuple[str, str]]:
    csv = write_rows_csv(tmp / "b15.csv", rows)
    out = []
    base = None
    for executor, w in (("local", None), ("ray", 1), ("ray", 2)):
        name = f"b15-{executor}{w or ''}"
        r = one(name, csv, tmp, executor=executor, workers=w, sim_kw={"seed": 1}, limits="")
        rate, rate_span = r["rows"] / r["wall_s"], r["rows"] / max(r["span_s"], 1e-9)
        base = base or rate
        out.append((f"B15 {executor}" + (f" {w} worker{'s' if w > 1 else ''}" if w else ""),
                    f"{rate:,.0f} rows/s over the run ({r['wall_s']:.1f} s, {rate / base:.2f}x local); "
                    f"{rate_span:,.0f} rows/s first to last answer; "
                    f"this process's CPU {r['driver_cpu_us']:,.0f} µs/row"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["b14", "b15"])
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--b15-rows", type=int, default=10000)
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    lines: list[tuple[str, str]] = []
    try:
        with tempfile.TemporaryDirectory() as t:
            tmp = Path(t)
            if args.only in (None, "b14"):
                lines += b14(args.rows, tmp)
            if args.only in (None, "b15"):
                lines += b15(args.b15_rows, tmp)
    finally:
        ray.shutdown()
    print(table(lines, "B14/B15: llmap on Ray"))
    print(f"\nreproduce: .venv/bin/python bench/b14_b15_ray.py --rows {args.rows} --b15-rows {args.b15_rows}"
          + (f" --only {args.only}" if args.only else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
