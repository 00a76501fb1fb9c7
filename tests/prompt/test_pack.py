"""Row packing: schema wrapping, pack messages, parsing by id, bisect, auto size."""

from __future__ import annotations

import json
import urllib.request

import pytest

from llmap.control.packsize import AutoPackSize
from llmap.prompt.pack import (
    PACK_INSTRUCTION,
    bisect,
    pack_messages,
    pack_schema,
    parse_pack,
)
from llmap.prompt.render import Renderer
from llmap.prompt.schema import OutputSchema
from llmap.sim import Simulator
from llmap.sim.answers import extract_ids
from llmap.spec import FieldSpec, PromptSpec

USER = "Classify the title {{ title }} written by {{ author }}."
SYSTEM = "You label news for {{ desk }}."
FIELDS = {
    "label": FieldSpec(type="string", enum=["sport", "politics", "other"]),
    "score": FieldSpec(type="integer"),
}


@pytest.fixture
def schema() -> OutputSchema:
    return OutputSchema(FIELDS)


def renderer(examples: list[dict] | None = None, system: str | None = SYSTEM) -> Renderer:
    return Renderer.from_spec(PromptSpec(system=system, user=USER, examples=examples or []))


def rows(n: int) -> list[tuple[str, dict]]:
    return [
        (f"r{i}", {"title": f"Title {i}", "author": f"A{i}", "desk": "desk", "secret": "x"})
        for i in range(n)
    ]


def answer(items: list[dict]) -> str:
    return json.dumps({"items": items})


def good(rid: object, label: str = "sport", score: int = 1) -> dict:
    return {"id": rid, "label": label, "score": score}


# --------------------------------------------------------------------------- schema


def test_pack_schema_wraps_item_with_required_id_first(schema):
    packed = pack_schema(schema.json_schema)
    assert packed["type"] == "object"
    assert packed["required"] == ["items"]
    assert packed["additionalProperties"] is False
    item = packed["properties"]["items"]["items"]
    assert packed["properties"]["items"]["type"] == "array"
    assert list(item["properties"]) == ["id", "label", "score"]
    assert item["properties"]["id"] == {"type": "string"}
    assert item["properties"]["label"] == schema.json_schema["properties"]["label"]
    assert item["required"] == ["id", "label", "score"]
    assert item["additionalProperties"] is False
    assert "id" not in schema.json_schema["properties"]  # input not modified


def test_pack_schema_rejects_field_named_id_and_non_objects():
    with pytest.raises(ValueError, match="named 'id'"):
        pack_schema(
            {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}
        )
    with pytest.raises(ValueError, match="object"):
        pack_schema({"type": "array", "items": {}})


# --------------------------------------------------------------------------- messages


def test_messages_hold_ids_and_only_template_variables():
    msgs = pack_messages(renderer(), rows(3), USER)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"].startswith("You label news for desk.")
    assert PACK_INSTRUCTION in msgs[0]["content"]
    last = msgs[-1]["content"]
    assert USER in last  # the task as source text
    assert extract_ids(msgs) == ["r0", "r1", "r2"]
    items = json.loads(last[last.index("[{") :])
    assert items[1] == {"id": "r1", "author": "A1", "title": "Title 1"}
    assert "secret" not in last and "desk" not in last


def test_items_are_first_id_array_even_if_task_has_one():
    tricky = 'Like [{"id": "zz", "title": "t"}]: label {{ title }}'
    r = Renderer.from_spec(PromptSpec(user=tricky))
    msgs = pack_messages(r, [("a", {"title": "x"}), ("b", {"title": "y"})], tricky)
    assert extract_ids(msgs) == ["a", "b"]
    assert tricky in msgs[-1]["content"]


def test_examples_become_one_prior_packed_turn():
    examples = [
        {"input": {"title": "Goal!", "author": "B"}, "output": {"label": "sport", "score": 3}},
        {"input": {"title": "Vote", "author": "C"}, "output": {"label": "politics", "score": 2}},
    ]
    msgs = pack_messages(renderer(examples), rows(2), USER)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert extract_ids(msgs[:2]) == ["ex1", "ex2"]
    assert json.loads(msgs[2]["content"]) == {
        "items": [
            {"id": "ex1", "label": "sport", "score": 3},
            {"id": "ex2", "label": "politics", "score": 2},
        ]
    }
    assert extract_ids(msgs) == ["r0", "r1"]


