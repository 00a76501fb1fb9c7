"""Prompt-lookup drafting: guess the next tokens from where the last few occurred before.

The embedded model verifies a draft in one batch and keeps it as far as it
equals the greedy choice (:mod:`llmap.providers.local.model`), so a good
guess saves decode steps and a bad one costs a little batch width, never
a different answer. llmap's rows repeat the few-shot answers' text
(``{"kind": "county", "confidence": 0.9}``), which makes the guess good.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["DRAFT_MAX", "NGRAM", "draft"]

#: Most tokens proposed by one draft.
DRAFT_MAX = 12
#: Length of the n-gram a draft is looked up by, in tokens.
NGRAM = 3


def draft(history: Sequence[int], *, ngram: int = NGRAM, max_tokens: int = DRAFT_MAX) -> list[int]:
    """The tokens after the latest earlier occurrence of the last ``ngram`` tokens.

    Args:
        history: prompt and generated token ids so far.
        ngram: how many trailing tokens must match.
        max_tokens: the most tokens to propose.

    Returns:
        Up to ``max_tokens`` token ids; empty when the n-gram occurs nowhere earlier.
    """
    n = len(history)
    if n <= ngram or max_tokens <= 0:
        return []
    tail = list(history[n - ngram:])
    for start in range(n - ngram - 1, -1, -1):
        if history[start] == tail[0] and list(history[start:start + ngram]) == tail:
            return list(history[start + ngram:start + ngram + max_tokens])
    return []
