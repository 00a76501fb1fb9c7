"""The settle stage: each kind of outcome in, the decision out; no server, no clock, no ledger."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from llmap import errors as E
from llmap.control.cascade import EscalateIf
from llmap.control.retry import RetryDecision, RetryPolicy
from llmap.prompt.schema import OutputSchema
from llmap.providers.base import Completion
from llmap.run.settle import (
    Done,
    Escalate,
    FailOver,
    Reask,
    Retry,
    Settler,
    Split,
    Stop,
    Tries,
    cut_error,
    refusal_error,
)
from llmap.spec import FieldSpec

FIELDS = {"kind": FieldSpec(type="string", enum=["city", "county", "other"]),
          "n": FieldSpec(type="integer", minimum=1, maximum=10)}
SCHEMA = OutputSchema(FIELDS)
FIRST = SimpleNamespace(index=0, label="sim:cheap", model=SimpleNamespace(max_tokens=64))
LAST = SimpleNamespace(index=1, label="sim:strong", model=SimpleNamespace(max_tokens=64))


def comp(content: str, stop: str | None = None) -> Completion:
    return Completion(content, 10, 5, 0.1, stop_reason=stop)


def answer(settler: Settler, c: Completion, tries: Tries | None = None, target=FIRST):
    return asyncio.run(settler.answer(c, target, tries or Tries()))


@pytest.fixture
def settler() -> Settler:
    return Settler(SCHEMA, max_reask=2, models=2)


def test_a_valid_answer_is_done(settler):
    assert answer(settler, comp('{"kind": "city", "n": 3}')) == Done({"kind": "city", "n": 3})


def test_an_invalid_answer_is_reasked_with_the_error_then_fails_over_with_the_last_answer(settler):
    bad = '{"kind": "town", "n": 3}'
    first = answer(settler, comp(bad))
    assert isinstance(first, Reask) and first.outcome == "invalid" and not first.cut
    assistant, reask = first.extra
    assert assistant == {"role": "assistant", "content": bad}
    assert reask["role"] == "user" and "kind" in reask["content"] and "JSON Schema" in reask["content"]
    tries = Tries()
    tries.after(first)
    assert tries == Tries(reasks=1)
    assert isinstance(answer(settler, comp(bad), Tries(reasks=1)), Reask)
    spent = answer(settler, comp(bad), Tries(reasks=2))
    assert isinstance(spent, FailOver)
    assert spent.error.startswith("AnswerInvalid: ") and spent.error.endswith("(after 2 re-asks)")
    assert spent.raw == bad and spent.outcome == "invalid"


def test_not_json_at_all_is_invalid(settler):
    assert isinstance(answer(settler, comp("The district is a city.")), Reask)


def test_a_cut_answer_is_reasked_once_then_fails_with_one_message(settler):
    first = answer(settler, comp('{"kind": "ci', stop="max_tokens"))
    assert isinstance(first, Reask) and first.cut and first.outcome == "max_tokens"
    assert "64 tokens" in first.extra[0]["content"]
    tries = Tries()
    tries.after(first)
    assert tries.cut and tries.reasks == 0  # a cut does not spend an invalid answer's re-asks
    second = answer(settler, comp('{"kind": "ci', stop="max_tokens"), tries)
    assert second == FailOver(cut_error(64), "max_tokens", '{"kind": "ci')
    assert "cut at max_tokens = 64" in second.error and second.error.startswith("AnswerCut:")


def test_a_refusal_fails_over_without_a_reask(settler):
    d = answer(settler, comp("I can't help with that.", stop="refusal"))
    assert d == FailOver(refusal_error("sim:cheap"), "refusal", "I can't help with that.")
    assert "declined to answer" in d.error


def test_escalate_if_sends_a_valid_answer_on_and_the_last_model_keeps_it():
    cond = EscalateIf.bind("kind = 'other'", SCHEMA.field_types)
    settler = Settler(SCHEMA, max_reask=2, escalate_if=[cond, cond], models=2)
    try:
        assert answer(settler, comp('{"kind": "other", "n": 1}')) == Escalate({"kind": "other", "n": 1})
        assert answer(settler, comp('{"kind": "city", "n": 1}')) == Done({"kind": "city", "n": 1})
        # the last model has no one to escalate to
        assert answer(settler, comp('{"kind": "other", "n": 1}'), target=LAST) == Done({"kind": "other", "n": 1})
    finally:
        cond.close()


def test_a_pack_with_one_bad_item_settles_the_rest_and_splits_that_one(settler):
    content = json.dumps({"items": [{"id": "a", "kind": "city", "n": 2}, {"id": "b", "kind": "nope", "n": 2},
                                    {"id": "c", "kind": "county", "n": 9}]})
    decisions = settler.pack(comp(content), FIRST, ["a", "b", "c", "d"])
    assert list(decisions) == ["a", "b", "c", "d"]
    assert decisions["a"] == Done({"kind": "city", "n": 2})
    assert decisions["c"] == Done({"kind": "county", "n": 9})
    assert isinstance(decisions["b"], Split) and "AnswerInvalid" in decisions["b"].error
    assert isinstance(decisions["d"], Split)  # missing from the answer


@pytest.mark.parametrize("stop", ["max_tokens", "refusal"])
def test_a_cut_or_refused_pack_splits_whole(settler, stop):
    decisions = settler.pack(comp('{"items": [', stop=stop), FIRST, ["a", "b"])
    assert all(isinstance(d, Split) for d in decisions.values())


def test_a_pack_escalates_item_by_item():
    cond = EscalateIf.bind("n > 5", SCHEMA.field_types)
    settler = Settler(SCHEMA, max_reask=0, escalate_if=[cond], models=2)
    try:
        content = json.dumps({"items": [{"id": "a", "kind": "city", "n": 2}, {"id": "b", "kind": "city", "n": 7}]})
        decisions = settler.pack(comp(content), FIRST, ["a", "b"])
        assert decisions == {"a": Done({"kind": "city", "n": 2}), "b": Escalate({"kind": "city", "n": 7})}
    finally:
        cond.close()


RETRY = RetryDecision(True, 1.5, "retry")
GIVE_UP = RetryDecision(False, 0.0, "gave up")


@pytest.mark.parametrize("exc", [
    E.RateLimited("HTTP 429", status=429, retry_after=1.5),
    E.Overloaded("HTTP 529: overloaded", status=529),
    E.RequestTimeout("no answer within 10 s"),
    E.ConnectionFailed("connection refused"),
    E.MalformedResponse("200 with no choices"),
])
def test_a_transient_error_is_retried_while_the_policy_says_so(exc):
    assert Settler.error(exc, RETRY) == Retry(1.5, f"{type(exc).__name__}: {exc}")
    assert Settler.error(exc, GIVE_UP) == FailOver(f"{type(exc).__name__}: {exc}")
    assert Settler.error(exc, None) == Retry(0.0, f"{type(exc).__name__}: {exc}")  # a batch's own policy decides


@pytest.mark.parametrize("exc", [E.BadRequest("HTTP 400: bad"), E.ContextTooLong("HTTP 400: context length"),
                                 E.AnswerCut("answers stop at max_tokens"), E.ModelLeftOut("left out")])
def test_a_terminal_error_fails_over(exc):
    assert Settler.error(exc, RetryPolicy().decide(exc, 1, 0.0)) == FailOver(f"{type(exc).__name__}: {exc}")


def test_a_pack_too_long_splits_and_other_pack_errors_do_not():
    assert isinstance(Settler.error(E.ContextTooLong("too long"), GIVE_UP, pack=True), Split)
    assert isinstance(Settler.error(E.BadRequest("HTTP 404"), GIVE_UP, pack=True), FailOver)
    assert isinstance(Settler.error(E.Overloaded("HTTP 503"), RETRY, pack=True), Retry)


@pytest.mark.parametrize("exc", [E.AuthError("HTTP 401: bad key"), E.QuotaExhausted("insufficient_quota"),
                                 E.LocalModelCrashed("SIGSEGV")])
def test_an_error_every_row_would_hit_stops_the_run(exc):
    d = Settler.error(exc, RetryPolicy().decide(exc, 1, 0.0))
    assert isinstance(d, Stop) and d.error is exc and d.reason == str(exc)
