"""B17 the 429 regression: four scenarios against a simulator whose buckets hold 1 s of burst.

Every scenario runs ``llmap run`` (a child process) against the simulator (another child process)
started with ``--burst-s 1``: 3,000 RPM is enforced as 50 requests a second, as Anthropic says it may
("a rate of 60 requests per minute (RPM) might be enforced as 1 request per second"), while the
headers still say ``limit: 3000``. A client that takes ``limit`` (or a full minute) as its burst
over-sends; one that trusts ``remaining`` and the reset time does not.

1. told       1,500 rows, [limits] rpm = 3000, tpm = 1000000, concurrency = 100; latency median 0.5 s,
              sigma 0.5 (S1). A fixed concurrency lets a first burst out at once (AIMD's default start of
              16 would hide part of it).
2. not told   2,000 rows, no limits, [limits] concurrency = 100; latency median 0.5 s, sigma 0.5.
3. anthropic  1,000 rows, provider anthropic (/v1/messages, anthropic-ratelimit-* headers), no limits,
              concurrency 32, latency 0.1 s, 5% of requests answered 529 overloaded_error.
4. ray        3,000 rows as in 1, ``--executor ray --workers 4`` (on a 2-core machine the 4 workers
              share 2 cores: the 429 share is what can be seen, the wall includes Ray's start).

Printed per scenario: requests at the simulator, 429 answers and their share of requests (target
<= 0.5%), wall / ideal where ideal = rows / (RPM / 60) (wave 1's figure for "told" was 1.053), and the
first request to last answer from the ledger (start-up left out).

``--warm`` first runs a one-row job against the same simulator, so the client knows the server's
structured-output dialect, as it does on a second job against a server (remembered in the cache
folder): then the first request does not go alone and wait for its answer. Without it each scenario
is a first job against a new server.

``--client-src DIR`` runs another checkout's llmap as the client (its ``src`` folder, e.g. a
worktree of wave 1 at 8d392ef) against this checkout's simulator, so before and after are measured
in one sitting with the same server; scenarios that checkout cannot run (no Anthropic provider, no
Ray executor) are reported as such.

    python bench/b17_limits_regression.py [--only told,not-told,anthropic,ray] [--client-src DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import table, write_job, write_rows_csv

from llmap.sim import start_simulator_process

RPM, TPM, ITPM = 3000, 1_000_000, 1_000_000
KEY = "sk-ant-bench"
SCENARIOS = ("told", "not-told", "anthropic", "ray")

ANTHROPIC_JOB = """
name = "{name}"
[input]
path = "{csv}"
key = "id"
[prompt]
system = "You tag short notes."
user = "{{{{ title }}}}: {{{{ body }}}}"
[output]
path = "out/{name}.parquet"
[output.fields]
topic = {{ type = "string", enum = ["budget", "staff", "transport", "food", "governance", "other"] }}
confidence = {{ type = "number", description = "0 to 1" }}
urgent = {{ type = "boolean" }}
[model]
provider = "anthropic"
name = "claude-haiku-4-5"
base_url = "{url}"
max_tokens = 64
[limits]
concurrency = 32
"""


def run_llmap(args: list[str], client_src: Path | None, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m llmap ARGS`` with ``client_src`` (if given) first on the path; (result, wall seconds)."""
    env = dict(os.environ)
    if client_src is not None:
        env["PYTHONPATH"] = str(client_src) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "llmap", *args], capture_output=True, text=True, cwd=cwd, env=env,
                         timeout=1800)
    return res, time.perf_counter() - t0


def warm_up(name: str, tmp: Path, sim, client_src: Path | None) -> None:
    """One row of other text against the same simulator, so the client knows the server's dialect (as on a second
    job against it: the first request no longer goes alone); then the simulator's stats and buckets start over."""
    csv = tmp / f"{name}-warm.csv"
    csv.write_text("id,title,body\nwarm,Warm-up,one row that teaches the dialect\n", encoding="utf-8")
    if name == "anthropic":
        job = tmp / f"{name}-warm.toml"
        job.write_text(ANTHROPIC_JOB.format(name=f"{name}-warm", csv=csv, url=sim.url), encoding="utf-8")
    else:
        job = write_job(tmp, name=f"{name}-warm", csv=csv, base_urls=[sim.base_url])
    res, _ = run_llmap(["run", str(job), "-q"], client_src, tmp)
    if res.returncode != 0:
        raise SystemExit(f"warm-up of {name} failed: {res.stderr[-300:]}")
    sim.reset_stats()


