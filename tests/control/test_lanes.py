"""A lane's concurrency gate: where its cap and first limit come from."""

from __future__ import annotations

from llmap.control.lanes import INITIAL_CONCURRENCY, Lane
from llmap.spec import LimitsSpec, ModelSpec


class _Provider:
    def __init__(self, max_concurrency: int, *, own: bool = False) -> None:
        self.label = "p:x"
        self.max_concurrency = max_concurrency
        if own:
            self.own_concurrency = True


def _lane(provider, **limits) -> Lane:
    return Lane(0, provider, ModelSpec(provider="openai", name="x"), LimitsSpec(**limits), clock=lambda: 0.0)


def test_an_http_lane_is_capped_by_limits_concurrency_and_probes_first():
    lane = _lane(_Provider(256), concurrency=4)
    assert (lane.max_in_flight, lane.aimd.limit, lane.probing, lane.limit) == (4, 4, True, 1)
    lane = _lane(_Provider(256))
    assert lane.aimd.limit == INITIAL_CONCURRENCY and lane.probing


def test_a_provider_that_sizes_its_own_concurrency_is_filled_at_once():
    # the embedded model: [limits] concurrency = 2 means 2 processes, each decoding 16 rows together
    lane = _lane(_Provider(32, own=True), concurrency=2)
    assert (lane.max_in_flight, lane.aimd.limit, lane.probing, lane.limit) == (32, 32, False, 32)
    lane = _lane(_Provider(32, own=True))
    assert lane.limit == 32
