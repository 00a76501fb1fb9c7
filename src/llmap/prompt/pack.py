"""Row packing: several rows in one request, as pure functions.

``[prompt] pack = N`` sends N rows in one request. The rows go in as one JSON
array of ``{"id": ..., <column>: value, ...}`` objects (the columns are the
variables the user template reads) and the answer is an object
``{"items": [{"id": ..., <field>: value, ...}, ...]}``: OpenAI structured
outputs need an object at the top, so the array is wrapped.

Items are matched by ``id``, never by position. A pack's answer is split by
:func:`parse_pack` into valid answers and per-row problems (missing,
duplicate id, invalid). The rows with problems are retried by bisecting
(:func:`bisect`); ``pack = "auto"`` picks N from a prompt-size target and the
observed item failure rate (:class:`~llmap.control.packsize.AutoPackSize`).

Recovery loop (run by the parser/engine, not here)::

    outcome = parse_pack(content, ids, schema.validate)
    commit(outcome.answers)
    for half in bisect(list(outcome.problems)):
        send half as its own pack      # N/2 rows, then N/4, ... down to 1
        repeat on that half's problems

A pack of one row that still fails is an ordinary row failure: the usual
re-ask and retry rules apply to it, as to an unpacked row.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jinja2
from jinja2 import meta

from llmap.errors import AnswerInvalid

__all__ = [
    "PACK_INSTRUCTION",
    "PackOutcome",
    "bisect",
    "pack_messages",
    "pack_schema",
    "parse_pack",
]

#: Appended to the system prompt of every packed request.
PACK_INSTRUCTION = (
    'You will receive a JSON array of items. Each item has an "id" and the input '
    "fields of one task. Do the task for each item independently. Answer with one "
    'JSON object {"items": [...]} holding exactly one object per input item: copy the '
    'item\'s "id" exactly and add the answer fields. Do not skip, merge, repeat or '
    "invent items."
)

_NOT_PACKED = "answer is not a JSON object with an items array"
_PARSER = jinja2.Environment()


# --------------------------------------------------------------------------- schema


def pack_schema(item_schema: Mapping[str, Any]) -> dict[str, Any]:
    """Wrap the per-row answer schema into the schema of a packed answer.

    Args:
        item_schema: one row's JSON Schema: ``{"type": "object", "properties":
            {...}, "required": [...], "additionalProperties": false}`` (as
            :attr:`~llmap.prompt.schema.OutputSchema.json_schema`). Not modified.

    Returns:
        ``{"type": "object", "properties": {"items": {"type": "array",
        "items": <item>}}, "required": ["items"], "additionalProperties":
        false}`` where ``<item>`` is a copy of ``item_schema`` with a required
        ``"id"`` string property placed first.

    Raises:
        ValueError: ``item_schema`` is not an object schema, or already has
            an ``id`` property (an output field named ``id`` cannot be packed).
    """
    if item_schema.get("type") != "object":
        raise ValueError("pack_schema: the item schema must have type 'object'")
    props = dict(item_schema.get("properties") or {})
    if "id" in props:
        raise ValueError(
            "pack_schema: an output field is named 'id', which packing uses for the row id; "
            "rename the field or set pack = 1"
        )
    item = copy.deepcopy(dict(item_schema))
    item["properties"] = {"id": {"type": "string"}, **copy.deepcopy(props)}
    item["required"] = ["id", *(item_schema.get("required") or [])]
    item["additionalProperties"] = False
    return {
        "type": "object",
        "properties": {"items": {"type": "array", "items": item}},
        "required": ["items"],
        "additionalProperties": False,
    }


# --------------------------------------------------------------------------- messages


def _template_variables(source: str) -> tuple[str, ...]:
    """The names a Jinja2 template reads, sorted."""
    return tuple(sorted(meta.find_undeclared_variables(_PARSER.parse(source))))


def _plain(value: Any) -> Any:
    """A JSON-safe value: NaN/inf become ``None``; unknown types their ``str``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def _items_json(rows: Sequence[tuple[Any, Mapping[str, Any]]], names: Sequence[str]) -> str:
    items = [{"id": str(rid), **{n: _plain(row[n]) for n in names}} for rid, row in rows]
    return json.dumps(items, ensure_ascii=False, separators=(",", ":"))