def test_messages_default_to_renderer_source_and_truncate_like_renderer():
    r = Renderer.from_spec(PromptSpec(system=SYSTEM, user=USER), max_chars={"title": 4})
    long_row = [("a", {"title": "A very long title", "author": "B", "desk": "d"})]
    msgs = pack_messages(r, long_row)
    assert msgs == pack_messages(r, long_row, USER)
    assert USER in msgs[-1]["content"]
    cut = r.messages(long_row[0][1])[-1]["content"]
    title = json.loads(msgs[-1]["content"].split("\n")[-1])[0]["title"]
    assert title != "A very long title" and title in cut


def test_messages_ids_are_strings_and_values_json_safe():
    r = renderer(system=None)
    msgs = pack_messages(r, [(7, {"title": float("nan"), "author": None})], USER)
    assert msgs[0] == {"role": "system", "content": PACK_INSTRUCTION}
    assert extract_ids(msgs) == ["7"]
    assert '{"id":"7","author":null,"title":null}' in msgs[-1]["content"]


def test_messages_need_rows_and_a_template_source():
    with pytest.raises(ValueError, match="at least one row"):
        pack_messages(renderer(), [], USER)
    stub = Renderer(renderer().system, renderer().user, (), ("title",))  # no user_source
    with pytest.raises(ValueError, match="user_template"):
        pack_messages(stub, rows(1))
    with pytest.raises(KeyError):
        pack_messages(renderer(), [("a", {"title": "x", "desk": "d"})], USER)


# --------------------------------------------------------------------------- parse


def test_parse_all_good(schema):
    out = parse_pack(answer([good("a"), good("b", "politics", 2)]), ["a", "b"], schema.validate)
    assert out.ok
    assert out.answers == {
        "a": {"label": "sport", "score": 1},
        "b": {"label": "politics", "score": 2},
    }
    assert out.problems == {} and out.unknown == ()


def test_parse_matches_by_id_not_position(schema):
    content = answer([good("c", score=3), good("a", score=1), good("b", score=2)])
    out = parse_pack(content, ["a", "b", "c"], schema.validate)
    assert {k: v["score"] for k, v in out.answers.items()} == {"a": 1, "b": 2, "c": 3}
    assert list(out.answers) == ["a", "b", "c"]


def test_parse_dropped_item_is_missing(schema):
    out = parse_pack(answer([good("a"), good("c")]), ["a", "b", "c"], schema.validate)
    assert out.problems == {"b": "missing"}
    assert set(out.answers) == {"a", "c"}


def test_parse_duplicate_id_trusts_neither_copy(schema):
    content = answer([good("a"), good("b", score=1), good("b", score=2)])
    out = parse_pack(content, ["a", "b"], schema.validate)
    assert out.problems == {"b": "duplicate id"}
    assert list(out.answers) == ["a"]


def test_parse_unknown_id_is_ignored_and_reported(schema):
    content = answer([good("a"), good("zz"), good("b"), good("zz")])
    out = parse_pack(content, ["a", "b"], schema.validate)
    assert out.ok and set(out.answers) == {"a", "b"}
    assert out.unknown == ("zz",)


def test_parse_wrong_type_is_invalid_with_detail(schema):
    content = answer([good("a"), {"id": "b", "label": "sport", "score": "not a number"}])
    out = parse_pack(content, ["a", "b"], schema.validate)
    assert out.problems["b"].startswith("invalid: ")
    assert "score" in out.problems["b"]
    assert list(out.answers) == ["a"]


def test_parse_numeric_ids_are_coerced(schema):
    out = parse_pack(answer([good(1), good(2.0)]), ["1", "2"], schema.validate)
    assert out.ok and set(out.answers) == {"1", "2"}


@pytest.mark.parametrize(
    "content",
    ["not json at all", "[1, 2]", '{"answers": []}', '{"items": {"id": "a"}}', ""],
)
def test_parse_unpacked_content_gives_every_id_a_problem(schema, content):
    out = parse_pack(content, ["a", "b"], schema.validate)
    assert out.answers == {}
    assert set(out.problems) == {"a", "b"}
    assert all(
        p.startswith("answer is not a JSON object with an items array: ")
        for p in out.problems.values()
    )


