"""B12 prompt caching: 1,000 rows sharing a 2,000-token system prompt, with and without prompt_cache.

Simulator (a separate process): /v1/messages, --latency-median 0.2 --latency-sigma 0.5; a prefix marked
with cache_control is cached once it is at least 1,024 tokens (the simulator counts 4 characters per
token, so the system prompt is 8,000 characters). The job's [model] prompt_cache is true (the default
for anthropic) in the first run and false in the second; the response cache is off in both, so every
row is a request. Input cost is the ledger's per-request usage at Claude Haiku 4.5's list prices
(USD 1 per million input tokens, cache reads 0.1 x, cache writes 1.25 x: llmap's defaults).

Targets: share of requests that read the prefix from the cache >= 99%;
         billed input cost with caching <= 0.15 x the same run without.

    python bench/b12_prompt_cache.py [--rows 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import tempfile
from pathlib import Path

from _common import run_cli, table, write_rows_csv

from llmap.pricing import cost_usd
from llmap.sim import start_simulator_process
from llmap.spec import ModelSpec

KEY = "sk-ant-bench"
SYSTEM = ("You tag short notes from school district board meetings. " * 140)[:8000]  # 2,000 simulator tokens

JOB = """
name = "{name}"
[input]
path = "{csv}"
key = "id"
[prompt]
system = "{system}"
user = "{{{{ title }}}}: {{{{ body }}}}"
[output]
path = "out/{name}.parquet"
[output.fields]
topic = {{ type = "string", enum = ["budget", "staff", "transport", "food", "governance", "other"] }}
urgent = {{ type = "boolean" }}
[model]
provider = "anthropic"
name = "claude-haiku-4-5"
base_url = "{url}"
max_tokens = 64
price_in = 1.0
price_out = 5.0
prompt_cache = {cache}
[cache]
enabled = false
"""


def one(tmp: Path, csv: Path, url: str, *, cache: bool) -> dict:
    name = "b12-cache" if cache else "b12-no-cache"
    job = tmp / f"{name}.toml"
    job.write_text(JOB.format(name=name, csv=csv, system=SYSTEM, url=url, cache=str(cache).lower()), encoding="utf-8")
    res, wall, _ = run_cli(["run", str(job), "-q"])
    if res.returncode != 0:
        raise SystemExit(f"{name} failed: {res.stderr}")
    model = ModelSpec(provider="anthropic", name="claude-haiku-4-5", price_in=1.0, price_out=5.0)
    with sqlite3.connect(tmp / ".llmap" / f"{name}.ledger.sqlite") as db:
        reqs = db.execute("SELECT prompt_tokens, cache_read_tokens, cache_write_tokens FROM requests "
                          "WHERE outcome = '200'").fetchall()
    return {"name": name, "wall_s": wall, "requests": len(reqs), "reads": sum(1 for r in reqs if r[1]),
            "writes": sum(1 for r in reqs if r[2]), "prompt_tokens": sum(r[0] for r in reqs),
            "cache_read_tokens": sum(r[1] for r in reqs),
            "input_usd": sum(cost_usd(model, pt, 0, read, write) for pt, read, write in reqs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1000)
    args = ap.parse_args()
    os.environ["ANTHROPIC_API_KEY"] = KEY
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        csv = write_rows_csv(tmp / "rows.csv", args.rows)
        with start_simulator_process(latency_median=0.2, latency_sigma=0.5, seed=1, require_key=KEY) as sim:
            cached = one(tmp, csv, sim.url, cache=True)
            sim.reset_stats()  # also empties the simulator's prompt cache
            plain = one(tmp, csv, sim.url, cache=False)
    share = cached["reads"] / max(1, cached["requests"])
    ratio = cached["input_usd"] / plain["input_usd"]
    print(table([
        ("rows", f"{args.rows:,}"),
        ("requests (with / without caching)", f"{cached['requests']:,} / {plain['requests']:,}"),
        ("requests that read the prefix from the cache", f"{cached['reads']:,} = {100 * share:.2f}% (target >= 99%)"),
        ("requests that wrote it", f"{cached['writes']:,}"),
        ("prompt tokens (of them cache reads)", f"{cached['prompt_tokens']:,} ({cached['cache_read_tokens']:,})"),
        ("billed input cost with caching", f"${cached['input_usd']:.4f}"),
        ("billed input cost without caching", f"${plain['input_usd']:.4f}"),
        ("with / without", f"{ratio:.3f} x (target <= 0.15)"),
        ("wall time with / without", f"{cached['wall_s']:.1f} s / {plain['wall_s']:.1f} s"),
    ], "B12: 1 system prompt of 2,000 tokens shared by every row, /v1/messages, prompt_cache on and off"))
    print(f"\ncommand: python bench/b12_prompt_cache.py --rows {args.rows}")
    print(json.dumps({"cached": cached, "plain": plain, "read_share": share, "input_cost_ratio": ratio}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
