"""``kind = "resolve"``: rows that mean the same entity get the same ``_entity`` (entity resolution, dedup).

1. **Block by embeddings.** Every row's text is embedded; each row's
   ``[resolve] neighbors`` nearest rows (faiss) are its candidate pairs. All
   pairs are never compared.
2. **Threshold.** With ``threshold = "auto"`` (the default), a seeded sample of
   ``[resolve] sample`` candidate pairs is judged first, and the threshold is the
   similarity above which ``target_recall`` of the pairs judged the same lie
   (the rule DocETL's resolve uses to block at 95% recall). Candidate pairs below
   it are not judged. The sample takes the pairs with the smallest hash of their
   keys, so a rerun over more rows keeps most of it (already answered).
3. **Judge.** The model judges the candidate pairs above the threshold, packed
   (``[resolve] pack`` pairs per request).
4. **Connect.** Pairs judged the same are joined; each connected component is one
   entity, named by the key of its first row in input order (``_entity``).

Steps are committed as they settle (:mod:`llmap.operators.steps`); a rerun with
new rows judges only pairs it has not judged before.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from llmap.operators.context import OpContext, OpRow
from llmap.operators.embed import embed_texts
from llmap.operators.families import UnionFind
from llmap.operators.neighbors import knn
from llmap.operators.steps import Step, StepKind, StepRunner, StepSchema, StrictAnswer, raw
from llmap.run.stats import Stop
from llmap.store.ledger import RowResult

__all__ = ["auto_threshold", "candidate_pairs", "run_resolve"]

_JUDGE = """{system}

Two rows follow. Say whether they refer to the same entity (the same real thing, written differently): \
answer {{"same": true}} or {{"same": false}}."""
#: Positive pairs needed in the sample before the auto threshold is trusted; with fewer, every candidate is judged.
MIN_POSITIVES = 5
_SCHEMA_TITLE = "llmap_resolve_judge"


class _Same(StrictAnswer):
    same: bool


def candidate_pairs(vectors: np.ndarray, neighbors: int) -> dict[tuple[int, int], float]:
    """``(i, j) -> cosine similarity`` for ``i < j`` where one is among the other's ``neighbors`` nearest."""
    if len(vectors) < 2:
        return {}
    sims, idx = knn(vectors, min(neighbors, len(vectors) - 1))
    out: dict[tuple[int, int], float] = {}
    for i in range(len(vectors)):
        for s, j in zip(sims[i], idx[i], strict=True):
            if j >= 0:
                out[(min(i, int(j)), max(i, int(j)))] = float(s)
    return out


def auto_threshold(sampled: list[tuple[float, bool]], target_recall: float) -> float | None:
    """The similarity above which ``target_recall`` of the same-entity pairs of a sample lie.

    DocETL's blocking rule (judge a sample of candidate pairs, keep the threshold that keeps the target share
    of the pairs judged the same), with one correction: a model that says "same" wrongly now and then does so at
    any similarity, and one such verdict on a dissimilar pair would drag the threshold down to it (and let every
    pair above it be judged, each a chance for another wrong merge). So the similarities of the pairs judged the
    same that lie below Tukey's lower fence (``Q1 - 1.5 * IQR`` of those similarities) are taken as wrong
    verdicts and left out; the threshold is the ``1 - target_recall`` quantile of the rest.

    Args:
        sampled: ``(similarity, judged the same)`` of each sampled candidate pair.
        target_recall: the share of same-entity pairs to keep (0 to 1).

    Returns:
        The threshold, or None when fewer than :data:`MIN_POSITIVES` sampled pairs were judged the same (then
        every candidate is judged).
    """
    pos = np.sort(np.array([s for s, same in sampled if same], dtype=np.float64))
    if len(pos) < MIN_POSITIVES:
        return None
    q1, q3 = np.percentile(pos, [25, 75])
    kept = pos[pos >= q1 - 1.5 * (q3 - q1)]
    cut = math.floor((1.0 - target_recall) * len(kept) + 1e-9)
    return float(kept[min(cut, len(kept) - 1)])


def _pair_hash(a: str, b: str) -> str:
    return hashlib.sha256(f"{a}\x00{b}".encode()).hexdigest()


