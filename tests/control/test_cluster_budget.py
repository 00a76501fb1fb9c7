"""ClusterBudget: the cluster-wide budget as a pure object of its state and an explicit clock."""

from __future__ import annotations

import pytest

from llmap.control.cluster import ClusterBudget, LaneLimits, Report
from llmap.control.limits import RateLimiter


def budget(rpm=None, tpm=None, *, workers=4, concurrency=64, initial=16) -> ClusterBudget:
    return ClusterBudget([LaneLimits(rpm, tpm, concurrency, initial)], workers=workers, now=0.0)


def test_chunks_from_four_workers_never_admit_more_than_one_limiter():
    b = budget(rpm=600)  # 10 requests per second for the whole cluster
    alone = RateLimiter(600, now=0.0)
    granted = admitted_alone = 0
    t = 0.0
    while t < 60.0:
        for w in range(4):
            granted += b.sync(Report(f"w{w}", 0, want=5, est_tokens=10), t).requests
        while alone.reserve(10, t) == 0:
            admitted_alone += 1
        t = round(t + 0.05, 6)
    assert granted == admitted_alone
    assert 600 <= granted <= 600 + 10 + 1  # a minute's budget plus the first second's worth


def test_a_grant_is_partial_when_the_bucket_is_short_and_says_when_to_ask_again():
    b = budget(rpm=60)  # 1/s; starts with one second's worth: 1 request
    first = b.sync(Report("a", 0, want=5), 0.0)
    assert first.requests == 1
    second = b.sync(Report("b", 0, want=5), 0.0)
    assert second.requests == 0 and second.wait_s == pytest.approx(1.0)


def test_an_unused_grant_handed_back_is_refunded():
    b = budget(rpm=600)
    g = b.sync(Report("a", 0, want=10), 0.0)
    assert g.requests == 10
    assert b.sync(Report("b", 0, want=10), 0.0).requests == 0
    b.sync(Report("a", 0, returned_requests=10), 0.0)
    assert b.sync(Report("b", 0, want=10), 0.0).requests == 10


def test_settlement_charges_real_usage_to_everyone():
    b = budget(tpm=6000)  # 100 tokens/s; the first grant finds one second's worth: 100
    assert b.sync(Report("a", 0, want=1, est_tokens=100), 1.0).requests == 1  # 0 left
    b.sync(Report("a", 0, reserved_tokens=100, actual_tokens=400), 1.0)  # used 300 more: -300
    g = b.sync(Report("b", 0, want=1, est_tokens=100), 2.0)  # -200 at t=2: 3 s until 100
    assert g.requests == 0 and g.wait_s == pytest.approx(3.0)


def test_a_retry_after_from_one_worker_pauses_every_worker():
    b = budget(rpm=6000)
    v0 = b.view(0, "b", 0.0).version
    b.sync(Report("a", 0, pause_s=5.0), 0.0)
    other = b.sync(Report("b", 0, want=1), 1.0)
    assert other.requests == 0 and other.wait_s == pytest.approx(4.0)
    assert other.paused_s == pytest.approx(4.0) and other.version > v0
    assert b.sync(Report("b", 0, want=1), 5.0).requests == 1


def test_headers_seen_by_one_worker_set_the_budget_for_all():
    b = budget()
    assert not b.view(0, "b", 0.0).limited
    b.sync(Report("a", 0, headers={"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0"},
                  headers_age_s=0.0), 2.0)
    v = b.sync(Report("b", 0, want=3), 2.0)
    assert v.limited and v.requests == 0 and v.wait_s > 0


def test_aimd_share_is_the_cluster_limit_over_the_workers_and_congestion_halves_it_once():
    b = budget(workers=4, concurrency=64, initial=16)
    assert b.view(0, "a", 0.0).share == 4
    v0 = b.view(0, "a", 0.0).version
    after = b.sync(Report("a", 0, congestions=3, in_flight=4), 0.0)
    assert after.share == 2 and after.version > v0  # 16 -> 8 over 4 workers
    b.sync(Report("b", 0, congestions=1, in_flight=4), 0.0)  # the same burst: held off
    assert b.view(0, "a", 0.0).share == 2


def test_the_breaker_is_shared_and_one_worker_gets_the_probe():
    b = budget()
    for w in ("a", "b"):
        b.sync(Report(w, 0, breaker_failures=5), 0.0)  # 10 outage failures in a row, from two workers
    assert b.view(0, "c", 0.0).breaker == "open"
    assert b.view(0, "c", 0.5).probe_in_s == pytest.approx(1.5)
    assert b.sync(Report("a", 0, want_probe=True), 1.0).probe_owner is None  # cooldown not over
    v = b.sync(Report("a", 0, want_probe=True), 2.0)
    assert v.breaker == "half_open" and v.probe_owner == "a"
    assert b.sync(Report("c", 0, want_probe=True), 2.0).probe_owner == "a"  # one probe only
    b.sync(Report("c", 0, breaker_successes=3), 2.1)  # a late answer of an older call closes nothing
    assert b.view(0, "c", 2.1).breaker == "half_open"
    b.sync(Report("a", 0, probe_outcome=True), 2.2)
    assert b.view(0, "c", 2.2).breaker == "closed"


def test_nothing_accrues_before_the_first_grant():
    b = budget(rpm=600)  # the workers take 5 s to start: their first grant still gets one second's worth
    assert b.sync(Report("a", 0, want=32), 5.0).requests == 10


def test_separate_output_token_limit_is_shared_and_settled():
    b = ClusterBudget([LaneLimits(None, None, 64, 16, otpm=6000)], workers=2, now=0.0)  # 100 output tokens/s
    g = b.sync(Report("a", 0, want=5, est_tokens=500, est_output=50), 0.0)
    assert g.requests == 2 and g.output == 100  # one second's worth of output tokens: two requests
    assert b.sync(Report("b", 0, want=1, est_tokens=500, est_output=50), 0.0).requests == 0
    b.sync(Report("a", 0, reserved_tokens=1000, actual_tokens=1000, reserved_output=100, actual_output=10), 0.0)
    assert b.sync(Report("b", 0, want=1, est_tokens=500, est_output=50), 0.0).requests == 1  # 90 refunded
