"""Answers already paid for: the persistent response cache plus in-run dedup.

Before a request is sent, :meth:`AnswerCache.claim` is asked, in this order:

1. answers validated earlier in this run and not yet written to the cache;
2. an identical request in flight right now: the row waits for its answer
   (identical requests are sent once and the answer fans out). When that
   request's leader gives up without an answer, exactly one waiter takes
   over and leads; the others keep waiting;
3. the persistent :class:`~llmap.store.cache.ResponseCache`, shared across
   jobs and runs (fresh entries only; see ``[cache] ttl``). Lookups that
   arrive in the same event-loop turn share one ``get_many`` query, and the
   worker pool looks up a whole page of rows at once (:meth:`prefetch`).

Hits are counted in memory and written to the cache file in one statement
per flush (:meth:`flush`), never one write transaction per hit. Writes never
wait for another process's lock during a run: a busy cache file defers them to
the next flush, and the last flush of a run waits (see :meth:`flush`).

Keys are :func:`~llmap.store.cache.request_key` of the model's identity, its
sampling parameters, the rendered messages and the schema. The sampling
parameters are ``temperature``, ``max_tokens`` and the ``[model] params``
that may change an answer (``reasoning_effort``, ``seed``, ``top_p``...; not
``user``, ``metadata`` and the like: :data:`~llmap.providers.params.NEUTRAL_PARAMS`).
How the request was sent is not in the key: the structured-output dialect
(a validated answer is valid whichever dialect produced it) and the
parameter spellings a server asked for (``max_completion_tokens``, no
``temperature``) leave it unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from llmap.providers.params import answer_params
from llmap.spec import ModelSpec
from llmap.store.cache import CacheEntry, ResponseCache, canonical_json, request_key

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
        self._prefetched: dict[str, CacheEntry] = {}  # stored answers looked up ahead, until claimed
        # rows looked up ahead per key and not taken yet (:meth:`peek`, :meth:`pass_over`): while a key
        # has any, its prefetched answer stays, and an answer written to SQLite meanwhile stays in memory
        # (the lookup ahead can no longer see it)
        self._looked_up: Counter[str] = Counter()
        self._hit_keys: list[str] = []  # stored answers served since the last flush (hit counts)
        self._batch: dict[str, asyncio.Future[CacheEntry | None]] = {}  # stored lookups of this loop turn
        self.hits = 0

    @staticmethod
    def _parts(model: ModelSpec) -> dict[str, Any]:
        """What of ``model`` is in a request's key: provider, identity and the parameters that change answers."""
        m = model
        params = {"temperature": m.temperature, "max_tokens": m.max_tokens}
        params.update(answer_params(getattr(m, "params", None) or {}))
        return {"provider": m.provider, "model": m.name + "@" + (m.base_url or m.model_path or ""), "params": params}

    @staticmethod
    def key(model: ModelSpec, messages: Sequence[dict[str, str]], schema: dict[str, Any] | None) -> str:
        """The cache key of a row's request to ``model`` (its identity, parameters, messages, schema)."""
        return request_key(**AnswerCache._parts(model), messages=messages, schema=schema)

    @staticmethod
    def user_keyer(model: ModelSpec, head: Sequence[dict[str, str]],
                   schema: dict[str, Any] | None) -> Callable[[str], str]:
        """Keys of requests whose messages are ``head`` (the same for every row) plus one user message.

        ``keyer(content)`` equals ``key(model, [*head, {"role": "user", "content": content}], schema)``;
        the canonical JSON around the content is built once, so a key costs one JSON string
        encoding and one SHA-256 (``llmap estimate`` keys millions of rows this way).
        """
        parts = AnswerCache._parts(model)
        rest = canonical_json({**parts, "schema": schema})
        prefix = '{"messages":[' + "".join(canonical_json(x) + "," for x in head) + '{"content":'
        suffix = ',"role":"user"}],' + rest[1:]
        encode = json.JSONEncoder(ensure_ascii=False).encode

        def keyer(content: str) -> str:
            return hashlib.sha256((prefix + encode(content) + suffix).encode("utf-8")).hexdigest()

        return keyer

    # -- looking up -----------------------------------------------------------
    def prefetch(self, keys: Iterable[str]) -> None:
        """Look up many keys in the persistent cache with one query; hits wait in memory for
        :meth:`peek`/:meth:`claim`."""
        if self.cache is None:
            return
        keys = list(keys)
        self._looked_up.update(keys)  # one per row: each row is taken once (peek or pass_over)
        wanted = [k for k in dict.fromkeys(keys) if k not in self._recent and k not in self._prefetched]
        if wanted:
            self._prefetched.update(self.cache.get_many(wanted, count_hits=False))

    def peek(self, key: str) -> CacheEntry | None:
        """Take a row looked up ahead: the answer for ``key`` already in memory (this run's, or
        prefetched), without waiting, or None; counted as a hit."""
        self._take(key)
        return self._memory(key)

    def pass_over(self, key: str) -> None:
        """Take a row looked up ahead without asking for its answer (it waits for an identical request)."""
        self._take(key)
        if key not in self._looked_up:
            self._prefetched.pop(key, None)

    def _take(self, key: str) -> None:
        n = self._looked_up.get(key, 0)
        if n > 1:
            self._looked_up[key] = n - 1
        else:
            self._looked_up.pop(key, None)

    def _memory(self, key: str) -> CacheEntry | None:
        entry = self._recent.get(key)
        if entry is None:  # a prefetched answer stays while other rows looked up ahead still want it
            entry = self._prefetched.get(key) if key in self._looked_up else self._prefetched.pop(key, None)
            if entry is not None:
                self._hit_keys.append(key)
        if entry is not None:
            self.hits += 1
        return entry

    def leading(self, key: str) -> bool:
        """True while a caller leads ``key`` (an identical request is in flight)."""
        return key in self._inflight

    async def claim(self, key: str) -> CacheEntry | None:
        """An answer for ``key`` without sending a request, or None: then the caller leads ``key``.

        Waits while an identical request is in flight. A caller that gets None
        must call :meth:`resolve` exactly once (with the answer, or None when
        it gives up, which lets exactly one waiter take over).
        """
        while True:
            entry = self._memory(key)
            if entry is not None:
                return entry
            fut = self._inflight.get(key)
            if fut is not None:
                entry = await asyncio.shield(fut)
                if entry is not None:
                    self.hits += 1
                    return entry
                continue  # the leader gave up: the first waiter to get here leads
            entry = await self._stored(key)
            if entry is not None:
                self.hits += 1
                self._hit_keys.append(key)
                return entry
            if key in self._inflight or key in self._recent:
                continue  # another caller led (or answered) while this one looked
            self.lead(key)
            return None

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

    async def _stored(self, key: str) -> CacheEntry | None:
        """The persistent cache's fresh answer for ``key``; lookups of one loop turn share a query."""
        if self.cache is None:
            return None
        fut = self._batch.get(key)
        if fut is None:
            loop = asyncio.get_running_loop()
            if not self._batch:
                loop.call_soon(self._run_batch)
            fut = self._batch[key] = loop.create_future()
        return await asyncio.shield(fut)

    def _run_batch(self) -> None:
        batch, self._batch = self._batch, {}
        try:
            found = self.cache.get_many(list(batch), count_hits=False) if self.cache is not None else {}
        except Exception as exc:
            for fut in batch.values():
                if not fut.done():
                    fut.set_exception(exc)
            return
        for key, fut in batch.items():
            if not fut.done():
                fut.set_result(found.get(key))

    # -- answering ------------------------------------------------------------
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

    def abandon(self) -> None:
        """Release every lead still open (the run is ending): waiters get None."""
        for key in list(self._inflight):
            self.resolve(key, None)

    def flush(self, *, wait: bool = False) -> int:
        """Write answers validated since the last flush, and the hit counts, to the persistent cache.

        Args:
            wait: wait for another process's write lock (up to the cache's
                busy timeout, 10 s) instead of deferring to the next flush. The
                run passes True only for its last flush, so the event loop is
                never held for seconds while rows are in flight.

        Returns:
            How many answers were written (0 when deferred).
        """
        if self.cache is None:
            self._unwritten.clear()
            return 0
        if not self._unwritten and not self._hit_keys:
            return 0
        entries, hits = self._unwritten, self._hit_keys
        if entries and self.cache.put_many(entries, wait=wait) == 0:
            return 0  # the file is busy: keep them for the next flush
        self._unwritten, self._hit_keys = [], []
        self.cache.record_hits(hits, wait=wait)
        for e in entries:  # now in SQLite: the memory copy can go, unless a lookup ahead missed it
            if e.key not in self._looked_up:
                self._recent.pop(e.key, None)
        return len(entries)

    def stale(self, keys: Sequence[str]) -> CacheEntry | None:
        """The first expired-or-fresh stored answer among ``keys`` (stale-if-error), or None."""
        if self.cache is None or not keys:
            return None
        found = self.cache.get_stale_many(list(keys))
        return next((found[k] for k in keys if k in found), None)
