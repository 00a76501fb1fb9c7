"""``[limits]``: the backoff settings and how a bad one is refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from llmap.spec import LimitsSpec


def test_backoff_defaults_and_bounds():
    assert (LimitsSpec().backoff_base_s, LimitsSpec().backoff_cap_s) == (0.5, 8.0)
    assert LimitsSpec(backoff_base_s=0).backoff_base_s == 0.0  # retry at once
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        LimitsSpec(backoff_base_s=-1)
    with pytest.raises(ValidationError, match="backoff_base_s = 10 is over backoff_cap_s = 8; lower backoff_base_s"):
        LimitsSpec(backoff_base_s=10)
    assert LimitsSpec(backoff_base_s=10, backoff_cap_s=20).backoff_base_s == 10
