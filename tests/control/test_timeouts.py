import pytest

from llmap.control.timeouts import AdaptiveTimeout


def test_ceiling_until_enough_samples_then_multiple_of_p99():
    t = AdaptiveTimeout(120.0, floor_s=2.0, multiple=4.0, min_samples=20)
    for _ in range(19):
        t.observe(1.0)
    assert t.current() == 120.0
    t.observe(1.0)
    assert t.current() == 4.0
    for _ in range(80):
        t.observe(1.0)
    t.observe(5.0)  # one slow answer in 101 is above p99's rank
    assert t.current() == 4.0
    for _ in range(AdaptiveTimeout.RECOMPUTE_EVERY):  # recomputed every so many answers
        t.observe(5.0)
    assert t.current() == 20.0


def test_floor_and_ceiling_clamp():
    fast = AdaptiveTimeout(120.0, floor_s=2.0, min_samples=3)
    for _ in range(3):
        fast.observe(0.001)
    assert fast.current() == 2.0
    slow = AdaptiveTimeout(10.0, floor_s=2.0, min_samples=3)
    for _ in range(3):
        slow.observe(100.0)
    assert slow.current() == 10.0


def test_window_forgets_old_latencies():
    t = AdaptiveTimeout(120.0, floor_s=0.1, multiple=1.0, min_samples=2, window=3)
    for v in (50.0, 50.0, 50.0):
        t.observe(v)
    assert t.current() == 50.0
    for _ in range(AdaptiveTimeout.RECOMPUTE_EVERY):
        t.observe(1.0)
    assert t.current() == 1.0


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        AdaptiveTimeout(0)


def test_quantile_of_recent_latencies():
    t = AdaptiveTimeout(60.0, min_samples=4)
    assert t.quantile(0.95) == 60.0  # not enough samples yet
    for v in (1.0, 2.0, 3.0, 4.0):
        t.observe(v)
    assert t.quantile(0.5) == 2.0 and t.quantile(0.95) == 4.0
