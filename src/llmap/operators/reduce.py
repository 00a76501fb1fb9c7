"""``kind = "reduce"``: one answer per group of rows (a SQL ``GROUP BY``), however large the group.

Rows are grouped by the values of ``[reduce] by`` (no columns: one group of
every row), in the order groups first appear. Each row reads as the job's user
template renders it. A group whose rows fit one request (``context_tokens`` x
``chunk_share``) is answered at once with the ``[output.fields]``. A larger
group is reduced hierarchically: its rows are cut into consecutive chunks that
fit, each chunk is summarized (at most ``summary_tokens``), the summaries are
cut into chunks again, and so on until they fit one request, which gives the
answer. Every row reaches exactly one chunk of the first level, and every
summary exactly one chunk of the next (``op_chunks`` records each chunk's
members). The levels of all groups run together, so requests go out in parallel.

A group is answered again only when its rows changed (a fingerprint of its rows'
keys and texts); chunks whose rows did not change are answered from the ledger,
so a rerun after one row changed pays for that row's chunk, the summaries above
it, and the group's answer.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

from llmap.operators.context import OpContext, OpRow
from llmap.operators.steps import Step, StepKind, StepResult, StepRunner, StepSchema, StrictAnswer, raw
from llmap.run.stats import Stop
from llmap.spec.operators import DEFAULT_REMOTE_CONTEXT
from llmap.store.ledger import RowResult

__all__ = ["chunk", "run_reduce"]

_SUMMARY = """{system}

The rows below are one part of the group {{{{ group }}}}, too large to read at once. Summarize this part so that \
the task can be done for the whole group from the summaries of all its parts alone: keep every count, name, \
amount and fact the task needs."""
_ANSWER = """{system}

