"""Configuration errors: one refusal repeating on every request, told apart from an outage.

A wrong model name, a structured-output dialect the server does not take, a
parameter the model refuses: every request fails the same way, and retrying,
circuit breaking or failing row after row only repeats it. An outage looks
different: its errors are transient (5xx, 429, timeouts) and it recovers.

:class:`MisconfigDetector` is the pure policy. Per model it watches
*terminal* errors (:class:`~llmap.errors.BadRequest`, not a row's own
:class:`~llmap.errors.ContextTooLong`); transient errors never count, so an
outage (say 10 × 503, then healthy) never trips it. A model is judged
misconfigured when

- its first ``first`` requests of the run (default 3) all failed with the same
  error class, status and message, before any answer came back; or
- later, ``streak`` requests in a row (default 20) failed that way with no
  answer in between.

Messages are compared with numbers and ids masked, so request ids
and counts in them do not hide a repeat. :func:`likely_fix` names the fix
from the server's words; :func:`verdict_message` makes the one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from llmap import errors as E

__all__ = ["MisconfigDetector", "likely_fix", "mask_numbers", "signature", "verdict_message"]

#: Ids (a word of 8+ characters with a digit in it) and numbers: masked before messages are compared.
_MASK = re.compile(r"\b(?=[\w-]*\d)[\w-]{8,}\b|\d+")


def mask_numbers(text: str) -> str:
    """``text`` with numbers and ids masked as ``#``: two messages that differ only there are the same."""
    return _MASK.sub("#", text)


def signature(exc: E.ProviderError) -> tuple[str, int | None, str] | None:
    """What makes two errors "the same": class, status and masked message; None for errors that do
    not count (transient errors, a row's context overflow, anything not terminal)."""
    if not isinstance(exc, E.BadRequest) or isinstance(exc, E.ContextTooLong):
        return None
    return type(exc).__name__, exc.status, mask_numbers(str(exc))


@dataclass
class _LaneState:
    answered: bool = False
    first: list[tuple] = field(default_factory=list)
    streak_sig: tuple | None = None
    streak: int = 0


class MisconfigDetector:
    """Per-model memory of terminal errors; says when one model fails every request the same way.

    Args:
        first: how many identical refusals before any answer make a configuration error (>= 1).
        streak: how many identical refusals in a row, after answers, make one (>= 1).

    Raises:
        ValueError: ``first`` or ``streak`` below 1.
    """

    def __init__(self, *, first: int = 3, streak: int = 20) -> None:
        if first < 1 or streak < 1:
            raise ValueError(f"first and streak must be >= 1, got {first}, {streak}")
        self.first = first
        self.streak = streak
        self._lanes: dict[int, _LaneState] = {}

    def _state(self, lane: int) -> _LaneState:
        return self._lanes.setdefault(lane, _LaneState())

    def success(self, lane: int) -> None:
        """Model ``lane`` answered a request (any 2xx answer, valid or not)."""
        st = self._state(lane)
        st.answered, st.streak_sig, st.streak = True, None, 0

    def failure(self, lane: int, exc: E.ProviderError) -> bool:
        """Model ``lane`` failed a request with ``exc``. Returns True when it is misconfigured."""
        sig = signature(exc)
        if sig is None:
            return False  # an outage or a row's own problem: not ours to judge
        st = self._state(lane)
        if sig == st.streak_sig:
            st.streak += 1
        else:
            st.streak_sig, st.streak = sig, 1
        if not st.answered and len(st.first) < self.first:
            st.first.append(sig)
        early = not st.answered and len(st.first) >= self.first and len(set(st.first)) == 1 and sig == st.first[0]
        return early or st.streak >= self.streak


def likely_fix(exc: E.ProviderError, *, structured: str = "auto") -> str:
    """The fix a repeated refusal most likely needs, from the server's words.

    Args:
        exc: the error.
        structured: the model's ``[model] structured`` mode.
    """
    text = str(exc).lower()
    if isinstance(exc, E.AnswerCut):
        return "raise [model] max_tokens: the answers do not fit in it"
    if exc.status == 404 or "model_not_found" in text or "does not exist" in text or "no such model" in text:
        return "check [model] name (and base_url): the server does not know this model"
    if "response_format" in text or "json_schema" in text or "json_object" in text:
        if structured != "auto":
            return (f"the server refuses structured = \"{structured}\"; set [model] structured = \"auto\" "
                    "(or the dialect it takes: json_schema, json_object or prompt)")
        return "set [model] structured = \"prompt\": the server takes no response_format"
    if any(w in text for w in ("max_tokens", "max_completion_tokens", "temperature", "unsupported parameter",
                               "unsupported value", "unrecognized request argument", "extra inputs")):
        return "check [model] params, temperature and max_tokens against what the model takes"
    if "api-version" in text or "api version" in text:
        return "check [model] query (api-version)"
    return "check the [model] table (name, base_url, params, structured) against what the server takes"


def verdict_message(label: str, exc: E.ProviderError, *, structured: str = "auto") -> str:
    """One line: which model, the server's words, the likely fix."""
    return (f"{label} refused every request the same way ({type(exc).__name__}: {exc}); "
            f"{likely_fix(exc, structured=structured)}")
