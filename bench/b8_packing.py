"""B8 packing: 10,000 rows with ``pack = 10``.

Runs against the zero-latency simulator (own process), each with a fresh response cache:
  1. packed: requests must be at most 1,050 (ideal 1,000);
  2. unpacked (pack = 1): every row's answer must equal the packed run's (items are matched
     by id; the simulator derives a row's answer from the model and the row's text only);
  3. packed, with 5% of items corrupted by the simulator (--corrupt-item-rate 0.05): every row
     done, requests at most 1.3 x ideal;
  4. packed, with 30% of the rows duplicating another row's text: identical rows wait for the
     first and share its answer, so requests = ceil(unique rows / 10) + bisect retries (none here).

    python bench/b8_packing.py [--rows 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
from _common import run_cli, table, write_rows_csv

from llmap.sim import start_simulator_process

JOB = """
name = "{name}"
[input]
path = "{csv}"
key = "id"
[prompt]
system = "You tag short notes."
user = "{{{{ body }}}}"
pack = {pack}
[output]
path = "out/{name}.parquet"
[output.fields]
topic = {{ type = "string", enum = ["budget", "staff", "transport", "food", "governance", "other"] }}
confidence = {{ type = "number" }}
[model]
provider = "openai"
name = "sim"
base_url = "{base_url}"
max_tokens = 64
"""


def run(tmp: Path, name: str, csv: Path, pack: int, **sim_kw) -> dict:
    os.environ["LLMAP_CACHE_DIR"] = str(tmp / f"cache-{name}")  # a fresh cache per run
    with start_simulator_process(seed=8, **sim_kw) as sim:
        job = tmp / f"{name}.toml"
        job.write_text(JOB.format(name=name, csv=csv, pack=pack, base_url=sim.base_url))
        res, wall, _ = run_cli(["run", str(job), "-q"])
        requests = sim.stats()["requests"]
    rows = pq.read_table(tmp / "out" / f"{name}.parquet").to_pylist()
    return {"name": name, "exit": res.returncode, "wall_s": wall, "requests": requests,
            "done": sum(r["_status"] == "done" for r in rows),
            "answers": {r["id"]: (r["topic"], r["confidence"]) for r in rows}}


def _with_duplicates(src: Path, dst: Path, unique: int) -> Path:
    """``src`` with every row from ``unique`` on carrying the body of row ``i % unique`` (ids stay unique)."""
    lines = src.read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], lines[1:]
    out = [header]
    for i, line in enumerate(rows):
        if i >= unique:
            rid, title, _ = line.split(",", 2)
            line = f"{rid},{title},{rows[i % unique].split(',', 2)[2]}"
        out.append(line)
    dst.write_text("\n".join(out) + "\n", encoding="utf-8")
    return dst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000)
    args = ap.parse_args()
    n, ideal = args.rows, -(-args.rows // 10)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        csv = write_rows_csv(tmp / "rows.csv", n)
        packed = run(tmp, "packed", csv, 10)
        single = run(tmp, "single", csv, 1)
        corrupt = run(tmp, "corrupt", csv, 10, corrupt_item_rate=0.05)
        unique = n - 3 * n // 10
        dupes = run(tmp, "dupes", _with_duplicates(csv, tmp / "dupes.csv", unique), 10)
    ideal_dupes = -(-unique // 10)
    same = sum(packed["answers"][k] == v for k, v in single["answers"].items())
    checks = {
        "packed requests <= 1.05 x ideal": packed["requests"] <= 1.05 * ideal,
        "packed answers == unpacked": same == n,
        "corrupt: all done": corrupt["done"] == n,
        "corrupt requests <= 1.3 x ideal": corrupt["requests"] <= 1.3 * ideal,
        "30% duplicates: all done": dupes["done"] == n,
        "30% duplicates: requests == ceil(unique / 10)": dupes["requests"] == ideal_dupes,
    }
    print(table([
        ("rows / ideal requests at pack = 10", f"{n:,} / {ideal:,}"),
        ("packed: requests, wall",
         f"{packed['requests']:,} (target <= {int(1.05 * ideal):,}), {packed['wall_s']:.1f} s"),
        ("unpacked: requests, wall", f"{single['requests']:,}, {single['wall_s']:.1f} s"),
        ("rows whose packed answer equals the unpacked one", f"{same:,} of {n:,} (target: all)"),
        ("5% items corrupted: rows done", f"{corrupt['done']:,} of {n:,} (target: all)"),
        ("5% items corrupted: requests", f"{corrupt['requests']:,} = {corrupt['requests'] / ideal:.3f} x ideal "
                                        f"(target <= 1.3), {corrupt['wall_s']:.1f} s"),
        ("30% duplicates: unique rows, rows done", f"{unique:,}, {dupes['done']:,} of {n:,} (target: all)"),
        ("30% duplicates: requests", f"{dupes['requests']:,} (target = ceil(unique / 10) = {ideal_dupes:,}), "
                                     f"{dupes['wall_s']:.1f} s"),
        ("command", f"python bench/b8_packing.py --rows {n}"),
    ], "B8 packing: pack = 10, zero-latency simulator"))
    print(json.dumps({"checks": checks, "packed_requests": packed["requests"], "corrupt_requests": corrupt["requests"],
                      "dupes_requests": dupes["requests"], "same_answers": same, "met": all(checks.values())}))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
