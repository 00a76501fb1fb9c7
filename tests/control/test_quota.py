import pytest

from llmap.control.quota import GroupQuota, QuotaDecision

TAKE, HOLD, SKIP = QuotaDecision.TAKE, QuotaDecision.HOLD, QuotaDecision.SKIP


def test_takes_n_then_holds_then_skips_once_done():
    q = GroupQuota(2)
    assert [q.decide("WY") for _ in range(3)] == [TAKE, TAKE, HOLD]
    q.settle("WY", done=True)
    assert q.decide("WY") == HOLD  # one still in flight could fail
    q.settle("WY", done=True)
    assert q.decide("WY") == SKIP
    assert q.decide("CO") == TAKE  # groups are independent


def test_a_failure_frees_a_place_for_the_next_row():
    q = GroupQuota(1)
    assert q.decide("WY") == TAKE and q.decide("WY") == HOLD
    q.settle("WY", done=False)
    assert q.decide("WY") == TAKE


def test_done_rows_from_earlier_runs_count():
    q = GroupQuota(3, {"WY": 3, "CO": 1})
    assert q.decide("WY") == SKIP
    assert [q.decide("CO") for _ in range(3)] == [TAKE, TAKE, HOLD]
    assert "has 3 done rows (n = 3)" in q.reason("WY", "state")


def test_rejects_bad_n():
    with pytest.raises(ValueError):
        GroupQuota(0)
