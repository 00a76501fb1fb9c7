"""The simulator's oracle mode (answers from a labels file) and its configurable calibration curve."""

from __future__ import annotations

import json

import pytest

from llmap.prompt.schema import OutputSchema
from llmap.sim import Simulator
from llmap.sim.calibrated import floor
from llmap.sim.config import SimConfig
from llmap.spec import FieldSpec

FIELDS = {"kind": FieldSpec(type="string", enum=["county", "city", "charter"]), "open": FieldSpec(type="boolean")}
SCHEMA = OutputSchema(FIELDS).json_schema


def _body(model: str, text: str, schema=SCHEMA, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}},
            **extra}


def _labels(tmp_path, n: int = 200) -> tuple[str, dict[str, dict]]:
    kinds = ["county", "city", "charter"]
    rows = {f"Place {i} School District": {"kind": kinds[i % 3], "open": i % 2 == 0} for i in range(n)}
    path = tmp_path / "labels.csv"
    path.write_text("id,name,kind,open\n" + "".join(f"{i},{name},{v['kind'].upper()},{'yes' if v['open'] else 'no'}\n"
                                                    for i, (name, v) in enumerate(rows.items())), encoding="utf-8")
    return str(path), rows


def test_a_model_without_accuracy_answers_the_labels_of_the_row_its_prompt_names(tmp_path, post_chat):
    path, rows = _labels(tmp_path)
    with Simulator(labels=path, labels_match="name") as sim:
        for name, true in list(rows.items())[:60]:
            text = f"District: {name} (WY), 120 students."
            got = json.loads(post_chat(sim, _body("oracle", text)).json()["choices"][0]["message"]["content"])
            assert got == true  # typed as the schema says: the enum's own case, booleans from yes/no
        plain = json.loads(post_chat(sim, _body("oracle", "no district here")).json()["choices"][0]["message"]
                           ["content"])
        assert set(plain) == {"kind", "open"}  # unmatched: answered as without labels


def test_the_longest_match_wins_and_packed_items_match_by_value(tmp_path, post_chat):
    path = tmp_path / "l.jsonl"
    path.write_text(json.dumps({"name": "District #1", "kind": "city"}) + "\n"
                    + json.dumps({"name": "District #10", "kind": "charter"}) + "\n", encoding="utf-8")
    with Simulator(labels=str(path), labels_match="name") as sim:
        one = json.loads(post_chat(sim, _body("o", "Natrona District #10, WY")).json()["choices"][0]["message"]
                         ["content"])
        assert one["kind"] == "charter"
        packed = {"type": "object", "properties": {"items": {"type": "array", "items": {
            "type": "object", "properties": {"id": {"type": "string"}, **SCHEMA["properties"]},
            "required": ["id", "kind", "open"], "additionalProperties": False}}}, "required": ["items"],
            "additionalProperties": False}
        items = [{"id": "1", "name": "District #1"}, {"id": "2", "name": "District #10"}]
        doc = post_chat(sim, _body("o", json.dumps(items), schema=packed)).json()
        got = json.loads(doc["choices"][0]["message"]["content"])["items"]
        assert [g["kind"] for g in got] == ["city", "charter"]


def test_a_calibrated_model_is_right_against_the_labels_as_often_as_set(tmp_path, post_chat):
    path, rows = _labels(tmp_path, 400)
    right = 0
    with Simulator(labels=path, labels_match="name", model_accuracy="proxy=0.8") as sim:
        for name, true in rows.items():
            got = json.loads(post_chat(sim, _body("proxy", f"District: {name}")).json()["choices"][0]["message"]
                             ["content"])
            right += got["kind"] == true["kind"]
    assert right / len(rows) == pytest.approx(0.8, abs=0.06)


def test_the_calibration_curve_takes_a_power_and_labels_need_a_match_column(tmp_path):
    assert SimConfig(calibration="over").power == 2.0 and SimConfig(calibration="3").power == 3.0
    assert floor(0.85, 3.0) > floor(0.85, 2.0)  # more over-confident: higher confidences for the same accuracy
    with pytest.raises(ValueError, match="calibration must be one of"):
        SimConfig(calibration="sometimes")
    path, _ = _labels(tmp_path, 3)
    with pytest.raises(ValueError, match="labels needs labels_match"):
        SimConfig(labels=path)
    with pytest.raises(ValueError, match="has no column 'title'"):
        SimConfig(labels=path, labels_match="title")
