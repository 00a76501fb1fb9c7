"""Pages of rows: every filter, sort and page answers what a plain Python reading of the ledger says, from the
index (each of its query plans) and from the ledger while the index builds."""

from __future__ import annotations

import itertools
import json
import random
import re
import sqlite3

import pytest
from ui_support import add_labels_table, fill_ledger

from llmap.ui import queries
from llmap.ui.index import Columns, UiIndex
from llmap.ui.queries import RowQuery, fts_query, iter_keys, ledger_page, page

TYPES = {"kind": "string", "score": "number"}
COLS = Columns(("kind", "score"), "state", True)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "l.sqlite"
    led = fill_ledger(path, 1500, seed=11)
    led.close()
    add_labels_table(path, confidence=True)
    db = sqlite3.connect(path)
    rnd = random.Random(5)
    db.executemany("UPDATE rows SET confidence = ?, updated_at = updated_at + 1 WHERE key = ?",
                   [(round(rnd.random(), 3), k) for (k,) in db.execute("SELECT key FROM rows WHERE status = 'done'")])
    db.commit()
    index = UiIndex(path, COLS)
    index.sync()
    yield path, index, sqlite3.connect(path)


def reference(db, q: RowQuery):
    """Keys and total, computed in Python over every row of the plan."""
    rows = []
    for key, seq, status, model, error, data, output, conf in db.execute(
            "SELECT key, seq, status, model, error, data, output, confidence FROM rows WHERE plan = 1"):
        data = json.loads(data)
        out = json.loads(output) if output else {}
        m = re.match(r"^([^:\s]+):", error or "")
        err = None if error is None else (m.group(1) if m else "other")
        text = " ".join(str(v) for v in [*data.values(), *out.values(), error or ""]).lower()
        rows.append({"key": key, "seq": seq, "status": status, "model": model, "error": err, "group": data["state"],
                     "kind": out.get("kind"), "score": out.get("score"), "conf": conf,
                     "words": set(re.findall(r"\w+", text))})
    keep = []
    for r in rows:
        if q.status and r["status"] != q.status or q.model and r["model"] != q.model:
            continue
        if q.error and r["error"] != q.error or q.has_group and r["group"] != q.group:
            continue
        if any(r[name] != value for name, value in q.fields):
            continue
        if q.conf_below is not None and not (r["conf"] is not None and r["conf"] < q.conf_below):
            continue
        if q.text:
            wanted = [(w.lower(), q.text[m.end():m.end() + 1] == "*") for m in re.finditer(r"\w+", q.text)
                      for w in [m.group(0)]]
            if not all(any(x == w or (p and x.startswith(w)) for x in r["words"]) for w, p in wanted):
                continue
        keep.append(r)
    col = {"field:kind": "kind", "field:score": "score"}.get(q.sort, q.sort)

    def order(r):
        v = r[col]
        return (v is not None, v if v is not None else 0, r["seq"])  # SQLite: NULL first when ascending

    keep.sort(key=(lambda r: r[col]) if col in ("seq", "key") else order, reverse=q.desc)
    return [r["key"] for r in keep], len(keep)


QUERIES = [
    {}, {"status": "failed"}, {"status": "done", "f.kind": "charter"}, {"model": "openai:large"},
    {"error": "AnswerInvalid"}, {"error": "other", "status": "failed"}, {"group": '"WY"'},
    {"group": '"UT"', "f.kind": "county", "sort": "field:score", "desc": "1"},
    {"f.kind": "other", "model": "openai:small"}, {"f.score": "0.5"}, {"conf_lt": "0.1"},
    {"conf_lt": "0.3", "sort": "conf"}, {"sort": "key", "desc": "1"}, {"sort": "field:kind"},
    {"sort": "model", "offset": "40"}, {"sort": "error", "desc": "1"}, {"sort": "group", "offset": "300"},
    {"q": "valley"}, {"q": "valley lake"}, {"q": "Riv* WY"}, {"q": "k00042"}, {"q": "timeout", "status": "failed"},
    {"q": "charter", "sort": "field:score"}, {"status": "pending", "offset": "5", "limit": "7"},
    {"status": "done", "offset": "1400"},
]


