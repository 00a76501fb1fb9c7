"""Helpers shared by the benchmarks: peak RSS of child processes, job files, tables."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def run_cli(args: list[str], *, timeout: float = 3600) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``python -m llmap ARGS``; return (result, wall seconds, peak RSS of that child in MB).

    Peak RSS comes from ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (kilobytes on
    Linux), read before and after: run one measured child at a time.
    """
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "llmap", *args], capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return res, wall, peak_mb


def table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title, "-" * len(title)]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)
