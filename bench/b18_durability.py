"""B18 durability: SIGKILL `llmap run` at random moments; count the answers paid for twice.

An answer received is an answer kept: the pool commits settled rows at the end of the event-loop turn
they settle in. After each kill, the rerun finishes the job; the requests paid twice (the first run's
requests whose answers the ledger lacks) must be at most the requests in flight (``[limits]
concurrency``). Runs against the simulator in its own process, with the response cache on and off.

    python bench/b18_durability.py [--rows 5000] [--kills 10] [--concurrency 16] [--seed 18]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import table

from llmap.sim import start_simulator_process

JOB = """
name = "b18"
[input]
path = "{csv}"
key = "id"
[prompt]
user = "{{{{ text }}}}"
[output]
path = "out/b18.parquet"
[output.fields]
label = {{ type = "string", enum = ["a", "b", "c"] }}
[model]
provider = "openai"
name = "sim"
base_url = "{base_url}"
[limits]
concurrency = {concurrency}
hedge_tail = false
[cache]
enabled = {cache}
"""


def done(ledger: Path) -> int:
    try:
        with sqlite3.connect(ledger) as db:
            return db.execute("SELECT count(*) FROM rows WHERE status = 'done'").fetchone()[0]
    except sqlite3.Error:
        return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seed", type=int, default=18)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    lines, worst, ok = [], 0, True
    with tempfile.TemporaryDirectory() as t, start_simulator_process(latency_median=0.005, latency_sigma=0.5) as sim:
        tmp = Path(t)
        csv = tmp / "rows.csv"
        csv.write_text("id,text\n" + "".join(f"r{i},row {i} about buses\n" for i in range(args.rows)))
        for k in range(args.kills):
            cache = "true" if k % 2 == 0 else "false"
            d = tmp / f"k{k}"
            d.mkdir()
            (d / "job.toml").write_text(JOB.format(csv=csv, base_url=sim.base_url, concurrency=args.concurrency,
                                                   cache=cache))
            env = {**os.environ, "LLMAP_CACHE_DIR": str(d / "cache")}
            sim.reset_stats()
            proc = subprocess.Popen([sys.executable, "-m", "llmap", "run", str(d / "job.toml"), "-q"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            target = rng.randrange(args.rows // 20, args.rows * 3 // 4)
            ledger = d / ".llmap" / "b18.ledger.sqlite"
            deadline = time.monotonic() + 300
            while done(ledger) < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.001)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            at_kill, sent = done(ledger), sim.stats()["requests"]
            rerun = subprocess.run([sys.executable, "-m", "llmap", "run", str(d / "job.toml"), "-q"], env=env,
                                   capture_output=True, text=True)
            again = sim.stats()["requests"] - sent
            twice = sent + again - args.rows
            worst = max(worst, twice)
            ok &= rerun.returncode == 0 and twice <= args.concurrency
            lines.append((f"kill {k + 1} (cache {cache})", f"{at_kill:,} done at the kill, {sent:,} sent; rerun sent "
                                                          f"{again:,}; paid twice {twice}"))
    lines.append(("worst paid twice", f"{worst} (bound: {args.concurrency} in flight) -> {'met' if ok else 'MISSED'}"))
    print(table(lines, f"B18: {args.kills} SIGKILLs of a {args.rows:,}-row run at concurrency {args.concurrency}"))
    print(f"reproduce: python bench/b18_durability.py --rows {args.rows} --kills {args.kills} "
          f"--concurrency {args.concurrency} --seed {args.seed}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
