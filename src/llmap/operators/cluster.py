"""``kind = "cluster"``: rows into families that the model names and describes.

A family is what the job's system prompt says it is (default: rows about the
same subject). One run of the operator, over the rows that are pending (new,
changed, or failed before) and the rows no family fit before:

1. **Assign to the families that exist** (from earlier runs), when there are
   some: rows that fit one are settled; the rest go on.
2. **Propose.** The rows left are embedded and put in an order where similar
   rows sit together (k-means clusters chained by similarity), then cut into
   windows sized to the model's context (``[cluster] context_tokens`` x
   ``window_share``). Each window is one request; the model answers the
   families it sees, with their member rows.
3. **Merge.** Families from different windows (and the families of earlier
   runs) that are near each other by embedding are candidate pairs; the model
   judges each pair (packed), and pairs judged the same are joined (most
   similar first; two families of earlier runs are never joined).
4. **Assign.** Each row is offered its window's family and its nearest
   families by embedding (``[cluster] candidates``) and put into one or none,
   packed like ``map`` (``[cluster] pack`` rows per request).
5. **Settle.** A new family with fewer than ``min_size`` rows is dissolved
   (its rows get ``_family`` null); past ``max_families`` the smallest new
   ones are. Rows and families are committed together.

Every request is a step (:mod:`llmap.operators.steps`): sent through the job's
dispatcher, judged by the settle stage, committed to the ledger as it settles.
The pipeline is a deterministic function of the rows and those outcomes, so a
run killed at any point resumes without repeating a call and ends with the
output an uninterrupted run writes.
"""

from __future__ import annotations

import json

import numpy as np
from pydantic import Field

from llmap.operators.context import OpContext, OpRow
from llmap.operators.embed import embed_texts
from llmap.operators.families import (
    Proposal,
    candidate_lines,
    candidates,
    examples,
    family_vectors,
    merge_components,
    merge_pairs,
    proposals_from,
    resolve_answer,
    row_tokens,
    windows,
)
from llmap.operators.neighbors import similarity_order
from llmap.operators.steps import Step, StepKind, StepResult, StepRunner, StepSchema, StrictAnswer, raw
from llmap.run.stats import Stop
from llmap.spec.operators import DEFAULT_REMOTE_CONTEXT
from llmap.store.ledger import RowResult
from llmap.store.operators import Family

__all__ = ["DEFAULT_FAMILY", "run_cluster"]

#: What a family is when the job's system prompt does not say.
DEFAULT_FAMILY = "A family is a group of rows about the same subject."

_PROPOSE = """{system}

You group rows into families. The rows below are a JSON array of {{"id", "text"}}. Propose the families you \
find among them: a family needs at least 2 of these rows. Give each family a short name (a few words), one \
sentence saying what its rows share, and the ids of its rows. A row belongs to at most one family; leave out \
rows that fit no family."""
_MERGE = """{system}

Two families follow, each as "name: description". Say whether they are the same family, so that their rows \
belong together under one name: answer {{"same": true}} or {{"same": false}}."""
_ASSIGN = """{system}

Put the row into the one candidate family it belongs to: answer with that family's id (like "F3"), or null \
when none of them fits."""


#: One example per step kind, sent before each step (a small model copies the shape of an answer it is shown).
_EXAMPLE_ROWS = ["Apple pie recipe", "Toyota Corolla review", "Banana bread recipe", "Honda Civic review",
                 "Weather today"]
_BAKING, _CARS = "Baking recipes: Recipes for baked goods.", "Car reviews: Reviews of car models."
# The example's ids are letters and a window's are numbers: a model that copies the example names no real row.
_PROPOSE_EXAMPLE = (
    {"rows": json.dumps([{"id": "abcde"[i], "text": t} for i, t in enumerate(_EXAMPLE_ROWS)])},
    {"families": [{"name": "Baking recipes", "description": "Recipes for baked goods.", "members": ["a", "c"]},
                  {"name": "Car reviews", "description": "Reviews of car models.", "members": ["b", "d"]}]})
