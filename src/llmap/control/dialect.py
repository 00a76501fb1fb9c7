"""What a server takes: the structured-output dialect and the parameter spellings.

OpenAI-compatible servers disagree on how to ask for structured output:

- ``json_schema``: ``response_format: {type: json_schema, json_schema: {name,
  schema, strict}}`` (OpenAI, vLLM, llama.cpp's ``llama-server``);
- ``json_object``: ``response_format: {type: json_object, schema: S}``
  (llama-cpp-python's ``python -m llama_cpp.server``, Anyscale-style servers);
- ``prompt``: no ``response_format``; the schema goes into the system prompt
  and llmap's validation and re-ask do the rest (any chat server).

and OpenAI's reasoning models (o1, o3, o4, gpt-5...) refuse ``max_tokens``
(they take ``max_completion_tokens``) and any ``temperature`` but 1. Some
servers refuse ``logprobs`` (asked for per-row confidence,
:mod:`llmap.quality.confidence`): it is then dropped, and the answers of that
server have no ``_confidence``.

:class:`RequestShape` is the pure policy: it holds what to send now and what
to do when the server refuses it. ``structured = "auto"`` starts at
``json_schema`` and steps to the next dialect when a server refuses one; a
refused parameter is renamed or dropped. The step is immediate (no backoff),
applies to the row that was refused and every later request, and is never an
outage. :func:`dialect_refused` and :func:`refused_parameter` read a refusal
from the HTTP status and error body.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DIALECTS",
    "STRUCTURED_MODES",
    "RequestShape",
    "Sent",
    "dialect_refused",
    "error_text",
    "refused_parameter",
]

#: Structured-output dialects, in the order ``auto`` tries them.
DIALECTS = ("json_schema", "json_object", "prompt")
#: Values of ``[model] structured``.
STRUCTURED_MODES = ("auto", *DIALECTS)
#: Statuses a server answers a request it cannot parse with: 400, 422 (FastAPI), 500
#: (llama-cpp-python's server turns pydantic's validation error into a 500).
_REFUSAL_STATUSES = (400, 422, 500)


def error_text(body: Any) -> str:
    """The lower-cased words of an error body: message, param, code and type, or the raw text."""
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            parts = [inner.get(k) for k in ("message", "param", "code", "type", "detail")]
            return " ".join(str(p) for p in parts if p).lower()
        return str(inner).lower()
    return str(body or "").lower()


def dialect_refused(status: int, body: Any, sent: str) -> bool:
    """True when a 400/422/500 answer says the server does not take the ``response_format`` sent.

    Args:
        status: the HTTP status.
        body: the decoded error body (OpenAI style ``{"error": {...}}`` or any JSON).
        sent: the dialect the request used (``prompt`` sends no response_format:
            never refused).
    """
    if sent == "prompt" or status not in _REFUSAL_STATUSES:
        return False
    text = error_text(body)
    return "response_format" in text or sent in text


def refused_parameter(status: int, body: Any) -> str | None:
    """Which llmap default a 400 refuses: ``"max_tokens"``, ``"temperature"``, ``"logprobs"`` or None.

    Reads OpenAI's bodies for reasoning models::

        {"error": {"message": "Unsupported parameter: 'max_tokens' is not supported with this
          model. Use 'max_completion_tokens' instead.", "type": "invalid_request_error",
          "param": "max_tokens", "code": "unsupported_parameter"}}
        {"error": {"message": "Unsupported value: 'temperature' does not support 0 with this
          model. Only the default (1) value is supported.", "type": "invalid_request_error",
          "param": "temperature", "code": "unsupported_value"}}

    and gateways that keep the message but change ``code`` or drop ``param``
    (Azure, proxies). A refusal that names ``logprobs`` or ``top_logprobs`` (a
    model or server without log-probabilities) is ``"logprobs"``.
    """
    if status not in (400, 422):
        return None
    text = error_text(body)
    if "logprobs" in text:
        return "logprobs"
    if "max_completion_tokens" in text and "max_tokens" in text:
        return "max_tokens"
    if "temperature" in text and ("unsupported" in text or "not supported" in text
                                  or "only the default" in text):
        return "temperature"
    return None


@dataclass(frozen=True, slots=True)
class Sent:
    """The shape one request was sent with (a snapshot of :class:`RequestShape`)."""

    dialect: str
    token_param: str
    temperature: bool
    logprobs: bool = True


@dataclass
class RequestShape:
    """The request shape for one (base URL, model), and how it changes on refusals.

    Attributes:
        mode: ``[model] structured``: ``auto`` or a forced dialect.
        dialect: the dialect to send now.
        token_param: ``max_tokens`` or ``max_completion_tokens``.
        temperature: whether to send ``temperature``.
        logprobs: whether a request that wants log-probabilities may ask for them (False once the
            server refused them).
        settled: a request with the current shape was answered (or an earlier
            run's answer was remembered): requests need not wait for a probe.
            Until then one request at a time finds out what the server takes,
            so a refusal costs one request, not one per row in flight.
        learned: what changed in this run, in words (for the ledger, ``status`` and ``report``).
        user_params: the keys of ``[model] params``: a refusal of a value the
            user set is theirs to fix, never adapted away.
    """

    mode: str = "auto"
    dialect: str = "json_schema"
    token_param: str = "max_tokens"
    temperature: bool = True
    logprobs: bool = True
    settled: bool = False
    remembered: bool = False
    learned: list[str] = field(default_factory=list)
    user_params: frozenset[str] = frozenset()

    @classmethod
    def start(cls, mode: str, remembered: Mapping[str, Any] | None = None,
              user_params: frozenset[str] = frozenset()) -> RequestShape:
        """The shape a run starts with.

        Args:
            mode: ``auto`` or one of :data:`DIALECTS` (forced).
            remembered: what an earlier run learned for this base URL and model
                (:meth:`record`), or None. Its dialect is used in ``auto`` mode only.
            user_params: the keys of ``[model] params``.

        Raises:
            ValueError: an unknown mode.
        """
        if mode not in STRUCTURED_MODES:
            raise ValueError(f"structured must be one of {', '.join(STRUCTURED_MODES)}, got {mode!r}")
        shape = cls(mode=mode, dialect=DIALECTS[0] if mode == "auto" else mode, user_params=user_params)
        rec = dict(remembered or {})
        if mode != "auto" and remembered is not None:
            shape.settled = True  # this server answered this model before
        if mode == "auto" and rec.get("structured") in DIALECTS:
            shape.dialect, shape.settled, shape.remembered = rec["structured"], True, True
        if rec.get("token_param") == "max_completion_tokens" and "max_tokens" not in user_params:
            shape.token_param = "max_completion_tokens"
        if rec.get("temperature") is False and "temperature" not in user_params:
            shape.temperature = False
        if rec.get("logprobs") is False and "logprobs" not in user_params:
            shape.logprobs = False
        return shape

    def sent(self) -> Sent:
        """A snapshot to build one request from (and to pass back to :meth:`refused`)."""
        return Sent(self.dialect, self.token_param, self.temperature, self.logprobs)

    def accepted(self, sent: Sent) -> bool:
        """A request sent as ``sent`` got a 2xx answer. Returns True when this settles the shape."""
        if self.settled or sent != self.sent():
            return False
        self.settled = True
        return True

    def refused(self, sent: Sent, *, dialect: bool = False, param: str | None = None) -> str | None:
        """The server refused a request sent as ``sent``; decide whether to send it again at once.

        Args:
            sent: the snapshot the refused request was built from.
            dialect: the refusal names the ``response_format`` (:func:`dialect_refused`).
            param: the refused parameter (:func:`refused_parameter`), or None.

        Returns:
            None: do not resend; the error stands (a forced dialect, the last
            dialect, a parameter the user set). Otherwise the reason to resend:
            ``""`` when another request already changed the shape (resend
            quietly), else what changed, in words, once per change.
        """
        if dialect:
            if self.dialect != sent.dialect:
                return ""
            i = DIALECTS.index(sent.dialect)
            if self.mode != "auto" or i + 1 >= len(DIALECTS):
                return None
            self.dialect, self.settled, self.remembered = DIALECTS[i + 1], False, False
            note = f"the server refused structured output {sent.dialect}; using {self.dialect}"
        elif param == "max_tokens" and "max_tokens" not in self.user_params:
            if self.token_param != sent.token_param:
                return ""
            if self.token_param == "max_completion_tokens":
                return None
            self.token_param, self.settled = "max_completion_tokens", False
            note = "the model refuses max_tokens; sending max_completion_tokens"
        elif param == "temperature" and "temperature" not in self.user_params:
            if self.temperature != sent.temperature:
                return ""
            if not self.temperature:
                return None
            self.temperature, self.settled = False, False
            note = "the model refuses temperature; sending none (its default)"
        elif param == "logprobs" and "logprobs" not in self.user_params:
            if self.logprobs != sent.logprobs:
                return ""
            if not self.logprobs:
                return None
            self.logprobs, self.settled = False, False
            note = "the server refuses logprobs; its answers get no _confidence"
        else:
            return None
        self.learned.append(note)
        return note

    def record(self) -> dict[str, Any]:
        """What to remember for the next run (see :meth:`start`)."""
        rec: dict[str, Any] = {"token_param": self.token_param, "temperature": self.temperature,
                               "logprobs": self.logprobs}
        if self.mode == "auto":
            rec["structured"] = self.dialect
        return rec

    def describe(self) -> str:
        """The dialect and parameter spellings in words, e.g. ``json_object (json_schema refused)``."""
        how = []
        if self.mode == "auto":
            how.append("remembered" if self.remembered else "auto")
        else:
            how.append("forced")
        how += [n.split("; ")[0].replace("the server refused structured output ", "refused ")
                for n in self.learned if "structured output" in n]
        extra = []
        if self.token_param != "max_tokens":
            extra.append(self.token_param)
        if not self.temperature:
            extra.append("no temperature")
        if not self.logprobs:
            extra.append("no logprobs")
        text = f"{self.dialect} ({', '.join(how)})"
        return text + (f"; {', '.join(extra)}" if extra else "")
