"""One run at a time per job: an exclusive lock on the job's ledger.

Two runs of one job at once (an hourly cron that overlaps itself, a second
terminal) would plan the same pending rows and pay for each of them twice.
A run therefore holds an exclusive ``flock(2)`` on a lock file beside the
ledger (``<ledger>.lock``) for its whole life, from before the ledger is
opened until after the output is exported.

``flock`` locks belong to the open file and the kernel drops them when the
process ends in any way, SIGKILL and crashes included: a dead run never
leaves a stale lock behind, and there is no lock file to delete by hand. The
file is never removed (removing it would let two runs lock two different
files of the same name); while locked it holds the holder's pid, host and
start time, so the refusal can say who holds it.

Readers (``llmap status``, ``export``, ``report``, ``estimate`` and ``run
--if-changed``'s check) never take this lock: they open the ledger read-only
and work while a run holds it.

Caveats: ``flock`` is advisory (only llmap honours it) and on network file
systems it is only as good as the server's lock support. A process forked
from the run without ``exec`` inherits the lock and holds it until it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from llmap.errors import LedgerLocked, SpecError
from llmap.store.diskfull import disk_full, is_disk_full

__all__ = ["Holder", "LedgerLock", "lock_path"]

#: Seconds between tries while waiting for another run's lock (``--wait-lock``).
POLL_S = 0.5


def lock_path(ledger_path: Path) -> Path:
    """The lock file of a ledger: ``<ledger>.lock`` beside it."""
    return ledger_path.with_name(ledger_path.name + ".lock")


@dataclass(frozen=True)
class Holder:
    """Who holds a ledger's lock, as the holder wrote it into the lock file.

    Attributes:
        pid: the holding process's id.
        host: the host name it runs on.
        started_at: POSIX seconds when it took the lock.
    """

    pid: int
    host: str
    started_at: float

    def describe(self, now: float | None = None) -> str:
        """E.g. ``pid 4242 on host 'etl1', since 2024-12-01 10:22:01 (3 min ago)``."""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        ago = max(0.0, (time.time() if now is None else now) - self.started_at)
        age = f"{ago:.0f} s" if ago < 120 else f"{ago / 60:.0f} min" if ago < 7200 else f"{ago / 3600:.1f} h"
        text = f"pid {self.pid} on host {self.host!r}, since {since} ({age} ago)"
        if self.host == socket.gethostname() and not _alive(self.pid):
            text += "; that process has exited, so a process it started still holds the lock"
        return text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, owned by another user
        return True
    return True


class LedgerLock:
    """The exclusive lock of one ledger (see the module docstring).

    Args:
        ledger_path: the job's ledger file; the lock file is :func:`lock_path` of it.
        job: the job's name, for messages.

    Use :meth:`acquire` once, then :meth:`release` (or ``async with``).
    """

    def __init__(self, ledger_path: Path, *, job: str = "") -> None:
        self.path = lock_path(Path(ledger_path))
        self.job = job
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True while this object holds the lock."""
        return self._fd is not None

    def holder(self) -> Holder | None:
        """Who holds the lock now, as written in the lock file, or None if unknown."""
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8") or "null")
            return Holder(int(doc["pid"]), str(doc["host"]), float(doc["started_at"]))
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def try_acquire(self) -> bool:
        """Take the lock if it is free, without waiting.

        Returns:
            True when taken (also when already held by this object), False
            when another process holds it.

        Raises:
            SpecError: the lock file cannot be created (e.g. the ledger's folder is not writable).
            DiskFull: the disk is too full to create it.
        """
        if self._fd is not None:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full(self.path, "ledger") from exc
            raise SpecError(
                f"cannot create the ledger's lock file {str(self.path)!r}: {exc.strerror or exc}; make its folder "
                "writable, or set `ledger = ...` in the job file to a writable place"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise SpecError(
                f"cannot lock the ledger's lock file {str(self.path)!r}: {exc.strerror or exc} (a file system "
                "without locks?); set `ledger = ...` in the job file to a path on a local disk"
            ) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": time.time()}
        with contextlib.suppress(OSError):  # who holds it is for messages only
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return True

    async def acquire(self, *, wait: bool = False, on_wait: Callable[[str], None] | None = None,
                      poll_s: float = POLL_S,
                      sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        """Take the lock, or wait for it (``wait``), or refuse.

        Args:
            wait: when another run holds the lock, wait until it is released
                (polling every ``poll_s`` seconds) instead of raising.
            on_wait: called once with a one-line message when waiting starts.
            poll_s: seconds between tries while waiting.
            sleep: the sleep to wait with (tests inject a fake one).

        Raises:
            LedgerLocked: another run holds the lock and ``wait`` is False.
            SpecError: the lock file cannot be created or locked.
        """
        if self.try_acquire():
            return
        if not wait:
            holder = self.holder()
            who = holder.describe() if holder else "a process that has not said who it is yet"
            raise LedgerLocked(
                f"another llmap run of job {self.job!r} holds its ledger ({who}); nothing was sent: wait for it "
                f"to finish, or pass --wait-lock (Python: wait_lock=True) to wait for it",
                holder=holder, lock_path=self.path,
            )
        if on_wait is not None:
            holder = self.holder()
            who = f" ({holder.describe()})" if holder else ""
            on_wait(f"llmap: another run of job {self.job!r} holds its ledger{who}; waiting for it to finish "
                    "(--wait-lock)")
        while not self.try_acquire():
            await sleep(poll_s)

    def release(self) -> None:
        """Give the lock back (the file stays; see the module docstring). Safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # before unlocking: the next holder writes its own name
        os.close(fd)  # closing the last descriptor drops the flock

    async def __aenter__(self) -> LedgerLock:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()
