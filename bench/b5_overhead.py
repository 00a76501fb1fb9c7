"""B5 overhead: client CPU per 1,000 rows and rows/s, llmap beside the openai SDK and LiteLLM.

20,000 rows (``--rows``) against llmap's simulator at zero latency with no rate
limits, run in its own process. Three clients, one after another, against the
same simulator, each in its own process so only its CPU (user + sys, from
``getrusage(RUSAGE_CHILDREN)`` deltas) is counted, never the simulator's:

1. llmap: ``llmap run JOB.toml -q`` on a generated CSV (id, text), provider
   ``openai`` at the simulator, 2 output fields, ``[limits] concurrency = 64``;
   writes its SQLite ledger and a JSONL output.
2. openai SDK: ``AsyncOpenAI(max_retries=0)`` + ``asyncio.Semaphore(64)``, same
   messages and ``response_format``, ``json.loads`` per answer, JSONL output.
3. LiteLLM ``Router`` (one deployment ``openai/sim``), ``await
   router.acompletion(...)`` with the same semaphore and requests.

The peers live in their own venv, ``bench/.venv-peers`` (created here and filled
from ``bench/peers/requirements-b5.txt`` when missing), never in llmap's. Every
figure includes the process's start-up (interpreter, imports). The simulator must
see exactly ``--rows`` chat completions per client.

    python bench/b5_overhead.py                 # 20,000 rows
    python bench/b5_overhead.py --rows 2000     # a quick try
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO

from llmap.sim import start_simulator_process

BENCH = REPO / "bench"
PEER_SCRIPT = BENCH / "b5_peer.py"
PEER_REQUIREMENTS = BENCH / "peers" / "requirements-b5.txt"
DEFAULT_PEERS_VENV = BENCH / ".venv-peers"
# LiteLLM: quiet, no telemetry, no remote model cost map (nothing leaves the machine).
PEER_ENV = {"LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False"}

JOB = """
name = "b5-overhead"
[input]
path = "{csv}"
key = "id"
[prompt]
system = "You label short customer comments."
user = "Comment: {{{{ text }}}}"
[output]
path = "out/llmap.jsonl"
[output.fields]
label = {{ type = "string", enum = ["positive", "negative", "neutral"] }}
score = {{ type = "number", description = "0 to 1" }}
[model]
provider = "openai"
name = "sim"
base_url = "{base_url}"
[limits]
concurrency = {concurrency}
"""

WORDS = [
    "the", "delivery", "was", "late", "but", "support", "fixed", "it", "quickly", "and", "product",
    "works", "well", "enough", "battery", "screen", "price", "shipping", "refund", "broken", "great",
    "terrible", "okay", "fine", "excellent", "slow", "fast", "would", "buy", "again", "never",
    "recommend", "box", "arrived", "damaged", "love", "this", "quality", "cheap", "sturdy", "flimsy",
]


def write_csv(path: Path, rows: int) -> None:
    rng = random.Random(5)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        for i in range(rows):
            w.writerow([i, " ".join(rng.choices(WORDS, k=rng.randint(8, 24)))])


def pinned() -> dict[str, str]:
    out = {}
    for line in PEER_REQUIREMENTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[name.strip()] = version.strip()
    return out


def ensure_peers_venv(venv: Path) -> Path:
    """Create/fill the peers' venv if needed; return its python. Prints what it does."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"peers venv: creating {venv} (python -m venv, no system site-packages)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    want = pinned()
    probe = ("import importlib.metadata as m, json, sys\n"
             "def v(n):\n"
             "    try: return m.version(n)\n"
             "    except m.PackageNotFoundError: return None\n"
             "print(json.dumps({n: v(n) for n in sys.argv[1:]}))")
    have = json.loads(subprocess.run([str(python), "-c", probe, *want], check=True,
                                     capture_output=True, text=True).stdout)
    if have != want:
        print(f"peers venv: installing {PEER_REQUIREMENTS.relative_to(REPO)} into {venv} "
              f"(have {have}, want {want})", flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(PEER_REQUIREMENTS)], check=True)
    else:
        print(f"peers venv: reusing {venv} ({', '.join(f'{k} {v}' for k, v in have.items())})", flush=True)
    return python


