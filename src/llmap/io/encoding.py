"""Input encodings: read a CSV or JSONL file that is not UTF-8 (``[input] encoding``).

DuckDB 2.0 reads UTF-8, and its CSV reader decodes ``latin-1`` natively (strictly:
it refuses the bytes 0x80-0x9F, which Windows-1252 files use for ``€``, ``“`` and
``”``). Its ``utf-16`` assumes little-endian and ignores a big-endian BOM, and
every other encoding needs DuckDB's ``encodings`` extension, which DuckDB would
download on first use (impossible offline, and not something to do behind a
user's back). Its JSON reader reads UTF-8 only.

So llmap hands DuckDB UTF-8 and latin-1 CSV files as they are, and streams any
other encoding (and any non-UTF-8 JSONL) through Python's codecs into a
temporary UTF-8 copy, 1 MiB at a time: memory stays flat, the copy needs as much
disk as the file (in ``$TMPDIR``), and it is deleted when the source closes.
Encoding names are Python's (``latin-1``, ``cp1252``, ``utf-16``, ``shift_jis``, ...).
"""

from __future__ import annotations

import codecs
import os
import shutil
import tempfile
from pathlib import Path

from llmap.errors import InputError

__all__ = ["canonical", "duckdb_csv_encoding", "transcode_to_utf8"]

#: Bytes read per step while transcoding.
CHUNK_BYTES = 1 << 20

#: Python codec name -> the name DuckDB's CSV reader decodes natively.
_DUCKDB_CSV = {"utf-8": "utf-8", "utf-8-sig": "utf-8", "iso8859-1": "latin-1"}


def canonical(name: str) -> str:
    """Python's canonical name of an encoding (``latin1`` -> ``iso8859-1``).

    Raises:
        ValueError: Python knows no such encoding (the message says what to write).
    """
    try:
        info = codecs.lookup(name)
    except LookupError:
        raise ValueError(
            f"encoding {name!r} is not one Python knows; write e.g. \"utf-8\", \"latin-1\", \"cp1252\" "
            "(Windows), \"utf-16\" or \"shift_jis\""
        ) from None
    if not getattr(info, "_is_text_encoding", True):
        raise ValueError(f"{name!r} is not a text encoding; name the file's character encoding, e.g. \"latin-1\"")
    return info.name


def is_utf8(name: str | None) -> bool:
    """True for no encoding, ``utf-8`` and ``utf-8-sig`` (DuckDB strips a UTF-8 BOM)."""
    return name is None or canonical(name) in ("utf-8", "utf-8-sig")


def duckdb_csv_encoding(name: str | None) -> str | None:
    """DuckDB's ``read_csv`` ``encoding`` for ``name``, or None when DuckDB cannot decode it natively."""
    return "utf-8" if name is None else _DUCKDB_CSV.get(canonical(name))


def transcode_to_utf8(path: Path, encoding: str, *, label: str) -> Path:
    """Stream ``path`` from ``encoding`` into a temporary UTF-8 file and return its path.

    The copy lives in a fresh folder under ``$TMPDIR``; delete that folder
    (the returned path's parent) when done. Line endings are kept as they are.

    Args:
        path: the input file.
        encoding: its encoding (a Python codec name).
        label: how messages name the input.

    Raises:
        InputError: the file is not valid ``encoding`` (naming the line), or the
            copy cannot be written (e.g. ``$TMPDIR`` is full).
    """
    folder = Path(tempfile.mkdtemp(prefix="llmap-input-"))
    out_path = folder / (path.stem + ".utf8" + path.suffix)
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    lines = 0
    try:
        with open(path, "rb") as src, open(out_path, "w", encoding="utf-8", newline="") as dst:
            while True:
                chunk = src.read(CHUNK_BYTES)
                pending = decoder.getstate()[0] if hasattr(decoder, "getstate") else b""
                try:
                    text = decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as exc:
                    seen = (pending + chunk)[: exc.start].decode(encoding, errors="replace")
                    line = lines + seen.count("\n") + 1
                    raise InputError(
                        f"input {label} is not valid {encoding}: "
                        f"line {line} holds bytes {exc.object[exc.start:exc.end]!r} "
                        f"that {encoding} cannot decode; set [input] encoding to the file's real encoding "
                        "(e.g. \"utf-8\", \"latin-1\") or convert the file to UTF-8"
                    ) from None
                lines += text.count("\n")
                dst.write(text)
                if not chunk:
                    break
    except InputError:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise InputError(
            f"cannot make a UTF-8 copy of input {label} in {str(folder.parent)!r}: {exc.strerror or exc}; free "
            f"space there or point TMPDIR at a disk with {_size(path)} free, or convert the file to UTF-8"
        ) from None
    return out_path


def _size(path: Path) -> str:
    n = float(os.path.getsize(path))
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
