"""B14 one budget across Ray workers / B15 the Ray executor's overhead.

B14: simulator --rpm 3000 --tpm 1000000 --latency-median 0.5 --latency-sigma 0.5 (a separate
process); the job states the limits ([limits] rpm, tpm), as B1 does. 4,000 rows with
``--executor ray`` on 1 worker, then on 4 workers (one budget actor for the cluster).
Targets: wall / ideal <= 1.05 for both (ideal = N / (RPM / 60) = 80 s), 429s <= 0.5% of
requests, and the 4-worker run's busiest 60 s no busier than the limit the 1-worker run respects.

B15: simulator at zero latency and no limit; rows/s of the local executor against
``--executor ray`` with 1, 2 and 4 workers, on the same machine, in one run (after a 50-row warm-up
of each executor, so no run pays the one-time imports; ``--repeat N`` runs each configuration N
times, in turn, and prints medians). For each configuration it prints
this process's CPU per row split by phase (``time.process_time``, every thread of the process,
Ray's own threads included): *preflight* (lock, Ray workers launched, checks), *plan* (rows planned
into the ledger), *dispatch* (every pending row settled: for Ray, the driver's leases, commits and
in-run duplicates; for local, everything including the requests), *export* (the output file written
from the ledger). Target: the Ray driver's dispatch phase at most 50 µs per row.

Both connect to one local Ray (2 CPUs, no dashboard) first, so Ray's own start (about 10 s here)
is not in the figures; starting the workers is (it is part of every run).

    python bench/b14_b15_ray.py [--only b14|b15] [--rows 4000] [--b15-rows 10000] [--repeat 1]
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from _common import table, write_job, write_rows_csv

from llmap import Job
from llmap.observe.progress import NullProgress
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


class Phases(NullProgress):
    """Marks this process's CPU seconds (and wall) where a run's phases meet: preflight ends when
    :meth:`Job.prepare` returns, plan when the progress reporter starts, dispatch when it finishes."""

    def __init__(self) -> None:
        self.marks: dict[str, tuple[float, float]] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = (time.process_time(), time.perf_counter())

    def start(self, tally) -> None:
        self.mark("plan")

    def finish(self, tally) -> None:
        self.mark("dispatch")


class TimedJob(Job):
    phases: Phases

    async def prepare(self, **kw):
        prepared = await super().prepare(**kw)
        self.phases.mark("preflight")
        return prepared


def one(name: str, csv: Path, tmp: Path, *, executor: str, workers: int | None, sim_kw: dict, limits: str) -> dict:
    with start_simulator_process(**sim_kw) as sim:
        job = TimedJob.from_toml(write_job(tmp, name=name, csv=csv, base_urls=[sim.base_url], limits=limits))
        job.phases = phases = Phases()
        t0, epoch0, cpu0 = time.perf_counter(), time.time(), time.process_time()
        phases.marks["start"] = (cpu0, t0)
        result = job.run(executor=executor, workers=workers, progress=phases)
        phases.mark("export")
        wall, epoch1, cpu = time.perf_counter() - t0, time.time(), time.process_time() - cpu0
        stats = sim.stats()
    times = _requests(tmp / ".llmap" / f"{name}.ledger.sqlite")
    if result.exit_code != 0:
        raise SystemExit(f"{name} failed: {result.counts} {result.stop_reason}")
    n429 = stats["by_status"].get("429", 0)
    return {"name": name, "rows": result.counts["done"], "wall_s": wall, "span_s": times[-1] - times[0],
            "requests": stats["requests"], "429": n429, "429_pct": 100 * n429 / max(1, stats["requests"]),
            "busiest_60s": _busiest_minute(times), "before_s": times[0] - epoch0, "after_s": epoch1 - times[-1],
            "driver_cpu_us": 1e6 * cpu / max(1, result.counts["done"]),
            "phases": _phases(phases, result.counts["done"])}


def _phases(phases: Phases, rows: int) -> dict[str, tuple[float, float]]:
    """Phase -> (CPU µs per row, wall seconds)."""
    order = ["start", "preflight", "plan", "dispatch", "export"]
    m = phases.marks
    return {b: (1e6 * (m[b][0] - m[a][0]) / max(1, rows), m[b][1] - m[a][1])
            for a, b in zip(order, order[1:], strict=False) if a in m and b in m}


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


B15_RUNS = (("local", None), ("ray", 1), ("ray", 2), ("ray", 4))


def b15(rows: int, tmp: Path, repeat: int = 1) -> list[tuple[str, str]]:
    csv = write_rows_csv(tmp / "b15.csv", rows)
    warm = write_rows_csv(tmp / "b15-warm.csv", 50)
    for executor, w in (("local", None), ("ray", 1)):  # imports (pyarrow's of pandas, Ray's), charged to no run
        one(f"b15-warm-{executor}", warm, tmp, executor=executor, workers=w, sim_kw={"seed": 1}, limits="")
    runs: dict[tuple, list[dict]] = {k: [] for k in B15_RUNS}
    for i in range(repeat):  # the configurations in turn, so each sees the machine's load alike
        for executor, w in B15_RUNS:
            runs[(executor, w)].append(one(f"b15-{executor}{w or ''}-{i}", csv, tmp, executor=executor, workers=w,
                                           sim_kw={"seed": 1}, limits=""))
    out = []
    base = base_span = None
    for (executor, w), rs in runs.items():
        rate = statistics.median(r["rows"] / r["wall_s"] for r in rs)
        rate_span = statistics.median(r["rows"] / max(r["span_s"], 1e-9) for r in rs)
        base, base_span = base or rate, base_span or rate_span
        phases = {k: statistics.median(r["phases"][k][0] for r in rs) for k in rs[0]["phases"]}
        dispatch = sorted(r["phases"]["dispatch"][0] for r in rs)
        label = f"B15 {executor}" + (f" {w} worker{'s' if w > 1 else ''}" if w else "")
        out.append((label,
                    f"{rate:,.0f} rows/s over the run ({rate / base:.2f}x local); "
                    f"{rate_span:,.0f} rows/s first to last answer ({rate_span / base_span:.2f}x local)"))
        out.append(("  this process's CPU, µs/row",
                    ", ".join(f"{k} {v:,.1f}" for k, v in phases.items())
                    + f"; total {statistics.median(r['driver_cpu_us'] for r in rs):,.1f}"
                    + (f"  (dispatch over {repeat} runs: {', '.join(f'{d:.1f}' for d in dispatch)})"
                       if repeat > 1 else "")))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["b14", "b15"])
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--b15-rows", type=int, default=10000)
    ap.add_argument("--repeat", type=int, default=1, help="B15: runs of each configuration (medians printed)")
    args = ap.parse_args()
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    lines: list[tuple[str, str]] = []
    try:
        with tempfile.TemporaryDirectory() as t:
            tmp = Path(t)
            if args.only in (None, "b14"):
                lines += b14(args.rows, tmp)
            if args.only in (None, "b15"):
                lines += b15(args.b15_rows, tmp, args.repeat)
    finally:
        ray.shutdown()
    print(table(lines, "B14/B15: llmap on Ray"))
    print(f"\nreproduce: .venv/bin/python bench/b14_b15_ray.py --rows {args.rows} --b15-rows {args.b15_rows}"
          + (f" --repeat {args.repeat}" if args.repeat > 1 else "") + (f" --only {args.only}" if args.only else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
