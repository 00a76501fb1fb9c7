"""B10 estimate: how long `llmap.observe.estimate.rows` takes (target: under 5 s for 100,000 rows), sending nothing.

Scenarios:
  1. 100,000 generated rows, no ledger, no response cache (every row rendered and keyed);
  2. the same rows with half of their answers already in the response cache
     (every row rendered, keyed and looked up; 50,000 hits expected);
  3. the 17,842 NCES districts before any run, then after `llmap run` against
     the simulator (every row done; usage learned from the ledger). Skipped when
     ../shared/data is absent.

The model's base URL in scenarios 1-2 is a closed port: an estimate that tried
to reach it would fail. In scenario 3 the simulator counts requests: the
estimates must add none.

    python bench/b10_estimate.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import SHARED_DATA, run_cli, table, write_job, write_rows_csv
from b0_districts import JOB as DISTRICTS_JOB

from llmap import Job
from llmap.observe.estimate.rows import Estimate, estimate
from llmap.prompt.render import Renderer
from llmap.prompt.schema import OutputSchema
from llmap.store.answers import AnswerCache
from llmap.store.cache import CacheEntry, ResponseCache

TARGET_S = 5.0


def timed(job_path: Path) -> tuple[Estimate, float]:
    t0 = time.perf_counter()
    est = estimate(Job.from_toml(job_path).spec)
    return est, time.perf_counter() - t0


def fill_cache(job_path: Path, csv: Path, every: int) -> int:
    """Store an answer for every ``every``-th row's request, as a run would have. Returns how many."""
    import csv as csvmod

    spec = Job.from_toml(job_path).spec
    renderer = Renderer.from_spec(spec.prompt)
    schema = OutputSchema(spec.output.fields).json_schema
    entries = []
    with open(csv, encoding="utf-8") as f:
        for i, row in enumerate(csvmod.DictReader(f)):
            if i % every == 0:
                key = AnswerCache.key(spec.model, renderer.messages(row), schema)
                entries.append(CacheEntry(key, spec.model.label, {"topic": "other"}, 10, 5))
    with ResponseCache() as cache:
        cache.put_many(entries)
    return len(entries)


def line(label: str, est: Estimate, wall: float) -> tuple[str, str]:
    return (label, f"{est.elapsed_s:.2f} s (wall with spec load {wall:.2f} s); rows {est.rows:,}, done {est.done:,}, "
                   f"cached {est.cached:,}, duplicates {est.duplicates:,}, to request {est.to_request:,}, "
                   f"prompt tokens {est.prompt_tokens:,} ({est.chars_per_token_source}), completion tokens "
                   f"{est.completion_tokens:,} ({est.completion_source}), cost ${est.cost_usd:,.2f}, "
                   f"time {est.time_s:,.0f} s (by {est.time_bound})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()
    n = args.rows
    figures: list[tuple[str, str]] = []
    checks: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        os.environ["LLMAP_CACHE_DIR"] = str(tmp / "cache")  # a fresh, private response cache
        csv = write_rows_csv(tmp / "rows.csv", n)
        job = write_job(tmp, name="b10", csv=csv, base_urls=["http://127.0.0.1:9/v1"],
                        model_extra="price_in = 0.15\nprice_out = 0.60")
        est, wall = timed(job)
        figures.append((f"{n:,} rows, no ledger, no cache", ""))
        figures.append(line("  estimate", est, wall))
        checks["100k fresh under target"] = est.elapsed_s < TARGET_S and est.to_request == n
        stored = fill_cache(job, csv, 2)
        est, wall = timed(job)
        figures.append((f"{n:,} rows, {stored:,} answers in the cache", ""))
        figures.append(line("  estimate", est, wall))
        checks["100k with cache under target"] = est.elapsed_s < TARGET_S and est.cached == stored
    data = SHARED_DATA / "districts_2023_24_nces.csv"
    if not data.is_file():
        figures.append(("districts", f"skipped: {data} is absent"))
    else:
        from llmap.sim import start_simulator_process

        with tempfile.TemporaryDirectory() as t, start_simulator_process() as sim:
            tmp = Path(t)
            os.environ["LLMAP_CACHE_DIR"] = str(tmp / "cache")
            job = tmp / "b10-districts.toml"
            job.write_text(DISTRICTS_JOB.format(path=data, base_url=sim.base_url, concurrency=32))
            est, wall = timed(job)
            figures.append(("17,842 districts", ""))
            figures.append(line("  before any run", est, wall))
            checks["districts before run"] = (est.elapsed_s < TARGET_S and sim.stats()["requests"] == 0
                                              and est.to_request + est.duplicates == 17_842)
            res, run_wall, _ = run_cli(["run", str(job), "-q"])
            sent = sim.stats()["requests"]
            figures.append(("  llmap run", f"exit {res.returncode}, {sent:,} requests (estimated {est.requests:,}), "
                                           f"{run_wall:.1f} s"))
            checks["districts: run sent the estimated requests"] = res.returncode == 0 and sent == est.requests
            est, wall = timed(job)
            figures.append(line("  after the run", est, wall))
            checks["districts after run"] = (est.done == 17_842 and est.to_request == 0
                                             and est.completion_source == "past runs"
                                             and sim.stats()["requests"] == sent)
    figures.append(("target", f"< {TARGET_S:.0f} s per estimate on this {os.cpu_count()}-core machine"))
    figures.append(("command", f"python bench/b10_estimate.py --rows {n}"))
    print(table(figures, "B10 estimate: rows, tokens, cost and time of a run, without sending a request"))
    print(json.dumps(checks))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
