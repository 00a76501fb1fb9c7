"""LeaseBook: rows leased to workers, returned on death or silence, settled exactly once."""

from __future__ import annotations

import pytest

from llmap.run.ray.leases import LeaseBook


def test_a_row_is_accepted_once_and_a_late_answer_is_dropped():
    book = LeaseBook(timeout_s=10)
    first = book.grant("a", ["r1", "r2"], now=0)
    (expired,) = book.expired(now=10)
    assert expired is first
    again = book.give_back(first)
    assert again == ["r1", "r2"]
    second = book.grant("b", again, now=10)
    assert book.accept(second.id, "r1") is True
    assert book.accept(first.id, "r1") is False  # the silent worker answers late: dropped
    assert book.dropped == 1
    assert book.accept(first.id, "r2") is False  # r2 is leased again: the new lease answers it, not the old one
    assert book.accept(second.id, "r2") is True
    assert book.accept(second.id, "r2") is False  # a second answer from the same lease: dropped
    assert book.dropped == 3
    assert len(book) == 0


def test_accept_many_keeps_the_open_rows_in_order_and_memory_holds_only_open_leases():
    book = LeaseBook(timeout_s=10)
    lease = book.grant("a", [f"r{i}" for i in range(5)], now=0)
    assert book.accept_many(lease.id, ["r3", "r1"]) == ["r3", "r1"]
    assert book.accept_many(lease.id, ["r1", "r0", "r9"]) == ["r0"]  # r1 settled, r9 never leased here
    assert book.dropped == 2
    assert book.accept_many(lease.id, ["r4", "r2"]) == ["r4", "r2"]
    assert len(book) == 0  # the lease is closed once every row settled: nothing kept per settled row
    assert book.accept_many(lease.id, ["r2"]) == []


def test_answers_renew_a_workers_leases():
    book = LeaseBook(timeout_s=10)
    lease = book.grant("a", ["r1"], now=0)
    book.heard("a", now=8)
    assert book.expired(now=10) == []
    assert book.expired(now=18) == [lease]


def test_a_lost_worker_returns_only_its_unsettled_rows():
    book = LeaseBook(timeout_s=10)
    a = book.grant("a", ["r1", "r2", "r3"], now=0)
    book.grant("b", ["r4"], now=0)
    book.accept(a.id, "r2")
    assert book.lost("a") == ["r1", "r3"]
    assert [lease.worker for lease in book.held_by("b")] == ["b"]
    assert len(book) == 1


def test_timeout_must_be_positive():
    with pytest.raises(ValueError):
        LeaseBook(timeout_s=0)
