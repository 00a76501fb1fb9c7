"""A full disk, said in one line: which file, how much space is left, and that progress is kept.

SQLite reports a full disk as ``sqlite3.OperationalError: database or disk
is full`` (``SQLITE_FULL``), file writes as ``OSError(ENOSPC)`` (or
``EDQUOT``, a full quota). Neither says which file or what to do. Every
write boundary of llmap's own files (the ledger, the response cache, the
output export) maps them here to :class:`~llmap.errors.DiskFull`, naming the
file and the free space on its file system. A SQLite transaction that hits a
full disk is rolled back whole, so what was committed before stays committed
and a rerun continues from there.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from llmap.errors import DiskFull

__all__ = ["disk_full", "guard", "guard_writes", "human_bytes", "is_disk_full"]

F = TypeVar("F", bound=Callable[..., Any])

_ERRNOS = {errno.ENOSPC, errno.EDQUOT}

#: What to do, per kind of file.
_FIX = {
    "ledger": "finished rows are kept in the ledger: free some space and run the same command again",
    "response cache": ("finished rows are kept in the ledger: free some space (or point LLMAP_CACHE_DIR at another "
                       "disk, or set [cache] enabled = false) and run the same command again"),
    "output": ("the ledger holds every finished row and no half-written output was left: free some space and run "
               "`llmap export` on the job (or the same command again)"),
}


def is_disk_full(exc: BaseException | None) -> bool:
    """True for SQLite's ``SQLITE_FULL`` and for ``ENOSPC`` / ``EDQUOT`` file errors (also as Arrow reports them).

    The chain of causes is followed too: a ``ROLLBACK`` after ``SQLITE_FULL``
    fails with "no transaction is active" when SQLite already rolled back.
    """
    for _ in range(4):
        if not isinstance(exc, sqlite3.Error | OSError):
            return False
        if isinstance(exc, sqlite3.Error) and (getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
                                               or "database or disk is full" in str(exc)):
            return True
        if isinstance(exc, OSError) and (exc.errno in _ERRNOS or "No space left on device" in str(exc)
                                         or "Disk quota exceeded" in str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def human_bytes(n: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` (powers of 1000)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - the loop returns


def _free(path: Path) -> int | None:
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            if p.exists():
                return shutil.disk_usage(p if p.is_dir() else p.parent).free
    return None


def disk_full(path: Path, what: str) -> DiskFull:
    """The one-line :class:`~llmap.errors.DiskFull` for a failed write of ``path``.

    Args:
        path: the file being written.
        what: ``"ledger"``, ``"response cache"`` or ``"output"``.
    """
    free = _free(Path(path))
    left = f"{human_bytes(free)} free there" if free is not None else "free space unknown"
    fix = _FIX.get(what, "free some space and run the same command again")
    return DiskFull(f"disk full: cannot write the {what} {str(path)!r} ({left}); {fix}", path=Path(path),
                    free_bytes=free)


@contextlib.contextmanager
def guard(path: Path, what: str) -> Iterator[None]:
    """Turn a full-disk error raised inside into :class:`~llmap.errors.DiskFull` for ``path``."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        if is_disk_full(exc):
            raise disk_full(path, what) from exc
        raise


def guard_writes(what: str) -> Callable[[F], F]:
    """Decorate a method of an object with a ``path`` attribute: a full disk inside becomes ``DiskFull``."""

    def wrap(method: F) -> F:
        @functools.wraps(method)
        def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
            with guard(self.path, what):
                return method(self, *args, **kwargs)

        return guarded  # type: ignore[return-value]

    return wrap
