"""Helpers of the page's tests: ledgers written through the Ledger's own API, and the quality work's labels
table."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

from llmap.store.ledger import Ledger, PlannedRow, RowResult

SCRIPT = "<script>alert(1)</script>"
KINDS = ["city", "county", "charter", "regional", "technical", "other"]
WORDS = ["north", "south", "east", "west", "valley", "river", "lake", "mountain", "union", "public"]


def fill_ledger(path: Path, n: int, *, seed: int = 3, run_id: int | None = None) -> Ledger:
    """A ledger of ``n`` district-like rows, settled through ``Ledger.record``: mostly done (kind, score), some
    failed with errors of several classes, some pending; models small and large; some from the cache."""
    rnd = random.Random(seed)
    led = Ledger(path)
    run = run_id or led.start_run("h")
    led.set_meta("data_columns", json.dumps(["id", "name", "state"]))
    rows = []
    for i in range(n):
        name = f"{rnd.choice(WORDS).title()} {rnd.choice(WORDS).title()} {i}"
        rows.append(PlannedRow(f"k{i:05d}", i, f"h{i}", json.dumps({"id": f"k{i:05d}", "name": name,
                                                                     "state": rnd.choice(["WY", "CO", "UT"])})))
    led.plan(run, rows)
    results = []
    for i in range(n):
        r = rnd.random()
        model = "openai:small" if rnd.random() < 0.8 else "openai:large"
        if r < 0.8:
            out = {"kind": rnd.choices(KINDS, [30, 40, 10, 8, 7, 5])[0], "score": round(rnd.random(), 2)}
            results.append(RowResult(f"k{i:05d}", "done", out, attempts=1, model=model,
                                     source="cache" if rnd.random() < 0.2 else "model",
                                     tried=[(model, "done", out, 10, 5)]))
        elif r < 0.92:
            err = rnd.choice(["AnswerInvalid: kind: Input should be 'city'", "RequestTimeout: read timeout",
                              "an identical row's request failed twice"])
            results.append(RowResult(f"k{i:05d}", "failed", error=err, attempts=3, model=model))
    led.record(results, run_id=run, requests=[(1000.0 + i, "openai:small", "200", 0.1, 10, 5, 1)
                                              for i in range(len(results))])
    return led


def make_old(ledger: Path) -> None:
    """Take out what migration 007_quality added (the labels table, rows' confidence and raw columns, the rows'
    history), as a ledger written by an llmap before the quality work has it."""
    db = sqlite3.connect(ledger)
    try:
        db.execute("DROP TABLE IF EXISTS labels")
        db.execute("DROP TABLE IF EXISTS row_history")
        cols = {r[1] for r in db.execute("PRAGMA table_info(rows)")}
        for col in ("confidence", "raw"):
            if col in cols:
                db.execute(f"ALTER TABLE rows DROP COLUMN {col}")
        db.commit()
    finally:
        db.close()


def add_labels_table(ledger: Path, *, confidence: bool = False) -> None:
    """The labels table (and optionally rows.confidence) as the quality work's migration 007_quality makes them;
    nothing when they exist already."""
    db = sqlite3.connect(ledger)
    try:
        db.execute("CREATE TABLE IF NOT EXISTS labels (key TEXT NOT NULL, field TEXT NOT NULL, value TEXT, "
                   "source TEXT NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (key, field))")
        cols = {r[1] for r in db.execute("PRAGMA table_info(rows)")}
        if confidence and "confidence" not in cols:
            db.execute("ALTER TABLE rows ADD COLUMN confidence REAL")
        db.commit()
    finally:
        db.close()
