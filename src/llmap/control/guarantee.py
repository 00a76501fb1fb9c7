"""A guaranteed cascade's threshold, chosen from a random sample (the statistics, as pure functions).

The proxy (the first ``[[model]]``) answers every row with a score (``_confidence``). A seeded uniform
sample of the rows (:func:`draw_sample`) is answered by the oracle (the last ``[[model]]``). From the
sample, :func:`choose_threshold` picks the lowest score threshold ``t`` such that the run's final answers
(the proxy's on unsampled rows scoring at least ``t``, the oracle's on every other row) meet the target
with probability at least ``1 - delta``:

- ``agreement``: the share of rows whose final answer of ``field`` equals the oracle's;
- ``precision`` (a boolean field): of the rows whose final answer is true, the share the oracle says true;
- ``recall`` (a boolean field): of the rows the oracle says true, the share whose final answer is true.

**Method.** Exact finite-population (hypergeometric) confidence bounds, the Clopper–Pearson construction
applied to sampling without replacement (Clopper & Pearson 1934, Biometrika 26(4):404-413; for finite
populations Buonaccorsi 1987, The American Statistician 41(3):205-208, and Wright 1991, Exact Confidence
Bounds when Sampling from Small Finite Universes, Lecture Notes in Statistics 66), tested at candidate
thresholds in a fixed sequence from the highest down, stopping at the first failure: fixed-sequence
testing controls the family-wise error at ``delta`` with no Bonferroni correction (Bauer 1991, Multiple
testing in clinical trials, Statistics in Medicine 10(6):871-890; its use for choosing a threshold with a
risk guarantee: "Learn then Test", Angelopoulos, Bates, Candès, Jordan and Lei 2021, arXiv 2110.01052).

**What is assumed.** The sample is uniform over the rows and drawn independently of the answers (a
seeded hash of the row keys: the draw never looks at a score or an answer), after the proxy has answered
every row (so the candidate thresholds, the population's scores, are fixed before the draw). The oracle
is the reference: the promise is about agreement with the answer the oracle gives (or would give) on
each row. **What is not promised:** accuracy against the truth when the oracle itself is wrong; anything
about a field other than ``field``; the rate on a subset of the rows.

**Proof.** Fix the population: ``N`` rows, row ``i`` with a score ``s_i`` (or none: never kept), the
proxy's value ``p_i`` and the oracle's ``o_i`` (unknown off the sample). The only randomness is the
sample ``S``, a uniform ``n``-subset. For a threshold ``t`` let ``K_t = {i : s_i >= t}``.

1. *Final answers.* Row ``i`` ends with ``p_i`` if ``i`` is in ``K_t`` and not in ``S``, else ``o_i``. So
   every row not kept agrees with the oracle, and the disagreements are at most ``D_t = #{i in K_t :
   p_i != o_i}``: agreement >= ``1 - D_t / N``. (Precision: with ``A_t = #{i in K_t : p_i true}``,
   ``D_t`` those of them the oracle says false and ``P_t`` the rows outside ``K_t`` the oracle says true,
   the true positives are at least ``A_t - D_t + P_t`` and the false ones at most ``D_t``, so precision
   >= ``1 - D_t / (A_t + P_t)``. Recall: with ``D_t`` the rows of ``K_t`` the proxy says false and the
   oracle true, and ``Q_t`` every other row the oracle says true, recall >= ``Q_t / (Q_t + D_t)``.) Each
   bound is monotone: decreasing in ``D_t``, increasing in ``P_t`` or ``Q_t``.
2. *Conditional uniformity.* Given ``k = |S ∩ R|`` for a set ``R`` fixed by the population, ``S ∩ R`` is a
   uniform ``k``-subset of ``R``; so the count ``X`` of sampled rows of ``R`` with a property held by
   ``D`` rows of ``R`` is Hypergeometric(``|R|``, ``D``, ``k``).
3. *Exact bounds* (:func:`upper_count`, :func:`lower_count`). ``U(x) = max{D : F_D(x) > a}`` where
   ``F_D`` is that hypergeometric's CDF. ``F_D(x)`` does not increase with ``D``, so ``D > U(X)`` implies
   ``F_D(X) <= a``, which has probability at most ``a`` for any discrete ``X``. The lower bound is the
   mirror image. Known counts clip them (``D <= |R| - `` the sampled rows of ``R`` without the property):
   the event ``D > min(U, cap)`` is the event ``D > U``, since ``D > cap`` never happens.
4. *One test.* ``H_t``: the target is missed at ``t`` (agreement: ``D_t > floor((1 - target) N)``). It is
   rejected ("``t`` is safe") only when the bound of step 1 computed with ``U`` (and ``L`` for ``P_t`` or
   ``Q_t``) meets the target. If ``H_t`` is true, rejecting it needs ``D_t > U`` (or ``P_t < L``): by step 3
   and a union bound (``delta / 2`` each for precision and recall), probability at most ``delta``,
   conditionally on the sampled counts of step 2 and so unconditionally.
5. *Fixed sequence.* The candidate thresholds ``t_1 > t_2 > ...`` depend on the population only. Testing
   in order and stopping at the first ``H`` not rejected, a true ``H`` can be rejected only if the first
   true one, ``H_{j0}`` (fixed by the population), is rejected: the procedure reaches any later one only
   through it. So P(some true ``H`` rejected) <= P(``H_{j0}`` rejected) <= ``delta``. With probability at
   least ``1 - delta`` no rejected ``H`` is true; the chosen threshold is the lowest rejected one, so the
   final answers meet the target.

When the first (highest) candidate already fails, no threshold is safe: the caller escalates every row to
the oracle, or stops (``[cascade] on_miss``). It never keeps proxy answers without the bound.

**An incremental run** (:func:`reuse`): rows changed since the decision were not in its population, so
nothing of the sample speaks for them. The stored bounds stay valid for the rows that remain (a subset
has no more disagreements than the whole), and each changed row kept by the stored threshold is counted
as wrong: if the target still holds, the threshold is reused with the same probability; if not, the caller
draws a new sample.

This module is the seam for other operators (a semantic ``filter`` with a precision or recall promise):
give :func:`choose_threshold` the scores, the proxy's values and the sampled oracle values; it needs
nothing else of llmap.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "FAILED",
    "GUARANTEES",
    "MAX_CANDIDATES",
    "METHOD",
    "Choice",
    "Reuse",
    "choose_threshold",
    "draw_sample",
    "hypergeom_cdf",
    "lower_count",
    "reuse",
    "upper_count",
]

#: The promises a cascade can make.
GUARANTEES = ("agreement", "precision", "recall")
#: How the threshold is chosen, in words (reports and docs name it).
METHOD = "fixed-sequence test of exact hypergeometric (Clopper-Pearson) bounds"
#: Candidate thresholds tested at most (the population's scores, thinned evenly by rank beyond this).
MAX_CANDIDATES = 2000
#: An oracle answer that never came (the oracle failed on a sampled row): counted against the proxy.
FAILED = object()


# -- exact hypergeometric bounds ----------------------------------------------------------------
def _lcomb(a: int, b: int) -> float:
    return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)


def hypergeom_cdf(x: int, population: int, successes: int, draws: int) -> float:
    """``P(X <= x)`` for ``X`` ~ Hypergeometric: ``draws`` rows drawn without replacement from ``population``
    rows of which ``successes`` have the property (exact, in log space; O(``x``) terms)."""
    lo = max(0, draws - (population - successes))
    hi = min(draws, successes)
    if x < lo:
        return 0.0
    if x >= hi:
        return 1.0
    lp = _lcomb(successes, lo) + _lcomb(population - successes, draws - lo) - _lcomb(population, draws)
    if lp > -600:  # the first term does not underflow: the recurrence in plain floats
        p = total = math.exp(lp)
        for i in range(lo, x):  # pmf(i + 1) / pmf(i)
            p *= (successes - i) * (draws - i) / ((i + 1) * (population - successes - draws + i + 1))
            total += p
        return min(1.0, total)
    terms = [lp]
    for i in range(lo, x):
        lp += math.log((successes - i) * (draws - i)) - math.log((i + 1) * (population - successes - draws + i + 1))
        terms.append(lp)
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def upper_count(x: int, population: int, draws: int, alpha: float) -> int:
    """The exact one-sided ``1 - alpha`` upper confidence bound on how many of ``population`` rows have a
    property, when ``x`` of ``draws`` rows drawn uniformly without replacement have it: the largest count
    ``D`` (at most ``population - (draws - x)``, what the sample allows) with ``P(X <= x | D) > alpha``.

    Raises:
        ValueError: ``x`` outside ``[0, draws]`` or ``draws`` outside ``[0, population]``.
    """
    _check(x, population, draws)
    most = population - (draws - x)
    if draws == 0 or hypergeom_cdf(x, population, most, draws) > alpha:
        return most
    lo, hi = x, most  # F(x | lo) = 1 > alpha; F(x | hi) <= alpha
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if hypergeom_cdf(x, population, mid, draws) > alpha:
            lo = mid
        else:
            hi = mid
    return lo


def lower_count(y: int, population: int, draws: int, alpha: float) -> int:
    """The exact one-sided ``1 - alpha`` lower confidence bound (see :func:`upper_count`): the smallest count
    ``D`` (at least ``y``) with ``P(X >= y | D) > alpha``.

    Raises:
        ValueError: ``y`` outside ``[0, draws]`` or ``draws`` outside ``[0, population]``.
    """
    _check(y, population, draws)
    if y == 0 or draws == 0:
        return y
    most = population - (draws - y)
    if 1.0 - hypergeom_cdf(y - 1, population, y, draws) > alpha:
        return y
    lo, hi = y, most  # survival at lo <= alpha; at hi (every unsampled row has it) it is 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if 1.0 - hypergeom_cdf(y - 1, population, mid, draws) > alpha:
            hi = mid
        else:
            lo = mid
    return hi


def _check(x: int, population: int, draws: int) -> None:
    if not 0 <= draws <= population or not 0 <= x <= draws:
        raise ValueError(f"need 0 <= x <= draws <= population, got x={x}, draws={draws}, population={population}")


# -- the sample ----------------------------------------------------------------------------------
def _rank(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{key}".encode()).digest()


def draw_sample(keys: Sequence[str], n: int, seed: int) -> list[str]:
    """A seeded uniform random ``n``-subset of ``keys``: the ``n`` keys of smallest SHA-256 rank of
    ``(seed, key)``, in rank order.

    The draw sees nothing but the keys, so it is independent of every answer and score; the same keys and
    seed give the same sample, and a key keeps its rank in a larger population (a larger budget or input
    draws a superset wherever it can).
    """
    if n >= len(keys):
        return sorted(keys, key=lambda k: _rank(seed, k))
    return sorted(keys, key=lambda k: _rank(seed, k))[:n]


# -- the threshold -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    """What :func:`choose_threshold` decided.

    Attributes:
        met: a threshold meets the target (False: none does, even the highest score).
        threshold: the lowest safe score (rows scoring at least this keep the proxy's answer), or None
            when none is safe (every row goes to the oracle).
        guarantee, target, delta: the promise.
        bound: at the threshold, the ``1 - delta`` lower confidence bound of the promised rate (agreement,
            precision or recall) of the final answers; None without a threshold.
        upper: the matching upper bound (``[bound, upper]`` covers the rate with probability at least
            ``1 - 2 delta``); estimate: the plug-in estimate from the sample.
        population: rows the decision covers (``N``); sampled: rows in the sample (``n``).
        kept: rows keeping the proxy's answer (scoring at least the threshold, not sampled).
        escalated: rows the oracle answers beyond the sample (below the threshold, or no score).
        no_score: rows without a score (the proxy failed or gave no ``_confidence``).
        candidates: thresholds tested.
        first_failure: the first threshold that failed its test (where the sequence stopped), or None.
        counts: the figures the bound came from (``d_upper``: upper bound on the kept region's bad rows;
            ``region``: rows in that region; ``other_lower``: lower bound of ``P_t`` or ``Q_t``;
            ``kept_true``: ``A_t``), kept for :func:`reuse`.
        method: how it was chosen (:data:`METHOD`).
    """

    met: bool
    threshold: float | None
    guarantee: str
    target: float
    delta: float
    bound: float | None
    upper: float | None
    estimate: float | None
    population: int
    sampled: int
    kept: int
    escalated: int
    no_score: int
    candidates: int
    first_failure: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    method: str = METHOD

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (the ledger keeps it)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Choice:
        """The inverse of :meth:`as_dict` (unknown keys ignored)."""
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in doc.items() if k in names})


def _is_true(v: Any) -> bool:
    return v is True


def _candidates(scores: list[float]) -> list[float]:
    """The fixed sequence: the distinct scores, highest first; beyond :data:`MAX_CANDIDATES`, the scores at
    evenly spaced ranks (a function of the population alone, as the proof needs)."""
    ranked = sorted(scores, reverse=True)
    if len(ranked) > MAX_CANDIDATES:
        step = len(ranked) / MAX_CANDIDATES
        picks = [ranked[min(len(ranked) - 1, int((i + 1) * step) - 1)] for i in range(MAX_CANDIDATES)]
        ranked = picks
    out: list[float] = []
    for s in ranked:
        if not out or s < out[-1]:
            out.append(s)
    return out


class _Counts:
    """Running counts as the threshold goes down (the rows scoring at least it: the kept region ``K``)."""

    def __init__(self, n: int, sampled_true: int) -> None:
        self.k_rows = self.k_sampled = self.k_bad = 0  # |K|, sampled in K, sampled in K disagreeing
        self.a_rows = self.a_sampled = self.a_bad = 0  # K with proxy true; sampled; sampled and oracle not true
        self.r_sampled = self.r_bad = 0  # K with proxy not true: sampled; sampled and oracle true
        self.k_sampled_true = 0  # sampled in K with oracle true
        self.n = n
        self.sampled_true = sampled_true


def _region(g: str, c: _Counts, population: int) -> tuple[int, int, int, int, int, int]:
    """``(x, m, k, y, out_rows, out_k)``: the kept region's bad sampled rows, rows and sampled rows; and for
    precision and recall the other region's positive sampled rows, rows and sampled rows (step 1)."""
    if g == "agreement":
        return c.k_bad, c.k_rows, c.k_sampled, 0, 0, 0
    if g == "precision":  # the proxy's positives kept; the rows outside K go to the oracle
        return (c.a_bad, c.a_rows, c.a_sampled, c.sampled_true - c.k_sampled_true, population - c.k_rows,
                c.n - c.k_sampled)
    m, k = c.k_rows - c.a_rows, c.r_sampled  # recall: R = K with the proxy negative; every other row
    return c.r_bad, m, k, c.sampled_true - c.r_bad, population - m, c.n - k


def _passes(g: str, c: _Counts, population: int, target: float, delta: float) -> bool:
    """The test of step 4 at the kept region ``c``, with one CDF for the bad rows' bound: ``U <= most`` holds
    exactly when ``P(X <= x | most + 1) <= alpha`` (or ``most`` reaches what the sample allows)."""
    x, m, k, y, out_rows, out_k = _region(g, c, population)
    eps = 1 - target
    if g == "agreement":
        most, alpha = math.floor(eps * population + 1e-9), delta
    else:
        alpha = delta / 2
        lo = lower_count(y, out_rows, out_k, alpha)
        most = math.floor(eps * (m + lo) + 1e-9) if g == "precision" else math.floor(lo * eps / target + 1e-9)
    if most >= m - (k - x):
        return True
    return most >= x and hypergeom_cdf(x, m, most + 1, k) <= alpha


def _bounds(g: str, c: _Counts, population: int, alpha: float) -> tuple[float, float, float, dict[str, int]]:
    """``(bound, upper, estimate, counts)`` of the promised rate with the kept region ``c``."""
    x, m, k, y, out_rows, out_k = _region(g, c, population)
    half = alpha if g == "agreement" else alpha / 2
    ub = min(upper_count(x, m, k, half), m - (k - x))
    counts = {"d_upper": ub, "region": m, "region_sampled": k, "region_bad": x}
    d_est = x * m / k if k else 0.0
    lb_d = lower_count(x, m, k, half)
    if g == "agreement":
        return 1 - ub / population, 1 - lb_d / population, 1 - d_est / population, counts
    lo, hi = lower_count(y, out_rows, out_k, half), upper_count(y, out_rows, out_k, half)
    counts |= {"other_lower": lo, "other_rows": out_rows}
    o_est = y * out_rows / out_k if out_k else 0.0
    return _rate(g, ub, m, lo), _rate(g, lb_d, m, hi), _rate(g, d_est, m, o_est), counts


def _rate(g: str, bad: float, kept_true: float, other: float) -> float:
    """Precision ``1 - bad / (kept_true + other)`` or recall ``other / (other + bad)``, 1 when empty (step 1)."""
    if g == "precision":
        return 1 - bad / (kept_true + other) if kept_true + other else 1.0
    return other / (other + bad) if other + bad else 1.0


def choose_threshold(scores: Sequence[float | None], proxy: Sequence[Any], sample: Mapping[int, Any], *,
                     guarantee: str, target: float, delta: float) -> Choice:
    """The lowest safe threshold (see the module docstring for the method and its proof).

    Args:
        scores: per row of the population, the proxy's score (``_confidence``), or None (no score: the row
            is never kept; a row the proxy failed on has none).
        proxy: per row, the proxy's value of the promised field (precision and recall: ``True`` is
            positive, anything else negative).
        sample: row index -> the oracle's value of the field for each sampled row, or :data:`FAILED`
            when the oracle gave none (counted against the proxy).
        guarantee: one of :data:`GUARANTEES`.
        target: the promised rate, in (0, 1).
        delta: the failure probability, in (0, 1).

    Raises:
        ValueError: an unknown guarantee, a target or delta outside (0, 1), ``proxy`` and ``scores`` of
            different lengths, or a sampled index outside the population.
    """
    if guarantee not in GUARANTEES:
        raise ValueError(f"unknown guarantee {guarantee!r}; use one of {', '.join(GUARANTEES)}")
    if not (0 < target < 1 and 0 < delta < 1):
        raise ValueError(f"target and delta must be in (0, 1), got {target!r} and {delta!r}")
    population = len(scores)
    if len(proxy) != population:
        raise ValueError("scores and proxy values must cover the same rows")
    if any(not 0 <= i < population for i in sample):
        raise ValueError("a sampled row is outside the population")
    n = len(sample)
    sampled_true = sum(1 for v in sample.values() if _is_true(v))
    scored = [(s, i) for i, s in enumerate(scores) if s is not None and not math.isnan(s)]
    no_score = population - len(scored)
    scored.sort(key=lambda si: -si[0])
    candidates = _candidates([s for s, _ in scored])
    c = _Counts(n, sampled_true)
    best: tuple[float, _Counts] | None = None
    first_failure = None
    pos = 0
    tested = 0
    for t in candidates:
        while pos < len(scored) and scored[pos][0] >= t:
            _add(c, scored[pos][1], proxy, sample)
            pos += 1
        tested += 1
        if not _passes(guarantee, c, population, target, delta):
            first_failure = t
            break
        best = (t, copy.copy(c))
    if best is None:
        return Choice(False, None, guarantee, target, delta, None, None, None, population, n, 0,
                      population - n, no_score, tested, first_failure)
    t, at = best
    bound, upper, est, counts = _bounds(guarantee, at, population, delta)
    kept = at.k_rows - at.k_sampled
    counts["kept_true"] = at.a_rows
    return Choice(True, t, guarantee, target, delta, bound, upper, est, population, n, kept, population - n - kept,
                  no_score, tested, first_failure, counts)


def _add(c: _Counts, i: int, proxy: Sequence[Any], sample: Mapping[int, Any]) -> None:
    """Row ``i`` enters the kept region."""
    positive = _is_true(proxy[i])
    c.k_rows += 1
    c.a_rows += positive
    if i not in sample:
        return
    o = sample[i]
    failed = o is FAILED
    c.k_sampled += 1
    c.k_bad += failed or o != proxy[i]
    c.k_sampled_true += (not failed) and _is_true(o)
    if positive:
        c.a_sampled += 1
        c.a_bad += failed or not _is_true(o)
    else:
        c.r_sampled += 1
        c.r_bad += (not failed) and _is_true(o)


# -- an incremental run --------------------------------------------------------------------------
@dataclass(frozen=True)
class Reuse:
    """What :func:`reuse` found.

    Attributes:
        holds: the stored threshold still meets the target with the changed rows counted as wrong.
        bound: the promised rate's lower bound with them (the stored one's probability).
        changed_kept: changed rows the threshold keeps (each counted as wrong).
    """

    holds: bool
    bound: float
    changed_kept: int


def reuse(choice: Choice, *, population: int, gone_positive_room: int, changed_kept: int, changed_kept_true: int,
          kept_true_now: int) -> Reuse:
    """Whether a stored decision still holds for the rows of an incremental run (see the module docstring).

    Args:
        choice: the stored decision (a met one).
        population: rows the decision would cover now (the rows left of its population, plus the changed
            and new rows).
        gone_positive_room: rows of its population no longer in it (removed, or changed since) outside the
            kept region that might have been the oracle's positives (precision: ``P_t``; recall: ``Q_t``):
            each is taken off the stored lower bound.
        changed_kept: changed or new rows scoring at least the threshold.
        changed_kept_true: of those, the ones the proxy says true.
        kept_true_now: precision: rows now kept (or sampled) in the region ``A_t`` (proxy true, score at
            least the threshold).
    """
    counts = choice.counts
    ub = counts.get("d_upper", 0)
    if choice.guarantee == "agreement":
        bound = 1 - (ub + changed_kept) / population if population else 1.0
    else:
        room = max(0, counts.get("other_lower", 0) - gone_positive_room)
        bad = ub + (changed_kept_true if choice.guarantee == "precision" else changed_kept - changed_kept_true)
        bound = _rate(choice.guarantee, bad, kept_true_now, room)
    return Reuse(bound + 1e-12 >= choice.target, bound, changed_kept)
