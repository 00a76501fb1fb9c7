import pytest

from llmap.control.alerts import FailureRateAlert


def test_fires_only_when_the_window_is_full_and_the_rate_is_above_the_max():
    alert = FailureRateAlert(0.2, window=10)
    assert not any(alert.observe(True) for _ in range(9))  # 9 failures, window not full yet
    assert alert.observe(True) is True and alert.rate == 1.0
    assert "10 of the last 10 rows failed" in alert.message()


def test_sliding_window_forgets_old_failures():
    alert = FailureRateAlert(0.2, window=5)
    for failed in (True, True, False, False, False):
        fired = alert.observe(failed)
    assert fired and alert.rate == 0.4
    assert alert.observe(False) is False and alert.rate == 0.2  # the oldest failure left: not above 0.2
    assert alert.observe(False) is False and alert.rate == 0.0


def test_rejects_bad_settings():
    with pytest.raises(ValueError):
        FailureRateAlert(1.5)
    with pytest.raises(ValueError):
        FailureRateAlert(0.2, window=0)
