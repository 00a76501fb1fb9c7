"""Settle: what one request's outcome means for the rows it was for.

The one place that judges an answer (DESIGN.md's "Settle" stage). Real-time
dispatch (:mod:`llmap.run.dispatch`, :mod:`llmap.run.packer`), batch
collection (:mod:`llmap.run.batch.collect`) and, through the dispatcher, the
Ray workers and Ray Data's mappers all call it; none keeps a copy. Given the
outcome of a request (an answer, :class:`~llmap.providers.base.Completion`, or
an error, :class:`~llmap.errors.ProviderError`) and the items it was for (one
row, or a pack's items), it returns one decision per item:

============ ==================================================================
``Done``     the answer is valid and meets the checks: the row is settled with
             ``output`` and its ``confidence``
``Reask``    the same model again, with ``extra`` messages appended (an invalid
             answer, with the validation error; an answer that breaks an
             ``[output] checks`` rule, with its message; an answer cut at
             ``max_tokens``, once, with a note)
``Escalate`` a valid answer that meets the model's ``escalate_if``: the next
             model gets the row (a cascade)
``Retry``    a transient error: the same request again after ``delay_s``
``FailOver`` this model cannot answer the row: the next model gets it, or the
             row fails with ``error`` (refused, cut twice, re-asks spent, a check
             still broken, a 4xx, retries spent), keeping the last answer in ``raw``
``Split``    the item was damaged in a pack (missing, duplicated, invalid), or
             the pack was too long, cut or refused: smaller packs, then alone
``Stop``     an error every row would hit (auth, quota): the run stops and the
             rows stay pending
============ ==================================================================

It sends nothing, never sleeps, writes nothing and reads no clock: a test
feeds it a Completion or an error and checks the decision. The only things it
awaits are ``escalate_if`` and the checks, DuckDB SQL evaluated over the
answers that settle in one event-loop turn together
(:meth:`~llmap.control.cascade.EscalateIf.holds`, :mod:`llmap.quality.checks`).
The confidence of a done answer comes from its tokens' log-probabilities
(:mod:`llmap.quality.confidence`), per item in a pack.

Error texts a user reads are made here, once: :func:`refusal_error` and
:func:`cut_error` (the same cause gives the same error in real time and in a
batch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from llmap import errors as E
from llmap.control.cascade import EscalateIf
from llmap.control.retry import RetryDecision
from llmap.prompt.pack import parse_pack
from llmap.prompt.schema import OutputSchema, cut_message, reask_message
from llmap.providers.base import Completion
from llmap.quality.checks import Checks, check_error
from llmap.quality.confidence import Confidence

__all__ = [
    "Decision",
    "Done",
    "Escalate",
    "FailOver",
    "Reask",
    "Retry",
    "Settler",
    "Split",
    "Stop",
    "Target",
    "Tries",
    "cut_error",
    "refusal_error",
]


# -- decisions ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Done:
    """A valid answer: settle the row with ``output`` (field name -> value) and ``confidence`` (the
    probability of the values the model chose, :mod:`llmap.quality.confidence`; None when unknown)."""

    output: dict[str, Any]
    confidence: float | None = None


@dataclass(frozen=True, slots=True)
class Reask:
    """Ask the same model again with ``extra`` appended to the messages that were sent.

    Attributes:
        extra: the messages to append (the invalid answer and the re-ask, or the cut note).
        error: what was wrong, for the row's error if the re-ask never comes.
        outcome: ``"invalid"``, ``"check"`` or ``"max_tokens"`` (the attempt's outcome in the row's ``tried`` log).
        raw: the answer being re-asked.
    """

    extra: tuple[dict[str, str], ...]
    error: str
    outcome: str
    raw: str | None = None

    @property
    def cut(self) -> bool:
        """True when the answer was cut at ``max_tokens`` (re-asked once, with a note)."""
        return self.outcome == "max_tokens"


@dataclass(frozen=True, slots=True)
class Escalate:
    """A valid answer that meets this model's ``escalate_if``: the next model gets the row."""

    output: dict[str, Any]
    confidence: float | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    """A transient error: send the same request again after ``delay_s`` seconds."""

    delay_s: float
    error: str


@dataclass(frozen=True, slots=True)
class FailOver:
    """This model cannot answer the row: the next model gets it, or (on the last) the row fails.

    Attributes:
        error: the row's error, as the user reads it (``"Refusal: ..."``, ``"AnswerCut: ..."``,
            ``"AnswerInvalid: ... (after N re-asks)"``, ``"BadRequest: ..."``).
        outcome: the attempt's outcome in the row's ``tried`` log (``"refusal"``,
            ``"max_tokens"``, ``"invalid"``, ``"check"``), or None for an error (no answer came).
        raw: the model's last answer text, when one came.
    """

    error: str
    outcome: str | None = None
    raw: str | None = None


@dataclass(frozen=True, slots=True)
class Split:
    """The item came back damaged from a pack, or the pack itself failed for its size:
    send the item again in a smaller pack (then alone, on the ordinary per-row path)."""

    error: str


