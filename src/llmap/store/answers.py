"""Answers already paid for: the persistent response cache plus in-run dedup.

Before a request is sent, :class:`AnswerCache` is asked, in this order:

1. answers validated earlier in this run and not yet written to the cache;
2. an identical request in flight right now (the row waits for its answer:
   identical requests are sent once and the answer fans out);
3. the persistent :class:`~llmap.store.cache.ResponseCache`, shared across
   jobs and runs (fresh entries only; see ``[cache] ttl``).

Keys are :func:`~llmap.store.cache.request_key` of the model's identity, its
sampling parameters, the rendered messages and the schema. The sampling
parameters are ``temperature``, ``max_tokens`` and the ``[model] params``
that may change an answer (``reasoning_effort``, ``seed``, ``top_p``...; not
``user``, ``metadata`` and the like: :data:`~llmap.params.NEUTRAL_PARAMS`).
How the request was sent is not in the key: the structured-output dialect
(a validated answer is valid whichever dialect produced it) and the
parameter spellings a server asked for (``max_completion_tokens``, no
``temperature``) leave it unchanged.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from llmap.params import answer_params
from llmap.store.cache import CacheEntry, ResponseCache, request_key

__all__ = ["AnswerCache"]

#: Answers kept in memory when there is no persistent cache (oldest dropped first).
_MEMORY_ENTRIES = 20_000


class AnswerCache:
    """Cache lookups and in-run dedup for one run.

    Args:
        cache: the persistent cache, or None (``[cache] enabled = false``):
            then only identical requests within this run are shared.

    Attributes:
        hits: rows answered without a request (cache or dedup) in this run.
    """

    def __init__(self, cache: ResponseCache | None) -> None:
        self.cache = cache
        self._recent: OrderedDict[str, CacheEntry] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[CacheEntry | None]] = {}
        self._unwritten: list[CacheEntry] = []
        self.hits = 0

    @staticmethod
    def key(lane: Any, messages: Sequence[dict[str, str]], schema: dict[str, Any] | None) -> str:
        """The cache key of a row's request on ``lane`` (model identity, parameters, messages, schema)."""
        m = lane.model
        identity = m.name + "@" + (m.base_url or m.model_path or "")
        params = {"temperature": m.temperature, "max_tokens": m.max_tokens}
        params.update(answer_params(getattr(m, "params", None) or {}))
        return request_key(provider=m.provider, model=identity, params=params, messages=messages, schema=schema)

    async def lookup(self, key: str) -> CacheEntry | None:
        """An answer for ``key`` without sending a request, or None (then call :meth:`lead`)."""
        entry = self._recent.get(key)
        if entry is None and key in self._inflight:
            entry = await asyncio.shield(self._inflight[key])
        if entry is None and self.cache is not None:
            entry = self.cache.get_many([key]).get(key)
        if entry is not None:
            self.hits += 1
        return entry

    def lead(self, key: str) -> bool:
        """Announce that this caller sends the request for ``key``; others will wait for it.

        Returns:
            True when this caller leads (call :meth:`resolve` exactly once),
            False when another identical request is already in flight.
        """
        if key in self._inflight:
            return False
        self._inflight[key] = asyncio.get_running_loop().create_future()
        return True

    def resolve(self, key: str, entry: CacheEntry | None) -> None:
        """Finish a lead: hand ``entry`` (a validated answer) to the waiters, or None if it failed."""
        fut = self._inflight.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(entry)
        if entry is not None:
            self._recent[key] = entry
            self._unwritten.append(entry)
            if self.cache is None and len(self._recent) > _MEMORY_ENTRIES:
                self._recent.popitem(last=False)

    def flush(self) -> int:
        """Write answers validated since the last flush to the persistent cache. Returns how many."""
        entries, self._unwritten = self._unwritten, []
        if self.cache is None or not entries:
            return 0
        self.cache.put_many(entries)
        for e in entries:  # now in SQLite: the memory copy can go
            self._recent.pop(e.key, None)
        return len(entries)

    def stale(self, keys: Sequence[str]) -> CacheEntry | None:
        """The first expired-or-fresh stored answer among ``keys`` (stale-if-error), or None."""
        if self.cache is None or not keys:
            return None
        found = self.cache.get_stale_many(list(keys))
        return next((found[k] for k in keys if k in found), None)
