"""RequestShape: which dialect and parameter spellings to send, and how refusals change them."""

from __future__ import annotations

import pytest

from llmap.control.dialect import RequestShape, dialect_refused, refused_parameter

#: python -m llama_cpp.server 0.3.36 answering response_format json_schema (seen on this machine)
LLAMA_CPP_500 = {"error": {"message": "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', "
                                      "'response_format', 'type'), 'msg': \"Input should be 'text' or "
                                      "'json_object'\", 'input': 'json_schema'}", "type": "internal_server_error",
                           "param": None, "code": None}}
#: OpenAI, a model without Structured Outputs
OPENAI_400 = {"error": {"message": "Invalid parameter: 'response_format' of type 'json_schema' is not supported "
                                   "with this model.", "type": "invalid_request_error", "param": "response_format",
                        "code": None}}
#: OpenAI reasoning models (o1, o3, gpt-5)
MAX_TOKENS_400 = {"error": {"message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                                       "'max_completion_tokens' instead.", "type": "invalid_request_error",
                            "param": "max_tokens", "code": "unsupported_parameter"}}
TEMPERATURE_400 = {"error": {"message": "Unsupported value: 'temperature' does not support 0 with this model. Only "
                                        "the default (1) value is supported.", "type": "invalid_request_error",
                             "param": "temperature", "code": "unsupported_value"}}


@pytest.mark.parametrize(("status", "body", "sent", "refused"), [
    (500, LLAMA_CPP_500, "json_schema", True),
    (400, OPENAI_400, "json_schema", True),
    (422, {"detail": [{"loc": ["body", "response_format"], "msg": "Extra inputs are not permitted"}]},
     "json_object", True),
    (400, {"error": "unknown type json_object"}, "json_object", True),
    (503, {"error": {"message": "response_format busy"}}, "json_schema", False),  # an outage, whatever it says
    (400, MAX_TOKENS_400, "json_schema", False),
    (400, OPENAI_400, "prompt", False),  # prompt sends no response_format
])
def test_dialect_refused(status, body, sent, refused):
    assert dialect_refused(status, body, sent) is refused


@pytest.mark.parametrize(("status", "body", "param"), [
    (400, MAX_TOKENS_400, "max_tokens"),
    (400, TEMPERATURE_400, "temperature"),
    # a gateway that keeps the message but changes code and drops param (Azure, proxies)
    (400, {"error": {"message": MAX_TOKENS_400["error"]["message"], "code": "invalid_request_body"}}, "max_tokens"),
    (400, OPENAI_400, None),
    (500, MAX_TOKENS_400, None),
])
def test_refused_parameter(status, body, param):
    assert refused_parameter(status, body) == param


def test_auto_steps_through_the_dialects_once_per_change():
    shape = RequestShape.start("auto")
    assert (shape.dialect, shape.settled) == ("json_schema", False)
    first = shape.sent()
    note = shape.refused(first, dialect=True)
    assert shape.dialect == "json_object" and "json_schema" in note
    # a request in flight with the old dialect is refused too: resend quietly, no second step
    assert shape.refused(first, dialect=True) == "" and shape.dialect == "json_object"
    assert shape.refused(shape.sent(), dialect=True) and shape.dialect == "prompt"
    assert shape.refused(shape.sent(), dialect=True) is None  # nothing after prompt
    assert shape.accepted(shape.sent()) and shape.settled
    assert not shape.accepted(shape.sent())  # settles once
    assert shape.describe() == "prompt (auto, refused json_schema, refused json_object)"


def test_a_forced_dialect_is_never_changed():
    shape = RequestShape.start("json_schema")
    assert shape.refused(shape.sent(), dialect=True) is None and shape.dialect == "json_schema"
    assert not shape.settled  # the first request still probes alone
    assert RequestShape.start("json_schema", {"token_param": "max_tokens"}).settled  # answered before


def test_reasoning_model_parameters_are_renamed_and_dropped():
    shape = RequestShape.start("auto")
    sent = shape.sent()
    assert "max_completion_tokens" in shape.refused(sent, param="max_tokens")
    assert shape.token_param == "max_completion_tokens"
    assert "temperature" in shape.refused(shape.sent(), param="temperature") and not shape.temperature
    assert shape.refused(shape.sent(), param="temperature") is None  # nothing left to drop
    assert shape.describe().endswith("; max_completion_tokens, no temperature")


def test_parameters_the_user_set_are_theirs_to_fix():
    shape = RequestShape.start("auto", user_params=frozenset({"max_tokens", "temperature"}))
    assert shape.refused(shape.sent(), param="max_tokens") is None
    assert shape.refused(shape.sent(), param="temperature") is None


def test_remembered_shape_starts_settled_and_falls_forward_when_refused():
    rec = {"structured": "json_object", "token_param": "max_completion_tokens", "temperature": False}
    shape = RequestShape.start("auto", rec)
    assert (shape.dialect, shape.settled, shape.token_param, shape.temperature) == (
        "json_object", True, "max_completion_tokens", False)
    assert shape.describe().startswith("json_object (remembered)")
    assert shape.refused(shape.sent(), dialect=True) and shape.dialect == "prompt" and not shape.settled
    assert shape.record() == {"structured": "prompt", "token_param": "max_completion_tokens", "temperature": False,
                              "logprobs": True}
    # a forced dialect ignores the remembered one, keeps the parameter spellings
    forced = RequestShape.start("json_schema", rec)
    assert forced.dialect == "json_schema" and forced.token_param == "max_completion_tokens"
    assert "structured" not in forced.record()


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="structured must be one of"):
        RequestShape.start("xml")
