"""One row whole: the prompt rendered with the job's templates, every answer with its cost, cache and pack."""

from __future__ import annotations

import json

import pytest
from ui_support import add_labels_table

from llmap.prompt.render import Renderer
from llmap.spec import ModelSpec
from llmap.spec.sections import PromptSpec
from llmap.store.ledger import Ledger, PlannedRow, RowResult
from llmap.ui.detail import row_detail
from llmap.ui.quality import features, write_label

SMALL = ModelSpec(provider="openai", name="small", base_url="http://127.0.0.1:9/v1", price_in=1.0, price_out=2.0)
LARGE = ModelSpec(provider="openai", name="large", base_url="http://127.0.0.1:9/v1", price_in=10.0, price_out=20.0)


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    run = led.start_run("h")
    led.plan(run, [PlannedRow("a", 0, "h0", json.dumps({"name": "Ann", "city": None})),
                   PlannedRow("b", 1, "h1", json.dumps({"name": "Bob", "city": "Cody"}))])
    led.record([
        RowResult("a", "done", {"kind": "x"}, attempts=2, prompt_tokens=300, completion_tokens=30, latency_s=1.5,
                  model="openai:large", source="model",
                  tried=[("openai:small", "escalated", {"kind": "y"}, 100, 10), ("openai:large", "done", {"kind": "x"},
                                                                                   200, 20)]),
        RowResult("b", "done", {"kind": "x"}, model="openai:small", source="cache",
                  tried=[("openai:small", "cache", {"kind": "x"}, 0, 0)]),
    ], run_id=run)
    return led


def renderer(user="{{ name }} of {{ city | default('?', true) }}"):
    return Renderer.from_spec(PromptSpec(system="Sort.", user=user, examples=[{"input": {"name": "Z", "city": "Q"},
                                                                                "output": {"kind": "z"}}]))


def test_a_row_with_its_prompt_and_every_answer_at_its_models_prices(ledger):
    d = row_detail(ledger.connection, "a", renderer=renderer(), models={m.label: m for m in (SMALL, LARGE)}, pack=1)
    assert d["messages"] == [{"role": "system", "content": "Sort."}, {"role": "user", "content": "Z of Q"},
                             {"role": "assistant", "content": '{"kind": "z"}'}, {"role": "user", "content": "Ann of ?"}]
    assert [(a["model"], a["outcome"], a["output"]) for a in d["answers"]] == [
        ("openai:small", "escalated", {"kind": "y"}), ("openai:large", "done", {"kind": "x"})]
    assert d["answers"][0]["cost_usd"] == pytest.approx((100 * 1 + 10 * 2) / 1e6)
    assert d["answers"][1]["cost_usd"] == pytest.approx((200 * 10 + 20 * 20) / 1e6)
    assert d["cost_usd"] == pytest.approx((300 * 10 + 30 * 20) / 1e6)
    assert d["source_text"] == "answered by the model" and d["pack_text"] is None and d["labels"] is None
    assert d["attempts"] == 2 and d["latency_s"] == 1.5 and d["output"] == {"kind": "x"}


def test_a_cached_row_a_packed_job_a_template_that_fails_and_labels(ledger):
    add_labels_table(ledger.path)
    write_label(ledger.path, "b", "kind", "y")
    d = row_detail(ledger.connection, "b", renderer=renderer("{{ city.upper() }}"), models={}, pack=10,
                   features=features(ledger.connection))
    assert d["source_text"].startswith("answered from the response cache") and d["cost_usd"] is None
    assert d["pack_text"] is None  # from the cache, not from a pack
    assert d["messages"][-1]["content"] == "CODY" and d["labels"]["kind"]["value"] == "y"
    a = row_detail(ledger.connection, "a", renderer=renderer("{{ city.upper() }}"), models={}, pack="auto")
    assert a["messages"] is None and "city" in a["render_error"]  # NULL city: the row's own template error
    assert "packs rows into requests" in a["pack_text"]
    assert row_detail(ledger.connection, "nope", renderer=None, models={}) is None
