"""A full disk is recognised wherever it surfaces and named in one line: file, free space, fix."""

from __future__ import annotations

import errno
import sqlite3

import pytest

from llmap.errors import DiskFull
from llmap.store.diskfull import disk_full, guard, human_bytes, is_disk_full
from llmap.store.ledger import Ledger, PlannedRow, RowResult

FULL = "database or disk is full"


def test_what_counts_as_a_full_disk():
    assert is_disk_full(sqlite3.OperationalError(FULL))
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"))
    try:  # a ROLLBACK after SQLITE_FULL fails when SQLite already rolled back
        try:
            raise sqlite3.OperationalError(FULL)
        except sqlite3.OperationalError:
            raise sqlite3.OperationalError("cannot rollback - no transaction is active") from None
    except sqlite3.OperationalError as masked:
        assert is_disk_full(masked)
    assert not is_disk_full(sqlite3.OperationalError("database is locked"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError(FULL))


def test_the_message_names_the_file_the_free_space_and_the_fix(tmp_path):
    exc = disk_full(tmp_path / ".llmap" / "job.ledger.sqlite", "ledger")
    text = str(exc)
    assert text.startswith("disk full: cannot write the ledger ") and "job.ledger.sqlite" in text
    assert " free there)" in text and "finished rows are kept" in text and "run the same command again" in text
    assert "\n" not in text and exc.exit_code == 1 and exc.free_bytes > 0
    assert "LLMAP_CACHE_DIR" in str(disk_full(tmp_path / "responses.sqlite", "response cache"))
    assert "llmap export" in str(disk_full(tmp_path / "out.parquet", "output"))
    assert human_bytes(0) == "0 bytes" and human_bytes(1_234_567) == "1.2 MB"


def test_guard_maps_only_a_full_disk(tmp_path):
    with pytest.raises(DiskFull) as info, guard(tmp_path / "f", "output"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(OSError, match="Permission"), guard(tmp_path / "f", "output"):
        raise OSError(errno.EACCES, "Permission denied")


class _FullDisk:
    """A SQLite connection whose writes fail as on a full disk (reads still work)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __getattr__(self, name):
        return getattr(self._db, name)

    def execute(self, sql, *args):
        if sql.lstrip().split()[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            raise sqlite3.OperationalError(FULL)
        return self._db.execute(sql, *args)

    def executemany(self, sql, *args):
        raise sqlite3.OperationalError(FULL)

    def __enter__(self):
        return self._db.__enter__()

    def __exit__(self, *exc):
        return self._db.__exit__(*exc)


@pytest.mark.parametrize("write", ["plan", "record", "start_run", "end_run", "set_meta", "reset"])
def test_every_ledger_write_says_disk_full_and_keeps_what_was_committed(tmp_path, write):
    path = tmp_path / "job.ledger.sqlite"
    ledger = Ledger(path)
    run = ledger.start_run("spec")
    ledger.plan(run, [PlannedRow("a", 0, "h", "{}")])
    ledger.record([RowResult("a", "done", {"x": 1})], run_id=run)
    ledger._db = _FullDisk(ledger._db)
    calls = {
        "plan": lambda: ledger.plan(run, [PlannedRow("b", 1, "h", "{}")]),
        "record": lambda: ledger.record([RowResult("b", "done", {"x": 2})], run_id=run),
        "start_run": lambda: ledger.start_run("spec"),
        "end_run": lambda: ledger.end_run(run, exit_reason="complete", requests=1, prompt_tokens=1,
                                          completion_tokens=1),
        "set_meta": lambda: ledger.set_meta("k", "v"),
        "reset": lambda: ledger.reset(),
    }
    with pytest.raises(DiskFull, match=r"disk full: cannot write the ledger .*job\.ledger\.sqlite.* free there"):
        calls[write]()
    ledger.close()
    with Ledger(path, readonly=True) as again:  # what was committed stays committed
        assert again.counts(run)["done"] == 1
