"""Token estimates used to reserve TPM budget before a request is sent.

A request's cost against a tokens-per-minute budget is its prompt tokens plus
its completion tokens, and neither is known until the answer comes back. The
dispatcher reserves ``PromptTokenEstimator.estimate(prompt) +
OutputTokenEstimator.estimate()`` and settles the difference with the real
``usage`` afterwards (:meth:`llmap.control.limits.RateLimiter.settle`).

No tokenizer is downloaded: prompts are estimated from their length in
characters, and the ratio is corrected from the usage the server reports.

With a provider's prompt cache, part of a prompt may not count against the
input-token limit at all (Anthropic does not count cache reads):
:class:`CountedShare` learns what share of the prompt tokens counted, so the
reservation is the part that will.
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["CountedShare", "OutputTokenEstimator", "PromptTokenEstimator"]


class OutputTokenEstimator:
    """Estimate completion tokens from recent answers.

    The estimate is a high quantile (default the 90th percentile, nearest
    rank) of the completion tokens of the last ``window`` answers, so that most
    reservations are refunds rather than debts. Until an answer has been
    observed it is ``default`` — by default ``min(max_tokens, 256)``: 256
    tokens is a typical structured answer, and ``max_tokens`` is a hard upper
    bound on any answer. Every estimate is capped at ``max_tokens`` when set.

    Args:
        max_tokens: the request's ``max_tokens``, or None when unbounded.
        default: the estimate before any observation, in tokens. Defaults to
            ``min(max_tokens, 256)``.
        window: how many recent answers to keep (default 200).
        quantile: which quantile of the window to use, in (0, 1] (default 0.9).

    Raises:
        ValueError: window < 1, quantile outside (0, 1], or a negative bound.
    """

    def __init__(
        self,
        max_tokens: int | None = None,
        *,
        default: int | None = None,
        window: int = 200,
        quantile: float = 0.9,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if default is None:
            default = 256 if max_tokens is None else min(max_tokens, 256)
        if default < 0:
            raise ValueError(f"default must be >= 0, got {default}")
        self.max_tokens = max_tokens
        self.default = default
        self.quantile = quantile
        self._window: deque[int] = deque(maxlen=window)
        self._cached: int | None = None

    def __len__(self) -> int:
        """Number of observations in the window."""
        return len(self._window)

    def observe(self, completion_tokens: int) -> None:
        """Record the completion tokens of one answer (``usage.completion_tokens``).

        Raises:
            ValueError: completion_tokens is negative.
        """
        if completion_tokens < 0:
            raise ValueError(f"completion_tokens must be >= 0, got {completion_tokens}")
        self._window.append(int(completion_tokens))
        self._cached = None

    def estimate(self) -> int:
        """Return the completion tokens to reserve for the next request."""
        if not self._window:
            value = self.default
        else:
            if self._cached is None:
                ordered = sorted(self._window)
                rank = max(1, math.ceil(self.quantile * len(ordered)))
                self._cached = ordered[rank - 1]
            value = self._cached
        if self.max_tokens is not None:
            value = min(value, self.max_tokens)
        return value


class PromptTokenEstimator:
    """Estimate prompt tokens as ``ceil(chars / chars_per_token)``.

    The ratio starts at ``chars_per_token`` (4.0 characters per token, the
    usual figure for English with GPT-style tokenizers) and is corrected from
    each observed ``(chars, usage.prompt_tokens)`` pair. The correction is an
    exponentially weighted moving average with weight ``alpha``; for the first
    ``1/alpha`` observations the weight is ``1/n`` instead (a running mean), so
    that the default is forgotten quickly when the text is not English (CJK
    text is near 1 character per token). Chat-format overhead per message is
    part of what the server counts, so it is folded into the learned ratio.
    The ratio is kept within [``min_ratio``, ``max_ratio``].

    Args:
        chars_per_token: the starting ratio, characters per token (default 4.0).
        alpha: the EWMA weight of a new observation, in (0, 1] (default 0.1).
        min_ratio: the lowest ratio allowed (default 0.5).
        max_ratio: the highest ratio allowed (default 16.0).

    Raises:
        ValueError: a ratio is not positive, or alpha is outside (0, 1].
    """

    def __init__(
        self,
        chars_per_token: float = 4.0,
        *,
        alpha: float = 0.1,
        min_ratio: float = 0.5,
        max_ratio: float = 16.0,
    ) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if not 0.0 < min_ratio <= chars_per_token <= max_ratio:
            raise ValueError(
                f"need 0 < min_ratio <= chars_per_token <= max_ratio, got "
                f"{min_ratio}, {chars_per_token}, {max_ratio}"
            )
        self.chars_per_token = float(chars_per_token)
        self.alpha = alpha
        self.min_ratio = min_ratio
        self.max_ratio = max_ratio
        self.observations = 0

    def estimate(self, prompt: str | int) -> int:
        """Return the estimated prompt tokens.

        Args:
            prompt: the prompt text (all messages joined) or its length in characters.
        """
        chars = prompt if isinstance(prompt, int) else len(prompt)
        if chars <= 0:
            return 0
        return math.ceil(chars / self.chars_per_token)

    def observe(self, prompt: str | int, prompt_tokens: int) -> None:
        """Correct the ratio from one answer's ``usage.prompt_tokens``.

        Observations with zero characters or zero tokens carry no information
        and are ignored.

        Args:
            prompt: the prompt text that was sent, or its length in characters.
            prompt_tokens: the prompt tokens the server counted.
        """
        chars = prompt if isinstance(prompt, int) else len(prompt)
        if chars <= 0 or prompt_tokens <= 0:
            return
        self.observations += 1
        weight = max(self.alpha, 1.0 / self.observations)
        observed = chars / prompt_tokens
        ratio = (1.0 - weight) * self.chars_per_token + weight * observed
        self.chars_per_token = min(self.max_ratio, max(self.min_ratio, ratio))


class CountedShare:
    """The share of prompt tokens that count against the input-token limit, from recent answers.

    Anthropic does not count prompt-cache reads (``cache_read_input_tokens``)
    against its input-tokens-per-minute limit, so once the shared prefix is in
    the cache most of a prompt is free of the limit. The share is the sum of
    counted tokens over the sum of prompt tokens of the last ``window``
    answers; it is 1.0 until an answer with prompt tokens has been observed
    (reserve everything), and never below ``floor`` (a cache entry that
    expires makes the next prompt count in full, and the settled difference
    is owed then).

    Args:
        window: how many recent answers to keep (default 50).
        floor: the lowest share used, in (0, 1] (default 0.05).

    Raises:
        ValueError: window < 1 or floor outside (0, 1].
    """

    def __init__(self, *, window: int = 50, floor: float = 0.05) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0.0 < floor <= 1.0:
            raise ValueError(f"floor must be in (0, 1], got {floor}")
        self.floor = floor
        self._window: deque[tuple[int, int]] = deque(maxlen=window)
        self._counted = 0
        self._total = 0

    def observe(self, counted_tokens: int, prompt_tokens: int) -> None:
        """Record one answer: ``counted_tokens`` of its ``prompt_tokens`` counted against the limit.

        Answers without prompt tokens carry no information and are ignored.

        Raises:
            ValueError: a count is negative, or ``counted_tokens > prompt_tokens``.
        """
        if counted_tokens < 0 or prompt_tokens < 0 or counted_tokens > prompt_tokens:
            raise ValueError(f"need 0 <= counted_tokens <= prompt_tokens, got {counted_tokens}, {prompt_tokens}")
        if prompt_tokens == 0:
            return
        if len(self._window) == self._window.maxlen:
            old_counted, old_total = self._window[0]
            self._counted -= old_counted
            self._total -= old_total
        self._window.append((counted_tokens, prompt_tokens))
        self._counted += counted_tokens
        self._total += prompt_tokens

    @property
    def share(self) -> float:
        """Counted / prompt tokens over the window, in [``floor``, 1]; 1.0 before any observation."""
        if not self._total:
            return 1.0
        return max(self.floor, self._counted / self._total)
