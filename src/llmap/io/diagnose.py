"""What is wrong with an input file, on which line, and how to fix it: one line each.

DuckDB's reader errors are long and, for a few common faults, misleading: a
CSV whose first rows hold a ragged line is sniffed as one column named
``id,name`` (or as headerless ``column0, column1`` with rows skipped), so the
job fails later with "key names column 'id', which input lacks"; an empty file
reads as one column ``column0``. This module turns those into the real
problem (the ragged line and its number, the empty file, the encoding, the
broken JSON line, the file that is not Parquet) and its fix. It reads the file
itself only on the error path, streaming, and stops at the first fault.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
import re
from pathlib import Path

from llmap.errors import InputError

__all__ = ["check_file", "csv_shape_problem", "explain", "jsonl_shape_problem", "missing_file"]

#: Delimiters DuckDB's sniffer tries, as words for messages.
_DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
#: Bytes read to decide that a small file holds nothing but white space.
_BLANK_PROBE = 1 << 16
#: Records the ragged-line scan reads at most (DuckDB sniffs about 20,000 rows).
_SCAN_RECORDS = 200_000
#: JSON lines the broken-line scan reads at most.
_SCAN_JSON_LINES = 5_000_000



def missing_file(what: str, path: Path, fix: str = "check the path") -> str:
    """The one-line error for a file that does not exist: the folder looked in, the closest name there, the fix.

    Args:
        what: how to name the file (``"job file"``, ``"input file"``).
        path: the path looked for (relative paths are taken from the working directory).
        fix: the last words of the message.
    """
    folder = Path(os.path.normpath(path.parent.absolute()))
    if not folder.is_dir():
        return f"{what} {path.name!r} not found: folder {str(folder)!r} does not exist; {fix}"
    try:
        names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    except OSError:
        names = []
    near = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"{what} {path.name!r} not found in folder {str(folder)!r}{hint}; {fix}"


_LINE = re.compile(r"CSV Error on Line: (\d+)")
_COLUMNS = re.compile(r"Expected Number of Columns: (\d+) Found: (\d+)")
_CONVERT = re.compile(r'converting column "([^"]+)"\. Could not convert string "([^"]*)" to \'?(\w+)')
_JSON_AT = re.compile(r"Malformed JSON in file .*?, at byte \d+ in line (\d+): (.+?)\.?\s*$", re.S)
_FIX_UTF8 = ("set [input] encoding to the file's encoding (e.g. \"latin-1\", or \"cp1252\" for files from Windows) "
             "or convert the file to UTF-8")


def check_file(path: Path, label: str) -> None:
    """Refuse a folder and an empty (or blank) file before DuckDB reads it.

    Raises:
        InputError: naming the problem and the fix.
    """
    if path.is_dir():
        raise InputError(
            f"input {label} is a folder, not a file; set [input] path to one file in it, or read them all with "
            f"[input] sql = \"SELECT * FROM read_csv('{path.name}/*.csv')\" (or read_parquet, read_json)"
        )
    size = path.stat().st_size
    if size == 0 or (size <= _BLANK_PROBE and not path.read_bytes().strip()):
        raise InputError(
            f"input {label} is empty ({size} bytes{', all white space' if size else ''}); check that whatever wrote "
            "it finished, or point [input] path at the right file"
        )


def explain(text: str, *, fmt: str, label: str, read_path: Path | None = None) -> str | None:
    """A one-line message for a reader error DuckDB raised on a file, or None when it is not one of these.

    Args:
        text: the DuckDB (or Arrow) error text.
        fmt: ``"csv"``, ``"jsonl"``, ``"json"`` or ``"parquet"``.
        label: how to name the input.
        read_path: the file DuckDB read (a UTF-8 copy when transcoded), for the JSON line scan.
    """
    line = _LINE.search(text)
    where = f"line {line.group(1)}" if line else "a line"
    if "Invalid unicode" in text or "not utf-8 encoded" in text:
        return f"input {label} is not UTF-8: {where} holds bytes that are not valid UTF-8; {_FIX_UTF8}"
    if "is not latin-1 encoded" in text:
        return (f"input {label} is not latin-1: it holds bytes 0x80-0x9F, which latin-1 leaves unassigned; it is "
                "probably Windows-1252: set [input] encoding = \"cp1252\"")
    cols = _COLUMNS.search(text)
    if cols:
        want, got = cols.groups()
        return (f"input {label} {where} has {got} fields but the header has {want}: a ragged line (often a "
                "delimiter inside a value that is not in double quotes); fix or remove that line")
    conv = _CONVERT.search(text)
    if conv:
        col, value, typ = conv.groups()
        name = Path(label).name
        return (f"input {label} {where}: column {col!r} holds {value!r}, but DuckDB typed the column {typ} from "
                f"the first rows; fix the value, or read the column as text with [input] sql = "
                f"\"SELECT * FROM read_csv('{name}', types = {{'{col}': 'VARCHAR'}})\"")
    if fmt in ("json", "jsonl") and "Malformed JSON" in text:
        if "UTF-8" in text or "UTF-16" in text:
            return f"input {label} is not UTF-8 JSON; {_FIX_UTF8}"
        bad = _first_bad_json_line(read_path) if read_path is not None and fmt == "jsonl" else None
        if bad is not None:
            n, why = bad
            return (f"input {label} line {n} is not valid JSON ({why}); "
                    "fix or remove that line (one JSON object per line)")
        m = _JSON_AT.search(text)
        if m:
            return (f"input {label} is not valid JSON lines near line {m.group(1)} ({m.group(2)}); fix that line "
                    "(one JSON object per line)")
    if fmt == "parquet" and re.search(r"too small to be a Parquet file|No magic bytes|not a parquet file|"
                                      r"Invalid Input Error.*[Pp]arquet|Couldn't deserialize thrift", text):
        return (f"cannot read input {label}: it is not a Parquet file (or a truncated one); check that whatever "
                "wrote it finished, or give it the extension of its real format (.csv, .jsonl)")
    return None


def csv_shape_problem(path: Path, columns: list[str], *, encoding: str, label: str) -> str | None:
    """A ragged line that made DuckDB's CSV sniffer give up, or None.

    The sniffer reads one column (named like ``id,name``) or numbered columns
    without a header (``column0``, ...) when the lines it samples disagree on
    their number of fields. Only then is the file scanned (up to
    ``_SCAN_RECORDS`` records) for the first record whose field count differs
    from the header's.

    Args:
        path: the CSV file (UTF-8 or ``encoding``).
        columns: the columns DuckDB's sniffer found.
        encoding: the file's encoding (Python's name).
        label: how to name the input.
    """
    one_glued = len(columns) == 1 and any(d in columns[0] for d in _DELIMITERS)
    numbered = all(re.fullmatch(r"column\d+", c) for c in columns)
    if not (one_glued or numbered):
        return None
    with open(path, encoding=encoding, errors="replace", newline="") as f:
        header_line = next((ln for ln in f if ln.strip()), "")
        delim = max(_DELIMITERS, key=header_line.count)
        if header_line.count(delim) == 0:
            return None
        f.seek(0)
        reader = csv.reader(f, delimiter=delim)
        header: list[str] | None = None
        header_at = 0
        for i, record in enumerate(reader):
            if i > _SCAN_RECORDS:
                break
            if not record or all(not v.strip() for v in record):
                continue
            if header is None:
                header, header_at = record, reader.line_num
                continue
            if len(record) != len(header):
                return (f"input {label} line {reader.line_num} has {len(record)} fields but the header (line "
                        f"{header_at}) has {len(header)}: a ragged line (often a {_DELIMITERS[delim]} inside a "
                        f"value that is not in double quotes); fix or remove that line")
    return None


def jsonl_shape_problem(path: Path, columns: list[str], *, label: str) -> str | None:
    """A line that is not a JSON object, which made DuckDB read the file as one ``json`` column, or None."""
    if columns != ["json"]:
        return None
    bad = _first_bad_json_line(path)
    if bad is None:
        return None
    n, why = bad
    return f"input {label} line {n} is not a JSON object ({why}); fix or remove that line (one JSON object per line)"


def _first_bad_json_line(path: Path) -> tuple[int, str] | None:
    """``(line number, why)`` of the first line that is not one JSON object, or None."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if n > _SCAN_JSON_LINES:
                    return None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    return n, str(exc).split(":")[0]
                if not isinstance(obj, dict):
                    kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
                        type(obj), "a number")
                    return n, f"{kind}, not an object"
    except OSError:
        return None
    return None
