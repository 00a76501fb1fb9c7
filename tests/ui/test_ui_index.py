"""The page's index follows the ledger: first build, catch-up of changed rows, counts moved row by row, FTS kept
in step, rebuilt when it no longer fits."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from ui_support import fill_ledger

from llmap.store.ledger import PlannedRow, RowResult
from llmap.ui import index as ix
from llmap.ui.index import Columns, UiIndex, error_class_sql

COLS = Columns(("kind", "score"), "state", False)


def ledger_cells(db, plan):
    """What the index's counts must equal, counted in the ledger itself."""
    out = Counter()
    for row in db.execute(
            f"SELECT plan, status, model, source, {error_class_sql()}, json_extract(data, '$.state'), count(*) "
            "FROM rows WHERE plan = ? GROUP BY 1, 2, 3, 4, 5, 6", (plan,)):
        out[tuple(row[:6])] = row[6]
    return out


def plan_counts(index, plan):
    return Counter({k: v for k, v in index.counts().items() if k[0] == plan})


def search(index, words):
    db = index.reader()
    try:
        return sorted(k for (k,) in db.execute(
            "SELECT r.key FROM fts JOIN r ON r.id = fts.rowid WHERE fts MATCH ?", (words,)))
    finally:
        db.close()


def test_the_first_build_counts_what_the_ledger_holds(tmp_path):
    led = fill_ledger(tmp_path / "l.sqlite", 500)
    index = UiIndex(led.path, COLS)
    assert not index.ready
    index.sync()
    assert index.ready and not index.behind and index.indexed == 500
    assert plan_counts(index, 1) == ledger_cells(led.connection, 1)
    db = index.reader()
    # every output field, the group and the error class are columns of their own
    got = dict(db.execute("SELECT key, f0 FROM r WHERE status = 'done'").fetchall())
    want = {k: json.loads(o)["kind"] for k, o in led.connection.execute(
        "SELECT key, output FROM rows WHERE status = 'done'")}
    assert got == want
    assert {e for (e,) in db.execute("SELECT DISTINCT err FROM r WHERE err IS NOT NULL")} == {
        "AnswerInvalid", "RequestTimeout", "other"}
    db.close()


def test_the_build_goes_in_chunks_and_the_catch_up_follows_every_change(tmp_path, monkeypatch):
    monkeypatch.setattr(ix, "CHUNK", 37)
    led = fill_ledger(tmp_path / "l.sqlite", 300)
    index = UiIndex(led.path, COLS)
    index.sync(max_chunks=2)
    assert index.behind and not index.ready and index.indexed == 74
    index.sync()
    assert index.ready and index.indexed == 300
    # a run settles pending rows and fails a done one again; more rows than one chunk change
    pending = [k for (k,) in led.connection.execute("SELECT key FROM rows WHERE status = 'pending'")]
    results = [RowResult(k, "done", {"kind": "zebra", "score": 0.5}, model="openai:large", source="model")
               for k in pending]
    results.append(RowResult("k00000", "failed", error="Overloaded: 503", model="openai:small"))
    led.record(results)
    index.sync()
    assert plan_counts(index, 1) == ledger_cells(led.connection, 1)
    assert search(index, '"zebra"') == sorted(
        k for (k,) in led.connection.execute("SELECT key FROM rows WHERE output LIKE '%zebra%'"))


def test_a_new_run_moves_every_row_to_its_plan_and_words_that_change_are_searched_anew(tmp_path):
    led = fill_ledger(tmp_path / "l.sqlite", 120)
    index = UiIndex(led.path, COLS)
    index.sync()
    before = search(index, '"valley"')
    assert before
    run2 = led.start_run("h")
    rows = [PlannedRow(k, seq, h, d.replace("Valley", "Canyon")) for k, seq, h, d in led.connection.execute(
        "SELECT key, seq, input_hash, data FROM rows ORDER BY seq")][:100]  # 20 rows leave the plan
    led.plan(run2, rows)
    index.sync()
    assert plan_counts(index, run2) == ledger_cells(led.connection, run2)
    assert sum(plan_counts(index, run2).values()) == 100
    assert sum(plan_counts(index, 1).values()) == 20  # the rows no longer planned keep their old plan
    assert search(index, '"valley"') == sorted(k for k in before if int(k[1:]) >= 100)
    assert set(search(index, '"canyon"')) == {k for k in before if int(k[1:]) < 100}


def test_the_index_is_kept_for_the_next_start_and_rebuilt_when_it_no_longer_fits(tmp_path):
    led = fill_ledger(tmp_path / "l.sqlite", 80)
    first = UiIndex(led.path, COLS)
    first.sync()
    first.close()
    led.record([RowResult("k00000", "failed", error="Overloaded: 503", model="openai:small")])
    again = UiIndex(led.path, COLS)  # counts reloaded from the file by the first sync, nothing to build
    assert not again.ready and plan_counts(again, 1) != ledger_cells(led.connection, 1)  # as of the mark
    assert again.sync() == 1
    assert again.ready and again.indexed == 80 and plan_counts(again, 1) == ledger_cells(led.connection, 1)
    again.close()
    other = UiIndex(led.path, Columns(("kind",), None, False))  # other columns: built anew
    assert other.indexed == 0
    other.sync()
    assert other.indexed == 80
    other.close()
    led.close()
    for p in tmp_path.glob("l.sqlite*"):
        if not p.name.endswith(".ui-index"):
            p.unlink()
    led2 = fill_ledger(tmp_path / "l.sqlite", 10)  # a new ledger under the same name: built anew
    fresh = UiIndex(led2.path, Columns(("kind",), None, False))
    fresh.sync()
    assert fresh.indexed == 10


def test_a_write_with_an_earlier_clock_is_found_after_a_rewind(tmp_path):
    led = fill_ledger(tmp_path / "l.sqlite", 30)
    index = UiIndex(led.path, COLS)
    index.sync()
    led.connection.execute("UPDATE rows SET status = 'pending', output = NULL, updated_at = 0 WHERE key = 'k00001'")
    index.sync()
    assert plan_counts(index, 1) != ledger_cells(led.connection, 1)  # behind the mark: not seen
    index.rewind(1e12)
    index.sync()
    assert plan_counts(index, 1) == ledger_cells(led.connection, 1)


@pytest.mark.parametrize("error,cls", [("AnswerInvalid: x: y", "AnswerInvalid"), ("every template input is empty",
                                                                                 "other"), (None, None),
                                       ("a b: c", "other"), (": nothing before", "other")])
def test_the_error_class_is_the_word_before_the_colon(error, cls):
    import sqlite3

    db = sqlite3.connect(":memory:")
    assert db.execute(f"SELECT {error_class_sql('?1')}", (error,)).fetchone()[0] == cls
