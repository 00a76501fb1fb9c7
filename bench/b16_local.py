"""B16 local model: rows/s of the embedded model (Gemma 3 270M) on the Wyoming job, by batch size.

Runs ``examples/districts.toml`` (61 Wyoming districts from ../shared/data, or ``--data DIR``;
without the CSV, ``examples/districts_sample.toml``'s 12-row CSV) with the response cache off,
through ``Job.run()`` (what ``llmap run`` runs and prints: model load and preflight included, an
empty ``LLMAP_CACHE_DIR``), with each model process decoding 1, 4, 8 and 16 sequences per batch,
then the default configuration. 1 sequence per batch is one-at-a-time decoding (with the prefix's
KV state reused and prompt-lookup drafts, as before batching).

Also runs ``python -m llmap run`` itself on the job, for this tree's default configuration and, with
``--compare SRC``, for another llmap source tree (e.g. ``--compare /work/main/src``: the code before
batching), and prints the rows/s each printed, in the same sitting.

Prints per configuration: rows/s (wall, as the run reports it), the model processes' CPU time per
row (their rusage), llmap's own CPU per row, decoder steps and output rows (logits computed) per row,
and the time split into llama_decode and token choice (grammar). Then the speed-up of each batch size
over 1 sequence, and every row whose answer differs from one-at-a-time decoding (llama.cpp's CPU
kernels are not batch-invariant: near-ties can flip). Configurations run interleaved, so load from
other processes hits them alike; ``uptime``'s load is printed before and after.

    python bench/b16_local.py [--repeat 1] [--limit N] [--data DIR] [--processes P] [--compare SRC]
    python bench/b16_local.py --steps    # where a decode step's time goes, by rows per batch
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, SHARED_DATA, table

import llmap.engine
from llmap import Job
from llmap.providers.local.provider import (
    DEFAULT_PROCESSES,
    DEFAULT_SEQUENCES,
    LocalProvider,
    cores,
)


def _job(tmp: Path, data: Path) -> tuple[Path, str]:
    src = REPO / "examples" / ("districts.toml" if (data / "districts_2023_24_nces.csv").is_file()
                               else "districts_sample.toml")
    text = src.read_text(encoding="utf-8")
    text = text.replace('path = "../../shared/data/', f'path = "{data}/').replace(
        'path = "districts_sample.csv"', f'path = "{src.parent / "districts_sample.csv"}"')
    text = text.replace('path = "out/', f'path = "{tmp}/out/')
    text += "\n[cache]\nenabled = false\n"
    job = tmp / "job.toml"
    job.write_text(text, encoding="utf-8")
    return job, src.name


def run_once(job: Path, processes: int, sequences: int, limit: int | None) -> dict:
    """One run with a fresh ledger; returns rows/s, answers by key, CPU times and the decoders' counters."""
    stats: list[dict] = []

    def make(spec, *, concurrency):
        provider = LocalProvider(spec, processes=processes, sequences=sequences)
        close = provider.aclose

        async def aclose() -> None:
            stats.extend(await provider.stats())
            await close()

        provider.aclose = aclose  # type: ignore[method-assign]
        return provider

    original = llmap.engine.make_provider
    llmap.engine.make_provider = make
    before_c = resource.getrusage(resource.RUSAGE_CHILDREN)
    before_s = resource.getrusage(resource.RUSAGE_SELF)
    try:
        res = Job.from_toml(job).run(fresh=True, limit=limit)
    finally:
        llmap.engine.make_provider = original
    after_c = resource.getrusage(resource.RUSAGE_CHILDREN)  # the model processes, reaped by aclose()
    after_s = resource.getrusage(resource.RUSAGE_SELF)
    model_cpu = (after_c.ru_utime + after_c.ru_stime) - (before_c.ru_utime + before_c.ru_stime)
    own_cpu = (after_s.ru_utime + after_s.ru_stime) - (before_s.ru_utime + before_s.ru_stime)
    import pyarrow.parquet as pq

    rows_ = pq.read_table(res.output_path).to_pylist()
    key = next(iter(rows_[0]))
    answers = {r[key]: (r["district_name"], r["kind"], r["confidence"], r["_status"]) for r in rows_}
    rows = res.counts["done"] + res.counts["failed"]
    counters: dict[str, float] = {}
    for s in stats:
        for k, v in {**s.get("counters", {}), **s.get("timers", {})}.items():
            counters[k] = counters.get(k, 0) + v
    return {"rows": rows, "done": res.counts["done"], "elapsed_s": res.elapsed_s, "rows_per_s": rows / res.elapsed_s,
            "model_cpu_s": model_cpu, "own_cpu_s": own_cpu, "answers": answers, "c": counters,
            "completion_tokens": res.completion_tokens}


