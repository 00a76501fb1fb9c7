"""The batch book seen by one model: a guaranteed cascade's phase collects its own model's batches only."""

from __future__ import annotations

from llmap.store.batches import BatchBook, Line
from llmap.store.ledger import Ledger


def test_a_book_for_one_model_sees_only_that_models_held_batches(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    everyone = BatchBook(led)
    ids = {}
    for model, rows in (("openai:proxy", ["a", "b"]), ("openai:oracle", ["c"])):
        lines = [Line(f"{model}-{k}", k, k, f"ck-{k}") for k in rows]
        ids[model] = everyone.intent(run=1, model=model, provider="openai", tag=model, file_hash=model,
                                     requests=len(rows), size=10, tokens=5, lines=lines)
    proxy, oracle = BatchBook(led, model="openai:proxy"), BatchBook(led, model="openai:oracle")
    assert [r.id for r in everyone.held()] == [ids["openai:proxy"], ids["openai:oracle"]]
    assert [r.id for r in proxy.held()] == [ids["openai:proxy"]]
    assert [r.id for r in oracle.held()] == [ids["openai:oracle"]]
    assert (everyone.held_rows(), proxy.held_rows(), oracle.held_rows()) == (3, 2, 1)
    assert set(everyone.held_items()) == {"ck-a", "ck-b", "ck-c"}
    assert set(proxy.held_items()) == {"ck-a", "ck-b"} and set(oracle.held_items()) == {"ck-c"}
    led.close()
