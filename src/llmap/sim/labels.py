"""The simulator's oracle mode: true answers read from a labels file (``--labels FILE --labels-match COLUMN``).

A labels file is what ``llmap label`` reads: a CSV or JSONL file with one column per labelled output field,
named as the field, and other columns. The simulator needs to know which row a request is about: the
``--labels-match`` column holds a text that appears in the row's prompt (a district's name, a message's
text). For each request (or each item of a pack), the label row whose match text is the user message or
one of the item's values, else the longest one found inside the user message (or item), gives the true
answer of its labelled fields.

With labels, a row's true answer (:func:`llmap.sim.calibrated.truth`) takes the labelled values: a model
without an accuracy answers them as they are (the *oracle* mode: it is the labels), and a calibrated model
(``--accuracy``, ``--model-accuracy``) is right or wrong against them with a probability tied to the
confidence it reports. A request no label row matches is answered as without labels; a labelled value that
is not one of its field's enum, or not of its type, is left out (the field is generated as usual).

So a real first model (the embedded one, or any server) can be tested against true labels, with the
simulator as the strong model it is measured against.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["LabelTruth", "labels_of", "load_labels"]

_TRUE = {"true", "yes", "y", "1", "t"}
_FALSE = {"false", "no", "n", "0", "f"}


class LabelTruth:
    """Label rows by their match text (see the module docstring).

    Args:
        rows: ``(match text, column -> value)`` per label row.

    Attributes:
        matched, unmatched: requests (or items) answered from a label row, and not.
    """

    def __init__(self, rows: list[tuple[str, dict[str, Any]]]) -> None:
        self._exact = {m: values for m, values in rows if m}
        self._by_length = sorted(((m, v) for m, v in rows if m), key=lambda mv: -len(mv[0]))
        self.matched = 0
        self.unmatched = 0

    def __len__(self) -> int:
        return len(self._exact)

    @lru_cache(maxsize=65536)  # noqa: B019 - one object per file for the simulator's life
    def _find(self, text: str) -> dict[str, Any] | None:
        hit = self._exact.get(text.strip())
        if hit is not None:
            return hit
        for m, values in self._by_length:
            if m in text:
                return values
        return None

    def lookup(self, text: str, values: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The labelled values of the row whose prompt is ``text`` (a packed item: also its ``values``), or None."""
        hit = None
        for v in (values or {}).values():
            if isinstance(v, str) and (hit := self._exact.get(v.strip())) is not None:
                break
        if hit is None:
            hit = self._find(text)
        if hit is None:
            self.unmatched += 1
        else:
            self.matched += 1
        return hit

    def apply(self, value: dict[str, Any], properties: Mapping[str, Any], text: str,
              item: Mapping[str, Any] | None = None) -> bool:
        """Put the labelled values of ``text``'s row into ``value`` (an answer of ``properties``), in place.

        Returns:
            True when a label row matched.
        """
        hit = self.lookup(text, item)
        if hit is None:
            return False
        for name, prop in properties.items():
            if name in hit and isinstance(prop, Mapping):
                ok, v = _typed(hit[name], prop)
                if ok:
                    value[name] = v
        return True


def _typed(raw: Any, prop: Mapping[str, Any]) -> tuple[bool, Any]:
    """``raw`` (a CSV cell's text or a JSON value) as the schema property's type, and whether it fits."""
    if raw is None or raw == "":
        return False, None
    kinds = prop.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    v: Any = raw
    if isinstance(raw, str):
        low = raw.strip().lower()
        if low == "null" and "null" in kinds:
            return True, None
        if "boolean" in kinds and low in _TRUE | _FALSE:
            v = low in _TRUE
        elif "integer" in kinds:
            try:
                v = int(float(raw))
            except ValueError:
                return False, None
        elif "number" in kinds:
            try:
                v = float(raw)
            except ValueError:
                return False, None
    enum = prop.get("enum")
    if isinstance(enum, list):
        for e in enum:
            if e == v or (isinstance(e, str) and isinstance(v, str) and e.lower() == v.strip().lower()):
                return True, e
        return False, None
    return True, v


@lru_cache(maxsize=8)
def load_labels(path: str, match: str) -> LabelTruth:
    """Read a labels file once (CSV, or JSONL by its ``.jsonl``/``.ndjson`` suffix).

    Raises:
        ValueError: the file cannot be read, or has no column ``match``.
    """
    p = Path(path)
    try:
        if p.suffix.lower() in (".jsonl", ".ndjson"):
            records = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            with open(p, newline="", encoding="utf-8-sig") as f:
                records = list(csv.DictReader(f))
    except (OSError, ValueError) as exc:
        raise ValueError(f"labels: cannot read {path!r}: {exc}") from None
    if records and match not in records[0]:
        raise ValueError(f"labels: {path!r} has no column {match!r} (--labels-match); its columns: "
                         f"{', '.join(records[0])}")
    return LabelTruth([(str(r.get(match) or "").strip(), {k: v for k, v in r.items() if k != match})
                       for r in records if isinstance(r, dict)])


def labels_of(config: Any) -> LabelTruth | None:
    """The labels a :class:`~llmap.sim.config.SimConfig` names (``labels``, ``labels_match``), or None."""
    path = getattr(config, "labels", "")
    return load_labels(path, config.labels_match) if path else None
