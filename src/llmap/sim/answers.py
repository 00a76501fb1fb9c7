"""Deterministic answers for the simulator, and its token counts.

The simulator never thinks; it derives every answer from a 64-bit seed, so
the same request always gets the same answer and different requests usually
get different ones. A structured answer is seeded by the model and the row
(:func:`row_seed`: the last user message); plain-text answers by the whole
request (:func:`request_seed`). The values come from the compiled schema
(:mod:`llmap.sim.schema`).

*Packed* requests (several rows in one request): the items come from the
last user message, which holds a JSON array of objects with an ``id`` key;
the answer then holds exactly one item per id, carrying that id, in the same
order. Each item is seeded by the model and the item's values, so a row whose
user message is just its one column gets the same answer packed or not.

A *calibrated* model (``accuracy`` given, :mod:`llmap.sim.calibrated`) starts
from the row's true answer (seeded by its text alone) and gets each enum or
boolean field wrong with a probability tied to the confidence it reports. With labels
(:mod:`llmap.sim.labels`), a row they match has its labelled values as its true answer. With
``logprobs: true`` in the request, :meth:`Answer.logprobs` gives the answer's
token log-probabilities in OpenAI's shape.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmap.prompt.pack import find_items
from llmap.quality.confidence import json_spans
from llmap.sim.calibrated import TRUTH_MODEL, item_properties, logprobs_payload, perturb
from llmap.sim.labels import LabelTruth
from llmap.sim.schema import (
    SchemaPlan,
    canonical_json,
    compact_json,
    compile_schema,
    row_seed,
    schema_key,
    words,
)

__all__ = [
    "Answer",
    "completion_tokens",
    "extract_ids",
    "make_answer",
    "message_text",
    "prompt_schema",
    "prompt_tokens",
    "request_seed",
]


def message_text(content: Any) -> str:
    """The text of one message's ``content``: a string or a list of parts.

    Args:
        content: an OpenAI message content; a list holds ``{"type": "text",
            "text": ...}`` parts, other parts are ignored.

    Returns:
        The text, parts joined by newlines; ``""`` for anything else.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def prompt_tokens(messages: Sequence[Any]) -> int:
    """Estimated prompt tokens: ``ceil(chars / 4) + 4`` per message.

    Args:
        messages: OpenAI chat messages; non-dict entries count as empty.

    Returns:
        Tokens (the simulator's cheap stand-in for a tokenizer).
    """
    chars = 0
    for m in messages:
        if isinstance(m, dict):
            chars += len(message_text(m.get("content")))
    return math.ceil(chars / 4) + 4 * len(messages)


def completion_tokens(content: str) -> int:
    """Completion tokens of an answer: ``ceil(len(content) / 4)``."""
    return math.ceil(len(content) / 4)


def request_seed(body: Mapping[str, Any]) -> int:
    """The 64-bit seed of a request: sha256 of its canonical JSON.

    The canonical JSON is ``{"messages", "model", "response_format",
    "temperature"}`` with sorted keys and no spaces (absent keys are ``null``);
    other parameters (``max_tokens``, ``stream``...) do not change the answer.

    Args:
        body: the parsed request body.

    Returns:
        The first 8 bytes of the digest as an unsigned integer.
    """
    canonical = canonical_json(
        {
            "messages": body.get("messages"),
            "model": body.get("model"),
            "response_format": body.get("response_format"),
            "temperature": body.get("temperature"),
        }
    )
    return int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:8], "big")


#: The words after which a prompt carries the answer's JSON Schema (llmap's ``structured = "prompt"``
#: instruction and its re-ask both say them).
PROMPT_SCHEMA_MARKER = "JSON Schema:"


def prompt_schema(messages: Sequence[Any]) -> dict[str, Any] | None:
    """The JSON Schema a prompt asks the answer to match, or None.

    The simulated model "reads" the prompt: the last message that says
    ``JSON Schema:`` followed by a JSON object gives the schema. This is how a
    server without ``response_format`` (``structured = "prompt"``) still
    gets structured answers.
    """
    decoder = json.JSONDecoder()
    for m in reversed(messages):
        text = message_text(m.get("content")) if isinstance(m, dict) else ""
        at = text.rfind(PROMPT_SCHEMA_MARKER)
        if at < 0:
            continue
        try:
            value, _ = decoder.raw_decode(text[at + len(PROMPT_SCHEMA_MARKER):].lstrip())
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def last_user_text(messages: Sequence[Any]) -> str:
    """The text of the last user message ("" when there is none)."""
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return message_text(m.get("content"))
    return ""


