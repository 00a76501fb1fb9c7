"""The simulator's hidden groups: operator steps answered from the truth, with errors; and ``/v1/embeddings``.

With ``--groups FILE`` (a CSV or JSONL file with columns ``text``, ``group`` and
optionally ``name``), every text in it belongs to a hidden true group, so tests
and benchmarks know the right answer. Requests whose answer schema carries one
of llmap's operator titles are answered from the truth, each item wrong with
probability ``--group-error-rate`` (drawn from a hash of the item, so the same
request always gets the same answer):

- ``llmap_cluster_propose``: the rows of a window (a JSON array of ``{id, text}``)
  become one family per true group with at least 2 rows in the window, named after
  the group; a wrong row goes to another family of the window, or none.
- ``llmap_cluster_merge`` and ``llmap_resolve_judge``: ``same`` is true when both
  texts (``A: ...`` and ``B: ...``; a family's text starts with its name) belong to
  the same group; a wrong answer flips it.
- ``llmap_cluster_assign``: the candidate family (``- F12: name: description``) of
  the row's group, else null; a wrong answer picks another candidate, or null.

``POST /v1/embeddings`` embeds texts so that same-group texts lie near each
other: a text of group g gets ``unit(c_g + embed_noise * n_text)``, with ``c_g``
and ``n_text`` random unit vectors of ``embed_dim`` dimensions seeded by the group and
the text. A text outside the file gets a random unit vector (a family's text maps
to the group its name names). ``GET /stats/groups`` counts embedding requests and
texts, operator answers, and chat request bodies answered more than once.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from llmap.prompt.pack import find_items
from llmap.sim.answers import Answer, last_user_text, prompt_schema
from llmap.sim.schema import canonical_json, compact_json

__all__ = ["GroupBook", "GroupsMixin"]

_CANDIDATE = re.compile(r"^- (\S+?): (.*)$", re.MULTILINE)
_TITLES = ("llmap_cluster_propose", "llmap_cluster_merge", "llmap_cluster_assign", "llmap_resolve_judge")


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(canonical_json(list(parts)).encode()).digest()[:8], "big")


class GroupBook:
    """The hidden truth: text -> group, and each group's name.

    Args:
        path: a ``.csv`` or ``.jsonl`` file with ``text`` and ``group`` (and optionally ``name``).

    Raises:
        ValueError: the file lacks a column, or is neither CSV nor JSONL.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix.lower() == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            raise ValueError(f"groups file {str(path)!r} must be .csv or .jsonl")
        self.group: dict[str, str] = {}
        self.names: dict[str, str] = {}
        for r in rows:
            if "text" not in r or "group" not in r:
                raise ValueError(f"groups file {str(path)!r} needs columns text and group")
            g = str(r["group"])
            self.group[str(r["text"])] = g
            self.names.setdefault(g, str(r.get("name") or g))
        self.by_name = {n: g for g, n in self.names.items()}

    def group_of(self, text: str) -> str | None:
        """The group of a row's text, or of a family's text (``name: description``), or None."""
        text = text.strip()
        g = self.group.get(text)
        if g is not None:
            return g
        name = text.split(": ", 1)[0].strip()
        return self.by_name.get(name)


