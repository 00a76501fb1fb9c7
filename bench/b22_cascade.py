"""B22 cascade with a guarantee: does the chosen threshold meet its target, and what does it save?

**In-process** (the figures the issue asks for): for each calibration curve, 50 seeded runs of 5,000 rows.
Each row's proxy answer and confidence come from the simulator's own calibrated model
(:func:`llmap.sim.calibrated.decide`, the function its server answers with), the oracle's too; the
sample is :func:`~llmap.control.guarantee.draw_sample` over the row keys and the threshold
:func:`~llmap.control.guarantee.choose_threshold`, the code ``llmap run`` runs. For every run the true
agreement of the final answers with the oracle is measured on every row (the simulator knows every
answer). Printed per curve: the share of runs that met the target (at least 1 - delta = 95% is
required), the median share of rows the oracle answered, the median cost against the oracle on every
row (the proxy priced at 6% of the oracle, as gpt-4o-mini against gpt-4o), and the same figures for
a fixed threshold of 0.9 (no sample), the baseline.

Then the issue's cost check: a well-calibrated proxy right on 83% of rows, agreement 0.90 with delta
0.1 and a label budget of 300 over 2,000 rows: the oracle's median share of rows must be at most 75%.

**End to end** (``--e2e K``, default 2): K runs per curve through ``llmap run`` against the simulator
(a separate process, ``--model-accuracy proxy=...,oracle=...``, ``--calibration ...``), packed 25 rows
a request; each prints the in-process figures for the same seed beside the ones read from the run's
output and ledger. They agree exactly: the simulator's answers are a function of the row's text, and
the sample of the keys and seed.

    python bench/b22_cascade.py [--runs 50] [--rows 5000] [--e2e 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import table

from llmap.control.guarantee import choose_threshold, draw_sample
from llmap.prompt.schema import OutputSchema
from llmap.sim.calibrated import decide, truth
from llmap.sim.process import start_simulator_process
from llmap.spec import FieldSpec

ENUM = ["a", "b", "c", "d"]
SCHEMA = OutputSchema({"kind": FieldSpec(type="string", enum=ENUM)}).json_schema
#: the proxy's price as a share of the oracle's (gpt-4o-mini against gpt-4o, both in and out)
PRICE_RATIO = 0.06
CURVES = {"well calibrated": "well", "over-confident": "over"}


def _answer(model: str, text: str, true: str, accuracy: float, power: float) -> tuple[float, str]:
    """What the simulator's calibrated model answers for ``text``: (confidence, value)."""
    c, right, pick = decide(model, text, "kind", accuracy, power)
    others = [x for x in ENUM if x != true]
    return c, true if right else others[pick % len(others)]


def population(seed: int, n: int, proxy_acc: float, power: float, oracle_acc: float
               ) -> tuple[list[str], list[str], list[float], list[str], list[str]]:
    """(keys, texts, proxy confidences, proxy answers, oracle answers) of one run's rows."""
    keys = [f"r{i:05d}" for i in range(n)]
    texts = [f"s{seed} row {i}" for i in range(n)]
    scores, proxy, oracle = [], [], []
    for t in texts:
        true = truth(SCHEMA, t)["kind"]
        c, p = _answer("proxy", t, true, proxy_acc, power)
        scores.append(c)
        proxy.append(p)
        oracle.append(_answer("oracle", t, true, oracle_acc, 1.0)[1])
    return keys, texts, scores, proxy, oracle


def one_run(seed: int, n: int, proxy_acc: float, power: float, oracle_acc: float, target: float, delta: float,
            budget: int) -> dict:
    keys, _, scores, proxy, oracle = population(seed, n, proxy_acc, power, oracle_acc)
    sample = {i: oracle[i] for i in (int(k[1:]) for k in draw_sample(keys, budget, seed))}
    c = choose_threshold(scores, proxy, sample, guarantee="agreement", target=target, delta=delta)
    kept = [c.threshold is not None and scores[i] >= c.threshold and i not in sample for i in range(n)]
    fixed = [s >= 0.9 for s in scores]
    out = {"threshold": c.threshold, "bound": c.bound, "kept": sum(kept)}
    for name, keep in (("guarantee", kept), ("fixed", fixed)):
        agree = sum(proxy[i] == oracle[i] if keep[i] else True for i in range(n)) / n
        oracle_share = 1 - sum(keep) / n
        out[name] = {"agreement": agree, "met": agree >= target, "oracle_share": oracle_share,
                     "cost": PRICE_RATIO + oracle_share}
    return out


def summary(runs: list[dict], name: str) -> tuple[str, str]:
    met = sum(r[name]["met"] for r in runs) / len(runs)
    med = statistics.median
    return (f"  {'guarantee (fixed-sequence, exact bounds)' if name == 'guarantee' else 'fixed threshold 0.9'}",
            f"met {met:6.1%} | median oracle share {med(r[name]['oracle_share'] for r in runs):6.1%} | median cost "
            f"vs all-oracle {med(r[name]['cost'] for r in runs):6.1%} | agreement median "
            f"{med(r[name]['agreement'] for r in runs):.4f}, min {min(r[name]['agreement'] for r in runs):.4f}")


