"""kind = "reduce": one answer per group; a group 20 times the context is reduced hierarchically, every row once."""

from __future__ import annotations

import csv
import json

from llmap import Job
from llmap.operators.reduce import chunk
from llmap.sim import Simulator
from llmap.store.ledger import Ledger
from llmap.store.operators import OperatorBook
from operators.conftest import op_job, read_table

CONTEXT = 400  # tokens: a chunk holds half of it


def _data(path, n_big=900):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "region", "note"])
        for i in range(n_big):
            w.writerow([f"r{i}", "west", f"Order {i}: a customer bought {i % 7 + 1} widgets, paid on delivery"])
        for i in range(5):
            w.writerow([f"s{i}", "east", f"Order s{i}: two gadgets"])


def test_a_group_20_times_the_context_reaches_the_answer_with_every_row_in_exactly_one_chunk(tmp_path):
    _data(tmp_path / "sales.csv")
    with Simulator() as sim:
        job = op_job(tmp_path, sim, "reduce", data="sales.csv", system="Summarize a region's orders.",
                     user="{{ note }}", out="out/r.csv", fields='summary = { type = "string" }\n',
                     tables=f'[reduce]\nby = ["region"]\ncontext_tokens = {CONTEXT}\n')
        res = Job.from_toml(job).run()
        assert res.exit_code == 0, res.stop_reason
        assert Job.from_toml(job).run().requests == 0
    with open(tmp_path / "sales.csv", encoding="utf-8") as f:
        notes = [r for r in csv.DictReader(f) if r["region"] == "west"]
    assert sum(len(r["note"]) for r in notes) / 3.5 > 20 * CONTEXT  # the group is 20 times the context
    with Ledger(tmp_path / ".llmap" / "job.ledger.sqlite") as led:
        book = OperatorBook(led)
        chunks = book.chunks(json.dumps(["west"]))
        small = book.chunks(json.dumps(["east"]))
    level0 = [c for c in chunks if c[0] == 0]
    keys = [k for _, _, _, members in level0 for k in members]
    assert sorted(keys) == sorted(r["id"] for r in notes) and len(keys) == len(set(keys))  # each row once
    levels = max(c[0] for c in chunks) + 1
    assert levels >= 3 and len(level0) >= 20
    for level in range(1, levels):  # each summary of a level reaches exactly one chunk of the next
        below = [f"0:{level - 1}:{c[1]}" for c in chunks if c[0] == level - 1]
        above = [m for c in chunks if c[0] == level for m in c[3]]
        assert sorted(above) == sorted(below)
    assert [c[0] for c in small] == [0]  # a small group is answered at once
    out = read_table(tmp_path / "out" / "r.csv")
    assert [(r["region"], r["_rows"], r["_status"]) for r in out] == [("west", 900, "done"), ("east", 5, "done")]
    assert all(r["summary"] for r in out)
    assert res.operator["hierarchical"] == 1 and res.operator["groups"] == 2


def test_one_changed_row_pays_for_its_chunk_and_the_summaries_above_it(tmp_path):
    _data(tmp_path / "sales.csv", n_big=200)
    with Simulator() as sim:
        job = op_job(tmp_path, sim, "reduce", data="sales.csv", system="Summarize a region's orders.",
                     user="{{ note }}", out="out/r.csv", fields='summary = { type = "string" }\n',
                     tables=f'[reduce]\nby = ["region"]\ncontext_tokens = {CONTEXT}\n')
        first = Job.from_toml(job).run()
        text = (tmp_path / "sales.csv").read_text().replace("Order 7: a customer", "Order 7: one customer")
        (tmp_path / "sales.csv").write_text(text)
        second = Job.from_toml(job).run()
        assert second.exit_code == 0
        assert second.operator["reduced"] == 1  # only the group that changed
        assert 2 <= second.requests < first.requests / 3  # its chunk, the summaries above, the answer


def test_chunk_keeps_every_item_once_within_the_budget():
    items = [(str(i), "x" * (i % 50 + 1)) for i in range(300)] + [("long", "y" * 5000)]
    cuts = chunk(items, 100)
    assert [k for c in cuts for k, _ in c] == [k for k, _ in items]
    assert all(sum((len(t) + 4) / 3.5 for _, t in c) <= 101 for c in cuts)
    assert "truncated" in dict(cuts[-1])["long"]