def run_cli(job: Path, src: Path, limit: int | None) -> dict:
    """``python -m llmap run JOB --fresh`` with ``src`` first on the path; the rows/s and seconds it printed."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "llmap", "run", str(job), "--fresh", *(["--limit", str(limit)] if limit else [])]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # llmap and the model processes it reaped
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    m = re.search(r"of (\d+) rows.*?([\d.]+) s \(([\d.]+) rows/s\)", out.stdout + out.stderr)
    if out.returncode != 0 or m is None:
        raise SystemExit(f"llmap run with {src} failed: {(out.stderr or out.stdout)[-500:]}")
    rows, elapsed = int(m.group(1)), float(m.group(2))
    return {"rows": rows, "elapsed_s": elapsed, "rows_per_s": rows / elapsed,  # (the printed rate has 1 decimal)
            "cpu_s": cpu}


def step_costs(threads: int = 1) -> list[tuple[str, str]]:
    """One llama_decode of n rows' next tokens after a shared 240-token prefix, with logits for every row
    and for one: the output layer's share (Gemma's 262,144 x 640) against the rest of the model."""
    import llama_cpp

    from llmap.providers.local.model import load_model
    from llmap.providers.local.provider import default_model_path

    llm = load_model(str(default_model_path()), n_ctx=4096, n_threads=threads, sequences=32, n_batch=512,
                     n_ubatch=512, n_outputs=64)
    ctx, mem = llm._ctx.ctx, llama_cpp.llama_get_memory(llm._ctx.ctx)
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(entries: list[tuple[int, int, int, bool]]) -> float:
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, int(logits)
            batch.seq_id[i][0] = seq
        t0 = time.perf_counter()
        assert llama_cpp.llama_decode(ctx, batch) == 0
        return time.perf_counter() - t0

    prefix = 240
    decode([(100 + i % 50, i, 0, False) for i in range(prefix)])
    out = []
    for n in (1, 2, 4, 8, 16, 32):
        for s in range(1, n + 1):
            llama_cpp.llama_memory_seq_rm(mem, s, -1, -1)
            llama_cpp.llama_memory_seq_cp(mem, 0, s, 0, prefix)
        cost = {}
        for every in (True, False):
            best = min(decode([(7 + k, prefix + k, s, every or s == 1) for s in range(1, n + 1)]) for k in range(3))
            for s in range(1, n + 1):
                llama_cpp.llama_memory_seq_rm(mem, s, prefix, -1)
            cost[every] = best
        head = (cost[True] - cost[False]) / max(1, n - 1) if n > 1 else float("nan")
        out.append((f"{n:>2} rows, {threads} thread", f"{1000 * cost[True]:.0f} ms/step with every row's logits "
                    f"({1000 * cost[True] / n:.1f} ms/row), {1000 * cost[False]:.0f} ms with one "
                    f"({1000 * cost[False] / n:.1f} ms/row)" + (f"; output layer {1000 * head:.1f} ms per row"
                                                              if n > 1 else "")))
    llama_cpp.llama_batch_free(batch)
    llm.close()
    return out


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration; the median is shown")
    ap.add_argument("--limit", type=int, default=None, help="at most N rows")
    ap.add_argument("--data", type=Path, default=SHARED_DATA, help="folder with districts_2023_24_nces.csv")
    ap.add_argument("--processes", type=int, default=DEFAULT_PROCESSES, help="model processes (default %(default)s)")
    ap.add_argument("--compare", type=Path, default=None,
                    help="another llmap source tree (its src/) to run with `llmap run` in the same sitting")
    ap.add_argument("--steps", action="store_true", help="only time one decode step by rows per batch")
    args = ap.parse_args()
    if args.steps:
        load = _load()
        print(table([("load average", load), *step_costs(), ("command", "python bench/b16_local.py --steps")],
                    "B16 embedded model: one llama_decode step by rows per batch"))
        return 0
    procs = min(args.processes, cores())
    configs = [(procs, 1), (procs, 4), (procs, 8), (procs, 16)]
    default = (min(DEFAULT_PROCESSES, cores()), DEFAULT_SEQUENCES)
    if default not in configs:
        configs.append(default)
    load_before = _load()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as t:
        os.environ["LLMAP_CACHE_DIR"] = str(Path(t) / "cache")  # empty; the model is found in the user cache dir
        job, name = _job(Path(t), args.data.resolve())
        runs: dict[tuple[int, int], list[dict]] = {c: [] for c in configs}
        clis: dict[str, list[dict]] = {"this tree": []} | ({str(args.compare): []} if args.compare else {})
        here = Path(__file__).resolve().parents[1] / "src"
        for _ in range(args.repeat):
            for c in configs:  # interleaved, so load from other processes hits every configuration alike
                runs[c].append(run_once(job, *c, args.limit))
            for tree in clis:
                clis[tree].append(run_cli(job, here if tree == "this tree" else Path(tree), args.limit))
    base = runs[configs[0]][0]
    lines = [("job", f"examples/{name}, {base['rows']} rows, response cache off, {cores()} cores"),
             ("load average before / after", f"{load_before}  /  {_load()}  ({time.monotonic() - t0:.0f} s)")]
    rate = {c: statistics.median(r["rows_per_s"] for r in rs) for c, rs in runs.items()}
    diffs: dict[tuple[int, int], list[str]] = {}
    for c, rs in runs.items():
        r = rs[0]
        n, cn = r["rows"], r["c"]
        diffs[c] = [f"{v[0]}: {base['answers'][k][1:3]} -> {v[1:3]}" for k, v in r["answers"].items()
                    if v[1:3] != base["answers"].get(k, (None,) * 4)[1:3]]
        label = f"{c[0]} x {c[1]:>2} sequences" + (" (default)" if c == default else "")
        lines.append((label, (
            f"{rate[c]:.2f} rows/s ({r['elapsed_s']:.1f} s), {rate[c] / rate[configs[0]]:.2f}x of 1 sequence; "
            f"CPU per row: model {1000 * r['model_cpu_s'] / n:.0f} ms, llmap {1000 * r['own_cpu_s'] / n:.0f} ms; "
            f"per row: {cn.get('steps', 0) / n:.1f} steps, {cn.get('outputs', 0) / n:.1f} outputs, "
            f"{cn.get('prompt_eval', 0) / n:.0f} prompt tokens evaluated ({cn.get('prompt_reused', 0) / n:.0f} "
            f"reused), drafts kept {cn.get('draft_kept', 0):.0f}/{cn.get('drafted', 0):.0f}, "
            f"decode {1000 * cn.get('decode_s', 0) / n:.0f} ms, choice {1000 * cn.get('choice_s', 0) / n:.0f} ms; "
            f"answers equal to 1 sequence: {n - len(diffs[c])}/{n}")))
    for c, d in diffs.items():
        for line in d:
            lines.append((f"  differs at {c[1]} sequences", line))
    for tree, rs in clis.items():
        med = statistics.median(r["rows_per_s"] for r in rs)
        rate_note = f", {med / statistics.median(r['rows_per_s'] for r in clis[str(args.compare)]):.2f}x of " \
            f"{args.compare}" if args.compare and tree == "this tree" else ""
        lines.append((f"`llmap run`, {tree}", f"{med:.2f} rows/s as printed ({rs[0]['elapsed_s']:.1f} s, "
                      f"{rs[0]['rows']} rows){rate_note}; CPU {rs[0]['cpu_s']:.1f} s in all "
                      f"({1000 * rs[0]['cpu_s'] / rs[0]['rows']:.0f} ms/row: imports, model load, preflight included)"))
    all_done = all(r["done"] == r["rows"] for rs in runs.values() for r in rs)
    lines += [
        ("every row done", str(all_done)),
        ("command", "python bench/b16_local.py" + (f" --repeat {args.repeat}" if args.repeat > 1 else "")
         + (f" --limit {args.limit}" if args.limit else "") + (f" --data {args.data}" if args.data != SHARED_DATA
                                                              else "")
         + (f" --compare {args.compare}" if args.compare else "")),
    ]
    print(table(lines, "B16 embedded model: sequences decoded per batch"))
    print(json.dumps({f"{p}x{s}": round(v, 3) for (p, s), v in rate.items()}
                     | {"equal": {f"{p}x{s}": base["rows"] - len(d) for (p, s), d in diffs.items()}}
                     | {f"cli {k}": round(statistics.median(r["rows_per_s"] for r in v), 3) for k, v in clis.items()}))
    return 0 if all_done else 1


if __name__ == "__main__":
    raise SystemExit(main())
