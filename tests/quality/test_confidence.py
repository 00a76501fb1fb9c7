"""Per-row confidence: value spans in the answer's JSON, their tokens' joint probability, per item in a pack."""

from __future__ import annotations

import json
import math

import pytest

from llmap import errors as E
from llmap.quality.confidence import (
    Confidence,
    covered_fields,
    json_spans,
    span_probability,
    value_chars,
)
from llmap.spec import FieldSpec

FIELDS = {"kind": FieldSpec(type="string", enum=["city", "county"]), "n": FieldSpec(type="integer"),
          "ok": FieldSpec(type="boolean"), "note": FieldSpec(type="string"), "score": FieldSpec(type="number")}


def test_spans_of_every_value_keep_string_quotes():
    text = ' {"a": 1, "b": [true, "x\\"y"], "c": {"d": null}} '
    spans = json_spans(text)
    assert text[slice(*spans[("a",)])] == "1"
    assert text[slice(*spans[("b", 0)])] == "true"
    assert text[slice(*spans[("b", 1)])] == '"x\\"y"'
    assert text[slice(*spans[("c", "d")])] == "null"
    assert json.loads(text[slice(*spans[()])]) == json.loads(text)
    with pytest.raises(ValueError):
        json_spans('{"a": 1} extra')


def _lp(*pairs):
    return tuple((t, math.log(p)) for t, p in pairs)


def test_a_string_values_probability_is_its_own_tokens_not_the_forced_quotes_around_it():
    text = '{"kind":"county"}'
    # llama-cpp-python's server reports probabilities before the grammar's mask: a forced quote can be tiny
    toks = _lp(('{"', 1e-9), ("kind", 1.0), ('":"', 1e-6), ("coun", 0.5), ("ty", 0.8), ('"}', 1e-7))
    span = json_spans(text)[("kind",)]
    assert text[slice(*value_chars(text, span))] == "county"
    assert span_probability(text, toks, value_chars(text, span)) == pytest.approx(0.5 * 0.8)
    merged = _lp(('{"kind":', 1.0), ('"coun', 1.0), ("ty", 1.0))  # a token that writes both counts whole
    assert span_probability('{"kind":"county', merged, (9, 15)) == pytest.approx(1.0)
    assert value_chars('{"k":""}', (5, 7)) == (6, 7)  # an empty string: the choice is its closing quote


def test_a_number_counts_the_tokens_that_wrote_its_digits():
    text = '{"n":12}'
    toks = _lp(('{"n":', 1e-5), ("1", 0.7), ("2", 0.6), ("}", 1e-5))
    span = json_spans(text)[("n",)]
    assert value_chars(text, span) == span
    assert span_probability(text, toks, span) == pytest.approx(0.7 * 0.6)


def test_tokens_that_do_not_make_the_text_give_no_probability():
    text = '{"n":12}'
    assert span_probability(text, _lp(("{", 1.0), ("x", 1.0)), (5, 7)) is None
    # a server that pads: the tokens hold the text once, in one piece
    padded = _lp(("\n", 1.0), ('{"n":', 1.0), ("12", 0.4), ("}", 1.0))
    assert span_probability(text, padded, (5, 7)) == pytest.approx(0.4)


def test_row_confidence_is_the_product_over_the_covered_fields():
    conf = Confidence({"kind": FIELDS["kind"], "ok": FIELDS["ok"]})
    text = '{"kind":"city","ok":true}'
    toks = _lp(('{"kind":"', 0.1), ("city", 0.6), ('","ok":', 0.1), ("true", 0.5), ("}", 0.1))
    assert conf.ask and conf.row(text, toks) == pytest.approx(0.3)
    assert conf.row(text, None) is None and conf.row("not json", toks) is None


def test_pack_items_get_their_own_confidence_by_id():
    conf = Confidence({"kind": FIELDS["kind"]})
    text = '{"items":[{"id":"7","kind":"city"},{"id":"3","kind":"county"}]}'
    toks = _lp(('{"items":[{"id":"7","kind":"', 1.0), ("city", 0.9), ('"},{"id":"3","kind":"', 1.0),
               ("county", 0.2), ('"}]}', 1.0))
    assert conf.pack(text, toks, ["3", "7", "9"]) == {"3": pytest.approx(0.2), "7": pytest.approx(0.9), "9": None}


def test_covered_fields_auto_list_and_off():
    assert covered_fields(FIELDS, "auto") == ("kind", "n", "ok")  # free text and decimals are not covered
    short = {**FIELDS, "code": FieldSpec(type="string", max_length=8)}
    assert "code" in covered_fields(short, "auto")
    assert covered_fields(FIELDS, ["note"]) == ("note",)
    assert covered_fields(FIELDS, False) == () and not Confidence(FIELDS, False).ask
    with pytest.raises(E.SpecError, match="names 'nope', which is not an output field"):
        covered_fields(FIELDS, ["nope"])
    with pytest.raises(E.SpecError, match="confidence = true, but no field"):
        covered_fields({"note": FIELDS["note"]}, True)
