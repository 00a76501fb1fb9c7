"""The simulator's log-probabilities and its calibrated models: wrong with a known probability tied to the
confidence it reports.

**Log-probabilities.** A request with ``logprobs: true`` gets ``choices[0].logprobs.content`` in OpenAI's
shape: the answer split into tokens (:func:`tokens`: runs of letters, up to three digits, whitespace,
punctuation), each with a ``logprob`` and ``top_logprobs``. Every token has probability 1 (logprob 0)
but the first token of each value of the answer (of a string, its first token inside the quotes), which
carries the value's probability: so the joint probability of a value's tokens, what
:mod:`llmap.quality.confidence` computes, is exactly the probability the simulator chose for it.

**Calibrated models.** With ``--accuracy A`` (every model) or ``--model-accuracy name=A,...`` (per model
name), a model answers each enum or boolean field of a row as follows (:func:`decide`): it draws its
confidence ``c`` uniformly from ``[lo, 1]`` and gives the *true* value with probability ``g(c) = c ** p``,
else another value of the enum (or the other boolean), and reports ``c`` as that value's probability.
``p`` is the calibration curve (``--calibration``): ``well`` (p = 1: right as often as it says),
``over`` (p = 2: over-confident) or ``under`` (p = 0.5). ``lo`` is chosen so that the expected accuracy
``E[c ** p]`` is ``A`` (:func:`floor`); an accuracy below ``1 / (p + 1)`` cannot be reached and gives
``lo = 0``. The expected calibration error is then :func:`true_ece`: ``E|c - c ** p|``.

The true answer of a row does not depend on the model: it is the answer seeded by the row's text alone
(:func:`truth`), so a test can compute it and every model is wrong against the same truth. Everything is
a function of the model name and the row's text: the same request gets the same answer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from llmap.sim.schema import compile_schema, mix, row_seed, salt, schema_key

__all__ = ["CURVES", "TRUTH_MODEL", "accuracy_for", "decide", "floor", "item_properties", "logprobs_payload", "perturb",
           "tokens", "true_ece", "truth", "truth_seed"]

#: ``--calibration`` names and their power ``p`` (the true accuracy at reported confidence c is c ** p).
CURVES = {"well": 1.0, "over": 2.0, "under": 0.5}
#: What the true answer is seeded by instead of the model's name.
TRUTH_MODEL = "truth"
_TOKEN = re.compile(r"[A-Za-z]+|\d{1,3}|\s+|[^\sA-Za-z\d]+")
_TWO64 = float(1 << 64)


@lru_cache(maxsize=64)
def floor(accuracy: float, power: float) -> float:
    """``lo`` such that ``E[c ** power] = accuracy`` for ``c`` uniform on ``[lo, 1]`` (bisection; 0 when the
    accuracy is below what ``lo = 0`` gives, ``1 / (power + 1)``)."""
    def mean(lo: float) -> float:
        return (1 - lo ** (power + 1)) / ((power + 1) * (1 - lo)) if lo < 1 else 1.0

    if accuracy <= mean(0.0):
        return 0.0
    a, b = 0.0, 1.0
    for _ in range(60):
        m = (a + b) / 2
        if mean(m) < accuracy:
            a = m
        else:
            b = m
    return (a + b) / 2


def true_ece(accuracy: float, power: float) -> float:
    """The expected calibration error of a calibrated model: ``E|c - c ** power|`` over ``c ~ U[lo, 1]``."""
    lo = floor(accuracy, power)
    n = 20_000
    return sum(abs(c - c ** power) for c in (lo + (1 - lo) * (i + 0.5) / n for i in range(n))) / n


def _unit(h: int) -> float:
    return mix(h) / _TWO64


def decide(model: str, text: str, field: str, accuracy: float, power: float) -> tuple[float, bool, int]:
    """One field's draw for one row: ``(confidence, right, pick)``; ``pick`` chooses the wrong value."""
    h = salt(f"{model}\0{text}\0{field}")
    lo = floor(accuracy, power)
    c = lo + (1 - lo) * _unit(h)
    c = min(max(c, 1e-6), 1.0)
    right = _unit(h ^ 0x5851F42D4C957F2D) < c ** power
    return c, right, mix(h ^ 0x2545F4914F6CDD1D)