def test_parse_rejects_duplicate_pack_ids(schema):
    with pytest.raises(ValueError, match="distinct"):
        parse_pack(answer([]), ["a", "a"], schema.validate)


# --------------------------------------------------------------------------- bisect


def test_bisect_halves_in_order():
    assert bisect(["a", "b", "c", "d"]) == [["a", "b"], ["c", "d"]]
    assert bisect(["a", "b", "c", "d", "e"]) == [["a", "b", "c"], ["d", "e"]]
    assert bisect(["a", "b"]) == [["a"], ["b"]]
    assert bisect(["a"]) == [["a"]]
    assert bisect([]) == []


def test_bisect_reaches_single_rows():
    packs, rounds = [[str(i) for i in range(10)]], 0
    while any(len(p) > 1 for p in packs):
        packs = [h for p in packs for h in bisect(p)]
        rounds += 1
    assert rounds == 4
    assert [p[0] for p in packs] == [str(i) for i in range(10)]


# --------------------------------------------------------------------------- auto size


def test_auto_size_from_tokens():
    auto = AutoPackSize(3000, minimum=2, maximum=50)
    assert auto.size(100) == 30
    assert auto.size(7.5) == 50  # clamped to maximum
    assert auto.size(5000) == 2  # clamped to minimum
    assert AutoPackSize(initial=10).size(1) == 10
    with pytest.raises(ValueError):
        auto.size(0)
    with pytest.raises(ValueError):
        AutoPackSize(minimum=5, maximum=4)
    with pytest.raises(ValueError):
        AutoPackSize(initial=60)


def test_auto_size_shrinks_on_failures_then_grows_back():
    auto = AutoPackSize(3000, minimum=2, maximum=40)
    assert auto.size(10) == 40
    for _ in range(3):  # 120 items, 25% failed
        auto.observe(40, 10)
    assert auto.ceiling == 20 and auto.size(10) == 20
    for _ in range(30):  # keeps failing: halves again (20, 10, 5, 2), not below minimum
        auto.observe(20, 10)
    assert auto.ceiling == 2
    auto.observe(2, 0)
    assert auto.ceiling == 2  # one clean pack is not a window
    for _ in range(249):  # a full clean window: grow by at least one row
        auto.observe(2, 0)
    assert auto.ceiling == 3
    seen = [auto.ceiling]
    for _ in range(300):  # clean windows: +25% each (4, 5, 7, 9, 12, ...), capped at maximum
        auto.observe(25, 0)
        if auto.ceiling != seen[-1]:
            seen.append(auto.ceiling)
    assert seen == [3, 4, 5, 7, 9, 12, 15, 19, 24, 30, 38, 40]


def test_auto_size_holds_between_thresholds_and_checks_input():
    auto = AutoPackSize(maximum=20)
    for _ in range(100):  # 5% failures: neither shrink nor grow
        auto.observe(20, 1)
    assert auto.ceiling == 20
    auto2 = AutoPackSize(maximum=40, initial=16)
    for _ in range(50):
        auto2.observe(10, 1)  # 10% exactly: not above the threshold
    assert auto2.ceiling == 16
    with pytest.raises(ValueError):
        auto.observe(3, 4)


# --------------------------------------------------------------------------- end to end


def _ask(sim: Simulator, messages: list[dict], schema: dict) -> str:
    body = {
        "model": "sim",
        "messages": messages,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": True},
        },
    }
    req = urllib.request.Request(
        sim.base_url + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer x"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())["choices"][0]["message"]["content"]


def test_pack_round_trip_through_simulator(schema):
    pack = rows(10)
    ids = [rid for rid, _ in pack]
    messages = pack_messages(renderer(), pack, USER)
    packed = pack_schema(schema.json_schema)
    with Simulator(drop_item_rate=0.0) as sim:
        out = parse_pack(_ask(sim, messages, packed), ids, schema.validate)
    assert out.ok and list(out.answers) == ids
    assert all(a["label"] in {"sport", "politics", "other"} for a in out.answers.values())

    with Simulator(drop_item_rate=0.3, corrupt_item_rate=0.2, seed=1) as sim:
        out = parse_pack(_ask(sim, messages, packed), ids, schema.validate)
    assert out.problems and out.answers
    assert set(out.answers) | set(out.problems) == set(ids)
    assert not set(out.answers) & set(out.problems)
    assert {p.split(":")[0] for p in out.problems.values()} <= {"missing", "invalid"}
