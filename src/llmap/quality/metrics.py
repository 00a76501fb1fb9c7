"""Evaluation figures as pure functions: rates with 95% intervals, classification, numbers, strings,
calibration.

Every rate (accuracy, precision, recall, exact match, share within a tolerance) is a :class:`Rate`:
``k`` of ``n``, its value ``k / n`` and the Wilson score interval at 95% (:func:`wilson`). Samples are
small and the interval is the honest figure: 51 of 61 right is 0.836, [0.724, 0.908].

F1 is a harmonic mean of two rates, not a proportion: it has no binomial interval, and is given without
one. MAE (mean absolute error) has a normal-approximation interval (mean ± 1.96 standard errors).

Calibration: the rows are put in :data:`BINS` equal-width bins of reported confidence; each bin's mean
confidence is set against its accuracy (a reliability table), and the expected calibration error is
``ECE = sum over bins of (n_b / N) * |accuracy_b - confidence_b|``.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BINS",
    "Z95",
    "Calibration",
    "ClassFigures",
    "Classification",
    "NumberFigures",
    "Rate",
    "StringFigures",
    "calibration",
    "classification",
    "normalize_text",
    "numbers",
    "strings",
    "wilson",
]

#: The normal quantile of a two-sided 95% interval.
Z95 = 1.959963984540054
#: Bins of the reliability table.
BINS = 10


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``k`` successes in ``n`` trials (95% by default).

    Returns:
        ``(low, high)`` within [0, 1]; ``(0.0, 1.0)`` when ``n`` is 0 (nothing is known).

    Raises:
        ValueError: ``k`` is not within ``0..n``.
    """
    if not 0 <= k <= n:
        raise ValueError(f"wilson: k must be within 0..n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n``: a proportion with its 95% Wilson interval.

    Attributes:
        k: successes.
        n: the sample size.
        value: ``k / n``, or None when ``n`` is 0.
        low, high: the interval's ends (0 and 1 when ``n`` is 0).
    """

    k: int
    n: int

    @property
    def value(self) -> float | None:
        return self.k / self.n if self.n else None

    @property
    def low(self) -> float:
        return wilson(self.k, self.n)[0]

    @property
    def high(self) -> float:
        return wilson(self.k, self.n)[1]

    def as_dict(self, name: str) -> dict[str, Any]:
        """``{name: value, name_low, name_high, name_k, name_n}``: unrounded numbers for ``--json``."""
        return {name: self.value, f"{name}_low": self.low, f"{name}_high": self.high, f"{name}_k": self.k,
                f"{name}_n": self.n}

    def text(self) -> str:
        """``0.836 [0.724, 0.909] (51/61)``, or ``- (0/0)``."""
        if not self.n:
            return "- (0/0)"
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.k}/{self.n})"


# -- classification ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassFigures:
    """One class of an enum or boolean field.

    Attributes:
        label: the class.
        support: rows whose true value is this class.
        precision: of the rows answered this class, those right (``TP / (TP + FP)``).
        recall: of the rows truly this class, those answered so (``TP / (TP + FN)``).
        f1: the harmonic mean of precision and recall (no interval: not a proportion); None when undefined.
    """

    label: Any
    support: int
    precision: Rate
    recall: Rate
    f1: float | None


@dataclass(frozen=True)
class Classification:
    """An enum or boolean field against its labels.

    Attributes:
        accuracy: rows whose answer equals the label.
        classes: per class, in ``labels`` order.
        labels: the classes of the confusion matrix: the enum's values (or true, false) first, then any
            other value met in the answers or labels.
        matrix: ``matrix[i][j]``: rows whose label is ``labels[i]`` and answer ``labels[j]``.
        macro_f1: the mean F1 over classes with support (None when none).
    """

    accuracy: Rate
    classes: list[ClassFigures]
    labels: list[Any]
    matrix: list[list[int]]
    macro_f1: float | None


def classification(pairs: Sequence[tuple[Hashable, Hashable]], classes: Sequence[Any] = ()) -> Classification:
    """Accuracy, per-class precision, recall and F1, and the confusion matrix.

    Args:
        pairs: ``(label, answer)`` per row.
        classes: the field's classes in order (its enum; ``[True, False]`` for a boolean).
    """
    labels = list(classes)
    for t, a in pairs:
        for v in (t, a):
            if v not in labels:
                labels.append(v)
    index = {v: i for i, v in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for t, a in pairs:
        matrix[index[t]][index[a]] += 1
    right = sum(matrix[i][i] for i in range(len(labels)))
    figures = []
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        answered = sum(matrix[r][i] for r in range(len(labels)))
        support = sum(matrix[i])
        p, r = Rate(tp, answered), Rate(tp, support)
        f1 = None
        if p.value is not None and r.value is not None:
            f1 = 0.0 if p.value + r.value == 0 else 2 * p.value * r.value / (p.value + r.value)
        figures.append(ClassFigures(label, support, p, r, f1))
    f1s = [c.f1 for c in figures if c.support and c.f1 is not None]
    f1s += [0.0 for c in figures if c.support and c.f1 is None]
    return Classification(Rate(right, len(pairs)), figures, labels, matrix, sum(f1s) / len(f1s) if f1s else None)


# -- numbers ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NumberFigures:
    """An integer or number field against its labels.

    Attributes:
        exact: rows whose answer equals the label.
        mae: mean absolute error (None when no row).
        mae_low, mae_high: its 95% interval (mean ± 1.96 standard errors; None below 2 rows).
        tolerance: the tolerance given, or None.
        within: rows with ``|answer - label| <= tolerance`` (None without a tolerance).
        n: rows compared.
    """

    exact: Rate
    mae: float | None
    mae_low: float | None
    mae_high: float | None
    tolerance: float | None
    within: Rate | None
    n: int


def numbers(pairs: Sequence[tuple[float, float]], tolerance: float | None = None) -> NumberFigures:
    """Exact match, MAE with its interval, and the share within ``tolerance``, of ``(label, answer)`` pairs."""
    errors = [abs(float(a) - float(t)) for t, a in pairs]
    n = len(errors)
    exact = Rate(sum(1 for e in errors if e == 0), n)
    mae = sum(errors) / n if n else None
    low = high = None
    if n >= 2 and mae is not None:
        sd = math.sqrt(sum((e - mae) ** 2 for e in errors) / (n - 1))
        half = Z95 * sd / math.sqrt(n)
        low, high = max(0.0, mae - half), mae + half
    within = Rate(sum(1 for e in errors if e <= tolerance), n) if tolerance is not None else None
    return NumberFigures(exact, mae, low, high, tolerance, within, n)


# -- strings ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StringFigures:
    """A free-text field against its labels.

    Attributes:
        exact: rows whose answer equals the label, character for character.
        normalized: rows equal after :func:`normalize_text` on both sides.
    """

    exact: Rate
    normalized: Rate


_PUNCT_EDGES = re.compile(r"^[\W_]+|[\W_]+$", re.UNICODE)


def normalize_text(text: str) -> str:
    """A string as ``normalized`` match compares it: Unicode NFKC, case folded, runs of whitespace made one
    space, punctuation at either end removed (``"  Casper, WY. "`` and ``"casper, wy"`` are equal)."""
    t = unicodedata.normalize("NFKC", text).casefold()
    t = " ".join(t.split())
    return _PUNCT_EDGES.sub("", t)


def strings(pairs: Sequence[tuple[str, str]]) -> StringFigures:
    """Exact and normalized match of ``(label, answer)`` pairs."""
    n = len(pairs)
    exact = sum(1 for t, a in pairs if t == a)
    norm = sum(1 for t, a in pairs if normalize_text(str(t)) == normalize_text(str(a)))
    return StringFigures(Rate(exact, n), Rate(norm, n))


# -- calibration --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationBin:
    """One bin of the reliability table: confidences in ``[low, high)`` (the last bin includes 1)."""

    low: float
    high: float
    n: int
    confidence: float | None
    accuracy: Rate


@dataclass(frozen=True)
class Calibration:
    """Reported confidence against being right.

    Attributes:
        n: rows with a confidence and a verdict.
        ece: the expected calibration error (None when no row).
        bins: the reliability table (:data:`BINS` equal-width bins).
        mean_right, mean_wrong: mean confidence of the rows right and of the rows wrong.
        right, wrong: how many of each.
    """

    n: int
    ece: float | None
    bins: list[CalibrationBin] = field(default_factory=list)
    mean_right: float | None = None
    mean_wrong: float | None = None
    right: int = 0
    wrong: int = 0


def calibration(pairs: Sequence[tuple[float, bool]], bins: int = BINS) -> Calibration:
    """The reliability table and ECE of ``(confidence, right)`` pairs (confidence in [0, 1])."""
    members: list[list[tuple[float, bool]]] = [[] for _ in range(bins)]
    for c, ok in pairs:
        members[min(bins - 1, max(0, int(c * bins)))].append((c, ok))
    table, ece, n = [], 0.0, len(pairs)
    for i, m in enumerate(members):
        conf = sum(c for c, _ in m) / len(m) if m else None
        acc = Rate(sum(1 for _, ok in m if ok), len(m))
        table.append(CalibrationBin(i / bins, (i + 1) / bins, len(m), conf, acc))
        if m and conf is not None and acc.value is not None:
            ece += len(m) / n * abs(acc.value - conf)
    right = [c for c, ok in pairs if ok]
    wrong = [c for c, ok in pairs if not ok]
    return Calibration(n, ece if n else None, table, sum(right) / len(right) if right else None,
                       sum(wrong) / len(wrong) if wrong else None, len(right), len(wrong))