def truth_seed(text: str) -> int:
    """The seed of a row's true answer: its text alone (see :func:`llmap.sim.schema.row_seed`)."""
    return row_seed(TRUTH_MODEL, text)


def truth(schema: Mapping[str, Any], text: str) -> dict[str, Any]:
    """The true answer of a row whose user message (or packed item text) is ``text``, for the answer schema
    ``schema`` (one row's, as :attr:`~llmap.prompt.schema.OutputSchema.json_schema`): what a calibrated
    model answers when it is right."""
    return compile_schema(schema_key(schema)).generate(truth_seed(text), 0)


def _choices(prop: Mapping[str, Any]) -> list[Any] | None:
    if isinstance(prop.get("enum"), list) and len(prop["enum"]) > 1:
        return list(prop["enum"])
    kind = prop.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if "boolean" in kinds:
        return [True, False]
    return None


def perturb(value: dict[str, Any], properties: Mapping[str, Any], model: str, text: str, accuracy: float,
            power: float) -> dict[str, float]:
    """Make ``value`` (the true answer, changed in place) the calibrated model's: each enum or boolean field is
    kept with probability ``c ** power`` or replaced by another choice. Returns field -> reported confidence."""
    confidences: dict[str, float] = {}
    for name, prop in properties.items():
        choices = _choices(prop) if isinstance(prop, Mapping) else None
        if choices is None or name not in value:
            continue
        c, right, pick = decide(model, text, name, accuracy, power)
        if not right:
            others = [x for x in choices if x != value[name]] or choices
            value[name] = others[pick % len(others)]
        confidences[name] = c
    return confidences


def tokens(content: str) -> list[str]:
    """The simulator's tokens of an answer (their texts concatenate to it)."""
    return _TOKEN.findall(content)


def logprobs_payload(content: str, confidences: Mapping[tuple[Any, ...], float], spans: Mapping[tuple, tuple],
                     seed: int, top: int) -> dict[str, Any]:
    """``choices[0].logprobs`` for ``content`` in OpenAI's shape.

    Args:
        content: the answer.
        confidences: value path (``("kind",)``, ``("items", 0, "kind")``) -> the probability to report.
        spans: every value path -> its character span (:func:`llmap.quality.confidence.json_spans`).
        seed: the request's seed: a value not in ``confidences`` gets a probability in [0.5, 1) from it.
        top: ``top_logprobs`` asked for (at most 20).
    """
    toks = tokens(content)
    starts, at = [], 0
    for t in toks:
        starts.append(at)
        at += len(t)
    lps = [0.0] * len(toks)
    for path, (a, b) in spans.items():
        if a < len(content) and content[a] in "{[":
            continue  # objects and arrays: their leaves carry the probabilities
        inner = (a + 1, b - 1) if content[a] == '"' else (a, b)
        p = confidences.get(path)
        if p is None:
            p = 0.5 + 0.5 * _unit(seed ^ salt(repr(path)))
        for i, s in enumerate(starts):
            end = s + len(toks[i])
            if (s < inner[1] and end > inner[0]) or (inner[0] == inner[1] and s <= inner[0] < end):
                lps[i] = math.log(max(p, 1e-12))
                break
    out = []
    for t, lp in zip(toks, lps, strict=True):
        alts = [{"token": t, "logprob": lp, "bytes": list(t.encode())}]
        if top > 1 and lp < 0:
            rest = math.log(max(1e-12, 1 - math.exp(lp)))
            alts.append({"token": "<other>", "logprob": rest, "bytes": list(b"<other>")})
        out.append({"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": alts[:max(1, top)]})
    return {"content": out, "refusal": None}


def item_properties(schema: Mapping[str, Any], pack_key: str | None) -> Mapping[str, Any]:
    """The properties of one row's answer in ``schema`` (a packed schema's item properties)."""
    if pack_key is None:
        return schema.get("properties") or {}
    items = schema.get("items") if pack_key == "" else (schema.get("properties") or {}).get(pack_key, {}).get("items")
    return (items or {}).get("properties") or {}


def accuracy_for(model: str, default: float | None, per_model: Sequence[tuple[str, float]]) -> float | None:
    """The accuracy a model name has: its ``--model-accuracy`` entry, else ``--accuracy``, else None (not
    calibrated: the ordinary deterministic simulator)."""
    for name, acc in per_model:
        if name == model:
            return acc
    return default
