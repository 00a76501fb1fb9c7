"""Batch policies, as pure objects: how big a batch may be, when the provider's queue has room, where a row goes next.

- :func:`chunk` cuts lines into batches under a request count and a byte size.
- :class:`SizeLimit` learns from a refusal for size: a batch of N lines
  refused is submitted again as two halves, and later batches stay at N/2.
- :class:`EnqueueGate` handles OpenAI's ``token_limit_exceeded`` (a per-model
  cap on the prompt tokens queued in unfinished batches): a refused batch
  waits until running batches have ended, and is split when none of ours
  runs, so it never loops.
- :func:`route` decides where a row goes after its batch request: settled,
  real time, the next batch, or failed.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MAX_BATCH_TRIES", "EnqueueGate", "Next", "SizeLimit", "chunk", "route"]

#: Batch requests a row may spend on transient failures with ``retry = "batch"`` before it fails (each may take
#: up to a day, so fewer than real time's ``max_attempts``).
MAX_BATCH_TRIES = 3


def chunk(sizes: Sequence[int], *, max_requests: int, max_bytes: int) -> list[int]:
    """How many of the lines (in order, of ``sizes`` bytes each) go into each batch.

    Each batch holds at most ``max_requests`` lines and ``max_bytes`` bytes; a
    line bigger than ``max_bytes`` goes alone (the provider decides).

    Returns:
        Line counts per batch, summing to ``len(sizes)``.
    """
    out: list[int] = []
    n = size = 0
    for s in sizes:
        if n and (n + 1 > max_requests or size + s > max_bytes):
            out.append(n)
            n = size = 0
        n += 1
        size += s
    if n:
        out.append(n)
    return out


class SizeLimit:
    """Requests and bytes per batch: the configured limits, lowered by what the provider refused.

    Args:
        max_requests, max_bytes: ``[batch] max_requests`` / ``max_bytes`` capped by the API's own ceilings.
    """

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests = max(1, max_requests)
        self.max_bytes = max(1, max_bytes)

    def refused(self, requests: int, size: int, *, why: str = "") -> bool:
        """A batch of ``requests`` lines and ``size`` bytes was refused for its size: later batches stay under
        half of it, in requests when ``why`` speaks of requests (not bytes), in bytes when it speaks of bytes
        or a file's size, in both when it says neither. Returns False when it cannot be split (one line):
        that request alone is too big."""
        if requests <= 1:
            return False
        text = why.lower()
        count = "request" in text or "line" in text
        volume = any(w in text for w in ("byte", " mb", "file is too large", "file size", "too large"))
        if count or not volume:
            self.max_requests = min(self.max_requests, requests // 2)
        if volume or not count:
            self.max_bytes = min(self.max_bytes, max(1, size // 2 + 1))
        return True


class Wait(enum.Enum):
    """What :meth:`EnqueueGate.refused` says to do with a batch refused for ``token_limit_exceeded``."""

    WAIT = "wait"  # resubmit once running batches have ended (the queue has room again)
    SPLIT = "split"  # none of ours runs: the batch alone is over the cap; submit it as two halves
    FAIL = "fail"  # one request alone is over the cap


class EnqueueGate:
    """OpenAI's enqueued-token limit, learned from refusals.

    The provider caps the prompt tokens queued in a model's unfinished
    batches. A batch refused with ``token_limit_exceeded`` while ours queue
    ``open`` tokens shows the cap is below ``open + tokens``: no batch goes
    until that many fit, i.e. until running batches end. Refused with none of
    ours running, the batch alone is too big: it is split. Each refusal lowers
    the bound or halves the batch, so a refusal never repeats the same way:
    no loop. (Other clients' batches on the same organization count too;
    llmap cannot see them, which is why a lone batch is split, not retried
    as it is.)
    """

    def __init__(self) -> None:
        #: an upper bound on the cap (the tokens queued when a batch was refused), or None while unknown
        self.bound: float | None = None

    def allows(self, open_tokens: float, tokens: float) -> bool:
        """Whether a batch of ``tokens`` prompt tokens may be submitted while ours queue ``open_tokens``."""
        return self.bound is None or open_tokens == 0 or open_tokens + tokens < self.bound

    def refused(self, open_tokens: float, tokens: float, requests: int) -> Wait:
        """A batch of ``tokens`` (``requests`` lines) was refused with ``token_limit_exceeded`` while ours
        queued ``open_tokens`` (not counting it)."""
        if open_tokens > 0:
            self.bound = min(self.bound or float("inf"), open_tokens + tokens)
            return Wait.WAIT
        if requests > 1:
            return Wait.SPLIT
        return Wait.FAIL


class Next(enum.Enum):
    """Where a row goes after its batch request (see :func:`route`)."""

    REALTIME = "realtime"  # the model's real-time path, under its limits
    BATCH = "batch"  # the next batch
    FAIL = "fail"  # settled as failed, with the error


@dataclass(frozen=True)
class Outcome:
    """What a row's batch request came to, as :func:`route` reads it.

    Attributes:
        kind: ``"reask"`` (the settle stage re-asks the answer: its re-asks are not spent),
            ``"invalid"`` (an item damaged in a pack: it goes again alone), ``"transient"``
            (a 5xx, 429, timeout or malformed answer), ``"terminal"`` (a 4xx:
            the request itself is wrong), ``"unfinished"`` (expired or
            cancelled before it ran).
        tries: batch requests this row has spent on transient failures, this one included.
        reasks: re-asks of invalid answers so far, this one included.
    """

    kind: str
    tries: int = 1
    reasks: int = 0


def route(outcome: Outcome, *, retry: str, max_reask: int, past_deadline: bool) -> Next:
    """Where a row goes whose batch request came to ``outcome``.

    - terminal (4xx): fail with the provider's message; retrying cannot help;
    - past the deadline: real time, whatever ``retry`` says (the time is up);
    - ``retry = "realtime"``: real time (re-asks included: the real-time path re-asks);
    - ``retry = "batch"``: the next batch, while re-asks (``max_reask``) and
      transient tries (:data:`MAX_BATCH_TRIES`) last (a ``reask`` has re-asks
      left: :mod:`llmap.run.settle` decided so); an unfinished request
      (expired, cancelled) always goes again: it never ran.

    Args:
        outcome: what the request came to.
        retry: ``[batch] retry``.
        max_reask: ``[output] max_reask``.
        past_deadline: the row's batch ran past ``[batch] deadline``.
    """
    if outcome.kind == "terminal":
        return Next.FAIL
    if past_deadline or retry == "realtime":
        return Next.REALTIME
    if outcome.kind == "reask":
        return Next.BATCH
    if outcome.kind == "invalid":
        return Next.BATCH if outcome.reasks <= max_reask else Next.FAIL
    if outcome.kind == "transient":
        return Next.BATCH if outcome.tries < MAX_BATCH_TRIES else Next.FAIL
    return Next.BATCH