@dataclass(frozen=True, slots=True)
class Stop:
    """An error every row would hit: stop sending; the rows stay pending."""

    reason: str
    error: E.ProviderError


#: One item's decision.
Decision = Done | Reask | Escalate | Retry | FailOver | Split | Stop


@dataclass(slots=True)
class Tries:
    """What a row has been through on one model so far.

    Attributes:
        reasks: re-asks of invalid answers already sent (``[output] max_reask`` bounds them).
        cut: an answer was cut at ``max_tokens`` once (and re-asked with a note); a second cut fails.
    """

    reasks: int = 0
    cut: bool = False

    def after(self, decision: Reask) -> None:
        """Count ``decision`` (about to be sent)."""
        if decision.cut:
            self.cut = True
        else:
            self.reasks += 1


class _ModelView(Protocol):
    @property
    def max_tokens(self) -> int: ...


class Target(Protocol):
    """The model an answer came from, as settle reads it (a :class:`~llmap.control.lanes.Lane` is one)."""

    @property
    def index(self) -> int: ...

    @property
    def label(self) -> str: ...

    @property
    def model(self) -> _ModelView: ...


def refusal_error(label: str) -> str:
    """The row's error when ``label`` refused to answer (a ``refusal`` stop reason)."""
    return f"Refusal: {label} declined to answer (stop_reason refusal)"


def cut_error(max_tokens: int) -> str:
    """The row's error when its answer was cut at ``max_tokens`` twice (the second after a re-ask)."""
    return (f"AnswerCut: the answer was cut at max_tokens = {max_tokens}, also after a re-ask; "
            "raise [model] max_tokens")