def item_text(item: Mapping[str, Any]) -> str:
    """A packed item's values without its id, one per line (see :func:`row_seed`)."""
    return "\n".join(v if isinstance(v, str) else canonical_json(v) for k, v in item.items() if k != "id")


# --------------------------------------------------------------------------- packed ids


def extract_ids(messages: Sequence[Any]) -> list[Any] | None:
    """The row ids of a packed request, from its last user message.

    Args:
        messages: OpenAI chat messages.

    Returns:
        The ``id`` values of the first JSON array of objects (each with an
        ``id`` key) found in the last user message, in order; ``None`` when
        there is no such array.
    """
    items = extract_items(messages)
    return None if items is None else [v["id"] for v in items]


def extract_items(messages: Sequence[Any]) -> list[dict[str, Any]] | None:
    """The items of a packed request (see :func:`extract_ids`), or None."""
    return find_items(last_user_text(messages))


# --------------------------------------------------------------------------- answers


@dataclass(frozen=True, slots=True)
class Answer:
    """One simulated completion.

    Attributes:
        content: the message content (JSON text for structured requests).
        finish_reason: ``"stop"``, or ``"length"`` when plain text was cut
            at ``max_tokens``.
        confidences: value path (``("kind",)``, ``("items", 0, "kind")``) -> the probability a calibrated
            model reports for it; other values get one from the request's seed.
        seed: the request's seed.
    """

    content: str
    finish_reason: str = "stop"
    confidences: dict[tuple[Any, ...], float] = field(default_factory=dict)
    seed: int = 0

    def logprobs(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """``choices[0].logprobs`` when ``body`` asks for them (``logprobs: true``), else None."""
        if not body.get("logprobs"):
            return None
        try:
            spans = json_spans(self.content)
        except ValueError:  # plain text: one value, the whole answer
            spans = {}
        top = body.get("top_logprobs")
        return logprobs_payload(self.content, self.confidences, spans, self.seed,
                                min(20, top) if isinstance(top, int) and top > 0 else 0)


def _corrupt(item: dict[str, Any], rng: random.Random) -> None:
    """Give one field of ``item`` a value of the wrong type (``id`` last)."""
    keys = [k for k in item if k != "id"] or list(item)
    if not keys:
        item["id"] = ["corrupt"]
        return
    key = rng.choice(keys)
    value = item[key]
    if isinstance(value, bool) or value is None:
        item[key] = "maybe"
    elif isinstance(value, int | float):
        item[key] = "not a number"
    elif isinstance(value, str):
        item[key] = 12345
    else:
        item[key] = "oops"


def _packed_items(
    plan: SchemaPlan,
    model: Any,
    rows: list[dict[str, Any]],
    rng: random.Random | None,
    drop_item_rate: float,
    corrupt_item_rate: float,
    calibrated: tuple[Mapping[str, Any], float, float] | None = None,
    confidences: dict[tuple[Any, ...], float] | None = None,
    labels: LabelTruth | None = None,
    properties: Mapping[str, Any] | None = None,
) -> list[Any]:
    assert plan.item is not None
    items: list[Any] = []
    for row in rows:
        if rng is not None and drop_item_rate and rng.random() < drop_item_rate:
            continue
        text = item_text(row)
        item = _labelled(lambda seed: plan.item(seed, 1), text, labels, properties or {}, row)  # type: ignore[misc]
        if item is None:
            item = plan.item(row_seed(TRUTH_MODEL if calibrated else model, text), 1)
        if isinstance(item, dict):
            if calibrated is not None and confidences is not None:
                props, accuracy, power = calibrated
                for name, c in perturb(item, props, str(model), text, accuracy, power).items():
                    confidences[("items", len(items), name)] = c
            item["id"] = row["id"]
            if rng is not None and corrupt_item_rate and rng.random() < corrupt_item_rate:
                _corrupt(item, rng)
        items.append(item)
    return items


def _labelled(generate: Any, text: str, labels: LabelTruth | None, properties: Mapping[str, Any],
              item: Mapping[str, Any] | None = None) -> Any:
    """The row's true answer with its labelled values (:mod:`llmap.sim.labels`), or None when no label row
    matches ``text`` (or there are no labels)."""
    if labels is None:
        return None
    value = generate(row_seed(TRUTH_MODEL, text))
    if isinstance(value, dict) and labels.apply(value, properties, text, item):
        return value
    return None


def make_answer(
    body: Mapping[str, Any],
    *,
    rng: random.Random | None = None,
    drop_item_rate: float = 0.0,
    corrupt_item_rate: float = 0.0,
    accuracy: float | None = None,
    power: float = 1.0,
    labels: LabelTruth | None = None,
) -> Answer:
    """The deterministic answer to a chat completion request.

    Args:
        body: the parsed request body (``model``, ``messages``, optional
            ``response_format``, ``temperature``, ``max_tokens``).
        rng: the random source for item faults; ``None`` disables them.
        drop_item_rate: fraction of packed items left out (0..1).
        corrupt_item_rate: fraction of packed items given a wrong-typed value.
        accuracy: a calibrated model's expected accuracy (:mod:`llmap.sim.calibrated`); None: the
            ordinary deterministic answer.
        power: the calibrated model's curve (right with probability ``c ** power`` at confidence ``c``).
        labels: true answers from a labels file (:mod:`llmap.sim.labels`): a row they match has them as its
            true answer, which a model without ``accuracy`` gives as it is (the oracle mode).

    Returns:
        The :class:`Answer`. With a ``json_schema`` response format, a
        ``json_object`` one that carries a ``schema`` (llama-cpp-python's
        server), or no response format but a schema in the prompt
        (:func:`prompt_schema`), the content validates against the schema
        (unless item faults apply); with a bare ``json_object`` it is a small
        JSON object; otherwise plain text, cut to ``max_tokens * 4``
        characters when that is smaller.

    Raises:
        ValueError: the schema is missing, not an object, or has a ``$ref``
            that is not local or points nowhere.
    """
    seed = request_seed(body)
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    schema: Any = None
    if kind == "json_schema":
        spec = fmt.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise ValueError("response_format.json_schema.schema must be an object")
    elif kind == "json_object" and isinstance(fmt.get("schema"), Mapping):
        schema = fmt["schema"]  # llama-cpp-python's spelling: the schema beside the type
    elif kind is None:
        schema = prompt_schema(body.get("messages") or [])  # a model that follows the prompt's schema
    if schema is not None:
        plan = compile_schema(schema_key(schema))
        messages = body.get("messages") or []
        rows = extract_items(messages) if plan.pack_key is not None else None
        model = body.get("model")
        confidences: dict[tuple[Any, ...], float] = {}
        calibrated = None if accuracy is None else (item_properties(schema, plan.pack_key), accuracy, power)
        props = item_properties(schema, plan.pack_key)
        if rows is None:
            text = last_user_text(messages)
            value = _labelled(lambda seed: plan.generate(seed, 0), text, labels, props)
            if value is None:
                value = plan.generate(row_seed(model if calibrated is None else TRUTH_MODEL, text), 0)
            if calibrated is not None and isinstance(value, dict):
                got = perturb(value, calibrated[0], str(model), text, accuracy, power)
                confidences = {(n,): c for n, c in got.items()}
        else:
            items = _packed_items(plan, model, rows, rng, drop_item_rate, corrupt_item_rate, calibrated,
                                  confidences, labels, props)
            if plan.pack_key == "":
                value = items
                confidences = {k[1:]: c for k, c in confidences.items()}
            else:
                value = plan.generate(seed, 0)
                value[plan.pack_key] = items
                confidences = {(plan.pack_key, *k[1:]): c for k, c in confidences.items()}
        return Answer(compact_json(value), confidences=confidences, seed=seed)
    if kind == "json_object":
        return Answer(compact_json({"answer": words(seed, 3)}), seed=seed)
    text = f"Simulated answer {seed % 100_000}: {words(seed, 8)}."
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
    if isinstance(max_tokens, int) and 0 < max_tokens * 4 < len(text):
        return Answer(text[: max_tokens * 4], "length", seed=seed)
    return Answer(text, seed=seed)