# -- end to end -----------------------------------------------------------------------------------
JOB = """name = "b22"
[input]
path = "rows.csv"
key = "id"
[prompt]
user = "{{{{ text }}}}"
pack = 25
[output]
path = "out.parquet"
[output.fields]
kind = {{ type = "string", enum = ["a", "b", "c", "d"] }}
[[model]]
provider = "openai"
name = "proxy"
base_url = "{url}"
[[model]]
provider = "openai"
name = "oracle"
base_url = "{url}"
[cascade]
target = {target}
delta = {delta}
label_budget = {budget}
seed = {seed}
[limits]
concurrency = 16
[cache]
enabled = false
"""


def e2e(seed: int, n: int, proxy_acc: float, curve: str, oracle_acc: float, target: float, delta: float,
        budget: int, folder: Path) -> dict:
    import pyarrow.parquet as pq
    from _common import run_cli

    _, texts, _, _, oracle = population(seed, n, proxy_acc, 1.0, oracle_acc)
    with open(folder / "rows.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows((f"r{i:05d}", t) for i, t in enumerate(texts))
    with start_simulator_process(model_accuracy=f"proxy={proxy_acc},oracle={oracle_acc}", calibration=curve) as sim:
        (folder / "job.toml").write_text(JOB.format(url=sim.base_url, target=target, delta=delta, budget=budget,
                                                    seed=seed), encoding="utf-8")
        t0 = time.perf_counter()
        res, wall, _ = run_cli(["run", str(folder / "job.toml"), "-q"])
        if res.returncode != 0:
            sys.exit(f"llmap run failed: {res.stderr}")
        sent = sim.stats()["by_model"]
    rows = pq.read_table(folder / "out.parquet").to_pylist()
    agree = sum(r["kind"] == oracle[int(r["id"][1:])] for r in rows) / n
    with sqlite3.connect(folder / ".llmap" / "b22.ledger.sqlite") as db:
        threshold, choice = db.execute("SELECT threshold, choice FROM cascade_decisions").fetchone()
    return {"threshold": threshold, "kept": json.loads(choice)["kept"], "agreement": agree,
            "oracle_share": sum(r["_model"] == "openai:oracle" for r in rows) / n, "wall": time.perf_counter() - t0,
            "requests": sent}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--budget", type=int, default=400)
    ap.add_argument("--proxy-accuracy", type=float, default=0.9)
    ap.add_argument("--e2e", type=int, default=2, help="end-to-end runs per curve through llmap run (0: none)")
    args = ap.parse_args()
    target, delta = 0.95, 0.05
    print(f"B22: {args.runs} seeded runs x {args.rows:,} rows per curve; agreement >= {target} with delta {delta}, "
          f"label budget {args.budget}; proxy accuracy {args.proxy_accuracy}; proxy price {PRICE_RATIO:.0%} of the "
          "oracle's\n")
    scenarios = [(f"{label} proxy, oracle = truth", power, 1.0) for label, power in
                 (("well calibrated", 1.0), ("over-confident (p = 2)", 2.0))]
    scenarios.append(("well calibrated proxy, oracle right on 95% (agreement with the oracle, not the truth)", 1.0,
                      0.95))
    ok = True
    for label, power, oracle_acc in scenarios:
        t0 = time.perf_counter()
        runs = [one_run(seed, args.rows, args.proxy_accuracy, power, oracle_acc, target, delta, args.budget)
                for seed in range(args.runs)]
        lines = [summary(runs, "guarantee"), summary(runs, "fixed")]
        print(table(lines, f"{label} ({time.perf_counter() - t0:.1f} s)"))
        print()
        ok &= sum(r["guarantee"]["met"] for r in runs) / len(runs) >= 1 - delta
    cost = [one_run(seed, 2000, 0.83, 1.0, 1.0, 0.90, 0.1, 300) for seed in range(args.runs)]
    share = statistics.median(r["guarantee"]["oracle_share"] for r in cost)
    print(table([("  median share of rows the oracle answered", f"{share:.1%} (at most 75% required)"),
                 ("  runs that met 0.90", f"{sum(r['guarantee']['met'] for r in cost) / len(cost):.1%}")],
                f"cost check: well-calibrated proxy right on 83%, agreement 0.90, delta 0.1, budget 300, 2,000 rows, "
                f"{args.runs} seeds"))
    ok &= share <= 0.75
    if args.e2e:
        print()
        lines = []
        for label, curve in CURVES.items():
            power = 1.0 if curve == "well" else 2.0
            for seed in range(args.e2e):
                with tempfile.TemporaryDirectory() as tmp:
                    got = e2e(seed, args.rows, args.proxy_accuracy, curve, 1.0, target, delta, args.budget, Path(tmp))
                mine = one_run(seed, args.rows, args.proxy_accuracy, power, 1.0, target, delta, args.budget)
                same = got["threshold"] == mine["threshold"] and got["kept"] == mine["kept"] and \
                    abs(got["agreement"] - mine["guarantee"]["agreement"]) < 1e-12
                ok &= same
                lines.append((f"  {label}, seed {seed}",
                              f"llmap run: threshold {got['threshold']:.5f}, kept {got['kept']:,}, agreement "
                              f"{got['agreement']:.4f}, oracle share {got['oracle_share']:.1%}, {got['wall']:.1f} s, "
                              f"requests {got['requests']} | in-process: threshold {mine['threshold']:.5f}, kept "
                              f"{mine['kept']:,}, agreement {mine['guarantee']['agreement']:.4f} | "
                              f"{'identical' if same else 'DIFFERENT'}"))
        print(table(lines, f"end to end: llmap run against the simulator (a process), pack = 25, {args.rows:,} rows"))
    print("\nB22", "PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
