"""Shared helpers for the simulator tests: a small JSON-schema checker and HTTP calls."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest


def schema_errors(
    value: Any, schema: dict[str, Any], root: dict[str, Any] | None = None
) -> list[str]:
    """Hand-written check of the schema subset the simulator supports (no jsonschema dep)."""
    root = root if root is not None else schema
    if "$ref" in schema:
        node: Any = root
        for part in schema["$ref"][2:].split("/"):
            if part:
                node = node[part]
        return schema_errors(value, node, root)
    if "const" in schema:
        return [] if value == schema["const"] else [f"{value!r} != const"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{value!r} not in enum {schema['enum']}"]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            ok = any(not schema_errors(value, s, root) for s in schema[key])
            return [] if ok else [f"{value!r} matches no {key} variant"]
    kinds = schema.get("type")
    if kinds is None:
        return []
    kinds = kinds if isinstance(kinds, list) else [kinds]
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    matching = [k for k in kinds if checks[k](value)]
    if not matching:
        return [f"{value!r} is not of type {kinds}"]
    kind = matching[0]
    errors: list[str] = []
    if kind == "object":
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"missing required {name!r}")
        if schema.get("additionalProperties") is False:
            errors += [f"extra property {k!r}" for k in value if k not in props]
        for name, sub in props.items():
            if name in value:
                errors += [f"{name}: {e}" for e in schema_errors(value[name], sub, root)]
    elif kind == "array":
        if len(value) < schema.get("minItems", 0):
            errors.append("too few items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append("too many items")
        for i, item in enumerate(value):
            errors += [f"[{i}]: {e}" for e in schema_errors(item, schema.get("items", {}), root)]
    elif kind in ("integer", "number"):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{value} < minimum")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{value} > maximum")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errors.append(f"{value} <= exclusiveMinimum")
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            errors.append(f"{value} >= exclusiveMaximum")
    elif kind == "string":
        if len(value) < schema.get("minLength", 0):
            errors.append("string too short")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append("string too long")
    return errors


@pytest.fixture
def check_schema():
    """``check_schema(value, schema)`` -> list of errors (empty when valid)."""
    return schema_errors


def make_chat_body(
    content: str = "hello",
    *,
    model: str = "sim",
    schema: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """An OpenAI chat request body; ``schema`` adds a strict json_schema response format."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": schema, "strict": True},
        }
    body.update(extra)
    return body


class HttpResult:
    """Status, lower-cased headers and raw text of one HTTP answer."""

    def __init__(self, status: int, headers: dict[str, str], text: str) -> None:
        self.status, self.headers, self.text = status, headers, text

    def json(self) -> Any:
        return json.loads(self.text)


def http_call(
    url: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
    raw: bytes | None = None,
) -> HttpResult:
    """POST ``body`` as JSON (GET when ``body`` and ``raw`` are None); errors are results too."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, hdrs, text = resp.status, resp.headers, resp.read().decode()
    except urllib.error.HTTPError as exc:
        status, hdrs, text = exc.code, exc.headers, exc.read().decode()
    return HttpResult(status, {k.lower(): v for k, v in hdrs.items()}, text)


@pytest.fixture
def post_chat():
    """``post_chat(sim, body, **kw)`` -> :class:`HttpResult` of /chat/completions."""

    def post(sim: Any, body: Any, **kw: Any) -> HttpResult:
        return http_call(sim.base_url + "/chat/completions", body, **kw)

    return post


@pytest.fixture
def chat_body():
    """``chat_body(content, model=, schema=, **extra)`` -> request body dict."""
    return make_chat_body


@pytest.fixture
def http():
    """``http(url, body=None, headers=, timeout=, raw=)`` -> :class:`HttpResult`."""
    return http_call
