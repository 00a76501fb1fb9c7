"""The page's steering: stop the run, re-queue rows for the next run, roll back a run.

- **Stop** sends SIGTERM to the process that holds the job's ledger lock (:mod:`llmap.store.lock` names it),
  which llmap handles like Ctrl-C: requests in flight are dropped, every finished row is kept, and the same
  command continues later. It refuses when no run holds the lock, or when the holder runs on another host.
- **Re-queue** puts rows back to ``pending``: the next ``llmap run`` of the job sends them again (a run in
  progress takes those still ahead of it). Their earlier answers stay in the ledger's ``attempts``. Failed rows
  are retried by every run anyway; re-queueing done rows is for answers you do not trust, and with the response
  cache on an unchanged request gets its cached answer back (change the prompt or model, or turn the cache off).
- **Roll back** is ``llmap rollback`` (:func:`llmap.store.history.rollback`); it refuses while a run holds the
  ledger, and for a run that is not there or was rolled back already.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmap.errors import SpecError
from llmap.store.history import rollback as undo_run
from llmap.store.lock import Holder, LedgerLock, lock_path

__all__ = ["REQUEUE_CHUNK", "ActionRefused", "held_by", "requeue", "rollback", "running_text", "stop_run"]

#: Rows re-queued per transaction (a running job's writer waits for at most one of them).
REQUEUE_CHUNK = 5_000
#: Statuses a row may be re-queued from.
REQUEUABLE = ("done", "failed", "fallback")


class ActionRefused(Exception):
    """An action that cannot be done now; the message says why and what to do."""


@dataclass(frozen=True)
class Running:
    """The run that holds a ledger: its holder, and whether it is this process."""

    holder: Holder
    here: bool


def held_by(ledger_path: Path) -> Running | None:
    """The run holding the ledger's lock now, or None when no run holds it.

    The lock file names its holder; the lock itself is checked with a shared, non-blocking ``flock`` taken and
    dropped at once, so a holder that has exited (its pid still written) does not count.
    """
    path = lock_path(Path(ledger_path))
    holder = LedgerLock(Path(ledger_path)).holder()
    if holder is None:
        return None
    if holder.pid == os.getpid():
        return Running(holder, True)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return Running(holder, False)  # someone holds it exclusively: the run
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def running_text(ledger_path: Path) -> str | None:
    """Who runs the job, in words (``pid 42 on host 'etl1', since ...``), from the lock file alone (no lock is
    taken: the live view asks every tick); None when no live process is named there."""
    holder = LedgerLock(Path(ledger_path)).holder()
    if holder is None:
        return None
    if holder.host == socket.gethostname() and holder.pid != os.getpid():
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return None
        except OSError:
            pass  # it exists, owned by another user
    return holder.describe()


def stop_run(ledger_path: Path, *, kill: Callable[[int, int], None] = os.kill) -> str:
    """Stop the run holding the ledger as Ctrl-C would (SIGTERM to its process).

    Args:
        ledger_path: the job's ledger.
        kill: ``os.kill`` (tests pass a fake).

    Returns:
        What was done, in one line.

    Raises:
        ActionRefused: no run holds the ledger, or it runs on another host.
    """
    running = held_by(ledger_path)
    if running is None:
        raise ActionRefused("no run of this job is going: nothing to stop")
    if running.holder.host != socket.gethostname():
        raise ActionRefused(f"the run holding the ledger is on host {running.holder.host!r}; stop it there")
    kill(running.holder.pid, signal.SIGTERM)
    return (f"sent SIGTERM to the run (pid {running.holder.pid}): it stops like Ctrl-C, requests in flight are "
            "dropped and every finished row is kept; run the same command again to continue")


def requeue(ledger_path: Path, keys: Sequence[str], *, now: Callable[[], float] = time.time) -> int:
    """Put rows back to ``pending`` (see the module docstring), :data:`REQUEUE_CHUNK` rows per transaction.

    Args:
        ledger_path: the job's ledger.
        keys: the rows; those not ``done``, ``failed`` or ``fallback`` are left as they are.

    Returns:
        Rows re-queued.
    """
    db = sqlite3.connect(ledger_path, isolation_level=None, timeout=10.0)
    moved = 0
    try:
        for i in range(0, len(keys), REQUEUE_CHUNK):
            chunk = list(keys[i:i + REQUEUE_CHUNK])
            db.execute("BEGIN IMMEDIATE")
            try:
                cur = db.execute(
                    "UPDATE rows SET status = 'pending', output = NULL, error = NULL, updated_at = ? "
                    f"WHERE key IN ({', '.join('?' * len(chunk))}) AND status IN ('done', 'failed', 'fallback')",
                    (now(), *chunk))
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            moved += cur.rowcount
    finally:
        db.close()
    return moved


def rollback(ledger_path: Path, run_id: int, export: Callable[[], tuple[Path, int]] | None = None) -> str:
    """Roll back one run as ``llmap rollback`` does (0 requests; the cost history stays), then write the output
    again with ``export`` (``llmap.io.sinks.export_job`` for the job: ``(path, rows)``) unless no row is left.

    Raises:
        ActionRefused: a run holds the ledger, or it cannot be locked; a provider batch of the job may still
            answer rows (they would settle the rolled-back rows again); no such run, or it was rolled back
            already (the message says which runs there are).
    """
    lock = LedgerLock(ledger_path)
    try:
        got = lock.try_acquire()
    except SpecError as exc:  # the lock file cannot be made (a read-only folder)
        raise ActionRefused(str(exc)) from None
    if not got:  # held while rolling back, so no run starts halfway through
        raise ActionRefused("a run holds the ledger: stop it first, then roll back")
    try:
        db = sqlite3.connect(ledger_path, isolation_level=None, timeout=10.0)
        try:
            held = db.execute("SELECT count(*) FROM batches WHERE state IN ('intent', 'open')").fetchone()[0]
            if held:
                raise ActionRefused(f"{held} provider batch{'es' if held > 1 else ''} of this job may still answer "
                                    "rows; let `llmap run` collect them, or stop them with `llmap batch cancel`, "
                                    "then roll back")
            undone = undo_run(db, run_id)
            left = db.execute("SELECT count(*) FROM rows").fetchone()[0]
        except SpecError as exc:
            raise ActionRefused(str(exc)) from None
        finally:
            db.close()
        message = f"rolled back run{'s' if len(undone) > 1 else ''} {', '.join(map(str, undone))}: 0 requests"
        if export is not None and left:
            path, n = export()
            message += f"; output written again: {path} ({n:,} rows)"
        return message
    finally:
        lock.release()
