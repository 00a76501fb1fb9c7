"""Evaluation figures: Wilson intervals, classification, numbers, strings, calibration (pure functions)."""

from __future__ import annotations

import math

import pytest

from llmap.quality.metrics import (
    Rate,
    calibration,
    classification,
    normalize_text,
    numbers,
    strings,
    wilson,
)


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    # reference values: the Wilson score interval at z = 1.96 (e.g. statsmodels proportion_confint(method="wilson"))
    (0, 10, 0.0, 0.27753),
    (5, 10, 0.23659, 0.76341),
    (10, 10, 0.72247, 1.0),
    (51, 61, 0.72387, 0.90844),  # by hand: centre 0.816156, half-width 0.092282
    (1, 2, 0.09453, 0.90547),
])
def test_wilson_matches_reference_values(k, n, low, high):
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)


def test_wilson_of_nothing_knows_nothing_and_refuses_bad_counts():
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="k must be within"):
        wilson(3, 2)


def test_rate_is_k_of_n_with_its_interval_unrounded():
    r = Rate(51, 61)
    d = r.as_dict("accuracy")
    assert d["accuracy"] == 51 / 61 and d["accuracy_n"] == 61 and d["accuracy_k"] == 51
    assert d["accuracy_low"] < d["accuracy"] < d["accuracy_high"]
    assert r.text() == "0.836 [0.724, 0.908] (51/61)"
    assert Rate(0, 0).value is None and Rate(0, 0).text() == "- (0/0)"


def test_classification_counts_every_cell_and_per_class_rates():
    pairs = [("a", "a")] * 8 + [("a", "b")] * 2 + [("b", "b")] * 3 + [("b", "a")] * 1 + [("c", "a")] * 1
    c = classification(pairs, ["a", "b", "c"])
    assert (c.accuracy.k, c.accuracy.n) == (11, 15)
    assert c.labels == ["a", "b", "c"]
    assert c.matrix == [[8, 2, 0], [1, 3, 0], [1, 0, 0]]
    a, b, cc = c.classes
    assert (a.precision.k, a.precision.n, a.recall.k, a.recall.n, a.support) == (8, 10, 8, 10, 10)
    assert a.f1 == pytest.approx(0.8)
    assert (b.precision.k, b.precision.n, b.recall.k, b.recall.n) == (3, 5, 3, 4)
    assert b.f1 == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert cc.precision.n == 0 and cc.f1 is None and cc.recall.value == 0.0  # never answered: no precision
    assert c.macro_f1 == pytest.approx((0.8 + b.f1 + 0.0) / 3)


def test_classification_adds_values_outside_the_enum_to_the_matrix():
    c = classification([("a", "zzz"), (True, True)], ["a"])
    assert c.labels == ["a", "zzz", True] and c.matrix[0][1] == 1


def test_numbers_exact_mae_interval_and_tolerance():
    f = numbers([(300, 300), (300, 310), (400, 380), (360, 360)], tolerance=10)
    assert (f.exact.k, f.exact.n) == (2, 4)
    assert f.mae == pytest.approx(7.5)
    sd = math.sqrt(((0 - 7.5) ** 2 + (10 - 7.5) ** 2 + (20 - 7.5) ** 2 + (0 - 7.5) ** 2) / 3)
    assert f.mae_high == pytest.approx(7.5 + 1.959963984540054 * sd / 2)
    assert (f.within.k, f.within.n) == (3, 4)
    assert numbers([(1, 1)]).within is None and numbers([]).mae is None


def test_strings_exact_and_normalized():
    assert normalize_text("  Casper,  WY. ") == "casper, wy"
    s = strings([("Casper, WY", "casper, wy"), ("Cody", "Cody"), ("Lander", "Riverton")])
    assert (s.exact.k, s.normalized.k, s.exact.n) == (1, 2, 3)


def test_calibration_bins_and_ece_by_hand():
    # bin 0.9-1.0: 4 rows at 0.95, 3 right; bin 0.5-0.6: 2 rows at 0.55, 1 right
    pairs = [(0.95, True)] * 3 + [(0.95, False)] + [(0.55, True), (0.55, False)]
    c = calibration(pairs)
    assert c.n == 6 and (c.right, c.wrong) == (4, 2)
    b9 = c.bins[9]
    assert b9.n == 4 and b9.confidence == pytest.approx(0.95) and b9.accuracy.value == 0.75
    assert c.ece == pytest.approx(4 / 6 * 0.2 + 2 / 6 * 0.05)
    assert c.mean_right == pytest.approx((0.95 * 3 + 0.55) / 4) and c.mean_wrong == pytest.approx(0.75)
    assert calibration([(1.0, True)]).bins[9].n == 1  # a confidence of 1 goes in the last bin
