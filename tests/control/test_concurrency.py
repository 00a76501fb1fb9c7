"""AIMDConcurrency: +1 per round trip of successes, x0.5 per round trip of congestion."""

from __future__ import annotations

import pytest

from llmap.control.concurrency import AIMDConcurrency
from llmap.control.limits import AIMDConcurrency as ReExported


def test_reexported_from_limits():
    assert ReExported is AIMDConcurrency


def test_increases_by_one_per_round_trip():
    aimd = AIMDConcurrency(initial=4, minimum=1, maximum=100, slow_start=False)
    assert [aimd.on_success() for _ in range(4)] == [False, False, False, True]
    assert aimd.limit == 5
    assert [aimd.on_success() for _ in range(5)] == [False] * 4 + [True]
    assert aimd.limit == 6


def test_never_exceeds_maximum():
    aimd = AIMDConcurrency(initial=2, minimum=1, maximum=3, slow_start=False)
    for _ in range(100):
        aimd.on_success()
    assert aimd.limit == 3


def test_halves_on_congestion():
    aimd = AIMDConcurrency(initial=16, minimum=1, maximum=100, slow_start=False)
    assert aimd.on_congestion() is True
    assert aimd.limit == 8


def test_rounds_down_and_floors_at_minimum():
    aimd = AIMDConcurrency(initial=5, minimum=3, maximum=100, slow_start=False)
    aimd.on_congestion()
    assert aimd.limit == 3
    aimd = AIMDConcurrency(initial=7, minimum=1, maximum=100, slow_start=False)
    aimd.on_congestion()
    assert aimd.limit == 3


def test_one_burst_of_429s_halves_once():
    aimd = AIMDConcurrency(initial=16, minimum=1, maximum=100, slow_start=False)
    aimd.on_congestion()
    # The other 15 requests in flight were sent under the old limit.
    assert [aimd.on_congestion() for _ in range(15)] == [False] * 15
    assert aimd.limit == 8


def test_halves_again_after_a_round_trip():
    aimd = AIMDConcurrency(initial=16, minimum=1, maximum=100, slow_start=False)
    aimd.on_congestion()
    for _ in range(16):  # the old limit's worth of outcomes
        aimd.on_congestion()
    assert aimd.limit == 8
    assert aimd.on_congestion() is True
    assert aimd.limit == 4


def test_successes_also_end_the_holdoff():
    aimd = AIMDConcurrency(initial=4, minimum=1, maximum=100, slow_start=False)
    aimd.on_congestion()
    assert aimd.limit == 2
    aimd.on_success()
    aimd.on_success()  # limit 2 -> 3 after two successes
    assert aimd.limit == 3
    aimd.on_success()
    aimd.on_success()  # four outcomes: holdoff of 4 is over
    assert aimd.on_congestion() is True
    assert aimd.limit == 1


def test_in_flight_sets_the_holdoff():
    aimd = AIMDConcurrency(initial=16, minimum=1, maximum=100, slow_start=False)
    aimd.on_congestion(in_flight=2)
    assert aimd.on_congestion() is False
    assert aimd.on_congestion() is False
    assert aimd.on_congestion() is True
    assert aimd.limit == 4


def test_increase_counts_from_the_last_change():
    aimd = AIMDConcurrency(initial=8, minimum=1, maximum=100, slow_start=False)
    for _ in range(7):
        aimd.on_success()
    aimd.on_congestion(in_flight=0)
    assert aimd.limit == 4
    for _ in range(3):
        aimd.on_success()
    assert aimd.limit == 4
    aimd.on_success()
    assert aimd.limit == 5


def test_congestion_at_minimum_does_not_report_a_cut():
    aimd = AIMDConcurrency(initial=1, minimum=1, maximum=4, slow_start=False)
    assert aimd.on_congestion() is False
    assert aimd.limit == 1


@pytest.mark.parametrize(("initial", "minimum", "maximum"), [(0, 0, 4), (5, 1, 4), (2, 3, 4)])
def test_invalid_parameters(initial, minimum, maximum):
    with pytest.raises(ValueError):
        AIMDConcurrency(initial, minimum, maximum)


def test_slow_start_doubles_per_round_trip_until_congestion():
    aimd = AIMDConcurrency(initial=4, minimum=1, maximum=100)
    for _ in range(4):  # one round trip at limit 4
        aimd.on_success()
    assert aimd.limit == 8
    for _ in range(8):
        aimd.on_success()
    assert aimd.limit == 16
    assert aimd.on_congestion() is True and aimd.limit == 8 and aimd.slow_start is False
    for _ in range(8 + 8):  # holdoff of the 16 in flight is spent by successes, then additive
        aimd.on_success()
    assert aimd.limit == 9  # additive: +1 after a round trip of 8


def test_slow_start_stops_at_maximum():
    aimd = AIMDConcurrency(initial=4, minimum=1, maximum=6)
    for _ in range(50):
        aimd.on_success()
    assert aimd.limit == 6
