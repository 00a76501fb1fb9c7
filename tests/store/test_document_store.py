"""The document store: bodies by URL and validator, texts by content, file hashes by stat; read-only mode."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from _support import FakeTime
from llmap.store.documents import DocumentStore, FetchedEntry, TextEntry


def test_fetched_bodies_texts_and_file_hashes_round_trip(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "d.sqlite")
    entry = FetchedEntry("https://x.org/a", "ab" * 32, "text/html", '"v1"', None, "https://x.org/b", 10.0, 10.0)
    store.put_fetched(entry, b"<p>a</p>")
    store.put_fetched(FetchedEntry("https://x.org/copy", "ab" * 32, None, None, None, "https://x.org/copy", 11, 11),
                      b"<p>a</p>")  # two URLs, one body
    assert store.fetched("https://x.org/a") == entry and store.body("ab" * 32) == b"<p>a</p>"
    store.confirm("https://x.org/a", 99.0)
    assert store.fetched("https://x.org/a").checked_at == 99.0 and store.fetched("https://x.org/nope") is None
    store.put_text("ab" * 32, "html|eng|1", TextEntry(("page one", "page two"), 5, 1))
    got = store.text("ab" * 32, "html|eng|1")
    assert got == TextEntry(("page one", "page two"), 5, 1) and not got.complete
    assert store.text("ab" * 32, "pdf|eng|1") is None
    store.put_file_hash("/d/a.pdf", 10, 123, "cd" * 32)
    assert store.file_hash("/d/a.pdf", 10, 123) == "cd" * 32
    assert store.file_hash("/d/a.pdf", 10, 124) is None  # another mtime: hash it again
    store.close()


def test_prune_forgets_old_entries_and_their_bodies(tmp_path: Path, fake_time: FakeTime) -> None:
    fake_time.now = 1000.0
    store = DocumentStore(tmp_path / "d.sqlite", clock=fake_time.clock)
    store.put_fetched(FetchedEntry("u1", "11" * 32, None, None, None, "u1", 100.0, 100.0), b"old")
    store.put_fetched(FetchedEntry("u2", "22" * 32, None, None, None, "u2", 1900.0, 1900.0), b"new")
    store.put_text("11" * 32, "r", TextEntry(("t",), 1, 0))
    fake_time.now = 2000.0
    assert store.prune(900.0) == 2  # u1 (checked at 100) and the text written at 1000; not u2 (1900)
    assert store.fetched("u1") is None and store.body("11" * 32) is None and store.body("22" * 32) == b"new"
    store.close()


def test_read_only_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "d.sqlite"
    DocumentStore(path).close()
    ro = DocumentStore(path, readonly=True)
    ro.put_file_hash("/a", 1, 1, "x")
    ro.put_text("x", "r", TextEntry(("t",), 1, 0))
    assert ro.file_hash("/a", 1, 1) is None and ro.text("x", "r") is None
    ro.close()
    with pytest.raises(sqlite3.Error):
        DocumentStore(tmp_path / "absent.sqlite", readonly=True)