def find_items(text: str) -> list[dict[str, Any]] | None:
    """The first JSON array of objects that all have an ``id`` key in ``text``, or None.

    This is how a packed request's items are found: they must be the first
    such array of its last user message (the in-repo simulator reads packs
    with this function too).
    """
    decoder = json.JSONDecoder()
    pos = text.find("[")
    while pos != -1:
        try:
            value, _ = decoder.raw_decode(text, pos)
        except ValueError:
            value = None
        if isinstance(value, list) and value and all(isinstance(v, dict) and "id" in v for v in value):
            return value
        pos = text.find("[", pos + 1)
    return None


def _user_content(task: str, items: str) -> str:
    head = "Task, for each item (the {{ name }} placeholders are the item's fields):\n"
    if find_items(task) is not None:
        # The task text itself holds an id-array: put the items first so that
        # they are the first id-array of the message.
        return f"Items (JSON array):\n{items}\n\n{head}{task}"
    return f"{head}{task}\n\nItems (JSON array):\n{items}"


def pack_messages(
    renderer: Any,
    rows: Sequence[tuple[str, Mapping[str, Any]]],
    user_template: str | None = None,
) -> list[dict[str, str]]:
    """The chat messages of one pack.

    The system message is the renderer's system template rendered with the
    *first* row, then :data:`PACK_INSTRUCTION`. A system prompt that varies
    per row is therefore wrong for every row but the first: do not pack such
    jobs. Few-shot examples become one user/assistant pair before the pack: a
    pack of the example inputs with ids ``"ex1"``, ``"ex2"``... and the answer
    ``{"items": [{"id": "ex1", ...output}, ...]}``. The last message is the
    user turn: the user template's source text (the task) then the rows as
    one compact JSON array ``[{"id": "<id>", <variable>: value, ...}, ...]``,
    which is the first array of id-objects in that message (the task text
    goes after the items when it holds such an array itself).

    Args:
        renderer: a :class:`~llmap.prompt.render.Renderer` (``system``,
            ``examples``).
        rows: ``(row id, row)`` pairs, in pack order; a row maps column name
            to value and must hold every variable of the user template. Ids
            are sent as strings; values that JSON cannot hold are sent as
            their ``str`` (NaN and infinity as ``null``).
        user_template: the user template's source text. ``None`` (or ``""``)
            takes ``renderer.user_source``.

    Returns:
        ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.

    Raises:
        ValueError: ``rows`` is empty, or ``user_template`` is ``None`` and
            the renderer has no ``user_source``.
        KeyError: a row (or an example input) lacks a variable of the user
            template.
        jinja2.UndefinedError: the first row lacks a system template variable.
    """
    if not rows:
        raise ValueError("pack_messages: a pack needs at least one row")
    if user_template is None:
        user_template = getattr(renderer, "user_source", None) or None
        if user_template is None:
            raise ValueError("pack_messages: pass user_template (the renderer has no user_source)")
    names = _template_variables(user_template)
    # The renderer's own max_chars truncation, so packed and unpacked rows read the same.
    cut = renderer.cut
    rows = [(rid, cut(row)) for rid, row in rows]
    system = PACK_INSTRUCTION
    if renderer.system is not None:
        system = f"{renderer.system.render(rows[0][1])}\n\n{PACK_INSTRUCTION}"
    out = [{"role": "system", "content": system}]
    if renderer.examples:
        ex_rows = [(f"ex{i}", ex_in) for i, (ex_in, _) in enumerate(renderer.examples, 1)]
        answer = {
            "items": [
                {"id": f"ex{i}", **ex_out} for i, (_, ex_out) in enumerate(renderer.examples, 1)
            ]
        }
        out.append(
            {"role": "user", "content": _user_content(user_template, _items_json(ex_rows, names))}
        )
        out.append({"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)})
    out.append({"role": "user", "content": _user_content(user_template, _items_json(rows, names))})
    return out


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class PackOutcome:
    """One pack's answer, split by row id.

    Attributes:
        answers: row id -> validated answer fields (no ``id``), for the rows
            whose item came back once and valid; in pack order.
        problems: row id -> reason, for every other row of the pack, in pack
            order: ``"missing"``, ``"duplicate id"``, ``"invalid: <detail>"``
            or ``"answer is not a JSON object with an items array: <detail>"``.
        unknown: ids the answer holds that are not in the pack (ignored), in
            order of first appearance.
    """

    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    unknown: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether every row of the pack has a valid answer."""
        return not self.problems


def _id_text(value: Any) -> str | None:
    """A returned id as a string: numbers (from weak models) are coerced; other types give None."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def parse_pack(
    content: str, ids: Sequence[str], validate: Callable[[str], dict[str, Any]]
) -> PackOutcome:
    """Split a packed answer into per-row answers and per-row problems.

    Items are matched by ``id`` (compared as strings), never by position. An
    id that appears twice is trusted in neither copy. Items that are not
    objects or carry no usable id are ignored (their rows come out missing).

    Args:
        content: the completion text, ``{"items": [{"id": ..., ...}, ...]}``.
        ids: the row ids of the pack, as sent (distinct strings).
        validate: validates one item's JSON text *without* its ``id`` and
            returns its fields, raising :class:`~llmap.errors.AnswerInvalid`
            (e.g. :meth:`~llmap.prompt.schema.OutputSchema.validate`).

    Returns:
        A :class:`PackOutcome`; every id of ``ids`` is in exactly one of
        ``answers`` and ``problems``.

    Raises:
        ValueError: ``ids`` holds a duplicate.
    """
    expected = [str(i) for i in ids]
    if len(set(expected)) != len(expected):
        raise ValueError("parse_pack: the pack's ids must be distinct")
    try:
        obj = json.loads(content)
    except ValueError as exc:
        snippet = content[:80].replace("\n", " ")
        return PackOutcome(problems=dict.fromkeys(expected, f"{_NOT_PACKED}: {exc} in {snippet!r}"))
    if not isinstance(obj, dict) or not isinstance(obj.get("items"), list):
        got = (
            f"an object without an items array (keys {sorted(obj)[:5]})"
            if isinstance(obj, dict)
            else f"a {type(obj).__name__}"
        )
        return PackOutcome(problems=dict.fromkeys(expected, f"{_NOT_PACKED}: got {got}"))

    wanted = set(expected)
    seen: dict[str, list[dict[str, Any]]] = {}
    unknown: dict[str, None] = {}
    for item in obj["items"]:
        rid = _id_text(item.get("id")) if isinstance(item, dict) else None
        if rid is None:
            continue
        if rid in wanted:
            seen.setdefault(rid, []).append(item)
        else:
            unknown[rid] = None

    answers: dict[str, dict[str, Any]] = {}
    problems: dict[str, str] = {}
    for rid in expected:
        copies = seen.get(rid, [])
        if not copies:
            problems[rid] = "missing"
            continue
        if len(copies) > 1:
            problems[rid] = "duplicate id"
            continue
        fields = {k: v for k, v in copies[0].items() if k != "id"}
        try:
            answers[rid] = validate(json.dumps(fields, ensure_ascii=False))
        except AnswerInvalid as exc:
            problems[rid] = f"invalid: {exc.detail}"
    return PackOutcome(answers, problems, tuple(unknown))


# --------------------------------------------------------------------------- bisect


def bisect(ids: Sequence[str]) -> list[list[str]]:
    """Split the failed rows of a pack into two packs for the retry.

    Each half is sent as its own pack; the half's problems are bisected again,
    down to packs of one row. A pack of one that still fails is an ordinary
    row failure (re-ask and retry rules apply).

    Args:
        ids: the row ids with problems, in pack order.

    Returns:
        Two halves in order, the first one the larger by at most one row;
        ``[[id]]`` for a single id; ``[]`` for none.
    """
    ids = list(ids)
    if len(ids) <= 1:
        return [ids] if ids else []
    half = (len(ids) + 1) // 2
    return [ids[:half], ids[half:]]
