"""Helpers shared by the benchmarks: peak RSS of child processes, job files, tables."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Benchmarks never read or fill the user's response cache: a cache hit would skip the work
# being measured. Each benchmark process gets an empty cache folder (B7-B9 set their own).
os.environ.setdefault("LLMAP_CACHE_DIR", tempfile.mkdtemp(prefix="llmap-bench-cache-"))
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


def write_rows_csv(path: Path, n: int) -> Path:
    """A CSV of ``n`` synthetic rows: id, title, body (about 120 characters of text)."""
    words = ("district", "budget", "enrollment", "teacher", "schedule", "bus", "lunch", "policy", "board",
             "report", "county", "charter", "grade", "survey", "minutes", "vote")
    with open(path, "w", encoding="utf-8") as f:
        f.write("id,title,body\n")
        for i in range(n):
            w = [words[(i * 7 + k * 3) % len(words)] for k in range(18)]
            f.write(f"r{i:07d},Item {i} {w[0]},note {i}: {' '.join(w)}\n")
    return path


JOB = """
name = "{name}"
[input]
path = "{csv}"
key = "id"
[prompt]
system = "You tag short notes."
user = "{{{{ title }}}}: {{{{ body }}}}"
[output]
path = "out/{name}.parquet"
keep = ["title"]
[output.fields]
topic = {{ type = "string", enum = ["budget", "staff", "transport", "food", "governance", "other"] }}
confidence = {{ type = "number", description = "0 to 1" }}
summary = {{ type = "string", description = "one sentence" }}
reason = {{ type = "string", description = "one sentence" }}
urgent = {{ type = "boolean" }}
{models}
[limits]
{limits}
"""

MODEL = """
[[model]]
provider = "openai"
name = "{name}"
base_url = "{base_url}"
max_tokens = 64
{extra}
"""


def write_job(dir_: Path, *, name: str, csv: Path, base_urls: list[str], limits: str = "",
              model_extra: str = "") -> Path:
    """Write a job file over ``csv`` with one ``[[model]]`` per base URL (the first is primary)."""
    models = "".join(MODEL.format(name=f"m{i}", base_url=u, extra=model_extra) for i, u in enumerate(base_urls))
    job = dir_ / f"{name}.toml"
    job.write_text(JOB.format(name=name, csv=csv, models=models, limits=limits), encoding="utf-8")
    return job
