"""The settle stage's quality decisions: checks re-ask then fail naming the check, confidence per row and per
pack item, the last raw answer kept; no server, no clock, no ledger."""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace

import pytest

from llmap.prompt.schema import OutputSchema
from llmap.providers.base import Completion
from llmap.quality.checks import Checks
from llmap.quality.confidence import Confidence
from llmap.run.settle import Done, FailOver, Reask, Settler, Split, Tries
from llmap.spec import CheckSpec, FieldSpec

FIELDS = {"region": FieldSpec(type="string", enum=["LATAM", "APAC", "EMEA"])}
TARGET = SimpleNamespace(index=0, label="sim:m", model=SimpleNamespace(max_tokens=64))
CHECK = CheckSpec(sql="output.region != 'LATAM' OR country IN ('BR', 'MX')",
                  message="a LATAM region needs a Latin American country")


@pytest.fixture
def settler():
    checks = Checks.bind([CHECK], {"region": "string"}, {"country": "VARCHAR", "region": "VARCHAR"})
    yield Settler(OutputSchema(FIELDS), max_reask=1, checks=checks, confidence=Confidence(FIELDS))
    checks.close()


def comp(content: str, tokens=None) -> Completion:
    return Completion(content, 10, 5, 0.1, logprobs=tokens)


def answer(settler, c, row, tries=None):
    return asyncio.run(settler.answer(c, TARGET, tries or Tries(), row))


def test_a_broken_check_is_reasked_with_its_message_then_fails_naming_it(settler):
    bad = '{"region": "LATAM"}'
    first = answer(settler, comp(bad), {"country": "ID"})
    assert isinstance(first, Reask) and first.outcome == "check" and first.raw == bad
    assert first.extra[0] == {"role": "assistant", "content": bad}
    assert "a LATAM region needs a Latin American country" in first.extra[1]["content"]
    tries = Tries()
    tries.after(first)
    last = answer(settler, comp(bad), {"country": "ID"}, tries)
    assert isinstance(last, FailOver) and last.outcome == "check" and last.raw == bad
    assert last.error == ("CheckFailed: a LATAM region needs a Latin American country (check \"output.region != "
                          "'LATAM' OR country IN ('BR', 'MX')\", after 1 re-asks)")
    ok = answer(settler, comp(bad), {"country": "BR"})
    assert isinstance(ok, Done) and ok.output == {"region": "LATAM"}


def test_a_done_answer_carries_its_confidence(settler):
    text = '{"region":"APAC"}'
    tokens = (('{"region":"', 0.0), ("AP", math.log(0.8)), ("AC", math.log(0.9)), ('"}', math.log(0.5)))
    d = answer(settler, comp(text, tokens), {"country": "ID"})
    assert isinstance(d, Done) and d.confidence == pytest.approx(0.72)
    assert answer(settler, comp(text), {"country": "ID"}).confidence is None  # no log-probabilities: none


def test_checks_need_the_row(settler):
    with pytest.raises(ValueError, match="row's input columns were not passed"):
        answer(settler, comp('{"region": "APAC"}'), None)


def test_a_pack_item_that_breaks_a_check_splits_and_each_done_item_has_its_own_confidence(settler):
    text = '{"items":[{"id":"1","region":"LATAM"},{"id":"2","region":"LATAM"}]}'
    tokens = (('{"items":[{"id":"1","region":"', 0.0), ("LATAM", math.log(0.4)),
              ('"},{"id":"2","region":"', 0.0), ("LATAM", math.log(0.7)), ('"}]}', 0.0))
    got = settler.pack(comp(text, tokens), TARGET, ["1", "2"], {"1": {"country": "ID"}, "2": {"country": "MX"}})
    assert isinstance(got["1"], Split) and "CheckFailed: a LATAM region" in got["1"].error
    assert got["2"] == Done({"region": "LATAM"}, pytest.approx(0.7))


def test_a_stored_answer_is_checked_against_each_row(settler):
    assert asyncio.run(settler.accepts({"region": "LATAM"}, {"country": "BR"})) is True
    assert asyncio.run(settler.accepts({"region": "LATAM"}, {"country": "ID"})) is False
    assert settler.accepts_now({"region": "LATAM"}, {"country": "ID"}) is False
    assert settler.logprobs is True
    assert Settler(OutputSchema(FIELDS), max_reask=1).logprobs is False
