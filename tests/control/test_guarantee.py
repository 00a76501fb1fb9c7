"""The guaranteed cascade's statistics: exact hypergeometric bounds, the fixed-sequence threshold, the sample, reuse."""

from __future__ import annotations

import math
import random

import pytest

from llmap.control.guarantee import (
    FAILED,
    Choice,
    choose_threshold,
    draw_sample,
    hypergeom_cdf,
    lower_count,
    reuse,
    upper_count,
)


def _pmf(i: int, m: int, d: int, k: int) -> float:
    return math.comb(d, i) * math.comb(m - d, k - i) / math.comb(m, k)


@pytest.mark.parametrize(("m", "d", "k"), [(10, 3, 4), (40, 0, 7), (40, 40, 7), (57, 20, 31), (200, 9, 120)])
def test_hypergeometric_cdf_is_exact(m, d, k):
    for x in range(-1, k + 2):
        exact = sum(_pmf(i, m, d, k) for i in range(0, min(x, k) + 1) if i <= d and k - i <= m - d)
        assert hypergeom_cdf(x, m, d, k) == pytest.approx(exact, abs=1e-12)


@pytest.mark.parametrize(("m", "k", "alpha"), [(30, 10, 0.05), (25, 25, 0.1), (60, 7, 0.05), (41, 0, 0.2)])
def test_the_exact_bounds_cover_every_true_count_and_are_the_tightest(m, k, alpha):
    """P(D > U(X)) <= alpha and P(D < L(X)) <= alpha for every true D, summed exactly over X; and one less
    (or more) would not cover."""
    for d in range(m + 1):
        lo, hi = max(0, k - (m - d)), min(k, d)
        miss_up = sum(_pmf(x, m, d, k) for x in range(lo, hi + 1) if d > upper_count(x, m, k, alpha))
        miss_lo = sum(_pmf(x, m, d, k) for x in range(lo, hi + 1) if d < lower_count(x, m, k, alpha))
        assert miss_up <= alpha + 1e-12 and miss_lo <= alpha + 1e-12
    for x in range(k + 1):
        u = upper_count(x, m, k, alpha)
        assert hypergeom_cdf(x, m, u, k) > alpha
        assert u == m - (k - x) or hypergeom_cdf(x, m, u + 1, k) <= alpha


def test_bounds_refuse_impossible_counts():
    with pytest.raises(ValueError):
        upper_count(5, 10, 4, 0.05)
    with pytest.raises(ValueError):
        lower_count(0, 10, 11, 0.05)


