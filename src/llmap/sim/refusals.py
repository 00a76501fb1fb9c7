"""Requests the simulator refuses for their shape, with the bodies real servers answer them with.

- a ``response_format`` type the server does not take (``response_formats``): 400 as OpenAI answers it,
  or 500 with pydantic's validation error as ``python -m llama_cpp.server`` 0.3.36 does (``format_error``);
- OpenAI's reasoning models (``o1``, ``o3``, ``o4``, ``gpt-5``...): ``max_tokens`` (400
  ``unsupported_parameter``) and a ``temperature`` other than 1 (400 ``unsupported_value``);
- ``logprobs: true`` when ``refuse_logprobs`` is set: 400 ``unsupported_parameter``, as OpenAI answers a
  model without log-probabilities.

Each function returns the refusal as ``(status, message, type, code, param)``, or None to go on.
"""

from __future__ import annotations

from typing import Any

from llmap.sim.config import SimConfig

__all__ = ["REASONING_PREFIXES", "Refusal", "refuse_format", "refuse_params"]

#: Model names the simulator treats as OpenAI reasoning models (``max_completion_tokens``, temperature 1).
REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")

#: ``(status, message, error type, code, param)``.
Refusal = tuple[int, str, str, str | None, str | None]


def refuse_format(body: dict[str, Any], config: SimConfig) -> Refusal | None:
    """A ``response_format`` type ``config`` does not take, refused as ``config.format_error`` says."""
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    accepted = config.accepted_formats
    if kind in (None, "text") or kind in accepted:
        return None
    if config.format_error == "llama-cpp-python":
        # python -m llama_cpp.server 0.3.36: pydantic rejects the Literal, its error handler answers 500
        expected = " or ".join(repr(t) for t in ("text", *accepted))
        msg = (
            "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
            f"'msg': \"Input should be {expected}\", 'input': {kind!r}, "
            f"'ctx': {{'expected': \"{expected}\"}}}}\n\n"
            '  File "llama_cpp/server/app.py", line 376, in create_chat_completion\n'
            "    POST /v1/chat/completions"
        )
        return 500, msg, "internal_server_error", None, None
    msg = (
        f"Invalid parameter: 'response_format' of type {kind!r} is not supported with this model. "
        "Learn more about supported models at the Structured Outputs guide: "
        "https://platform.openai.com/docs/guides/structured-outputs"
    )
    return 400, msg, "invalid_request_error", None, "response_format"


def refuse_params(body: dict[str, Any], model: str, config: SimConfig) -> Refusal | None:
    """Parameters ``model`` refuses: a reasoning model's ``max_tokens`` and temperature, ``logprobs`` with
    ``config.refuse_logprobs``."""
    if config.refuse_logprobs and body.get("logprobs"):
        msg = "Unsupported parameter: 'logprobs' is not supported with this model."
        return 400, msg, "invalid_request_error", "unsupported_parameter", "logprobs"
    if not model.startswith(REASONING_PREFIXES):
        return None
    if "max_tokens" in body:
        msg = (
            "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead."
        )
        return 400, msg, "invalid_request_error", "unsupported_parameter", "max_tokens"
    temperature = body.get("temperature")
    if temperature is not None and temperature != 1:
        msg = (
            f"Unsupported value: 'temperature' does not support {temperature} with this model. "
            "Only the default (1) value is supported."
        )
        return 400, msg, "invalid_request_error", "unsupported_value", "temperature"
    return None
