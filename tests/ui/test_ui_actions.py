"""Steering: stop the run holding the ledger (SIGTERM to the lock's holder), re-queue rows, roll back."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from ui_support import fill_ledger

from llmap.store.batches import BatchBook, Line
from llmap.store.lock import LedgerLock, lock_path
from llmap.ui import actions

HOLDER = textwrap.dedent("""
    import asyncio, signal, sys
    from pathlib import Path
    from llmap.store.lock import LedgerLock
    async def main():
        lock = LedgerLock(Path(sys.argv[1]))
        await lock.acquire()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("held", flush=True)
        await stop.wait()
        lock.release()
        print("stopped by SIGTERM", flush=True)
    asyncio.run(main())
""")


def test_stop_signals_the_process_holding_the_ledger(tmp_path):
    led = fill_ledger(tmp_path / "l.sqlite", 5)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(led.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        running = actions.held_by(led.path)
        assert running is not None and running.holder.pid == proc.pid and not running.here
        assert f"pid {proc.pid}" in actions.running_text(led.path)
        message = actions.stop_run(led.path)
        assert f"pid {proc.pid}" in message and "like Ctrl-C" in message
        assert proc.wait(timeout=20) == 0 and proc.stdout.read().strip() == "stopped by SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert actions.held_by(led.path) is None and actions.running_text(led.path) is None
    with pytest.raises(actions.ActionRefused, match="no run of this job is going"):
        actions.stop_run(led.path)


def test_a_dead_holder_is_no_run_and_a_remote_one_is_not_signalled(tmp_path):
    led = fill_ledger(tmp_path / "l.sqlite", 5)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_path(led.path).write_text(f'{{"pid": {int(dead.stdout)}, "host": "{socket.gethostname()}", '
                                   '"started_at": 1}')
    assert actions.held_by(led.path) is None and actions.running_text(led.path) is None  # written, not locked
    lock = LedgerLock(led.path)
    assert lock.try_acquire()
    try:
        lock_path(led.path).write_text('{"pid": 1, "host": "elsewhere", "started_at": 1}')
        sent = []
        with pytest.raises(actions.ActionRefused, match="on host 'elsewhere'"):
            actions.stop_run(led.path, kill=lambda pid, sig: sent.append((pid, sig)))
        assert sent == []
    finally:
        lock.release()


def test_a_run_in_this_process_is_stopped_through_its_own_sigterm_handler(tmp_path):
    led = fill_ledger(tmp_path / "l.sqlite", 5)
    lock = LedgerLock(led.path)
    assert lock.try_acquire()
    try:
        running = actions.held_by(led.path)
        assert running is not None and running.here
        sent = []
        actions.stop_run(led.path, kill=lambda pid, sig: sent.append((pid, sig)))
        assert sent == [(os.getpid(), signal.SIGTERM)]
    finally:
        lock.release()


def test_requeue_moves_settled_rows_back_to_pending_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(actions, "REQUEUE_CHUNK", 7)
    led = fill_ledger(tmp_path / "l.sqlite", 60)
    db = led.connection
    before = dict(db.execute("SELECT key, status FROM rows"))
    keys = sorted(before)
    moved = actions.requeue(led.path, keys, now=lambda: 4e9)
    settled = [k for k in keys if before[k] in ("done", "failed", "fallback")]
    assert moved == len(settled)
    after = db.execute("SELECT status, count(*), max(updated_at), count(output), count(error) FROM rows "
                       "GROUP BY status").fetchall()
    assert after == [("pending", 60, 4e9, 0, 0)]
    assert db.execute("SELECT count(*) FROM attempts").fetchone()[0] > 0  # the earlier answers are kept


def test_rollback_refuses_while_a_run_holds_the_ledger_and_for_a_run_not_there(tmp_path):
    led = fill_ledger(tmp_path / "l.sqlite", 30)
    db = led.connection
    settled = db.execute("SELECT count(*) FROM rows WHERE status != 'pending'").fetchone()[0]
    assert settled > 0
    lock = LedgerLock(led.path)
    assert lock.try_acquire()
    try:
        with pytest.raises(actions.ActionRefused, match="a run holds the ledger"):
            actions.rollback(led.path, 1)
    finally:
        lock.release()
    with pytest.raises(actions.ActionRefused, match="run 7 not found; runs are 1..1"):
        actions.rollback(led.path, 7)
    book = BatchBook(led)
    bid = book.intent(run=1, model="openai:m", provider="openai", tag="t", file_hash="f", requests=1, size=1,
                      tokens=1, lines=[Line("c1", "k00001", "k00001")])
    with pytest.raises(actions.ActionRefused, match="1 provider batch of this job may still answer rows"):
        actions.rollback(led.path, 1)
    led.connection.execute("UPDATE batches SET state = 'collected' WHERE id = ?", (bid,))
    led.connection.commit()
    exported = []
    assert "rolled back run 1: 0 requests" in actions.rollback(led.path, 1, lambda: exported.append(1) or ("o", 0))
    assert exported == []  # rolling back the first run leaves no row: nothing to write
    assert db.execute("SELECT count(*) FROM rows WHERE status != 'pending'").fetchone()[0] == 0  # as before run 1
    assert actions.held_by(led.path) is None  # the lock taken for the rollback is given back
    with pytest.raises(actions.ActionRefused, match="rolled back already"):
        actions.rollback(led.path, 1)
