"""Helpers for the operator tests: job files over the simulator's hidden groups, its counters, the truth."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq


def group_stats(sim) -> dict:
    """``GET /stats/groups`` of a simulator: embedding requests, operator answers, repeated chat bodies."""
    with urllib.request.urlopen(f"{sim.url}/stats/groups", timeout=10) as r:
        return json.loads(r.read())


def op_job(folder: Path, sim, kind: str, *, data: str, system: str, user: str = "{{ text }}", out: str,
           tables: str = "", fields: str = "", keep: str = "", concurrency: int = 4, top: str = "") -> Path:
    """Write a job of ``kind`` over ``data`` (a CSV in ``folder``) against ``sim``; returns its path."""
    text = (f'kind = "{kind}"\n{top}\n'
            f'[input]\npath = "{data}"\nkey = "id"\n'
            f'[prompt]\nsystem = "{system}"\nuser = "{user}"\n'
            f'[output]\npath = "{out}"\n{keep}\n'
            + (f"[output.fields]\n{fields}\n" if fields else "")
            + f'[model]\nprovider = "openai"\nname = "sim"\nbase_url = "{sim.base_url}"\n'
            + f"[limits]\nconcurrency = {concurrency}\nbackoff_base_s = 0.01\nbackoff_cap_s = 0.01\n"
            + ('[embeddings]\nprovider = "openai"\nname = "sim-embed"\n' if kind in ("cluster", "resolve") else "")
            + tables)
    path = folder / "job.toml"
    path.write_text(text, encoding="utf-8")
    return path


def read_table(path: Path) -> list[dict]:
    """An output file's rows (Parquet or CSV)."""
    if path.suffix == ".csv":
        return pacsv.read_csv(path).to_pylist()
    return pq.read_table(path).to_pylist()
