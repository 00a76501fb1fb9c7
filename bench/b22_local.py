"""B22 local: a $0 first tier in front of an oracle that answers from true labels.

Two labelled district sets (they need ../shared/data; skipped without it):

- **Wyoming** (61 districts): ``examples/districts.toml`` with the hand-written labels of
  ``examples/districts_labels.csv``;
- **Alabama, Georgia and Virginia** (516 districts), labelled by a rule over the district's name written
  for this benchmark (:func:`rule`: "County"/"Parish" → county, "City"/"Town" → city, "Charter",
  "Academy", "Prep" → charter, "BOCES", "Regional", "Cooperative", "Educational Service" → regional,
  "Technical", "Vocational", "Career" → technical, else other).

Each runs as a ``[cascade]`` (agreement on ``kind``, target 0.9, delta 0.1) whose proxy is the
embedded model (``--proxy local``: Gemma 3 270M, free) or the simulator's calibrated model
(``--proxy sim``: right on 85% of rows against the labels, well calibrated), and whose oracle is the
simulator answering from the labels (``llmap simulate --labels FILE --labels-match district_name``).
Printed per set: the agreement of the final answers with the oracle (the labels) on every row, the
threshold and its bound, and the share of rows the proxy settled (for the embedded model: for $0).

    python bench/b22_local.py [--proxy local|sim] [--sets wy,large] [--budget-wy 25] [--budget-large 150]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sqlite3
import sys
import tempfile
from pathlib import Path

from _common import REPO, SHARED_DATA, run_cli, table

from llmap.sim.process import start_simulator_process

DISTRICTS = SHARED_DATA / "districts_2023_24_nces.csv"
LARGE_STATES = ("AL", "GA", "VA")


def rule(name: str) -> str:
    """The larger set's label: the district's kind read from its name."""
    low = name.lower()
    if re.search(r"\bcharter\b|academy|\bprep\b|preparatory", low):
        return "charter"
    if re.search(r"boces|regional|cooperative|educational service|\besc\b|\besd\b|service (center|agency)", low):
        return "regional"
    if re.search(r"technical|vocational|career", low):
        return "technical"
    if re.search(r"\bcounty\b|\bparish\b", low):
        return "county"
    if re.search(r"\bcity\b|\btown\b", low):
        return "city"
    return "other"


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _sets(tmp: Path) -> list[tuple[str, Path, Path, int]]:
    """(name, input CSV, labels CSV with district_name, rows) of each set."""
    rows = _read(DISTRICTS)
    names = {r["district_id"]: r["district_name"] for r in rows}
    wy_labels = {r["district_id"]: r["kind"] for r in _read(REPO / "examples" / "districts_labels.csv")}
    out = []
    for name, pick, label in (("Wyoming (hand labels)", lambda r: r["state"] == "WY",
                               lambda r: wy_labels[r["district_id"]]),
                              (f"{'+'.join(LARGE_STATES)} (rule labels)", lambda r: r["state"] in LARGE_STATES,
                               lambda r: rule(r["district_name"]))):
        chosen = [r for r in rows if pick(r)]
        data = tmp / f"{len(out)}.csv"
        with open(data, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(chosen)
        labels = tmp / f"{len(out)}.labels.csv"
        with open(labels, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["district_id", "district_name", "kind"])
            w.writerows((r["district_id"], names[r["district_id"]], label(r)) for r in chosen)
        out.append((name, data, labels, len(chosen)))
    return out


def _job(tmp: Path, i: int, data: Path, url: str, proxy: str, budget: int) -> Path:
    text = (REPO / "examples" / "districts.toml").read_text(encoding="utf-8")
    text = text.replace('path = "../../shared/data/districts_2023_24_nces.csv"', f'path = "{data}"')
    text = re.sub(r"where = .*\n", "", text)
    text = text.replace('path = "out/district_type.parquet"', f'path = "{tmp / f"out{i}.parquet"}"')
    head, _, _ = text.partition("[model]")
    if proxy == "sim":
        first = f'[[model]]\nprovider = "openai"\nname = "proxy"\nbase_url = "{url}"\n'
    else:
        first = '[[model]]\nprovider = "local"\nname = "gemma-3-270m"\ntemperature = 0\nmax_tokens = 64\n'
    return _write(tmp / f"job{i}.toml", head.replace('name = "district-type"', f'name = "b22-local-{i}"') + first
                  + f'[[model]]\nprovider = "openai"\nname = "oracle"\nbase_url = "{url}"\nprice_in = 2.5\n'
                  f'price_out = 10\n[cascade]\nfield = "kind"\ntarget = 0.9\ndelta = 0.1\nlabel_budget = {budget}\n'
                  'on_miss = "escalate_all"\n[cache]\nenabled = false\n')


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--proxy", choices=["local", "sim"], default="local")
    ap.add_argument("--budget-wy", type=int, default=25)
    ap.add_argument("--budget-large", type=int, default=150)
    ap.add_argument("--sets", default="wy,large", help="which sets: wy, large or both (default)")
    args = ap.parse_args()
    if not DISTRICTS.is_file():
        sys.exit(f"B22 local needs {DISTRICTS} (../shared/data beside the repository)")
    lines = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for i, (name, data, labels, n) in enumerate(_sets(tmp)):
            if ("wy" if i == 0 else "large") not in args.sets.split(","):
                continue
            with start_simulator_process(labels=str(labels), labels_match="district_name",
                                         model_accuracy="proxy=0.85", calibration="well") as sim:
                job = _job(tmp, i, data, sim.base_url, args.proxy, args.budget_wy if i == 0 else args.budget_large)
                res, wall, _ = run_cli(["run", str(job)])
                if res.returncode != 0:
                    sys.exit(f"llmap run failed:\n{res.stdout}\n{res.stderr}")
                sent = sim.stats()["by_model"]
            import pyarrow.parquet as pq

            rows = pq.read_table(tmp / f"out{i}.parquet").to_pylist()
            truth = {r["district_id"]: r["kind"] for r in _read(labels)}
            agree = sum(r["kind"] == truth[str(r["district_id"])] for r in rows) / n
            local = sum(r["_model"] != "openai:oracle" for r in rows)
            with sqlite3.connect(tmp / ".llmap" / f"b22-local-{i}.ledger.sqlite") as db:
                state, threshold, choice = db.execute("SELECT state, threshold, choice FROM cascade_decisions"
                                                      ).fetchone()
            c = json.loads(choice)
            said = [ln for ln in res.stderr.splitlines() if "cascade:" in ln]
            lines.append((f"  {name}, {n} rows", f"agreement with the labels {agree:.3f} (target 0.9); {state}: "
                          + (f"threshold {threshold:.4g}, bound {c['bound']:.3f}" if threshold is not None else
                             "no threshold") + f"; the proxy settled {local}/{n} = {local / n:.0%} of rows"
                          + (" for $0" if args.proxy == "local" else "")
                          + f"; oracle requests {sent.get('oracle', 0)}; {wall:.0f} s"))
            lines.extend(("", f"    {ln}") for ln in said)
    print(table(lines, f"B22 local: proxy = {'the embedded model' if args.proxy == 'local' else 'simulated (0.85)'}, "
                       "oracle = the simulator answering from labels"))


if __name__ == "__main__":
    main()
