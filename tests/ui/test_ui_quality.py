"""Labels from the page, eval's figures and the review sample: what the ledger has, and what a person's labels
say about the answers."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from ui_support import add_labels_table, fill_ledger, make_old

from llmap.spec.sections import FieldSpec
from llmap.ui import quality
from llmap.ui.index import Columns, UiIndex

FIELDS = {"kind": FieldSpec(type="string", enum=["city", "county", "charter", "regional", "technical", "other"]),
          "score": FieldSpec(type="number")}


@pytest.mark.parametrize("k,n,low,high", [(8, 10, 0.4902, 0.9433), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0),
                                          (51, 61, 0.7239, 0.9084), (0, 0, 0.0, 1.0)])
def test_the_wilson_interval_at_95_percent(k, n, low, high):
    got = quality.wilson(k, n)
    assert got == pytest.approx((low, high), abs=1e-4)


def test_wilson_refuses_more_successes_than_trials():
    with pytest.raises(ValueError, match="within 0..n"):
        quality.wilson(3, 2)


def test_the_page_sees_what_the_ledger_has_of_the_quality_work(tmp_path):
    led = fill_ledger(tmp_path / "l.sqlite", 10)
    assert quality.features(led.connection) == {"labels": True, "confidence": True, "raw": True, "rollback": True}
    make_old(led.path)  # as an llmap before the quality work left it
    assert quality.features(led.connection) == {"labels": False, "confidence": False, "raw": False,
                                                "rollback": False}
    add_labels_table(led.path, confidence=True)
    got = quality.features(led.connection)
    assert got["labels"] and got["confidence"] and not got["raw"] and not got["rollback"]


def test_labels_written_from_the_page_are_eval_figures(tmp_path):
    led = fill_ledger(tmp_path / "l.sqlite", 200)
    add_labels_table(led.path)
    db = led.connection
    done = [(k, json.loads(o))
            for k, o in db.execute("SELECT key, output FROM rows WHERE status = 'done' ORDER BY seq")]
    right, wrong = done[:12], done[12:16]
    for key, out in right:
        quality.write_label(led.path, key, "kind", out["kind"])
    for key, out in wrong:
        truth = "other" if out["kind"] != "other" else "city"
        quality.write_label(led.path, key, "kind", truth)
    quality.write_label(led.path, wrong[0][0], "kind", "technical" if wrong[0][1]["kind"] != "technical" else "city")
    failed = db.execute("SELECT key FROM rows WHERE status = 'failed' LIMIT 1").fetchone()[0]
    quality.write_label(led.path, failed, "kind", "city")  # a failed row's label: not in the accuracy of answers
    quality.write_label(led.path, right[0][0], "score", right[0][1]["score"])
    ev = quality.evaluate(db, 1, FIELDS)
    kind = ev["fields"]["kind"]
    assert (kind["n"], kind["correct"]) == (16, 12)
    assert kind["accuracy"] == 0.75 and (kind["low"], kind["high"]) == quality.wilson(12, 16)
    matrix = kind["confusion"]
    assert sum(map(sum, matrix)) == 16
    assert sum(matrix[i][i] for i in range(len(matrix))) == 12
    truth_counts = Counter(lbl for (lbl,) in db.execute(
        "SELECT json_extract(l.value, '$') FROM labels l JOIN rows r USING (key) WHERE l.field = 'kind' "
        "AND r.status = 'done'"))
    assert [sum(row) for row in matrix] == [truth_counts.get(c, 0) for c in kind["classes"]]
    assert ev["fields"]["score"]["n"] == 1 and ev["fields"]["score"]["accuracy"] == 1.0
    assert "confusion" not in ev["fields"]["score"]
    labels = quality.labels_of(db, [right[0][0], "nope"])
    assert labels[right[0][0]]["kind"]["value"] == right[0][1]["kind"] and labels[right[0][0]]["kind"]["source"] == "ui"


def test_a_boolean_label_is_not_a_number():
    assert quality.same_answer(True, True) and not quality.same_answer(1, True) and not quality.same_answer(True, 1)
    assert quality.same_answer(2, 2.0) and quality.same_answer("a", "a") and not quality.same_answer(None, "a")


def test_allocate_shares_equally_and_never_gives_a_group_more_than_it_has():
    assert quality.allocate({"a": 100, "b": 2, "c": 40}, 30) == {"a": 14, "b": 2, "c": 14}
    assert quality.allocate({"a": 3, "b": 2}, 50) == {"a": 3, "b": 2}
    assert sum(quality.allocate({"a": 7, "b": 7, "c": 7}, 10).values()) == 10


def test_the_review_sample_is_seeded_stratified_and_reaches_rare_classes(tmp_path):
    led = fill_ledger(tmp_path / "l.sqlite", 600)
    index = UiIndex(led.path, Columns(("kind", "score"), None, False))
    index.sync()
    db = index.reader()
    a = quality.review_sample(db, 1, 30, seed=1, stratify="f0")
    assert a == quality.review_sample(db, 1, 30, seed=1, stratify="f0") and len(a) == len(set(a)) == 30
    assert a != quality.review_sample(db, 1, 30, seed=2, stratify="f0")
    kinds = dict(led.connection.execute("SELECT key, json_extract(output, '$.kind') FROM rows"))
    statuses = dict(led.connection.execute("SELECT key, status FROM rows"))
    assert all(statuses[k] in ("done", "failed", "fallback") for k in a)
    per = Counter(kinds[k] for k in a)
    # 7 strata (6 kinds and the failed rows' none) of 30: 4 or 5 each, where a uniform draw gives "other" ~1
    assert set(per) == {*quality_kinds(led), None} and min(per.values()) >= 4
    plain = quality.review_sample(db, 1, 30, seed=1)
    assert len(plain) == 30 and plain != a


def quality_kinds(led):
    return {k for (k,) in led.connection.execute("SELECT DISTINCT json_extract(output, '$.kind') FROM rows "
                                                 "WHERE output IS NOT NULL")}