@pytest.mark.parametrize("params", QUERIES, ids=[json.dumps(q) for q in QUERIES])
@pytest.mark.parametrize("caps", [(100_000, 20_000), (60, 25), (5, 3)], ids=["wide", "narrow", "tiny"])
def test_every_query_answers_what_the_rows_say(ledger, params, caps, monkeypatch):
    monkeypatch.setattr(queries, "COUNT_CAP", caps[0])
    monkeypatch.setattr(queries, "NARROW", caps[1])
    path, index, db = ledger
    q = RowQuery.from_params({"limit": "25", **params}, COLS, TYPES)
    want, total = reference(db, q)
    cap, narrow = caps
    for got in (page(index, index.reader(), 1, q), ledger_page(db, COLS, 1, q)):
        if got.sorted:
            assert got.keys == want[q.offset:q.offset + q.limit]
            exact = not (q.status or q.model or q.error or q.has_group or q.fields or q.conf_below or q.text)
            assert (got.total, got.capped) == ((total, False) if exact else (min(total, cap), total > cap))
        else:  # a search matching more than NARROW rows: its first matches in ledger order, unsorted
            assert (got.total, got.capped) == (narrow, True)
            assert len(got.keys) == min(q.limit, max(0, total - q.offset)) and set(got.keys) <= set(want)


@pytest.mark.parametrize("params", QUERIES[:12], ids=[json.dumps(q) for q in QUERIES[:12]])
def test_every_key_a_filter_selects_in_input_order(ledger, params):
    path, index, db = ledger
    q = RowQuery.from_params(params, COLS, TYPES)
    want, _ = reference(db, RowQuery(**{**q.__dict__, "sort": "seq", "desc": False}))
    for conn, indexed in ((index.reader(), True), (db, False)):
        got = list(itertools.chain.from_iterable(iter_keys(conn, COLS, 1, q, indexed=indexed, chunk=17)))
        assert got == want
    done_only = list(itertools.chain.from_iterable(iter_keys(db, COLS, 1, q, indexed=False, statuses=("done",))))
    assert done_only == [k for k in want if db.execute("SELECT status FROM rows WHERE key = ?", (k,)).fetchone()[0]
                         == "done"]


@pytest.mark.parametrize("params,message", [
    ({"status": "nope"}, "status must be one of"), ({"f.nope": "x"}, "no output field 'nope'"),
    ({"f.score": "high"}, "not a number"), ({"group": "WY"}, "group must be a JSON value"),
    ({"conf_lt": "x"}, "conf_lt must be a number"), ({"sort": "data"}, "cannot sort by"),
    ({"offset": "-x"}, "whole numbers"),
])
def test_a_query_the_page_cannot_have_sent_is_refused_in_one_line(params, message):
    with pytest.raises(ValueError, match=message):
        RowQuery.from_params(params, COLS, TYPES)


def test_filters_that_need_a_column_the_ledger_lacks_say_so():
    bare = Columns(("kind",), None, False)
    with pytest.raises(ValueError, match="--by"):
        RowQuery.from_params({"group": '"WY"'}, bare, TYPES)
    with pytest.raises(ValueError, match="no confidence column"):
        RowQuery.from_params({"conf_lt": "0.5"}, bare, TYPES)


@pytest.mark.parametrize("text,want", [
    ("valley", '"valley"'), ("valley river*", '"valley" "river"*'), ('a" OR b', '"a" "OR" "b"'),
    ("NEAR(x y)", '"NEAR" "x" "y"'), ("-x ^y col:z", '"x" "y" "col" "z"'), ("***", None), ("é*", '"é"'),
])
def test_words_typed_in_the_search_box_never_reach_fts5_as_syntax(text, want):
    assert fts_query(text) == want


def test_the_page_is_cut_to_whole_values_of_a_cell(ledger):
    path, index, db = ledger
    db.execute("UPDATE rows SET error = ? WHERE key = 'k00003'", ("X: " + "y" * 1000,))
    rows = queries.read_rows(db, ["k00003", "missing", "k00002"])
    assert [r["key"] for r in rows] == ["k00003", "k00002"]
    assert len(rows[0]["error"]) == queries.CELL_CHARS + 1 and rows[0]["error"].endswith("…")
    db.rollback()
