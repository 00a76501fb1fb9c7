"""B9 cascade: a cheap model first, a strong model for the answers it is unsure of.

One simulator (own process, zero latency) serves both models. The cheap model's answers
escalate when ``confidence < 0.2``; the simulator's confidences are uniform in [0, 1), so
about 20% of rows go on to the strong model. Prices (USD per million tokens): cheap 0.15 in /
0.60 out, strong 2.50 in / 10.00 out. Target: the cascade costs less than sending every row
to the strong model (measured in the same run).

    python bench/b9_cascade.py [--rows 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path

from _common import run_cli, table, write_rows_csv

from llmap.sim import start_simulator_process

HEAD = """
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
"""
CHEAP = """
[[model]]
provider = "openai"
name = "cheap"
base_url = "{base_url}"
price_in = 0.15
price_out = 0.60
escalate_if = "confidence < 0.2"
"""
STRONG = """
[[model]]
provider = "openai"
name = "strong"
base_url = "{base_url}"
price_in = 2.50
price_out = 10.00
"""


def run(tmp: Path, name: str, csv: Path, models: str, base_url: str) -> dict:
    os.environ["LLMAP_CACHE_DIR"] = str(tmp / f"cache-{name}")
    job = tmp / f"{name}.toml"
    job.write_text(HEAD.format(name=name, csv=csv) + models.format(base_url=base_url))
    res, wall, _ = run_cli(["run", str(job), "-q"])
    cost = re.search(r"\$([0-9.,]+)", res.stderr)
    report = run_cli(["report", str(job)])[0].stdout
    return {"exit": res.returncode, "wall_s": wall, "cost_usd": float(cost.group(1).replace(",", "")) if cost else 0.0,
            "report": report}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t, start_simulator_process() as sim:
        tmp = Path(t)
        csv = write_rows_csv(tmp / "rows.csv", args.rows)
        cascade = run(tmp, "cascade", csv, CHEAP + STRONG, sim.base_url)
        by_model_cascade = dict(sim.stats()["by_model"])
        sim.reset_stats()
        strong = run(tmp, "strong-only", csv, STRONG, sim.base_url)
    met = cascade["exit"] == 0 and strong["exit"] == 0 and cascade["cost_usd"] < strong["cost_usd"]
    escalated = by_model_cascade.get("strong", 0)
    print(table([
        ("rows", f"{args.rows:,}"),
        ("cascade: requests by model", json.dumps(by_model_cascade)),
        ("cascade: rows escalated to strong", f"{escalated:,} = {100 * escalated / args.rows:.1f}%"),
        ("cascade: cost", f"${cascade['cost_usd']:.4f}"),
        ("strong model for every row: cost", f"${strong['cost_usd']:.4f}"),
        ("cascade / strong-only", f"{cascade['cost_usd'] / strong['cost_usd']:.3f} (target < 1)"),
        ("command", f"python bench/b9_cascade.py --rows {args.rows}"),
    ], "B9 cascade: cheap -> strong when confidence < 0.2"))
    print(cascade["report"])
    print(json.dumps({"cascade_usd": cascade["cost_usd"], "strong_usd": strong["cost_usd"], "met": met}))
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
