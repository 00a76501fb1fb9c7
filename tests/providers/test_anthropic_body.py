"""The Anthropic provider's request body and answer parsing (no network), and pricing with cache reads."""

from __future__ import annotations

import json

import pytest

from llmap.errors import MalformedResponse, SpecError
from llmap.pricing import cost_usd
from llmap.prompt.pack import pack_messages, pack_schema
from llmap.prompt.render import Renderer
from llmap.providers.anthropic import AnthropicProvider, output_schema
from llmap.providers.base import Request
from llmap.providers.http import HttpAnswer
from llmap.providers.openai import OpenAIProvider
from llmap.spec import Example, ModelSpec, PromptSpec

SCHEMA = {"type": "object", "properties": {"kind": {"type": "string", "enum": ["a", "b"]},
                                            "n": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["kind", "n"], "additionalProperties": False}
CACHE = {"type": "ephemeral"}


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-secret")


def provider(**kw) -> AnthropicProvider:
    return AnthropicProvider(ModelSpec(provider="anthropic", name="claude-haiku-4-5", **kw))


def request(renderer: Renderer, row: dict, **kw) -> Request:
    msgs = renderer.messages(row)
    return Request(msgs, SCHEMA, 0.0, 256, shared_prefix=renderer.shared_prefix(msgs), **kw)


def render(system: str | None = "You sort notes.", examples: int = 0) -> Renderer:
    ex = [Example(input={"t": f"ex {i}"}, output={"kind": "a", "n": i + 1}) for i in range(examples)]
    return Renderer.from_spec(PromptSpec(system=system, user="Note: {{ t }}", examples=ex))


def test_system_goes_top_level_with_the_breakpoint_and_the_row_after_it():
    body = provider().body(request(render(), {"t": "hello"}))
    assert body["model"] == "claude-haiku-4-5" and body["max_tokens"] == 256 and body["temperature"] == 0.0
    assert body["system"] == [{"type": "text", "text": "You sort notes.", "cache_control": CACHE}]
    assert body["messages"] == [{"role": "user", "content": "Note: hello"}]  # the row's own text: after it
    assert body["tools"] == [{"name": "answer", "description": body["tools"][0]["description"], "input_schema": SCHEMA}]
    assert body["tool_choice"] == {"type": "tool", "name": "answer"}
    assert "output_config" not in body


def test_few_shot_turns_are_user_assistant_and_the_last_one_carries_the_breakpoint():
    body = provider().body(request(render(examples=2), {"t": "row"}))
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    assert body["system"] == [{"type": "text", "text": "You sort notes."}]  # one breakpoint, at the prefix's end
    last_example = body["messages"][3]["content"]
    assert last_example == [{"type": "text", "text": json.dumps({"kind": "a", "n": 2}), "cache_control": CACHE}]
    assert body["messages"][4] == {"role": "user", "content": "Note: row"}
    marks = json.dumps(body).count("cache_control")
    assert marks == 1


def test_without_a_system_prompt_the_tool_carries_the_breakpoint():
    body = provider().body(request(render(system=None), {"t": "x"}))
    assert "system" not in body and body["tools"][0]["cache_control"] == CACHE


def test_a_system_prompt_that_reads_the_row_is_not_shared():
    r = Renderer.from_spec(PromptSpec(system="You sort notes from {{ t }}.", user="Note: {{ t }}"))
    req = request(r, {"t": "x"})
    assert req.shared_prefix == 0
    body = provider().body(req)
    assert "cache_control" not in json.dumps(body["system"]) and body["tools"][0]["cache_control"] == CACHE


def test_prompt_cache_false_marks_nothing():
    body = provider(prompt_cache=False).body(request(render(examples=1), {"t": "x"}))
    assert "cache_control" not in json.dumps(body)
    assert provider(prompt_cache=False).discovering is False


def test_an_empty_earlier_answer_is_not_sent_as_an_empty_block():
    r = render()
    msgs = [*r.messages({"t": "x"}), {"role": "assistant", "content": ""}, {"role": "user", "content": "again"}]
    body = provider().body(Request(msgs, SCHEMA, 0.0, 256, shared_prefix=1))
    assert body["messages"][1] == {"role": "assistant", "content": "(empty)"}


def test_an_answer_without_usage_counts_by_estimate():
    comp = provider()._parse(answer({"content": [{"type": "text", "text": "{}"}], "stop_reason": "end_turn"}),
                             request(render(), {"t": "x"}))
    assert not comp.usage_reported and comp.limit_prompt_tokens is None


def test_re_asks_stay_after_the_breakpoint():
    r = render(examples=1)
    base = r.messages({"t": "x"})
    msgs = [*base, {"role": "assistant", "content": "{}"}, {"role": "user", "content": "fix it"}]
    body = provider().body(Request(msgs, SCHEMA, 0.0, 256, shared_prefix=r.shared_prefix(base)))
    assert body["messages"][1]["content"][0]["cache_control"] == CACHE
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user", "assistant", "user"]


def test_packs_put_the_shared_instructions_before_the_breakpoint():
    r = render()
    msgs = pack_messages(r, [("1", {"t": "a"}), ("2", {"t": "b"})])
    body = provider().body(Request(msgs, pack_schema(SCHEMA), 0.0, 512, shared_prefix=r.shared_prefix(msgs)))
    assert "Do the task for each item independently" in body["system"][0]["text"]
    assert body["system"][0]["cache_control"] == CACHE
    assert body["tools"][0]["input_schema"]["properties"]["items"]["type"] == "array"
    assert '"id":"1"' in body["messages"][-1]["content"]


def test_json_schema_uses_output_config_without_the_bounds_it_refuses():
    p = provider(structured="json_schema")
    body = p.body(request(render(), {"t": "x"}))
    assert "tools" not in body and "tool_choice" not in body
    fmt = body["output_config"]["format"]
    assert fmt["type"] == "json_schema"
    assert fmt["schema"]["properties"]["n"] == {"type": "integer"}  # minimum/maximum enforced by llmap instead
    assert output_schema({"a": [{"maxLength": 3, "pattern": "x"}]}) == {"a": [{"pattern": "x"}]}
    assert p.structured == "json_schema" and provider().structured == "tool"


def test_params_pass_through_and_merge_into_output_config():
    p = provider(structured="json_schema", params={"top_k": 5, "output_config": {"effort": "low"},
                                                   "temperature": 0.3})
    body = p.body(request(render(), {"t": "x"}))
    assert body["top_k"] == 5 and body["temperature"] == 0.3
    assert body["output_config"]["effort"] == "low" and body["output_config"]["format"]["type"] == "json_schema"


@pytest.mark.parametrize("bad", ["system", "tools", "tool_choice", "messages", "stream"])
def test_params_may_not_set_what_llmap_owns(bad):
    with pytest.raises(Exception, match=f"params.{bad} is set by llmap"):
        ModelSpec(provider="anthropic", name="claude-x", params={bad: 1})


def test_spec_checks_anthropic_keys():
    with pytest.raises(Exception, match="structured = 'json_object' is not for provider = 'anthropic'"):
        ModelSpec(provider="anthropic", name="c", structured="json_object")
    with pytest.raises(Exception, match="is for provider = 'anthropic'"):
        ModelSpec(provider="openai", name="g", structured="tool")
    with pytest.raises(Exception, match="prompt_cache applies to provider = 'anthropic'"):
        ModelSpec(provider="openai", name="g", prompt_cache=True)
    m = ModelSpec(provider="anthropic", name="c")
    assert m.key_env == "ANTHROPIC_API_KEY" and m.caches_prompt
    assert ModelSpec(provider="openai", name="g").key_env is None


def test_missing_key_is_a_spec_error_naming_the_variable(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(SpecError, match="environment variable ANTHROPIC_API_KEY is not set"):
        provider()


def answer(doc: dict) -> HttpAnswer:
    return HttpAnswer(200, json.dumps(doc).encode(), {}, 0.1)


def test_answers_parse_tool_input_usage_and_stop_reasons():
    p = provider()
    doc = {"content": [{"type": "tool_use", "id": "toolu_1", "name": "answer", "input": {"kind": "a", "n": 3}}],
           "stop_reason": "tool_use",
           "usage": {"input_tokens": 20, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 1500,
                     "output_tokens": 12}}
    comp = p._parse(answer(doc), request(render(), {"t": "x"}))
    assert json.loads(comp.content) == {"kind": "a", "n": 3}
    assert (comp.prompt_tokens, comp.cache_read_tokens, comp.cache_write_tokens) == (1520, 1500, 0)
    assert comp.counted_prompt_tokens == 20 and comp.completion_tokens == 12 and comp.stop_reason is None
    cut = p._parse(answer({**doc, "stop_reason": "max_tokens"}), request(render(), {"t": "x"}))
    refused = p._parse(answer({"content": [], "stop_reason": "refusal", "usage": doc["usage"]}),
                       request(render(), {"t": "x"}))
    assert cut.stop_reason == "max_tokens" and refused.stop_reason == "refusal" and refused.content == ""
    with pytest.raises(MalformedResponse):
        p._parse(HttpAnswer(200, b'{"content": 3}', {}, 0.1), request(render(), {"t": "x"}))


def test_openai_records_cached_tokens():
    p = OpenAIProvider(ModelSpec(provider="openai", name="gpt-4o-mini", base_url="http://127.0.0.1:9/v1"))
    doc = {"choices": [{"message": {"content": "{}"}}],
           "usage": {"prompt_tokens": 2000, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 1920}}}
    comp = p._parse(answer(doc), Request([], None, 0.0, 5), ())
    assert comp.cache_read_tokens == 1920 and comp.counted_prompt_tokens == 2000  # OpenAI counts them in full


def test_cache_reads_and_writes_are_priced():
    claude = ModelSpec(provider="anthropic", name="c", price_in=3.0, price_out=15.0)
    # 1,000 uncached + 2,000 read + 500 written input tokens, 100 output tokens
    assert cost_usd(claude, 3500, 100, 2000, 500) == pytest.approx(
        (1000 * 3.0 + 2000 * 0.3 + 500 * 3.75 + 100 * 15.0) / 1e6)
    gpt = ModelSpec(provider="openai", name="g", price_in=0.15, price_out=0.6)
    assert gpt.cache_read_price == pytest.approx(0.075) and gpt.cache_write_price == pytest.approx(0.1875)
    set_ = ModelSpec(provider="anthropic", name="c", price_in=1, price_cache_read=0.2, price_cache_write=2)
    assert cost_usd(set_, 1000, 0, 1000, 0) == pytest.approx(0.2 / 1e3)
    assert cost_usd(set_, 1000, 0, 0, 1000) == pytest.approx(2 / 1e3)


def test_an_image_part_becomes_an_image_block_with_a_base64_source():
    from llmap.prompt.parts import image_part

    msgs = [{"role": "user", "content": [{"type": "text", "text": "Schedule: "}, image_part("image/png", "QUJD"),
                                         {"type": "text", "text": ""},
                                         {"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}]
    body = provider(prompt_cache=False).body(Request(msgs, SCHEMA, 0.0, 256))
    assert body["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "Schedule: "},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "QUJD"}},
        {"type": "image", "source": {"type": "url", "url": "https://x.org/a.png"}}]}]  # the empty text left out


def test_openai_sends_image_parts_as_they_are():
    from llmap.prompt.parts import image_part

    msgs = [{"role": "user", "content": [{"type": "text", "text": "Schedule: "}, image_part("image/png", "QUJD")]}]
    p = OpenAIProvider(ModelSpec(provider="openai", name="gpt-4o-mini", base_url="http://127.0.0.1:9/v1"))
    body = p.body(Request(msgs, SCHEMA, 0.0, 256), p.shape.sent())
    assert body["messages"] == msgs
    assert body["messages"][0]["content"][1]["image_url"]["url"] == "data:image/png;base64,QUJD"