class GroupsMixin:
    """Adds hidden groups and ``/v1/embeddings`` to the simulator (see the module docstring)."""

    def _groups(self) -> GroupBook | None:
        path = self._config.groups
        if path is None:
            return None
        book = getattr(self, "_group_book", None)
        if book is None or getattr(self, "_group_path", None) != path:
            self._group_book, self._group_path = GroupBook(path), path
            self._group_counts = Counter()
        return self._group_book

    def _counts(self) -> Counter:
        if not hasattr(self, "_group_counts"):
            self._group_counts = Counter()
        return self._group_counts

    def add_group_routes(self, app: web.Application) -> None:
        """Register ``POST /v1/embeddings`` and ``GET /stats/groups``."""
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/stats/groups", self.group_stats)

    async def group_stats(self, request: web.Request) -> web.Response:
        """``GET /stats/groups``: embedding requests and texts, operator answers by kind, repeated chat bodies."""
        c = self._counts()
        bodies = getattr(self, "_bodies", Counter())
        data = {k: v for k, v in c.items()}
        data["bodies"] = len(bodies)
        data["bodies_repeated"] = sum(1 for n in bodies.values() if n > 1)
        return web.Response(text=json.dumps(data), content_type="application/json")

    # -- chat answers -----------------------------------------------------------------------------
    def group_answer(self, body: Mapping[str, Any]) -> Answer | None:
        """The answer to an operator step when the simulator knows the groups, else None (the usual answer)."""
        if not hasattr(self, "_bodies"):
            self._bodies = Counter()
        digest = _seed(body.get("model"), body.get("messages"), body.get("response_format"))
        self._bodies[digest] += 1
        book = self._groups()
        if book is None:
            return None
        schema = _schema(body)
        if not isinstance(schema, Mapping):
            return None
        item = ((schema.get("properties") or {}).get("items") or {}).get("items")
        title = schema.get("title") or (item.get("title") if isinstance(item, Mapping) else None)
        if title not in _TITLES:
            return None
        self._counts()[title] += 1
        messages = body.get("messages") or []
        text = last_user_text(messages)
        err = self._config.group_error_rate
        model = body.get("model")
        if title == "llmap_cluster_propose":
            return Answer(compact_json(_propose(book, text, err, model)))
        packed = item is not None and title != schema.get("title")
        items = _items(text) if packed else [_single(title, text)]
        answers = []
        for it in items:
            rng = random.Random(_seed(title, model, {k: v for k, v in it.items() if k != "id"}))
            if title == "llmap_cluster_assign":
                value = {"family": _assign(book, it, err, rng)}
            else:
                ga, gb = book.group_of(str(it.get("a", ""))), book.group_of(str(it.get("b", "")))
                same = ga is not None and ga == gb
                value = {"same": (not same) if rng.random() < err else same}
            answers.append({"id": it["id"], **value} if packed else value)
        return Answer(compact_json({"items": answers} if packed else answers[0]))

    # -- embeddings -------------------------------------------------------------------------------
    async def embeddings(self, request: web.Request) -> web.Response:
        """``POST /v1/embeddings``: ``{"model", "input": text or [texts]}`` -> OpenAI's list of embeddings."""
        try:
            body = json.loads(await request.read())
            texts = body["input"]
            texts = [texts] if isinstance(texts, str) else list(texts)
            if not all(isinstance(t, str) for t in texts):
                raise TypeError("input must be a string or a list of strings")
        except (ValueError, KeyError, TypeError) as exc:
            err = {"error": {"message": f"bad embeddings request: {exc}", "type": "invalid_request_error"}}
            return web.Response(status=400, text=json.dumps(err), content_type="application/json")
        if not self._authorized(request):
            return self._unauthorized()
        c = self._counts()
        c["embedding_requests"] += 1
        c["embedded_texts"] += len(texts)
        book = self._groups()
        cfg = self._config
        data = []
        for i, t in enumerate(texts):
            g = book.group_of(t) if book is not None else None
            data.append({"object": "embedding", "index": i, "embedding": _vector(g, t, cfg.embed_dim, cfg.embed_noise)})
        tokens = sum(len(t) // 4 + 1 for t in texts)
        doc = {"object": "list", "data": data, "model": body.get("model"),
               "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return web.Response(text=json.dumps(doc), content_type="application/json")


def _schema(body: Mapping[str, Any]) -> Any:
    fmt = body.get("response_format")
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
        return (fmt.get("json_schema") or {}).get("schema")
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_object":
        return fmt.get("schema")
    return prompt_schema(body.get("messages") or [])


def _items(text: str) -> list[dict[str, Any]]:
    return find_items(text) or []


def _single(title: str, text: str) -> dict[str, Any]:
    """One unpacked step's fields, read from the user message llmap renders for it."""
    if title == "llmap_cluster_assign":
        row = text.split("\n", 1)[0].removeprefix("Row: ")
        return {"id": "", "text": row, "candidates": text}
    fields = {}
    for line in text.splitlines():
        for k in ("a", "b"):
            for prefix in (f"{k.upper()}: ", f"Family {k.upper()}: "):
                if line.startswith(prefix):
                    fields[k] = line[len(prefix):]
    return {"id": "", **fields}


def _assign(book: GroupBook, item: Mapping[str, Any], err: float, rng: random.Random) -> str | None:
    cands = _CANDIDATE.findall(str(item.get("candidates") or ""))
    g = book.group_of(str(item.get("text", "")))
    right = next((cid for cid, rest in cands if g is not None and book.group_of(rest) == g), None)
    if rng.random() < err:
        wrong = [cid for cid, _ in cands if cid != right]
        return rng.choice(wrong + [None]) if (wrong or right is not None) else None
    return right


def _propose(book: GroupBook, text: str, err: float, model: Any) -> dict[str, Any]:
    rows = _items(text)
    groups = {str(r["id"]): (book.group_of(str(r.get("text", ""))), str(r.get("text", ""))) for r in rows}
    present = sorted({g for g, _ in groups.values() if g is not None})
    members: dict[str, list[str]] = {}
    for rid, (g, row_text) in groups.items():
        rng = random.Random(_seed("propose", model, row_text))
        if rng.random() < err:
            others = [x for x in present if x != g]
            g = rng.choice(others + [None]) if others else None
        if g is not None:
            members.setdefault(g, []).append(rid)
    fams = [{"name": book.names[g], "description": f"rows about {book.names[g]}", "members": ids}
            for g, ids in members.items() if len(ids) >= 2]
    return {"families": fams}


def _vector(group: str | None, text: str, dim: int, noise: float) -> list[float]:
    rnd = random.Random(_seed("noise", text))
    n = [rnd.gauss(0.0, 1.0) for _ in range(dim)]
    if group is None:
        v = n
    else:
        crnd = random.Random(_seed("center", group))
        c = [crnd.gauss(0.0, 1.0) for _ in range(dim)]
        cn = sum(x * x for x in c) ** 0.5
        nn = sum(x * x for x in n) ** 0.5
        v = [ci / cn + noise * ni / nn for ci, ni in zip(c, n, strict=True)]
    norm = sum(x * x for x in v) ** 0.5 or 1.0
    return [round(x / norm, 6) for x in v]
