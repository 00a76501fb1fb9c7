"""B16 local model: rows/s of the embedded model (Gemma 3 270M) on the Wyoming job.

Runs ``examples/districts.toml`` (61 Wyoming districts from ../shared/data; without that
folder, ``examples/districts_sample.toml``'s 12-row CSV) with the response cache off, for
1 and 2 model processes, with and without prefix reuse. Prints rows/s (wall time, model
start-up included), the model processes' CPU time per row, the time per row split into
prompt evaluation, answer decoding and token choice (grammar), and checks that every
configuration gives identical answers. Needs ``pip install -e '.[local]'``. Wall-clock
figures on a shared machine move with its load; the configurations run interleaved.

    python bench/b16_local.py [--repeat 1] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
from pathlib import Path

from _common import REPO, SHARED_DATA, table

import llmap.engine
from llmap import Job
from llmap.providers.local.provider import LocalProvider, cores


def _job(tmp: Path) -> tuple[Path, str]:
    src = REPO / "examples" / ("districts.toml" if (SHARED_DATA / "districts_2023_24_nces.csv").is_file()
                               else "districts_sample.toml")
    text = src.read_text(encoding="utf-8")
    data = (src.parent / ("../../shared/data" if "shared/data" in text else ".")).resolve()
    text = text.replace('path = "../../shared/data/', f'path = "{data}/').replace(
        'path = "districts_sample.csv"', f'path = "{src.parent / "districts_sample.csv"}"')
    text += "\n[cache]\nenabled = false\n"
    job = tmp / "job.toml"
    job.write_text(text, encoding="utf-8")
    return job, src.name


def run_once(job: Path, processes: int, reuse: bool, limit: int | None) -> dict:
    """One run with a fresh ledger; returns rows/s, answers by key and the model processes' timers."""
    stats: list[dict] = []

    def make(spec, *, concurrency):
        provider = LocalProvider(spec, processes=processes, prefix_reuse=reuse)
        close = provider.aclose

        async def aclose() -> None:
            stats.extend(await provider.stats())
            await close()

        provider.aclose = aclose  # type: ignore[method-assign]
        return provider

    original = llmap.engine.make_provider
    llmap.engine.make_provider = make
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        res = Job.from_toml(job).run(fresh=True, limit=limit)
    finally:
        llmap.engine.make_provider = original
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the model processes, reaped by aclose()
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    import pyarrow.parquet as pq

    table_ = pq.read_table(res.output_path).to_pylist()
    key = next(iter(table_[0]))
    answers = {r[key]: (r["kind"], r["confidence"], r["_status"]) for r in table_}
    rows = res.counts["done"] + res.counts["failed"]
    timers = {k: sum(s["timers"].get(k, 0.0) for s in stats) for k in ("prompt_s", "decode_s", "sample_s")}
    counters = {k: sum(s["counters"].get(k, 0) for s in stats) for k in
                ("prompt_eval", "prompt_reused", "decodes", "drafted", "draft_kept")}
    return {"rows": rows, "done": res.counts["done"], "elapsed_s": res.elapsed_s, "rows_per_s": rows / res.elapsed_s,
            "cpu_s": cpu_s,
            "answers": answers, "timers": timers, "counters": counters, "completion_tokens": res.completion_tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration; the median is shown")
    ap.add_argument("--limit", type=int, default=None, help="at most N rows")
    args = ap.parse_args()
    configs = [(1, True), (2, True), (1, False), (2, False)]
    with tempfile.TemporaryDirectory() as t:
        os.environ["LLMAP_CACHE_DIR"] = str(Path(t) / "cache")  # the model is found in the user cache dir
        job, name = _job(Path(t))
        runs: dict[tuple[int, bool], list[dict]] = {c: [] for c in configs}
        for _ in range(args.repeat):
            for c in configs:  # interleaved, so load from other processes hits every configuration alike
                runs[c].append(run_once(job, *c, args.limit))
    first = runs[configs[0]][0]
    identical = all(r["answers"] == first["answers"] for rs in runs.values() for r in rs)
    all_done = all(r["done"] == r["rows"] for rs in runs.values() for r in rs)
    lines = [("job", f"examples/{name}, {first['rows']} rows, response cache off, {cores()} cores")]
    rate = {}
    for (procs, reuse), rs in runs.items():
        rate[(procs, reuse)] = statistics.median(r["rows_per_s"] for r in rs)
        r = rs[0]
        n = r["rows"]
        tm, ct = r["timers"], r["counters"]
        lines.append((
            f"{procs} process{'es' if procs > 1 else ''}, prefix reuse {'on ' if reuse else 'off'}",
            f"{rate[(procs, reuse)]:.2f} rows/s ({r['elapsed_s']:.1f} s, model CPU {1000 * r['cpu_s'] / n:.0f} ms/row);"
            f" per row: prompt "
            f"{1000 * tm['prompt_s'] / n:.0f} ms ({ct['prompt_eval'] / n:.0f} tokens evaluated, "
            f"{ct['prompt_reused'] / n:.0f} reused), answer {1000 * tm['decode_s'] / n:.0f} ms "
            f"({r['completion_tokens'] / n:.1f} tokens, {ct['decodes'] / n:.1f} decodes, drafts kept "
            f"{ct['draft_kept']}/{ct['drafted']}), choice {1000 * tm['sample_s'] / n:.0f} ms",
        ))
    best = max(rate, key=rate.get)
    lines += [
        ("prefix reuse speed-up (1 process)", f"{rate[(1, True)] / rate[(1, False)]:.2f}x"),
        ("2 processes / 1 process (reuse on)", f"{rate[(2, True)] / rate[(1, True)]:.2f}x"),
        ("fastest", f"{best[0]} process(es), reuse {'on' if best[1] else 'off'}"),
        ("answers identical across configurations", f"{identical} (every row done: {all_done})"),
        ("command", "python bench/b16_local.py" + (f" --repeat {args.repeat}" if args.repeat > 1 else "")
         + (f" --limit {args.limit}" if args.limit else "")),
    ]
    print(table(lines, "B16 embedded model: processes x prefix reuse"))
    print(json.dumps({f"{p}p_{'reuse' if r else 'noreuse'}": round(v, 3) for (p, r), v in rate.items()}
                     | {"identical": identical}))
    return 0 if identical and all_done else 1


if __name__ == "__main__":
    raise SystemExit(main())
