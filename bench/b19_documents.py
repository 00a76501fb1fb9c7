"""B19 documents: the embedded model reads the bell-schedule notes as PDFs, and how right it is.

Renders each note of ``../shared/data/bell_schedules_2024_25.csv`` as a PDF with a text
layer (``--scans``: as a picture inside a PDF, read by OCR) in a temporary folder, then runs
one job with the embedded model (Gemma 3 270M, response cache off) over the PDF column
(``[input.documents]``) and the same job over the notes as a text column. Prints, against
the notes' true ``instructional_minutes``: exact match, mean absolute error (MAE), the share
within 15 minutes, with Wilson 95% intervals; the share of rows whose answer is the same
from the PDF as from the text column; and wall times (computed here, as ``llmap eval`` would).
Needs ``pip install -e '.[local,test]'`` and ``../shared/data``.

``--overhead`` measures what reading documents costs instead, on the simulator (no model
time): the notes x ``--copies`` as a text column, as PDFs read for the first time (fresh
document store) and as PDFs whose texts are stored, interleaved over ``--repeat`` rounds.

    python bench/b19_documents.py [--scans] [--limit N]
    python bench/b19_documents.py --overhead [--copies 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, SHARED_DATA, table

sys.path.insert(0, str(REPO / "tests"))
from _documents import pdf_with_text, scanned_pdf  # noqa: E402
from llmap import Job  # noqa: E402

DATA = SHARED_DATA / "bell_schedules_2024_25.csv"

JOB = """
name = "{name}"
[input]
path = "notes.csv"
key = "id"
{documents}
[prompt]
system = "You read a school's bell schedule notes and answer with the instructional minutes per school day, as JSON."
user = "Notes: {{{{ {column} }}}}"
{examples}
[output]
path = "out/{name}.jsonl"
[output.fields]
minutes = {{ type = "integer", minimum = 0, maximum = 600, description = "instructional minutes per day" }}
[model]
provider = "local"
name = "gemma-3-270m"
temperature = 0
max_tokens = 24
[cache]
enabled = false
"""


#: Few-shot examples (made up, not from the data): the notes' usual shapes.
EXAMPLES = [("Grades K-5: 8:00 AM - 2:30 PM (390 min total). Assuming ~60 min lunch/recess = 330 min instructional.",
             330),
            ("Block schedule. Monday: 290 min, Tue-Fri: 340 min. Using 330 min average.", 330),
            ("State minimum of 6 hours (360 min) of instruction per day; district follows it.", 360)]


def examples(column: str) -> str:
    return "".join(f'[[prompt.examples]]\noutput = {{ minutes = {m} }}\n[prompt.examples.input]\n{column} = "{t}"\n'
                   for t, m in EXAMPLES)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of k successes in n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def run(base: Path, name: str, column: str, documents: str = "") -> tuple[dict[str, dict], float]:
    job = base / f"{name}.toml"
    job.write_text(JOB.format(name=name, column=column, documents=documents, examples=examples(column)),
                   encoding="utf-8")
    t0 = time.perf_counter()
    res = Job.from_toml(job).run()
    wall = time.perf_counter() - t0
    lines = (base / "out" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
    print(f"{name}: {res.counts}, {res.requests} requests, {wall:.1f} s", flush=True)
    return {str(r["id"]): r for r in map(json.loads, lines)}, wall


def overhead(rows: list[dict], copies: int, repeat: int, scans: bool) -> None:
    """Wall seconds of one job over the text column, over PDFs read afresh and over PDFs already read."""
    import os

    from llmap.sim import Simulator

    sim_job = JOB.replace('provider = "local"\nname = "gemma-3-270m"',
                          'provider = "openai"\nname = "sim"\nbase_url = "{url}"')
    walls: dict[str, list[float]] = {"text": [], "pdf, read afresh": [], "pdf, texts stored": []}
    with tempfile.TemporaryDirectory(prefix="llmap-b19-") as tmp, Simulator() as sim:
        base = Path(tmp)
        (base / "docs").mkdir()
        table_rows = []
        for c in range(copies):
            for i, r in enumerate(rows):
                key, note = f"{c}-{i:03d}", f"{r['notes']} (copy {c})"
                (base / "docs" / f"{key}.pdf").write_bytes((scanned_pdf if scans else pdf_with_text)([[note]]))
                table_rows.append({"id": key, "note": note, "pdf": f"docs/{key}.pdf"})
        with open(base / "notes.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["id", "note", "pdf"])
            w.writeheader()
            w.writerows(table_rows)
        for k in range(repeat):
            for label, column, docs, store in (("text", "note", "", "t"),
                                               ("pdf, read afresh", "pdf", "[input.documents]\npdf = {}", f"f{k}"),
                                               ("pdf, texts stored", "pdf", "[input.documents]\npdf = {}", "s")):
                os.environ["LLMAP_CACHE_DIR"] = str(base / f"cache-{store}")
                name = f"{column}-{store}-{k}"
                job = base / f"{name}.toml"
                job.write_text(sim_job.format(name=name, column=column, documents=docs, examples=examples(column),
                                              url=sim.base_url), encoding="utf-8")
                t0 = time.perf_counter()
                Job.from_toml(job).run()
                if not (label == "pdf, texts stored" and k == 0):  # the first stored round fills the store
                    walls[label].append(time.perf_counter() - t0)
    n = len(table_rows)
    out = [(label, f"{min(w):.2f} s min, {sum(w) / len(w):.2f} s mean over {len(w)} runs ({n} rows)")
           for label, w in walls.items()]
    print(table(out, f"B19 overhead: reading {'scans (OCR)' if scans else 'PDFs'} on the simulator"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", action="store_true", help="scans inside PDFs, read by OCR, instead of a text layer")
    ap.add_argument("--limit", type=int, default=None, help="the first N notes only")
    ap.add_argument("--overhead", action="store_true", help="time reading documents on the simulator instead")
    ap.add_argument("--copies", type=int, default=4, help="--overhead: each note this many times (default 4)")
    ap.add_argument("--repeat", type=int, default=3, help="--overhead: interleaved rounds (default 3)")
    args = ap.parse_args()
    if not DATA.is_file():
        sys.exit(f"{DATA} is absent")
    with open(DATA, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[: args.limit]
    if args.overhead:
        overhead(rows, args.copies, args.repeat, args.scans)
        return
    with tempfile.TemporaryDirectory(prefix="llmap-b19-") as tmp:
        base = Path(tmp)
        (base / "docs").mkdir()
        table_rows = []
        for i, r in enumerate(rows):
            key = f"{i:03d}"
            make = scanned_pdf if args.scans else pdf_with_text
            (base / "docs" / f"{key}.pdf").write_bytes(make([[r["notes"]]]))
            table_rows.append({"id": key, "note": r["notes"], "pdf": f"docs/{key}.pdf"})
        with open(base / "notes.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["id", "note", "pdf"])
            w.writeheader()
            w.writerows(table_rows)
        text, wall_text = run(base, "text", "note")  # first: it pays for reading the model file from disk
        docs, wall_docs = run(base, "pdf", "pdf", '[input.documents]\npdf = { kind = "pdf", max_tokens = 1000 }')
    truth = {f"{i:03d}": int(r["instructional_minutes"]) for i, r in enumerate(rows)}
    n = len(truth)
    got = {k: r.get("minutes") for k, r in docs.items()}
    answered = [k for k in truth if got.get(k) is not None]
    exact = sum(got[k] == truth[k] for k in answered)
    near = sum(abs(got[k] - truth[k]) <= 15 for k in answered)
    mae = sum(abs(got[k] - truth[k]) for k in answered) / len(answered) if answered else float("nan")
    same = sum(docs[k].get("minutes") == text[k].get("minutes") and docs[k]["_status"] == text[k]["_status"]
               for k in truth)
    lo, hi = wilson(exact, n)
    nlo, nhi = wilson(near, n)
    print(table([
        ("notes", f"{n} ({'scans, OCR' if args.scans else 'PDFs with a text layer'})"),
        ("answered", f"{len(answered)} of {n}"),
        ("exact match", f"{exact}/{n} = {exact / n:.1%} (95% CI {lo:.1%}-{hi:.1%})"),
        ("within 15 min", f"{near}/{n} = {near / n:.1%} (95% CI {nlo:.1%}-{nhi:.1%})"),
        ("MAE", f"{mae:.1f} min over the answered rows"),
        ("same answer as the text column", f"{same}/{n} = {same / n:.1%}"),
        ("wall, PDF job", f"{wall_docs:.1f} s (extraction, model start and {n} rows)"),
        ("wall, text job", f"{wall_text:.1f} s"),
    ], "B19 documents: Gemma 3 270M over the bell-schedule notes as PDFs"))


if __name__ == "__main__":
    main()