def scenario(name: str, tmp: Path, client_src: Path | None, warm: bool = False) -> dict:
    rows = {"told": 1500, "not-told": 2000, "anthropic": 1000, "ray": 3000}[name]
    csv = write_rows_csv(tmp / f"{name}.csv", rows)
    sim_kw: dict = {"rpm": RPM, "burst_s": 1.0, "seed": 1}
    if name == "anthropic":
        sim_kw.update(itpm=ITPM, latency_median=0.1, overload_rate=0.05, require_key=KEY)
    else:
        sim_kw.update(tpm=TPM, latency_median=0.5, latency_sigma=0.5)
    extra: list[str] = []
    with start_simulator_process(**sim_kw) as sim:
        if name == "anthropic":
            job = tmp / f"{name}.toml"
            job.write_text(ANTHROPIC_JOB.format(name=name, csv=csv, url=sim.url), encoding="utf-8")
            os.environ["ANTHROPIC_API_KEY"] = KEY
        else:
            limits = "concurrency = 100" if name == "not-told" else f"rpm = {RPM}\ntpm = {TPM}\nconcurrency = 100"
            job = write_job(tmp, name=name, csv=csv, base_urls=[sim.base_url], limits=limits)
            if name == "ray":
                extra = ["--executor", "ray", "--workers", "4"]
        if warm:
            warm_up(name, tmp, sim, client_src)
        res, wall = run_llmap(["run", str(job), "-q", *extra], client_src, tmp)
        stats = sim.stats()
    out = {"scenario": name, "rows": rows, "rc": res.returncode}
    if res.returncode != 0:
        out["error"] = (res.stderr.strip().splitlines() or ["?"])[-1][:300]
        return out
    with sqlite3.connect(tmp / ".llmap" / f"{name}.ledger.sqlite") as db:
        done = db.execute("SELECT count(*) FROM rows WHERE status = 'done'").fetchone()[0]
        try:
            first, last = db.execute("SELECT min(t - latency_s), max(t) FROM requests").fetchone()
        except sqlite3.OperationalError:  # an older ledger without the request log
            first = last = None
    requests = stats["requests"]
    n429 = stats["by_status"].get("429", 0)
    ideal = rows / (RPM / 60)
    out.update(done=done, requests=requests, n429=n429, pct429=100 * n429 / max(1, requests),
               n529=stats["by_status"].get("529", 0), limited_at=stats.get("rate_limited_at", []), wall_s=wall,
               ideal_s=ideal, ratio=wall / ideal,
               dispatch_ratio=(last - first) / ideal if first is not None else None)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios: " + ", ".join(SCENARIOS))
    ap.add_argument("--client-src", type=Path, help="the src folder of another llmap checkout to run as the client")
    ap.add_argument("--repeat", type=int, default=1, help="runs per scenario (the 429 count is systematic)")
    ap.add_argument("--warm", action="store_true",
                    help="first teach the client the server's dialect with a one-row job (a second job against the "
                         "same server: its first request does not go alone)")
    args = ap.parse_args()
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    for s in wanted:
        if s not in SCENARIOS:
            raise SystemExit(f"unknown scenario {s!r}; use some of {', '.join(SCENARIOS)}")
    client = args.client_src.resolve() if args.client_src else None
    load = os.getloadavg()[0]
    results = []
    for name in wanted:
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as t:
                results.append(scenario(name, Path(t), client, args.warm))
    label = (f"client {client}" if client else "client: this checkout") + (", dialect known" if args.warm else "")
    lines = []
    for name in wanted:
        runs = [r for r in results if r["scenario"] == name]
        ok = [r for r in runs if r["rc"] == 0]
        if not ok:
            lines.append((name, f"did not run: {runs[0].get('error', '?')}"))
            continue
        n429 = ", ".join(f"{r['n429']}/{r['requests']} = {r['pct429']:.2f}%" for r in ok)
        ratio = statistics.median(r["ratio"] for r in ok)
        disp = [r["dispatch_ratio"] for r in ok if r["dispatch_ratio"] is not None]
        extra = f"; first request to last answer {statistics.median(disp):.3f}" if disp else ""
        done = min(r["done"] for r in ok)
        times = sorted(t for r in ok for t in r["limited_at"])
        if times:  # when the 429s came, seconds after the first request (all runs together)
            extra += (f"; 429s at {times[0]:.1f}-{times[-1]:.1f} s, "
                      f"{sum(t < 2.0 for t in times)} of {len(times)} in the first 2 s")
        lines.append((f"{name} ({ok[0]['rows']:,} rows, {done:,} done)",
                      f"429s {n429} (target <= 0.5%); wall/ideal {ratio:.3f}{extra}"
                      + (f"; 529s {ok[0]['n529']}" if name == "anthropic" else "")))
    print(table(lines, f"B17: simulator --rpm {RPM} --burst-s 1 ({label}; load average {load:.2f} at start)"))
    cmd = "python bench/b17_limits_regression.py --only " + ",".join(wanted)
    if client:
        cmd += f" --client-src {client}"
    if args.repeat != 1:
        cmd += f" --repeat {args.repeat}"
    if args.warm:
        cmd += " --warm"
    print(f"\ncommand: {cmd}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