def _row(row: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if row is None:
        raise ValueError("llmap internal error: the job has [output] checks but the row's input columns were not "
                         "passed to the settle stage")
    return row


def error_text(exc: BaseException) -> str:
    """An error as a row's ``_error`` reads it: ``"Class: message"``."""
    return f"{type(exc).__name__}: {exc}"


# -- the judge ----------------------------------------------------------------------------------
class Settler:
    """Judges request outcomes for one job.

    Args:
        schema: the output contract (validation, the re-ask's schema).
        max_reask: ``[output] max_reask``: re-asks after an invalid answer or a broken check, per model.
        escalate_if: per model (``[[model]]`` order), its bound ``escalate_if`` or None.
        models: how many models the job has (the last never escalates).
        checks: the bound ``[output] checks`` (:mod:`llmap.quality.checks`), or None.
        confidence: which fields ``_confidence`` covers (:mod:`llmap.quality.confidence`), or None for none.

    Attributes:
        logprobs: whether requests ask for log-probabilities (the job wants confidence).
    """

    def __init__(self, schema: OutputSchema, *, max_reask: int, escalate_if: Sequence[EscalateIf | None] = (),
                 models: int = 1, checks: Checks | None = None, confidence: Confidence | None = None) -> None:
        self.schema = schema
        self.max_reask = max_reask
        self.models = models
        self.escalate_if = list(escalate_if) + [None] * (models - len(escalate_if))
        self.checks = checks if checks else None
        self.confidence = confidence
        self.logprobs = confidence is not None and confidence.ask

    # -- checks -------------------------------------------------------------------------------
    async def accepts(self, output: Mapping[str, Any], row: Mapping[str, Any] | None) -> bool:
        """True when a stored answer (the response cache, an identical row's) meets every check for ``row``.

        Raises:
            ValueError: the row is missing while the job has checks (a caller that lost it), or a check
                cannot be evaluated on these values.
        """
        if self.checks is None:
            return True
        return await self.checks.first_failure(_row(row), output) is None

    def accepts_now(self, output: Mapping[str, Any], row: Mapping[str, Any] | None) -> bool:
        """:meth:`accepts` without awaiting (one query per check), for callers outside a coroutine."""
        if self.checks is None:
            return True
        return self.checks.failures([_row(row)], [output])[0] is None

    # -- escalate_if ------------------------------------------------------------------------
    async def escalates(self, index: int, output: Mapping[str, Any]) -> bool:
        """True when model ``index``'s ``escalate_if`` holds for ``output`` and a later model exists."""
        cond = self.escalate_if[index]
        return cond is not None and index + 1 < self.models and await cond.holds(output)

    def escalates_many(self, index: int, outputs: Sequence[Mapping[str, Any]]) -> list[bool]:
        """:meth:`escalates` for several answers of one model at once (a pack's), in one evaluation."""
        cond = self.escalate_if[index]
        if cond is None or index + 1 >= self.models or not outputs:
            return [False] * len(outputs)
        return cond.evaluate_many(outputs)

    # -- an answer ----------------------------------------------------------------------------
    async def answer(self, comp: Completion, target: Target, tries: Tries,
                     row: Mapping[str, Any] | None = None) -> Decision:
        """One row's answer: :class:`Done`, :class:`Escalate`, :class:`Reask` or :class:`FailOver`.

        Args:
            comp: the answer.
            target: the model it came from.
            tries: what the row has been through on that model (not changed here).
            row: the row's input columns (as the ledger keeps them); the checks read them.

        Raises:
            ValueError: the job has checks and ``row`` is None, or a check cannot be evaluated.
        """
        decision = self._judge(comp, target, tries)
        if not isinstance(decision, Done):
            return decision
        if self.checks is not None:
            broken = await self.checks.first_failure(_row(row), decision.output)
            if broken is not None:
                if tries.reasks < self.max_reask:
                    return Reask(({"role": "assistant", "content": comp.content},
                                  reask_message(broken.message, self.schema.json_schema)),
                                 f"CheckFailed: {broken.message} (check {broken.sql!r})", "check", comp.content)
                return FailOver(check_error(broken, tries.reasks), "check", comp.content)
        if self.confidence is not None:
            decision = Done(decision.output, self.confidence.row(comp.content, comp.logprobs))
        if await self.escalates(target.index, decision.output):
            return Escalate(decision.output, decision.confidence)
        return decision

    def _judge(self, comp: Completion, target: Target, tries: Tries) -> Decision:
        if comp.stop_reason == "refusal":
            return FailOver(refusal_error(target.label), "refusal", comp.content or None)
        max_tokens = target.model.max_tokens
        if comp.stop_reason == "max_tokens":
            if tries.cut:
                return FailOver(cut_error(max_tokens), "max_tokens", comp.content)
            return Reask((cut_message(max_tokens),), f"the answer was cut at max_tokens = {max_tokens}",
                         "max_tokens", comp.content)
        try:
            return Done(self.schema.validate(comp.content))
        except E.AnswerInvalid as exc:
            if tries.reasks < self.max_reask:
                return Reask(({"role": "assistant", "content": comp.content},
                              reask_message(exc.detail, self.schema.json_schema)),
                             f"AnswerInvalid: {exc.detail}", "invalid", comp.content)
            return FailOver(f"AnswerInvalid: {exc.detail} (after {tries.reasks} re-asks)", "invalid", comp.content)

    def pack(self, comp: Completion, target: Target, items: Sequence[str],
             rows: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Decision]:
        """A pack's answer: per item (in ``items`` order), :class:`Done`, :class:`Escalate` or :class:`Split`.

        Items are matched by id, never by position (:func:`~llmap.prompt.pack.parse_pack`). A pack cut at
        ``max_tokens`` or refused splits whole: smaller packs ask for shorter answers, and a refusal
        caused by one row's text stays with that row. An item that breaks a check splits too: alone, it is
        re-asked with the check's message. Each done item gets the confidence of its own fields' tokens.

        Args:
            comp: the answer.
            target: the model it came from.
            items: the pack's row ids.
            rows: row id -> the row's input columns (the checks read them).
        """
        if comp.stop_reason is not None:
            why = refusal_error(target.label) if comp.stop_reason == "refusal" else \
                f"the pack's answer was cut at max_tokens = {target.model.max_tokens * len(items)}"
            return {item: Split(why) for item in items}
        outcome = parse_pack(comp.content, list(items), self.schema.validate)
        answers = dict(outcome.answers)
        decided: dict[str, Decision] = {}
        if self.checks is not None and answers:
            keys = list(answers)
            broken = self.checks.failures([_row((rows or {}).get(k) if rows is not None else None) for k in keys],
                                          [answers[k] for k in keys])
            for k, b in zip(keys, broken, strict=True):
                if b is not None:
                    decided[k] = Split(f"CheckFailed: {b.message} (check {b.sql!r})")
                    del answers[k]
        conf = self.confidence.pack(comp.content, comp.logprobs, list(answers)) if self.confidence else {}
        outputs = list(answers.values())
        verdicts = self.escalates_many(target.index, outputs)
        for (item, output), up in zip(answers.items(), verdicts, strict=True):
            decided[item] = Escalate(output, conf.get(item)) if up else Done(output, conf.get(item))
        for item, why in outcome.problems.items():
            decided[item] = Split(f"AnswerInvalid: {why}")
        return {item: decided[item] for item in items}

    # -- an error -------------------------------------------------------------------------------
    @staticmethod
    def error(exc: E.ProviderError, retry: RetryDecision | None = None, *, pack: bool = False) -> Decision:
        """A failed request: :class:`Stop`, :class:`Split`, :class:`Retry` or :class:`FailOver`.

        Args:
            exc: what the request raised (mapped at the provider boundary).
            retry: the retry policy's verdict (:meth:`~llmap.control.retry.RetryPolicy.decide`); None
                where another policy decides when to retry (a batch: :func:`~llmap.control.batching.route`),
                and a transient error is then a :class:`Retry` with no delay.
            pack: the request carried a pack of rows.
        """
        if isinstance(exc, E.FatalProviderError) or (retry is not None and retry.stop_run):
            return Stop(str(exc), exc)
        if pack and isinstance(exc, E.ContextTooLong):  # the pack is too long: the same rows in smaller packs
            return Split(error_text(exc))
        if isinstance(exc, E.TransientError) and (retry is None or retry.retry):
            return Retry(retry.delay_s if retry is not None else 0.0, error_text(exc))
        return FailOver(error_text(exc))
