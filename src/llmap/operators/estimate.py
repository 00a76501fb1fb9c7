"""``llmap estimate`` for cluster, resolve and reduce: requests, tokens, USD and time, sending nothing.

The rows to work on are counted as a run would (the input after ``where`` and
``limit``; rows the ledger holds ``done`` with the same inputs are left out) and
rendered with the job's user template to measure them. Nothing is embedded and
no model is asked, so what depends on answers is an assumption, named in the
figure's basis:

- cluster: windows are exact (rows' tokens over the window budget); families are
  assumed one per :data:`ROWS_PER_FAMILY` rows (B20's titles), proposals one per
  family and window, merge pairs at most ``merge_neighbors`` per proposal (half of
  them counted twice), and every row is assigned once.
- resolve: candidate pairs at most ``neighbors`` per row; the pairs judged are the
  sample plus :data:`JUDGED_SHARE` of the candidates (B21), with every candidate as
  the upper bound.
- reduce: exact given the summaries' length: each group's chunks, level by level,
  with every summary at ``summary_tokens`` (its upper bound).

``filter`` is ``map`` with a filtered export: its estimate is map's.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from llmap.io.sources import Source
from llmap.operators.families import row_tokens
from llmap.operators.reduce import CHARS_PER_TOKEN
from llmap.plan import build_source, check_input, compile_spec, keyed_rows
from llmap.pricing import cost_usd
from llmap.spec import JobSpec
from llmap.spec.operators import DEFAULT_REMOTE_CONTEXT

__all__ = ["JUDGED_SHARE", "ROWS_PER_FAMILY", "OperatorEstimate", "estimate_operator", "format_operator_estimate"]

#: Rows per family assumed by cluster's estimate (B20: 7,500 titles in 300 families).
ROWS_PER_FAMILY = 25
#: Share of candidate pairs above resolve's auto threshold assumed by the estimate (B21: 4,184 of 29,481).
JUDGED_SHARE = 0.15
#: Seconds per request and requests in flight assumed for the time.
LATENCY_S, IN_FLIGHT = 1.0, 16
#: Tokens of instructions and few-shot example around each step's own text.
STEP_OVERHEAD = {"propose": 260, "merge": 140, "assign": 160, "judge": 80, "summary": 90, "answer": 80}


@dataclass
class OperatorEstimate:
    """What a cluster, resolve or reduce run would send now.

    Attributes:
        kind: the job's kind.
        rows, done, to_work: input rows, rows done with the same inputs, rows the run works on.
        steps: per step kind, ``(requests, prompt tokens, completion tokens, basis)``.
        embedding_texts, embedding_requests: texts to embed (cluster, resolve) and requests for them.
        requests, prompt_tokens, completion_tokens, cost_usd: totals on the primary model.
        upper_requests: the most requests the run can send (the assumptions at their worst), when it differs.
        time_s: requests x :data:`LATENCY_S` / :data:`IN_FLIGHT` (or the model's RPM, when set).
        notes: the assumptions, in words.
        elapsed_s: seconds the estimate took.
    """

    kind: str
    rows: int = 0
    done: int = 0
    to_work: int = 0
    steps: dict[str, tuple[int, int, int, str]] = field(default_factory=dict)
    embedding_texts: int = 0
    embedding_requests: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    upper_requests: int | None = None
    time_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


def _done_rows(spec: JobSpec) -> dict[str, str]:
    path = spec.ledger_path
    if not path.is_file():
        return {}
    con = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT key, input_hash FROM rows WHERE status = 'done'").fetchall())
    except sqlite3.OperationalError:
        return {}
    finally:
        con.close()


def estimate_operator(spec: JobSpec, *, limit: int | None = None, source: Source | None = None) -> OperatorEstimate:
    """Estimate a cluster, resolve or reduce run (see the module docstring); nothing is sent or written.

    Raises:
        SpecError: the input lacks a column the job names, ``where`` fails, or keys are bad (as a run's preflight).
    """
    started = time.perf_counter()
    compiled = compile_spec(spec)
    compiled.close()
    src = build_source(spec, limit=limit, given=source)
    est = OperatorEstimate(spec.kind)
    done = _done_rows(spec)
    texts: list[str] = []
    groups: dict[str, list[int]] = {}
    try:
        columns = check_input(spec, compiled, src).data_columns
        columns = list(dict.fromkeys(columns + list(spec.reduce.by)))
        for r in keyed_rows(spec, compiled, src, columns):
            est.rows += 1
            if done.get(r.key) == r.input_hash:
                est.done += 1
                continue
            text = compiled.renderer.messages(json.loads(json.dumps(r.row, default=str)))[-1]["content"]
            texts.append(text)
            if spec.kind == "reduce":
                groups.setdefault(json.dumps([r.row.get(c) for c in spec.reduce.by], default=str), []).append(
                    _tokens(text))
    finally:
        if source is None:
            src.close()
    est.to_work = len(texts)
    if texts:
        {"cluster": _cluster, "resolve": _resolve, "reduce": _reduce}[spec.kind](spec, est, texts, groups)
    for req, pt, ct, _ in est.steps.values():
        est.requests += req
        est.prompt_tokens += pt
        est.completion_tokens += ct
    embed_tokens = round(est.embedding_texts * sum(_tokens(t) for t in texts) / max(1, len(texts)))
    est.cost_usd = cost_usd(spec.model, est.prompt_tokens, est.completion_tokens) + \
        embed_tokens * spec.embeddings.price_in / 1e6
    rpm = spec.model.rpm or spec.limits.rpm
    est.time_s = max(est.requests * LATENCY_S / IN_FLIGHT, est.requests / rpm * 60 if rpm else 0.0)
    est.elapsed_s = time.perf_counter() - started
    return est


def _tokens(text: str) -> int:
    return math.ceil((len(text) + 4) / CHARS_PER_TOKEN)


def _context(spec: JobSpec, given: int | None) -> int:
    return given or (spec.model.n_ctx if spec.model.provider == "local" else DEFAULT_REMOTE_CONTEXT)


def _cluster(spec: JobSpec, est: OperatorEstimate, texts: list[str], _: Any) -> None:
    opt, n = spec.cluster, len(texts)
    budget = _context(spec, opt.context_tokens)
    win = int(budget * opt.window_share)
    row_t = [row_tokens(t) for t in texts]
    windows = max(1, math.ceil(sum(row_t) / win))
    fams = max(1, round(n / ROWS_PER_FAMILY))
    proposals = fams + windows
    answer = 3 * n + 30 * proposals
    est.steps["propose"] = (windows, sum(row_t) + windows * STEP_OVERHEAD["propose"], answer,
                            f"{windows:,} windows of up to {win:,} tokens; about {fams:,} families "
                            f"(one per {ROWS_PER_FAMILY} rows)")
    pairs = proposals * opt.merge_neighbors // 2
    mp = min(opt.pack, 10)
    est.steps["merge"] = (math.ceil(pairs / mp), pairs * 40 + math.ceil(pairs / mp) * STEP_OVERHEAD["merge"],
                          pairs * 8, f"at most {pairs:,} family pairs, {mp} per request")
    per_row = sum(row_t) + n * opt.candidates * 20
    est.steps["assign"] = (math.ceil(n / opt.pack), per_row + math.ceil(n / opt.pack) * STEP_OVERHEAD["assign"],
                           n * 10, f"{n:,} rows, {opt.pack} per request, {opt.candidates} candidate families each")
    est.embedding_texts = n + 2 * proposals
    est.embedding_requests = math.ceil(n / spec.embeddings.batch) + 2
    est.notes.append("families, proposals and merge pairs depend on the data; the counts assume one family per "
                     f"{ROWS_PER_FAMILY} rows")


def _resolve(spec: JobSpec, est: OperatorEstimate, texts: list[str], _: Any) -> None:
    opt, n = spec.resolve_, len(texts)
    cands = n * opt.neighbors
    avg = sum(row_tokens(t) for t in texts) / n
    sample = min(opt.sample, cands) if opt.threshold == "auto" else 0
    judged = sample + round(JUDGED_SHARE * (cands - sample)) if opt.threshold == "auto" else cands
    req = math.ceil(judged / opt.pack)
    est.steps["judge"] = (req, round(judged * 2 * avg + req * STEP_OVERHEAD["judge"]), judged * 8,
                          f"{sample:,} sampled + {JUDGED_SHARE:.0%} of up to {cands:,} candidate pairs, "
                          f"{opt.pack} per request")
    est.upper_requests = math.ceil(cands / opt.pack)
    est.embedding_texts = n
    est.embedding_requests = math.ceil(n / spec.embeddings.batch)
    est.notes.append(f"every row embedded once; all {n * (n - 1) // 2:,} pairs are never compared")


def _reduce(spec: JobSpec, est: OperatorEstimate, texts: list[str], groups: dict[str, list[int]]) -> None:
    opt = spec.reduce
    context = _context(spec, opt.context_tokens)
    budget = int(context * opt.chunk_share)
    summary = min(opt.summary_tokens or max(16, context // 8), max(16, budget // 3))
    s_req = s_pt = s_ct = 0
    levels = 1
    for toks in groups.values():
        items, level = toks, 0
        while True:
            chunks = _chunks(items, budget)
            if chunks == 1:
                break
            s_req += chunks
            s_pt += sum(items) + chunks * STEP_OVERHEAD["summary"]
            s_ct += chunks * summary
            items = [summary] * chunks
            level += 1
        levels = max(levels, level + 1)
    finals = len(groups)
    est.steps["summary"] = (s_req, s_pt, s_ct, f"chunks of up to {budget:,} tokens, summaries of up to {summary:,}")
    est.steps["answer"] = (finals, sum(sum(t) for t in groups.values()) // max(1, levels) + finals * 80,
                           finals * spec.model.max_tokens, f"{finals:,} groups, at most {levels} levels")


def _chunks(items: list[int], budget: int) -> int:
    n, used = 1, 0
    for t in items:
        t = min(t, budget)
        if used and used + t > budget:
            n, used = n + 1, 0
        used += t
    return n


def format_operator_estimate(est: OperatorEstimate) -> Any:
    """A ``rich.table.Table`` of the figures and their basis."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"llmap estimate (kind = {est.kind})", show_header=True, header_style="bold")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("basis", style="dim")
    rows = [("rows in the input", f"{est.rows:,}", "after [input] where and limit"),
            ("already done", f"{est.done:,}", "ledger: done with the same inputs"),
            ("rows to work on", f"{est.to_work:,}", "")]
    rows += [(f"{kind} requests", f"{req:,}", basis) for kind, (req, _, _, basis) in est.steps.items()]
    if est.embedding_requests:
        rows.append(("embedding requests", f"{est.embedding_requests:,}", f"{est.embedding_texts:,} texts at most"))
    upper = f"; at most {est.upper_requests:,}" if est.upper_requests is not None else ""
    rows += [("requests", f"{est.requests:,}", f"model calls{upper}"),
             ("prompt tokens", f"{est.prompt_tokens:,}", f"{CHARS_PER_TOKEN} characters per token"),
             ("completion tokens", f"{est.completion_tokens:,}", "answers at their expected length"),
             ("cost", f"${est.cost_usd:,.4f}", "at [model] price_in / price_out and [embeddings] price_in"),
             ("time", f"{est.time_s:,.1f} s", f"{LATENCY_S:g} s per request, {IN_FLIGHT} in flight, or the RPM")]
    for name, value, basis in rows:
        table.add_row(escape(name), escape(value), escape(basis))
    if est.notes:
        table.caption = escape("; ".join(est.notes))
        table.caption_justify = "left"
    return table
