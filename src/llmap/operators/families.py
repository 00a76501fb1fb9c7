"""Cluster's pure parts: windows of rows, proposals, merging proposals into families, candidates, sizes.

Nothing here sends a request: :mod:`llmap.operators.cluster` runs the steps and
hands the answers to these functions, which tests call with answers of their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from llmap.operators.neighbors import knn
from llmap.store.operators import Family

__all__ = ["Proposal", "UnionFind", "candidate_lines", "candidates", "examples", "family_vectors", "merge_components",
           "merge_pairs", "proposals_from", "resolve_answer", "row_tokens", "windows"]

#: Characters per token assumed when sizing windows (conservative for English text and JSON).
CHARS_PER_TOKEN = 3.5


def row_tokens(text: str) -> int:
    """Tokens one row takes in a window's JSON array (its text, its id and the JSON around it)."""
    return math.ceil((len(text) + 20) / CHARS_PER_TOKEN)


def windows(order: Sequence[int], texts: Sequence[str], budget_tokens: int) -> list[list[int]]:
    """Cut ``order`` (row indices) into consecutive windows of at most ``budget_tokens`` tokens each.

    A row longer than the budget alone still gets a window of its own (its text is cut when rendered).
    """
    out: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in order:
        t = row_tokens(texts[i])
        if cur and used + t > budget_tokens:
            out.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += t
    if cur:
        out.append(cur)
    return out


@dataclass
class Proposal:
    """A family one window's answer proposed.

    Attributes:
        pid: ``w<window>.<index>``.
        window: the window it came from.
        name, description: as the model wrote them.
        members: the row keys it named (those of its window, each once).
    """

    pid: str
    window: int
    name: str
    description: str
    members: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return f"{self.name}: {self.description}"


def proposals_from(window: int, answer: Mapping, ids: Mapping[str, str]) -> list[Proposal]:
    """The proposals of one window's answer; members mapped from the window's ids to row keys.

    Ids the window did not hold are ignored, a row named by two families stays with the first, and a family
    left with no member is dropped.
    """
    out: list[Proposal] = []
    taken: set[str] = set()
    for fam in answer.get("families") or []:
        members = []
        for m in fam.get("members") or []:
            key = ids.get(str(m).strip())
            if key is not None and key not in taken:
                taken.add(key)
                members.append(key)
        name = " ".join(str(fam.get("name") or "").split())
        if members and name:
            out.append(Proposal(f"w{window}.{len(out)}", window, name, " ".join(str(fam.get("description") or "")
                                                                                 .split()), members))
    return out


class UnionFind:
    """Disjoint sets over ``0..n-1`` (path halving, union by size)."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> bool:
        """Join the sets of ``a`` and ``b``; False when they were one already."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self.size[ra] < self.size[rb] or (self.size[ra] == self.size[rb] and rb < ra):
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        return True


def merge_pairs(vectors: np.ndarray, windows_of: Sequence[int], *, neighbors: int,
                min_similarity: float) -> list[tuple[int, int, float]]:
    """Candidate pairs to judge: each family's nearest families (by embedding) from *other* windows.

    Args:
        vectors: one unit vector per family (proposals, then earlier runs' families).
        windows_of: each family's window (-1 for an earlier run's family: never paired with another such).
        neighbors: nearest families per family.
        min_similarity: pairs below this cosine similarity are never judged.

    Returns:
        ``(i, j, similarity)`` with ``i < j``, each pair once, most similar first (ties by index).
    """
    if len(vectors) < 2:
        return []
    sims, idx = knn(vectors, min(len(vectors) - 1, neighbors + 8))
    found: dict[tuple[int, int], float] = {}
    for i in range(len(vectors)):
        taken = 0
        for s, j in zip(sims[i], idx[i], strict=True):
            if j < 0 or taken >= neighbors or s < min_similarity:
                break
            j = int(j)
            if windows_of[i] == windows_of[j]:  # one answer already told these apart (or both are old)
                continue
            taken += 1
            found[(min(i, j), max(i, j))] = float(s)
    return sorted(((i, j, s) for (i, j), s in found.items()), key=lambda p: (-p[2], p[0], p[1]))


def merge_components(n: int, old: Sequence[bool], verdicts: Sequence[tuple[int, int, bool]]) -> tuple[UnionFind, int]:
    """Join the families judged the same, in the order given (most similar first).

    Two families of earlier runs are never joined (through a proposal either): such a union is skipped.

    Returns:
        The sets, and how many unions were made (merges).
    """
    uf = UnionFind(n)
    has_old = [bool(o) for o in old]
    merges = 0
    for i, j, same in verdicts:
        if not same:
            continue
        ri, rj = uf.find(i), uf.find(j)
        if ri == rj or (has_old[ri] and has_old[rj]):
            continue
        uf.union(ri, rj)
        has_old[uf.find(ri)] = has_old[ri] or has_old[rj]
        merges += 1
    return uf, merges


def family_vectors(text_vectors: np.ndarray, member_vectors: Sequence[np.ndarray]) -> np.ndarray:
    """One unit vector per family: its text's embedding plus the mean of its members' (when it has some)."""
    out = np.array(text_vectors, dtype=np.float32, copy=True)
    for i, mv in enumerate(member_vectors):
        if len(mv):
            c = mv.mean(axis=0)
            c /= max(float(np.linalg.norm(c)), 1e-12)
            out[i] = out[i] + c
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def candidates(row_vectors: np.ndarray, fam_vectors: np.ndarray, k: int,
               first: Sequence[int | None]) -> list[list[int]]:
    """For each row, the families it is offered: the one its window proposed it for (if any), then the nearest
    by embedding, ``k`` in all."""
    if len(fam_vectors) == 0:
        return [[] for _ in range(len(row_vectors))]
    _, idx = knn(fam_vectors, min(k, len(fam_vectors)), queries=row_vectors)
    out = []
    for i in range(len(row_vectors)):
        picks = [first[i]] if first[i] is not None else []
        picks += [int(j) for j in idx[i] if j >= 0 and int(j) not in picks]
        out.append(picks[:k])
    return out


def candidate_lines(fams: Sequence[Family], picks: Sequence[int]) -> str:
    """The candidate families as the model reads them, one per line: ``- F3: name: description``."""
    return "\n".join(f"- {fams[j].id}: {fams[j].text}" for j in picks)


def resolve_answer(value: object, offered: Sequence[Family], by_name: Mapping[str, str]) -> str | None:
    """The family id an assignment answer names: an offered id, any family's id or exact name; else None."""
    if not isinstance(value, str) or not value.strip():
        return None
    v = value.strip()
    ids = {f.id for f in offered}
    if v in ids:
        return v
    return by_name.get(v.lower()) or (v if v in by_name.values() else None)


def examples(members: Sequence[str], text_of: Callable[[str], str | None], n: int = 5) -> tuple[str, ...]:
    """Up to ``n`` member rows' texts (in input order), for the families table."""
    out = []
    for k in members:
        t = text_of(k)
        if t:
            out.append(t if len(t) <= 200 else t[:199] + "…")
        if len(out) >= n:
            break
    return tuple(out)
