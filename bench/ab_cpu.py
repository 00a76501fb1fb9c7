"""A/B of llmap versions in one sitting: CPU seconds (user + sys) of `llmap run` per 1,000 rows, and rows/s.

Each version is a source folder (a checkout's ``src``, e.g. from ``git worktree add /tmp/before <commit>``),
run in turn, round after round, against one zero-latency simulator in its own process; the median of the
rounds is printed. CPU time is the figure to compare on a shared machine (wall time moves with the load).

    python bench/ab_cpu.py --rows 20000 --repeat 3 before=/tmp/before/src after=src
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOB = """
name = "ab"
[input]
path = "{csv}"
key = "id"
[prompt]
system = "Label the text."
user = "{{{{ text }}}}"
[output]
path = "out/ab.jsonl"
{output_extra}
[output.fields]
label = {{ type = "string", enum = ["a", "b", "c"] }}
score = {{ type = "number" }}
[model]
provider = "openai"
name = "sim"
base_url = "{base_url}"
[limits]
concurrency = {concurrency}
{extra}
"""

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--extra", default="", help="TOML appended to the job (after [limits])")
    ap.add_argument("--no-confidence", action="store_true",
                    help="[output] confidence = false: no log-probabilities asked for or read (what _confidence "
                         "costs; only for versions that know the key)")
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("versions", nargs="+", metavar="NAME=SRC")
    a = ap.parse_args()
    from llmap.sim import start_simulator_process
    res = {v.split("=")[0]: [] for v in a.versions}
    with tempfile.TemporaryDirectory() as t, start_simulator_process(latency_median=a.latency) as sim:
        tmp = Path(t)
        with open(tmp / "rows.csv", "w") as f:
            f.write("id,text\n")
            for i in range(a.rows):
                f.write(f"r{i},row number {i} about the school budget and buses\n")
        for rep in range(a.repeat):
            for v in a.versions:
                name, src = v.split("=")
                d = tmp / name
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir()
                (d / "job.toml").write_text(JOB.format(csv=tmp / "rows.csv", base_url=sim.base_url,
                                                       concurrency=a.concurrency, extra=a.extra,
                                                       output_extra="confidence = false" if a.no_confidence else ""))
                env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "LLMAP_CACHE_DIR": str(d / "cache")}
                r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                p = subprocess.run([sys.executable, "-m", "llmap", "run", str(d / "job.toml"), "-q"], env=env,
                                   capture_output=True, text=True)
                wall = time.perf_counter() - t0
                r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
                assert p.returncode == 0, p.stderr
                res[name].append((cpu / a.rows * 1000, a.rows / wall))
                print(f"{name} round {rep + 1}: {cpu / a.rows * 1000:.3f} CPU s per 1,000 rows, "
                      f"{a.rows / wall:,.0f} rows/s", flush=True)
    for name, xs in res.items():
        print(f"{name}: median {statistics.median(x[0] for x in xs):.3f} CPU s per 1,000 rows, "
              f"median {statistics.median(x[1] for x in xs):,.0f} rows/s (wall)")


if __name__ == "__main__":
    main()
