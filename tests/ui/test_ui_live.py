"""The live figures: the request log read once, counts from the index, rate and ETA on an injected clock."""

from __future__ import annotations

import sqlite3

import pytest
from ui_support import fill_ledger

from llmap.store.ledger import RowResult
from llmap.ui.index import Columns, UiIndex
from llmap.ui.live import LiveView, RequestLog, bucket_width, percentile


def entry(i, t, outcome="200", latency=0.1, pack=1, cost=0.001, path=None):
    return (i, t, "openai:m", outcome, latency, 10, 5, pack, cost, path)


def test_the_request_log_figures():
    log = RequestLog(1)
    log.add([entry(i + 1, 100.0 + i * 0.5, latency=(i + 1) / 100) for i in range(100)])
    log.add([entry(101, 120.2, "429", None), entry(102, 121.0, "503", None), entry(103, 121.5, "429", None),
             entry(104, 122.0, "hedged", None, cost=0.01), entry(105, 122.5, pack=5), entry(106, 123.0, "200",
                                                                                          None, path="batch")])
    f = log.figures(now=160.0)
    assert f["requests"] == 106 and f["rate_limited"] == 2 and f["errors"] == 3 and f["hedged"] == 1
    assert f["cost_usd"] == pytest.approx(0.001 * 102 + 0.001 * 3 + 0.01)  # every entry's cost, hedged included
    assert f["packs"] == 1 and f["packed_rows"] == 5 and f["batch_requests"] == 1
    assert f["latency"]["n"] == 101 and f["latency"]["p50"] == 0.5 and f["latency"]["max"] == 1.0
    t = f["timeline"]
    assert t["bucket_s"] == 1 and t["start"] == 100 and len(t["ok"]) == 61
    assert sum(t["ok"]) == 102 and t["errors"] == {"429": [0] * 20 + [1, 1] + [0] * 39,
                                                   "503": [0] * 21 + [1] + [0] * 39}
    assert log.last_id == 106


def test_the_timeline_keeps_at_most_its_buckets():
    log = RequestLog(1)
    log.add([entry(i + 1, i * 37.0) for i in range(1000)])
    t = log.figures(now=37_000.0)["timeline"]
    assert len(t["ok"]) <= 121 and sum(t["ok"]) == 1000 and t["bucket_s"] == bucket_width(37_000)


@pytest.mark.parametrize("span,width", [(10, 1), (120, 1), (121, 2), (3600, 30), (86400 * 10, 7200)])
def test_bucket_width(span, width):
    assert bucket_width(span) == width


def test_percentile_is_the_nearest_rank():
    assert percentile([], 0.5) is None
    assert percentile([1, 2, 3, 4], 0.5) == 2 and percentile([1, 2, 3, 4], 0.99) == 4 and percentile([7], 0.9) == 7


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_the_live_view_follows_a_run_through_its_ledger(tmp_path):
    led = fill_ledger(tmp_path / "l.sqlite", 400)
    index = UiIndex(led.path, Columns(("kind", "score"), "state", False))
    index.sync()
    clock = Clock()
    ro = sqlite3.connect(f"{led.path.resolve().as_uri()}?mode=ro", uri=True)
    view = LiveView(ro, index, job="j", cap_usd=2.0, group="state", running=lambda: "pid 1", clock=clock)
    s = view.tick()
    want = dict(led.connection.execute("SELECT status, count(*) FROM rows GROUP BY status"))
    assert {k: v for k, v in s["counts"].items() if v} == want and s["total"] == 400
    assert s["run"]["running"] and s["run"]["holder"] == "pid 1" and s["cost"]["cap_usd"] == 2.0
    assert sum(s["failed_by_error"].values()) == want["failed"]
    assert {g["value"] for g in s["groups"]} == {"WY", "CO", "UT"}
    assert sum(sum(g["counts"].values()) for g in s["groups"]) == 400
    assert s["by_source"]["cache"] + s["by_source"]["model"] == want["done"]
    assert s["requests"]["requests"] == want["done"] + want["failed"]
    assert s["rate_rows_s"] is None  # one look: no rate yet
    pending = [k for (k,) in led.connection.execute("SELECT key FROM rows WHERE status = 'pending'")]
    led.record([RowResult(k, "done", {"kind": "city", "score": 1}, model="openai:small", source="model")
                for k in pending[:20]], run_id=1)
    index.sync()
    clock.now += 3.0
    s = view.tick()
    assert s["counts"]["pending"] == len(pending) - 20
    assert s["rate_rows_s"] == pytest.approx(20 / 3) and s["eta_s"] == pytest.approx((len(pending) - 20) / (20 / 3))
    run2 = led.start_run("h")  # a new run: its own request log and tiers
    clock.now += 1.0
    s = view.tick()
    assert s["run"]["id"] == run2 and s["requests"]["requests"] == 0 and s["tiers"] == []


def test_while_the_index_builds_the_counts_come_from_the_ledger(tmp_path):
    led = fill_ledger(tmp_path / "l.sqlite", 50)
    ro = sqlite3.connect(f"{led.path.resolve().as_uri()}?mode=ro", uri=True)
    view = LiveView(ro, UiIndex(led.path, Columns(("kind", "score"))), job="j")
    s = view.tick()
    assert s["total"] == 50 and not s["index"]["ready"] and s["groups"] == []
    assert s["counts"]["done"] == led.connection.execute("SELECT count(*) FROM rows WHERE status='done'").fetchone()[0]
