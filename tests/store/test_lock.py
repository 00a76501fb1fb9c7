"""The ledger lock as a function of its state: refuse, wait, release, survive SIGKILL (no sleeping)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from llmap.errors import LedgerLocked
from llmap.store.lock import Holder, LedgerLock, lock_path


async def test_second_holder_is_refused_with_who_holds_it(tmp_path):
    ledger = tmp_path / ".llmap" / "job.ledger.sqlite"
    first, second = LedgerLock(ledger, job="job"), LedgerLock(ledger, job="job")
    await first.acquire()
    assert first.held and lock_path(ledger).is_file()
    with pytest.raises(LedgerLocked) as info:
        await second.acquire()
    msg = str(info.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()!r}" in msg
    assert "nothing was sent" in msg and "--wait-lock" in msg and "\n" not in msg
    assert info.value.exit_code == 75 and info.value.holder.pid == os.getpid()
    first.release()
    assert first.holder() is None  # the next holder writes its own name
    await second.acquire()
    assert second.held
    second.release()
    second.release()  # twice is fine


async def test_wait_polls_until_the_holder_releases(tmp_path):
    ledger = tmp_path / "job.ledger.sqlite"
    first, second = LedgerLock(ledger, job="job"), LedgerLock(ledger, job="job")
    await first.acquire()
    naps: list[float] = []
    said: list[str] = []

    async def nap(s: float) -> None:  # the holder finishes during the third nap
        naps.append(s)
        if len(naps) == 3:
            first.release()

    await second.acquire(wait=True, on_wait=said.append, poll_s=0.25, sleep=nap)
    assert second.held and naps == [0.25, 0.25, 0.25]
    assert len(said) == 1 and "waiting for it to finish" in said[0] and f"pid {os.getpid()}" in said[0]
    second.release()


def test_sigkill_of_the_holder_releases_the_lock(tmp_path):
    ledger = tmp_path / "job.ledger.sqlite"
    code = ("import sys, time; from llmap.store.lock import LedgerLock\n"
            f"lock = LedgerLock(__import__('pathlib').Path({str(ledger)!r}))\n"
            "assert lock.try_acquire(); print('locked', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        mine = LedgerLock(ledger)
        assert not mine.try_acquire()
        assert mine.holder().pid == child.pid
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert mine.try_acquire()  # the kernel dropped the dead process's lock
        mine.release()
    finally:
        child.kill()
        child.wait()


def test_holder_that_exited_is_named_as_such():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    text = Holder(gone.pid, socket.gethostname(), 0.0).describe(now=90.0)
    assert f"pid {gone.pid}" in text and "(90 s ago)" in text and "has exited" in text
    assert "has exited" not in Holder(os.getpid(), socket.gethostname(), 0.0).describe()