_MERGE_EXAMPLES = (({"a": _BAKING, "b": "Cakes and pies: How to bake cakes and pies."}, {"same": True}),
                   ({"a": _BAKING, "b": _CARS}, {"same": False}))
_EXAMPLE_CANDIDATES = f"- F1: {_BAKING}\n- F2: {_CARS}"
_ASSIGN_EXAMPLES = (({"text": "Cherry tart recipe", "candidates": _EXAMPLE_CANDIDATES}, {"family": "F1"}),
                    ({"text": "Stock market news", "candidates": _EXAMPLE_CANDIDATES}, {"family": None}))


class _Family(StrictAnswer):
    name: str
    description: str
    members: list[str | int]


class _Proposals(StrictAnswer):
    families: list[_Family]


class _Same(StrictAnswer):
    same: bool


class _Assigned(StrictAnswer):
    family: str | None = Field(...)


_PROPOSE_SCHEMA = StepSchema("llmap_cluster_propose", {"families": {"type": "array", "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "description": {"type": "string"},
                                     "members": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "description", "members"], "additionalProperties": False}}}, _Proposals)


def context_tokens(ctx: OpContext) -> int:
    """The model's context window in tokens: ``[cluster] context_tokens``, else ``n_ctx`` (local) or 16,000."""
    m = ctx.spec.model
    given = ctx.spec.cluster.context_tokens
    return given or (m.n_ctx if m.provider == "local" else DEFAULT_REMOTE_CONTEXT)


async def run_cluster(ctx: OpContext) -> None:
    """Cluster the plan's rows (see the module docstring); results are committed to the ledger.

    Raises:
        Stop: the run is stopping (a budget cap, an error every request would hit, a full disk); nothing of
            this run's families or rows is written, and every step already answered is kept for the rerun.
    """
    spec = ctx.spec
    rows = ctx.rows()
    pending = [r for r in rows if r.status == "pending"]
    ctx.summary.update(rows=sum(1 for r in rows if r.status != "skipped"), pending=len(pending))
    if not pending:
        _settle_summary(ctx, rows, ctx.book.families(), {})
        return
    system = raw(spec.prompt.system or DEFAULT_FAMILY)
    budget = context_tokens(ctx)
    answer_tokens = min(8192, int(budget * 0.4))
    runner = StepRunner(ctx)
    n_old = len(old := ctx.book.families())
    live = [r for r in rows if r.text is not None and r.status != "skipped"]
    vec = dict(zip((r.key for r in live), await embed_texts(ctx, [r.text for r in live]), strict=True))
    members_of: dict[str, list[str]] = {}  # an earlier run's family -> its rows
    for r in rows:
        if r.status == "done" and (r.output or {}).get("_family"):
            members_of.setdefault(r.output["_family"], []).append(r.key)
    st = _State(ctx, runner, system, vec, members_of)
    fam_of: dict[str, str | None] = {}  # row key -> family id (None: none fits), this run
    failed: dict[str, str] = {r.key: r.error for r in pending if r.text is None}
    work = [r for r in pending if r.text is not None]
    if old:  # 1. the families that exist take what fits them
        ctx.say(f"assigning {len(work):,} rows to the {len(old):,} families of earlier runs")
        got = await st.assign(work, old, {})
        fam_of.update({k: v for k, v in got.items() if isinstance(v, str) or v is None})
        failed.update({k: v[1] for k, v in got.items() if isinstance(v, tuple)})
        unfit = {r.key for r in work if r.key in fam_of and fam_of[r.key] is None}
        pool = [r for r in live if r.key in unfit or (r.status == "done" and not (r.output or {}).get("_family"))]
    else:
        pool = work
    # 2. propose
    proposals = await st.propose(pool, budget, answer_tokens)
    # 3. merge
    new, home = await st.merge(proposals, old)
    fams = old + new
    # 4. assign
    first = {k: home[p.pid] for p in proposals for k in p.members}
    ctx.say(f"assigning {len(pool):,} rows to {len(fams):,} families")
    got = await st.assign(pool, fams, first)
    for k, v in got.items():
        if isinstance(v, tuple):
            failed[k] = v[1]
        else:
            fam_of[k] = v
    _write(ctx, rows, fams, n_old, fam_of, failed, pool, st.model_of)