async def run_resolve(ctx: OpContext) -> None:
    """Resolve the plan's rows (see the module docstring); every row's ``_entity`` is committed at the end.

    Raises:
        Stop: the run is stopping; answered steps are kept, rows stay as they were.
    """
    opt = ctx.spec.resolve_
    rows = ctx.rows()
    pending = [r for r in rows if r.status == "pending"]
    live = [r for r in rows if r.text is not None and r.status != "skipped"]
    n = len(live)
    ctx.summary.update(rows=sum(1 for r in rows if r.status != "skipped"), pending=len(pending),
                       all_pairs=n * (n - 1) // 2)
    if not pending:
        return
    vectors = await embed_texts(ctx, [r.text for r in live])
    cands = candidate_pairs(vectors, opt.neighbors)
    ctx.summary["candidates"] = len(cands)
    kind = StepKind(ctx, "judge", system=_JUDGE.format(system=raw(ctx.spec.prompt.system)),
                    user="A: {{ a }}\nB: {{ b }}",
                    schema=StepSchema(_SCHEMA_TITLE, {"same": {"type": "boolean"}}, _Same), max_tokens=16,
                    pack=opt.pack)
    runner = StepRunner(ctx)
    verdict: dict[tuple[int, int], bool] = {}

    async def judge(pairs: list[tuple[int, int]]) -> None:
        steps = [Step(f"{i}-{j}", {"a": live[i].text, "b": live[j].text}) for i, j in pairs]
        res = await runner.run(kind, steps)
        if len(res) < len(steps) or ctx.stats.stop.is_set():
            raise Stop
        for (i, j), s in zip(pairs, steps, strict=True):
            r = res[s.id]
            verdict[(i, j)] = r.status == "done" and bool(r.output.get("same"))
            if r.status != "done":
                ctx.summary["failed_pairs"] = ctx.summary.get("failed_pairs", 0) + 1

    threshold = opt.threshold
    if threshold == "auto":
        by_hash = sorted(cands, key=lambda p: _pair_hash(live[p[0]].key, live[p[1]].key))
        sample = sorted(by_hash[:opt.sample])
        ctx.say(f"{len(cands):,} candidate pairs from {n:,} rows; judging a sample of {len(sample):,} to set the "
                "similarity threshold")
        await judge(sample)
        threshold = auto_threshold([(cands[p], verdict[p]) for p in sample], opt.target_recall)
        ctx.summary.update(sampled=len(sample), sample_same=sum(verdict[p] for p in sample))
        if threshold is None:
            ctx.say(f"fewer than {MIN_POSITIVES} pairs of the sample are the same entity: judging every candidate")
            threshold = -1.0
    ctx.summary["threshold"] = round(float(threshold), 4)
    rest = sorted(p for p, s in cands.items() if s >= threshold and p not in verdict)
    ctx.say(f"judging {len(rest):,} candidate pairs at similarity >= {threshold:.3f}")
    await judge(rest)
    _write(ctx, rows, live, verdict, cands)


def _write(ctx: OpContext, rows: list[OpRow], live: list[OpRow], verdict: dict[tuple[int, int], bool],
           cands: dict[tuple[int, int], float]) -> None:
    uf = UnionFind(len(live))
    for (i, j), same in sorted(verdict.items()):
        if same:
            uf.union(i, j)
    comps: dict[int, list[int]] = {}
    for i in range(len(live)):
        comps.setdefault(uf.find(i), []).append(i)
    entity = {}
    for members in comps.values():
        first = min(members, key=lambda i: live[i].seq)
        for i in members:
            entity[live[i].key] = live[first].key
    results = [RowResult(r.key, "failed", error=r.error) if r.text is None else
               RowResult(r.key, "done", output={"_entity": entity[r.key]}, source="model")
               for r in rows if r.status != "skipped"]
    merged = sorted((m for m in comps.values() if len(m) > 1), key=lambda m: (-len(m), min(live[i].seq for i in m)))
    s = ctx.summary
    s.update(judged=len(verdict), same=sum(verdict.values()), entities=len(comps),
             merged_rows=sum(len(m) for m in merged), requests=ctx.stats.requests,
             judged_share=len(verdict) / s["all_pairs"] if s.get("all_pairs") else 0.0,
             merges_sample=[{"entity": live[min(m, key=lambda i: live[i].seq)].key, "rows": len(m),
                             "texts": [live[i].text for i in sorted(m, key=lambda i: live[i].seq)[:5]]}
                            for m in merged[:ctx.spec.resolve_.show]])
    ctx.write_rows(results, also=[ctx.book.summary_statement(ctx.run_id, "resolve", dict(s))])
