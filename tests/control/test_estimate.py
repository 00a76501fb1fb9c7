"""Token estimators: output tokens from recent answers, prompt tokens from characters."""

from __future__ import annotations

import pytest

from llmap.control.tokens import OutputTokenEstimator, PromptTokenEstimator


def test_output_default_without_max_tokens():
    assert OutputTokenEstimator().estimate() == 256


def test_output_default_is_bounded_by_max_tokens():
    assert OutputTokenEstimator(max_tokens=100).estimate() == 100
    assert OutputTokenEstimator(max_tokens=4096).estimate() == 256


def test_output_explicit_default():
    assert OutputTokenEstimator(default=40).estimate() == 40


def test_output_uses_the_90th_percentile():
    estimator = OutputTokenEstimator()
    for tokens in range(1, 101):
        estimator.observe(tokens)
    assert estimator.estimate() == 90


def test_output_single_observation_replaces_the_default():
    estimator = OutputTokenEstimator()
    estimator.observe(12)
    assert estimator.estimate() == 12


def test_output_quantile_is_configurable():
    estimator = OutputTokenEstimator(quantile=0.5)
    for tokens in (10, 20, 30, 40):
        estimator.observe(tokens)
    assert estimator.estimate() == 20


def test_output_window_slides():
    estimator = OutputTokenEstimator(window=200)
    for _ in range(200):
        estimator.observe(1000)
    assert estimator.estimate() == 1000
    for _ in range(200):
        estimator.observe(10)
    assert len(estimator) == 200
    assert estimator.estimate() == 10


def test_output_estimate_updates_after_each_observation():
    estimator = OutputTokenEstimator(window=10)
    for _ in range(10):
        estimator.observe(5)
    assert estimator.estimate() == 5
    estimator.observe(500)
    assert estimator.estimate() == 5  # rank 9 of ten: nine 5s, one 500
    estimator.observe(500)
    assert estimator.estimate() == 500  # rank 9 of ten: eight 5s, two 500s


def test_output_estimate_is_capped_by_max_tokens():
    estimator = OutputTokenEstimator(max_tokens=50)
    estimator.observe(400)
    assert estimator.estimate() == 50


@pytest.mark.parametrize(
    "kwargs",
    [{"window": 0}, {"quantile": 0}, {"quantile": 1.5}, {"max_tokens": 0}, {"default": -1}],
)
def test_output_invalid_parameters(kwargs):
    with pytest.raises(ValueError):
        OutputTokenEstimator(**kwargs)


def test_output_rejects_negative_observation():
    with pytest.raises(ValueError):
        OutputTokenEstimator().observe(-1)


def test_prompt_default_ratio_is_four_chars_per_token():
    estimator = PromptTokenEstimator()
    assert estimator.estimate("a" * 400) == 100
    assert estimator.estimate(401) == 101  # rounds up
    assert estimator.estimate("") == 0


def test_prompt_first_observation_replaces_the_default():
    estimator = PromptTokenEstimator()
    estimator.observe("x" * 400, 200)
    assert estimator.chars_per_token == pytest.approx(2.0)
    assert estimator.estimate(1000) == 500


def test_prompt_running_mean_then_ewma():
    estimator = PromptTokenEstimator(alpha=0.25)
    estimator.observe(200, 100)  # ratio 2, weight 1
    estimator.observe(600, 100)  # ratio 6, weight 1/2 -> 4
    assert estimator.chars_per_token == pytest.approx(4.0)
    estimator.observe(100, 100)  # ratio 1, weight 1/3 -> 3
    assert estimator.chars_per_token == pytest.approx(3.0)
    estimator.observe(700, 100)  # ratio 7, weight 1/4 -> 4
    assert estimator.chars_per_token == pytest.approx(4.0)
    estimator.observe(800, 100)  # ratio 8, weight alpha=1/4 (not 1/5) -> 5
    assert estimator.chars_per_token == pytest.approx(5.0)


def test_prompt_ratio_is_clamped():
    estimator = PromptTokenEstimator(min_ratio=1.0, max_ratio=8.0)
    estimator.observe(10, 100)
    assert estimator.chars_per_token == 1.0
    estimator = PromptTokenEstimator(min_ratio=1.0, max_ratio=8.0)
    estimator.observe(10_000, 10)
    assert estimator.chars_per_token == 8.0


def test_prompt_ignores_empty_observations():
    estimator = PromptTokenEstimator()
    estimator.observe("", 10)
    estimator.observe(100, 0)
    assert estimator.chars_per_token == 4.0
    assert estimator.observations == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"alpha": 0}, {"alpha": 1.5}, {"chars_per_token": 0}, {"chars_per_token": 20.0}],
)
def test_prompt_invalid_parameters(kwargs):
    with pytest.raises(ValueError):
        PromptTokenEstimator(**kwargs)