Below are {{{{ what }}}} of the group {{{{ group }}}}. Answer for the whole group."""
#: Characters per token assumed when cutting chunks.
CHARS_PER_TOKEN = 3.5
#: A group reduced in more levels than this stops with an error (summaries that do not shrink).
MAX_LEVELS = 12


class _Summary(StrictAnswer):
    summary: str


def _tokens(text: str) -> int:
    return math.ceil((len(text) + 4) / CHARS_PER_TOKEN)


def chunk(items: list[tuple[str, str]], budget: int) -> list[list[tuple[str, str]]]:
    """Consecutive chunks of ``(id, text)`` items, each within ``budget`` tokens; every item lands in exactly one
    (a text longer than the budget alone is cut to it, with a visible marker)."""
    cap = int(budget * CHARS_PER_TOKEN) - 4
    out: list[list[tuple[str, str]]] = []
    cur: list[tuple[str, str]] = []
    used = 0
    for i, text in items:
        if len(text) > cap:
            text = text[:max(1, cap - 30)] + f"… [truncated {len(text) - cap + 30} chars]"
        t = _tokens(text)
        if cur and used + t > budget:
            out.append(cur)
            cur, used = [], 0
        cur.append((i, text))
        used += t
    if cur:
        out.append(cur)
    return out


@dataclass
class _Group:
    key: str
    seq: int
    values: dict
    rows: list[OpRow] = field(default_factory=list)
    items: list[tuple[str, str]] = field(default_factory=list)
    chunks: list[tuple[int, int, str, list[str]]] = field(default_factory=list)
    levels: int = 0
    error: str | None = None

    @property
    def label(self) -> str:
        return ", ".join(f"{k} = {v}" for k, v in self.values.items()) or "all rows"

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([(r.key, r.text) for r in self.rows], ensure_ascii=False)
                              .encode()).hexdigest()


async def run_reduce(ctx: OpContext) -> None:
    """Reduce every group whose rows changed (see the module docstring); groups and rows are committed at the end.

    Raises:
        Stop: the run is stopping; answered chunks are kept, groups stay as they were.
    """
    opt, spec = ctx.spec.reduce, ctx.spec
    rows = ctx.rows()
    groups: dict[str, _Group] = {}
    for r in rows:
        if r.status == "skipped" or r.text is None:
            continue
        values = {c: r.data.get(c) for c in opt.by}
        gkey = json.dumps(list(values.values()), ensure_ascii=False, default=str)
        g = groups.get(gkey) or groups.setdefault(gkey, _Group(gkey, len(groups), values))
        g.rows.append(r)
    stored = ctx.book.group_fingerprints()
    todo = [g for g in groups.values() if stored.get(g.key) != ("done", g.fingerprint())]
    ctx.summary.update(groups=len(groups), reduced=len(todo), rows=sum(len(g.rows) for g in groups.values()))
    context = opt.context_tokens or (spec.model.n_ctx if spec.model.provider == "local" else DEFAULT_REMOTE_CONTEXT)
    budget = int(context * opt.chunk_share)
    summary_tokens = min(opt.summary_tokens or max(16, context // 8), max(16, budget // 3))
    system = raw(spec.prompt.system)
    runner = StepRunner(ctx)
    if todo:
        ctx.say(f"reducing {len(todo):,} of {len(groups):,} groups (chunks of up to {budget:,} tokens)")
        summary = StepKind(ctx, "summary", system=_SUMMARY.format(system=system),
                           user="Part {{ part }}:\n{{ lines }}",
                           schema=StepSchema("llmap_reduce_summary", {"summary": {"type": "string"}}, _Summary),
                           max_tokens=summary_tokens)
        for g in todo:
            g.items = [(r.key, r.text) for r in g.rows]
        active = list(todo)
        finals: list[_Group] = []
        level = 0
        while active:
            steps, owner = [], {}
            for g in active:
                cuts = chunk(g.items, budget)
                g.chunks += [(level, i, f"{g.seq}:{level}:{i}", [k for k, _ in c]) for i, c in enumerate(cuts)]
                g.levels = level + 1
                if len(cuts) == 1:
                    finals.append(g)
                    continue
                if level + 1 >= MAX_LEVELS:
                    g.error = f"the summaries did not fit one request after {MAX_LEVELS} levels; raise context_tokens"
                    continue
                for i, c in enumerate(cuts):
                    sid = f"{g.seq}:{level}:{i}"
                    steps.append(Step(sid, {"group": g.label, "part": f"{i + 1} of {len(cuts)}",
                                            "lines": "\n".join(f"- {t}" for _, t in c)}))
                    owner[sid] = g
            if steps:
                ctx.say(f"level {level + 1}: summarizing {len(steps):,} chunks")
            res = await _run(ctx, runner, summary, steps)
            nxt: dict[str, list[tuple[str, str]]] = {}
            for s in steps:
                g, r = owner[s.id], res[s.id]
                if r.status != "done":
                    g.error = g.error or f"chunk {s.id}: {r.error}"
                nxt.setdefault(g.key, []).append((s.id, (r.output or {}).get("summary", "")))
            active = [g for g in active if g not in finals and g.error is None and g.key in nxt]
            for g in active:
                g.items = nxt[g.key]
            level += 1
        answer = StepKind(ctx, "answer", system=_ANSWER.format(system=system), user="{{ lines }}",
                          schema=ctx.compiled.schema, max_tokens=spec.model.max_tokens)
        steps = [Step(str(g.seq), {"group": g.label, "lines": "\n".join(f"- {t}" for _, t in g.items),
                                   "what": "the rows" if g.levels == 1 else "the summaries of the parts"})
                 for g in finals]
        res = await _run(ctx, runner, answer, steps)
        _write(ctx, rows, groups, todo, {g.key: res[str(g.seq)] for g in finals})
    else:
        _write(ctx, rows, groups, [], {})


async def _run(ctx: OpContext, runner: StepRunner, kind: StepKind, steps: list[Step]) -> dict[str, StepResult]:
    res = await runner.run(kind, steps)
    if len(res) < len(steps) or ctx.stats.stop.is_set():
        raise Stop
    return res


def _write(ctx: OpContext, rows: list[OpRow], groups: dict[str, _Group], todo: list[_Group],
           answers: dict[str, StepResult]) -> None:
    book, plan = ctx.book, ctx.run_id
    redone = {g.key for g in todo}
    also: list[tuple[str, tuple]] = []
    status_of: dict[str, tuple[str, str | None]] = {}
    stored = book.group_fingerprints()
    for g in groups.values():
        data = json.dumps({**g.values, "_rows": len(g.rows)}, ensure_ascii=False, default=str)
        if g.key not in redone:
            also.append(("UPDATE op_groups SET plan = ?, seq = ?, data = ? WHERE key = ?", (plan, g.seq, data, g.key)))
            status_of[g.key] = (stored.get(g.key, ("done", ""))[0], None)
            continue
        got = answers.get(g.key)
        if g.error is None and got is not None and got.status == "done":
            row = (g.key, g.seq, data, "done", json.dumps(got.output, ensure_ascii=False), None, got.model, got.source)
        else:
            err = g.error or (got.error if got is not None else "no answer")
            row = (g.key, g.seq, data, "failed", None, err, None, None)
        also += book.group_statements(plan, [(*row, g.fingerprint())])
        also += book.chunk_statements(g.key, g.chunks)
        status_of[g.key] = (row[3], row[5])
    results = []
    for r in rows:
        if r.status == "skipped":
            continue
        if r.text is None:
            results.append(RowResult(r.key, "failed", error=r.error))
            continue
        gkey = json.dumps([r.data.get(c) for c in ctx.spec.reduce.by], ensure_ascii=False, default=str)
        status, err = status_of.get(gkey, ("failed", "no group"))
        if r.status == "pending" or gkey in redone:
            results.append(RowResult(r.key, "done" if status == "done" else "failed",
                                     error=None if status == "done" else f"its group failed: {err}"))
    s = ctx.summary
    s.update(hierarchical=sum(1 for g in todo if g.levels > 1), levels=max((g.levels for g in todo), default=0),
             chunks=sum(len(g.chunks) for g in todo), failed_groups=sum(1 for g in todo
                                                                      if status_of[g.key][0] != "done"),
             requests=ctx.stats.requests)
    ctx.write_rows(results, also=[*also, ctx.book.summary_statement(ctx.run_id, "reduce", dict(s))])
