"""``[model] params``: the request-body keys llmap owns, and the ones that change answers.

``params`` are passed through to an OpenAI-compatible or Anthropic request
body as they are (see :class:`~llmap.spec.ModelSpec`). A few keys are llmap's
own and may not be set there (:data:`RESERVED_PARAMS`, and for Anthropic
:data:`ANTHROPIC_RESERVED_PARAMS`; see :func:`reserved_params`). Params that can change an answer
(``reasoning_effort``, ``seed``, ``top_p``...) are part of the response cache
key and of the rows' input hash; request metadata and routing hints
(:data:`NEUTRAL_PARAMS`) are not, so setting ``user`` re-asks nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["ANTHROPIC_RESERVED_PARAMS", "NEUTRAL_PARAMS", "RESERVED_PARAMS", "answer_params", "reserved_params"]

#: Request-body keys ``[model] params`` may not set, and what sets them instead.
RESERVED_PARAMS: dict[str, str] = {
    "model": "use [model] name",
    "messages": "use [prompt]",
    "response_format": "use [model] structured",
    "stream": "llmap reads whole answers",
    "n": "llmap reads one answer per request",
}

#: Request-body keys ``[model] params`` may not set for ``provider = "anthropic"`` (Messages API).
ANTHROPIC_RESERVED_PARAMS: dict[str, str] = {
    "model": "use [model] name",
    "messages": "use [prompt]",
    "system": "use [prompt] system",
    "tools": "use [model] structured",
    "tool_choice": "use [model] structured",
    "stream": "llmap reads whole answers",
}


def reserved_params(provider: str) -> dict[str, str]:
    """The request-body keys llmap owns for ``provider``, each with what sets it instead."""
    return ANTHROPIC_RESERVED_PARAMS if provider == "anthropic" else RESERVED_PARAMS


#: ``[model] params`` keys that do not change the answer: request metadata, billing and routing hints.
NEUTRAL_PARAMS = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key",
                            "safety_identifier", "stream_options", "parallel_tool_calls"})


def answer_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``[model] params`` that may change an answer (all but :data:`NEUTRAL_PARAMS`)."""
    return {k: v for k, v in params.items() if k not in NEUTRAL_PARAMS}
