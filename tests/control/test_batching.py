"""Batch policies as functions of their state (llmap.control.batching)."""

from __future__ import annotations

from llmap.control.batching import (
    MAX_BATCH_TRIES,
    EnqueueGate,
    Next,
    Outcome,
    SizeLimit,
    Wait,
    chunk,
    route,
)


def test_chunk_respects_requests_and_bytes():
    assert chunk([10] * 7, max_requests=3, max_bytes=1000) == [3, 3, 1]
    assert chunk([10] * 7, max_requests=100, max_bytes=25) == [2, 2, 2, 1]
    assert chunk([50, 1, 1], max_requests=100, max_bytes=20) == [1, 2]  # an over-size line goes alone
    assert chunk([], max_requests=3, max_bytes=10) == []


def test_size_limit_halves_on_a_refusal_and_never_grows():
    size = SizeLimit(50_000, 190_000_000)
    assert size.refused(20_000, 4_000_000)  # the words say neither: both halve
    assert (size.max_requests, size.max_bytes) == (10_000, 2_000_001)
    assert size.refused(10_000, 2_000_000)
    assert size.max_requests == 5_000
    assert size.refused(30_000, 9_000_000)  # a bigger refused batch cannot raise the limit again
    assert size.max_requests == 5_000
    assert not size.refused(1, 10)  # one request alone is too big: nothing to split


def test_size_limit_lowers_what_the_refusal_names():
    size = SizeLimit(50_000, 190_000_000)
    size.refused(20_000, 4_000_000, why="The batch has 20,000 requests; the limit is at most 5,000 requests")
    assert (size.max_requests, size.max_bytes) == (10_000, 190_000_000)  # a count: bytes stay
    size.refused(8_000, 3_000_000, why="uploading the batch file: HTTP 400: File is too large.")
    assert (size.max_requests, size.max_bytes) == (10_000, 1_500_001)  # bytes: the count stays


def test_enqueue_gate_waits_for_running_batches_then_lets_one_through():
    gate = EnqueueGate()
    assert gate.allows(0, 10**9)  # nothing known yet
    assert gate.refused(open_tokens=800, tokens=500, requests=10) is Wait.WAIT
    assert gate.bound == 1300
    assert not gate.allows(800, 500)  # the same again would be refused again: wait
    assert gate.allows(200, 500)  # a running batch ended: it fits under what was refused
    assert gate.allows(0, 5000)  # none of ours runs: always try (the bound may be others' batches)


def test_enqueue_gate_never_loops():
    gate = EnqueueGate()
    # Refused with nothing of ours running: the batch alone is too big, split it; one request alone fails.
    assert gate.refused(0, 500, requests=10) is Wait.SPLIT
    assert gate.refused(0, 500, requests=1) is Wait.FAIL
    # Each refusal while others run lowers the bound: a batch never meets the same refusal twice.
    assert gate.refused(900, 100, 4) is Wait.WAIT
    assert gate.refused(300, 100, 4) is Wait.WAIT
    assert gate.bound == 400
    assert not gate.allows(300, 100) and gate.allows(250, 100)


def test_route_terminal_errors_fail_whatever_the_policy():
    for retry in ("realtime", "batch"):
        assert route(Outcome("terminal"), retry=retry, max_reask=2, past_deadline=False) is Next.FAIL


def test_route_realtime_policy_and_deadline_send_to_real_time():
    for kind in ("invalid", "transient", "unfinished"):
        assert route(Outcome(kind, 1, 1), retry="realtime", max_reask=2, past_deadline=False) is Next.REALTIME
        assert route(Outcome(kind, 1, 1), retry="batch", max_reask=2, past_deadline=True) is Next.REALTIME


def test_route_batch_policy_bounds_tries_and_reasks():
    assert route(Outcome("transient", 1), retry="batch", max_reask=2, past_deadline=False) is Next.BATCH
    assert route(Outcome("transient", MAX_BATCH_TRIES), retry="batch", max_reask=2,
                 past_deadline=False) is Next.FAIL
    assert route(Outcome("invalid", reasks=2), retry="batch", max_reask=2, past_deadline=False) is Next.BATCH
    assert route(Outcome("invalid", reasks=3), retry="batch", max_reask=2, past_deadline=False) is Next.FAIL
    # a request that never ran (expired, cancelled) always goes again
    assert route(Outcome("unfinished", tries=9), retry="batch", max_reask=0, past_deadline=False) is Next.BATCH