def measured(argv: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run one child; return (result, wall s, CPU s user+sys of that child alone)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, timeout=3600, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return res, wall, cpu


def count_done(path: Path) -> int:
    with path.open() as f:
        return sum(1 for line in f if json.loads(line).get("_status") == "done")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1, help="runs per client; the median is reported")
    ap.add_argument("--peers-venv", type=Path, default=DEFAULT_PEERS_VENV)
    args = ap.parse_args()
    peer_python = ensure_peers_venv(args.peers_venv)
    llmap_cli = Path(sys.executable).with_name("llmap")
    llmap_argv = [str(llmap_cli)] if llmap_cli.exists() else [sys.executable, "-m", "llmap"]
    peer_env = {**os.environ, **PEER_ENV}

    runs: dict[str, list[tuple[float, float]]] = {"llmap": [], "openai": [], "litellm": []}
    versions: dict[str, str] = {}
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp_name, start_simulator_process() as sim:
        tmp = Path(tmp_name)
        data = tmp / "rows.csv"
        write_csv(data, args.rows)
        job = tmp / "b5.toml"
        job.write_text(JOB.format(csv=data, base_url=sim.base_url, concurrency=args.concurrency))
        from llmap import __version__ as llmap_version

        versions["llmap"] = llmap_version
        for rnd in range(args.repeat):
            for client in runs:
                sim.reset_stats()
                if client == "llmap":
                    shutil.rmtree(tmp / ".llmap", ignore_errors=True)
                    shutil.rmtree(tmp / "out", ignore_errors=True)
                    res, wall, cpu = measured([*llmap_argv, "run", str(job), "-q"])
                    out = tmp / "out" / "llmap.jsonl"
                else:
                    out = tmp / f"{client}.jsonl"
                    res, wall, cpu = measured([str(peer_python), str(PEER_SCRIPT), client,
                                               "--base-url", sim.base_url, "--csv", str(data), "--out", str(out),
                                               "--concurrency", str(args.concurrency)], env=peer_env)
                    if res.returncode == 0:
                        summary = json.loads(res.stdout.strip().splitlines()[-1])
                        versions[client] = summary["version"]
                requests = sim.stats()["requests"]
                done = count_done(out) if out.exists() else 0
                label = f"{client} (run {rnd + 1})"
                if res.returncode != 0:
                    problems.append(f"{label}: exit {res.returncode}: {(res.stderr or res.stdout).strip()[-600:]}")
                if requests != args.rows:
                    problems.append(f"{label}: the simulator saw {requests:,} requests, expected {args.rows:,}")
                if done != args.rows:
                    problems.append(f"{label}: {done:,} rows done in {out.name}, expected {args.rows:,}")
                print(f"{label}: {wall:.1f} s wall, {cpu:.1f} s CPU, {requests:,} requests, {done:,} done",
                      flush=True)
                runs[client].append((wall, cpu))

    n = args.rows
    fig = {}
    for client, rs in runs.items():
        wall = statistics.median(w for w, _ in rs)
        cpu = statistics.median(c for _, c in rs)
        fig[client] = {"wall_s": wall, "rows_per_s": n / wall, "cpu_s": cpu, "cpu_s_per_1k": cpu / n * 1000}
    base = fig["llmap"]["cpu_s_per_1k"]
    header = ("client", "version", "rows", "wall s", "rows/s", "CPU s", "CPU s/1k rows", "CPU/row vs llmap")
    lines = [header]
    for client, f in fig.items():
        lines.append((client, versions.get(client, "?"), f"{n:,}", f"{f['wall_s']:.1f}", f"{f['rows_per_s']:,.0f}",
                      f"{f['cpu_s']:.1f}", f"{f['cpu_s_per_1k']:.3f}", f"{f['cpu_s_per_1k'] / base:.2f}x"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    title = (f"B5 overhead: {n:,} rows, zero-latency simulator (own process), concurrency {args.concurrency}, "
             f"{os.cpu_count()} CPUs")
    print()
    print(title)
    print("-" * len(title))
    for i, row in enumerate(lines):
        print("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    met = all(fig["llmap"]["cpu_s_per_1k"] < fig[p]["cpu_s_per_1k"] for p in ("openai", "litellm"))
    print()
    print("CPU = user + sys of the client process only (getrusage of the child), start-up included;"
          " the simulator's CPU is not counted.")
    print("target: llmap uses less CPU per row than both peers -> " + ("MET" if met else "NOT MET"))
    for p in problems:
        print("problem: " + p)
    print(f"command: python bench/b5_overhead.py --rows {n} --concurrency {args.concurrency} --repeat {args.repeat}")
    print(json.dumps({
        "rows": n, "concurrency": args.concurrency, "repeat": args.repeat, "versions": versions,
        **{c: {k: round(v, 4) for k, v in f.items()} for c, f in fig.items()},
        "target_met": met, "ok": not problems,
    }))
    return 0 if met and not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