def test_the_sample_is_seeded_uniform_and_grows_as_a_superset():
    keys = [f"k{i}" for i in range(1000)]
    a = draw_sample(keys, 100, seed=7)
    assert a == draw_sample(list(reversed(keys)), 100, seed=7)  # the keys' order does not matter
    assert len(set(a)) == 100 and set(a) != set(draw_sample(keys, 100, seed=8))
    assert set(a) <= set(draw_sample(keys, 150, seed=7))  # a larger budget draws a superset
    counts = [0] * 10  # each decile of keys gets about a tenth of many draws
    for seed in range(200):
        for k in draw_sample(keys, 50, seed):
            counts[int(k[1:]) // 100] += 1
    assert max(counts) / min(counts) < 1.25
    assert draw_sample(keys[:3], 10, seed=1) == draw_sample(keys[:3], 3, seed=1)


def _population(n: int, rng: random.Random, *, hard: bool) -> tuple[list[float], list[str]]:
    """Scores and proxy answers against an oracle answering "a": wrong with probability 1 - s (calibrated), or
    (hard) far more often than the score says among the high scores."""
    scores, proxy = [], []
    for _ in range(n):
        s = rng.random()
        p_right = 0.85 if hard and s > 0.5 else s
        scores.append(s)
        proxy.append("a" if rng.random() < p_right else "b")
    return scores, proxy


@pytest.mark.parametrize("hard", [False, True])
def test_the_chosen_threshold_meets_the_agreement_target_with_probability_one_minus_delta(hard):
    target, delta, n_rows, budget, trials = 0.9, 0.2, 400, 120, 300
    misses = kept_any = 0
    for trial in range(trials):
        rng = random.Random(trial)
        scores, proxy = _population(n_rows, rng, hard=hard)
        keys = [str(i) for i in range(n_rows)]
        sample = {int(k): "a" for k in draw_sample(keys, budget, trial)}
        c = choose_threshold(scores, proxy, sample, guarantee="agreement", target=target, delta=delta)
        final = [proxy[i] if c.threshold is not None and scores[i] >= c.threshold and i not in sample else "a"
                 for i in range(n_rows)]
        misses += sum(v == "a" for v in final) / n_rows < target
        kept_any += c.kept > 0
        if c.met:
            assert c.bound >= target and c.bound <= c.estimate + 1e-9 <= c.upper + 2e-9
            assert c.kept + c.escalated + c.sampled == n_rows
    assert misses / trials <= delta
    assert kept_any > trials * 0.9  # and it keeps proxy answers: the promise is not met by keeping nothing


def test_a_fixed_threshold_misses_where_the_guarantee_does_not():
    """Over-confident scores: the rows scoring above 0.9 are right 80% of the time, not 95%."""
    rng = random.Random(5)
    n_rows = 2000
    scores = [0.9 + 0.1 * rng.random() if i % 2 else 0.9 * rng.random() for i in range(n_rows)]
    proxy = ["a" if rng.random() < (0.8 if s >= 0.9 else 0.5) else "b" for s in scores]
    fixed = sum(proxy[i] == "a" if scores[i] >= 0.9 else True for i in range(n_rows)) / n_rows
    assert fixed < 0.92
    sample = {int(k): "a" for k in draw_sample([str(i) for i in range(n_rows)], 400, 1)}
    c = choose_threshold(scores, proxy, sample, guarantee="agreement", target=0.95, delta=0.05)
    final = sum(proxy[i] == "a" if c.threshold is not None and scores[i] >= c.threshold and i not in sample
                else True for i in range(n_rows)) / n_rows
    assert final >= 0.95


@pytest.mark.parametrize("guarantee", ["precision", "recall"])
def test_precision_and_recall_of_a_boolean_filter_are_met_with_probability_one_minus_delta(guarantee):
    target, delta, n_rows, budget, trials = 0.9, 0.2, 500, 150, 120
    misses = kept = 0
    for trial in range(trials):
        rng = random.Random(1000 + trial)
        truth = [rng.random() < 0.3 for _ in range(n_rows)]
        scores = [rng.random() for _ in range(n_rows)]
        proxy = [t if rng.random() < 0.6 + 0.4 * s else not t for t, s in zip(truth, scores, strict=True)]
        sample = {int(k): truth[int(k)] for k in draw_sample([str(i) for i in range(n_rows)], budget, trial)}
        c = choose_threshold(scores, proxy, sample, guarantee=guarantee, target=target, delta=delta)
        final = [proxy[i] if c.threshold is not None and scores[i] >= c.threshold and i not in sample else truth[i]
                 for i in range(n_rows)]
        tp = sum(f and t for f, t in zip(final, truth, strict=True))
        rate = tp / max(1, sum(final)) if guarantee == "precision" else tp / max(1, sum(truth))
        misses += rate < target
        kept += c.kept
    assert misses / trials <= delta
    assert kept / trials > 20


def test_no_score_or_a_failing_top_threshold_is_a_miss_never_a_quiet_keep():
    c = choose_threshold([None] * 50, ["a"] * 50, {0: "a", 1: "a"}, guarantee="agreement", target=0.9, delta=0.1)
    assert not c.met and c.threshold is None and c.kept == 0 and c.no_score == 50 and c.candidates == 0
    # the proxy disagrees with the oracle on every sampled row: even the highest score fails (one row kept
    # unsampled could be wrong: 0.99 < 0.999)
    scores = [i / 100 for i in range(100)]
    c = choose_threshold(scores, ["b"] * 100, {i: "a" for i in range(0, 100, 2)}, guarantee="agreement",
                         target=0.999, delta=0.1)
    assert not c.met and c.threshold is None and c.first_failure is not None


def test_an_oracle_failure_on_a_sampled_row_counts_against_the_proxy():
    scores = [0.99] * 100
    ok = choose_threshold(scores, ["a"] * 100, dict.fromkeys(range(30), "a"), guarantee="agreement", target=0.9,
                          delta=0.1)
    sample = {**dict.fromkeys(range(30), "a"), **dict.fromkeys(range(20), FAILED)}
    failed = choose_threshold(scores, ["a"] * 100, sample, guarantee="agreement", target=0.9, delta=0.1)
    assert ok.met and not failed.met


def test_choice_round_trips_and_rejects_bad_arguments():
    c = choose_threshold([0.5, 0.9], ["a", "a"], {0: "a"}, guarantee="agreement", target=0.4, delta=0.1)
    assert Choice.from_dict(c.as_dict()) == c
    with pytest.raises(ValueError, match="guarantee"):
        choose_threshold([0.5], ["a"], {}, guarantee="accuracy", target=0.9, delta=0.1)
    with pytest.raises(ValueError, match="target"):
        choose_threshold([0.5], ["a"], {}, guarantee="agreement", target=1.0, delta=0.1)
    with pytest.raises(ValueError, match="outside"):
        choose_threshold([0.5], ["a"], {3: "a"}, guarantee="agreement", target=0.9, delta=0.1)


def test_reuse_holds_while_the_changed_rows_fit_the_slack_and_says_when_not():
    rng = random.Random(3)
    n_rows = 3000
    scores = [rng.random() for _ in range(n_rows)]
    proxy = ["a" if rng.random() < 0.5 + 0.5 * s else "b" for s in scores]
    sample = {int(k): "a" for k in draw_sample([str(i) for i in range(n_rows)], 400, 2)}
    c = choose_threshold(scores, proxy, sample, guarantee="agreement", target=0.9, delta=0.05)
    assert c.met
    slack = int((1 - c.target) * n_rows) - c.counts["d_upper"]
    assert slack >= 0
    none_kept = reuse(c, population=n_rows, gone_positive_room=0, changed_kept=0, changed_kept_true=0,
                      kept_true_now=0)
    assert none_kept.holds and none_kept.bound == pytest.approx(c.bound)
    within = reuse(c, population=n_rows, gone_positive_room=0, changed_kept=slack, changed_kept_true=0,
                   kept_true_now=0)
    beyond = reuse(c, population=n_rows, gone_positive_room=0, changed_kept=slack + 30, changed_kept_true=0,
                   kept_true_now=0)
    assert within.holds and not beyond.holds and beyond.bound < c.target