def _assign_schema(ids: list[str] | None = None) -> StepSchema:
    prop: dict = {"type": ["string", "null"]}
    if ids:
        prop = {"anyOf": [{"type": "string", "enum": ids}, {"type": "null"}]}
    return StepSchema("llmap_cluster_assign", {"family": prop}, _Assigned)


class _State:
    """One cluster run's steps and what they share."""

    def __init__(self, ctx: OpContext, runner: StepRunner, system: str, vec: dict[str, np.ndarray],
                 members_of: dict[str, list[str]]) -> None:
        self.ctx, self.runner, self.system, self.vec, self.members_of = ctx, runner, system, vec, members_of
        self.model_of: dict[str, str | None] = {}  # row key -> the model that assigned it

    def family_vectors(self, fams: list[Family], texts: np.ndarray, proposals: list[Proposal] = ()) -> np.ndarray:
        """Proposals' and families' vectors: text plus members' centroid."""
        dim = texts.shape[1]
        members = [np.stack([self.vec[k] for k in p.members]) for p in proposals]
        members += [np.stack([self.vec[k] for k in self.members_of.get(f.id, []) if k in self.vec])
                    if any(k in self.vec for k in self.members_of.get(f.id, [])) else np.zeros((0, dim), np.float32)
                    for f in fams]
        return family_vectors(texts, members)

    async def propose(self, pool: list[OpRow], budget: int, answer_tokens: int) -> list[Proposal]:
        ctx, vec = self.ctx, self.vec
        if not pool:
            return []
        texts = [r.text or "" for r in pool]
        win_tokens = int(budget * ctx.spec.cluster.window_share)
        total = sum(row_tokens(t) for t in texts)
        if total <= win_tokens:
            order = list(range(len(pool)))
        else:
            per_window = max(2, int(len(pool) * win_tokens / total))
            order = similarity_order(np.stack([vec[r.key] for r in pool]), max(4, per_window // 4))
        cuts = windows(order, texts, win_tokens)
        ctx.say(f"proposing families from {len(cuts):,} windows of rows ({len(pool):,} rows)")
        kind = StepKind(ctx, "propose", system=_PROPOSE.format(system=self.system),
                        user="Rows (JSON array):\n{{ rows }}", schema=_PROPOSE_SCHEMA, max_tokens=answer_tokens,
                        examples=[_PROPOSE_EXAMPLE])
        steps, ids = [], []
        for w, cut in enumerate(cuts):
            local = {str(n + 1): pool[i].key for n, i in enumerate(cut)}
            items = [{"id": str(n + 1), "text": pool[i].text} for n, i in enumerate(cut)]
            steps.append(Step(f"w{w}", {"rows": json.dumps(items, ensure_ascii=False)}))
            ids.append(local)
        res = await self.runner.run(kind, steps)
        _require(ctx, res, steps)
        out: list[Proposal] = []
        for w, s in enumerate(steps):
            r = res[s.id]
            if r.status == "done":
                out += proposals_from(w, r.output, ids[w])
            else:
                ctx.summary.setdefault("failed_steps", []).append(f"propose window {w}: {r.error}")
        ctx.summary.update(windows=len(cuts), proposals=ctx.summary.get("proposals", 0) + len(out))
        return out

    async def merge(self, proposals: list[Proposal], old: list[Family]) -> tuple[list[Family], dict[str, str]]:
        """Join proposals into families; returns the new families and each proposal's family id."""
        ctx = self.ctx
        if not proposals:
            return [], {}
        opt = ctx.spec.cluster
        texts = [p.text for p in proposals] + [f.text for f in old]
        fvec = self.family_vectors(old, await embed_texts(ctx, texts), proposals)
        wins = [p.window for p in proposals] + [-1] * len(old)
        pairs = merge_pairs(fvec, wins, neighbors=opt.merge_neighbors, min_similarity=opt.merge_min_similarity)
        ctx.say(f"{len(proposals):,} proposed families; judging {len(pairs):,} candidate pairs for merges")
        kind = StepKind(ctx, "merge", system=_MERGE.format(system=self.system),
                        user="Family A: {{ a }}\nFamily B: {{ b }}",
                        schema=StepSchema("llmap_cluster_merge", {"same": {"type": "boolean"}}, _Same),
                        max_tokens=16, pack=min(opt.pack, 10), examples=_MERGE_EXAMPLES)
        steps = [Step(f"{i}-{j}", {"a": texts[i], "b": texts[j]}) for i, j, _ in pairs]
        res = await self.runner.run(kind, steps)
        _require(ctx, res, steps)
        verdicts = [(i, j, res[f"{i}-{j}"].status == "done" and bool(res[f"{i}-{j}"].output.get("same")))
                    for i, j, _ in pairs]
        uf, merges = merge_components(len(texts), [False] * len(proposals) + [True] * len(old), verdicts)
        ctx.summary.update(merge_pairs=ctx.summary.get("merge_pairs", 0) + len(pairs),
                           merges=ctx.summary.get("merges", 0) + merges)
        comps: dict[int, list[int]] = {}
        for i in range(len(texts)):
            comps.setdefault(uf.find(i), []).append(i)
        next_id = 1 + max((int(f.id[1:]) for f in old if f.id[1:].isdigit()), default=0)
        home: dict[str, str] = {}
        new: list[Family] = []
        for root in sorted(comps, key=lambda r: min(comps[r])):
            idx = comps[root]
            olds = [i - len(proposals) for i in idx if i >= len(proposals)]
            if olds:
                fid = old[olds[0]].id
            else:
                best = max(idx, key=lambda i: (len(proposals[i].members), -i))
                fid = f"F{next_id}"
                next_id += 1
                new.append(Family(fid, proposals[best].name, proposals[best].description,
                                  sources=tuple(proposals[i].pid for i in idx), run=ctx.run_id))
            for i in idx:
                if i < len(proposals):
                    home[proposals[i].pid] = fid
        return new, home

    async def assign(self, rows: list[OpRow], fams: list[Family],
                     first: dict[str, str]) -> dict[str, str | None | tuple[str, str]]:
        """Each row's family id (or None), or ``("failed", error)``."""
        ctx, opt = self.ctx, self.ctx.spec.cluster
        if not rows or not fams:
            return {r.key: None for r in rows}
        fvec = self.family_vectors(fams, await embed_texts(ctx, [f.text for f in fams]))
        index = {f.id: i for i, f in enumerate(fams)}
        picks = candidates(np.stack([self.vec[r.key] for r in rows]), fvec, opt.candidates,
                           [index.get(first.get(r.key, "")) for r in rows])
        kind = StepKind(ctx, "assign", system=_ASSIGN.format(system=self.system),
                        user="Row: {{ text }}\n\nCandidate families:\n{{ candidates }}",
                        schema=_assign_schema([f.id for f in fams] if len(fams) <= 200 else None), max_tokens=24,
                        pack=opt.pack, examples=_ASSIGN_EXAMPLES)
        steps = [Step(r.key, {"text": r.text, "candidates": candidate_lines(fams, p)})
                 for r, p in zip(rows, picks, strict=True)]
        res = await self.runner.run(kind, steps)
        _require(ctx, res, steps)
        by_name = {f.name.lower(): f.id for f in fams}
        out: dict[str, str | None | tuple[str, str]] = {}
        for r, p in zip(rows, picks, strict=True):
            got: StepResult = res[r.key]
            self.model_of[r.key] = got.model
            if got.status != "done":
                out[r.key] = ("failed", got.error or "no answer")
            else:
                out[r.key] = resolve_answer(got.output.get("family"), [fams[j] for j in p], by_name)
        return out


def _require(ctx: OpContext, res: dict[str, StepResult], steps: list[Step]) -> None:
    """A step left unsettled means the run is stopping: go no further (what was answered is kept)."""
    if len(res) < len(steps) or ctx.stats.stop.is_set():
        raise Stop


def _write(ctx: OpContext, rows: list[OpRow], fams: list[Family], n_old: int, fam_of: dict[str, str | None],
           failed: dict[str, str], pool: list[OpRow], model_of: dict[str, str | None]) -> None:
    """Dissolve small new families, then commit every changed row, the families and the summary at once."""
    opt = ctx.spec.cluster
    final = {r.key: (r.output or {}).get("_family") for r in rows if r.status == "done"}
    final.update(fam_of)
    size: dict[str, int] = {}
    for k, f in final.items():
        if f and k not in failed:
            size[f] = size.get(f, 0) + 1
    new = fams[n_old:]
    dissolve = {f.id for f in new if size.get(f.id, 0) < opt.min_size}
    if opt.max_families is not None:
        keep = [f for f in new if f.id not in dissolve]
        room = max(0, opt.max_families - n_old)
        keep.sort(key=lambda f: (-size.get(f.id, 0), int(f.id[1:])))
        dissolve |= {f.id for f in keep[room:]}
    text_of = {r.key: r.text for r in rows}.get
    members: dict[str, list[str]] = {}
    results = []
    changed = set(fam_of) | set(failed) | {r.key for r in pool}
    for r in rows:
        if r.key not in changed:
            f = final.get(r.key)
            if f:
                members.setdefault(f, []).append(r.key)
            continue
        if r.key in failed:
            results.append(RowResult(r.key, "failed", error=failed[r.key]))
            continue
        f = final.get(r.key)
        if f in dissolve:
            f = None
        if f:
            members.setdefault(f, []).append(r.key)
        results.append(RowResult(r.key, "done", output={"_family": f}, model=model_of.get(r.key), source="model"))
    kept = [Family(f.id, f.name, f.description, len(members.get(f.id, [])), examples(members.get(f.id, []), text_of),
                   f.sources, f.run) for f in fams if f.id not in dissolve]
    ctx.summary.update(families_created=sum(1 for f in new if f.id not in dissolve), families_dissolved=len(dissolve))
    figures = _settle_summary(ctx, rows, kept, {r.key: r for r in results})
    ctx.write_rows(results, also=[*ctx.book.family_statements(kept),
                                  ctx.book.summary_statement(ctx.run_id, "cluster", figures)])


def _settle_summary(ctx: OpContext, rows: list[OpRow], fams: list[Family], written: dict[str, RowResult]) -> dict:
    """The cluster KPIs: assignment rate, families created (and in all), merges made, model calls per row."""
    s = ctx.summary
    n = assigned = 0
    for r in rows:
        if r.status == "skipped":
            continue
        n += 1
        res = written.get(r.key)
        out = res.output if res is not None else r.output
        if (res is None or res.status == "done") and (out or {}).get("_family"):
            assigned += 1
    s.update(rows=n, assigned=assigned, assignment_rate=assigned / n if n else 0.0, families=len(fams),
             requests=ctx.stats.requests)
    s.setdefault("families_created", 0)
    s.setdefault("merges", 0)
    s.setdefault("merge_pairs", 0)
    s["merge_success_rate"] = s["merges"] / s["merge_pairs"] if s["merge_pairs"] else None
    return {k: v for k, v in s.items() if not k.startswith("_")}
