"""Embedding texts for an operator: the ledger first, then the shared embeddings cache, then the model.

Every vector an operator uses is committed to the ledger (``op_vectors``)
before it is used, so a resumed run embeds nothing twice; the shared cache
(:mod:`llmap.store.vectors`) lets other jobs and ``--fresh`` reuse them too.
Requests go in batches of ``[embeddings] batch`` texts, several at once for a
remote model, retried on transient errors with the job's retry policy
(``[limits] max_attempts``, backoff, ``retry_budget_s``), billed at
``[embeddings] price_in`` into the run's cost (and its budget caps), and logged
in the request log with path ``"embeddings"``.
"""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np

from llmap import errors as E
from llmap.control.retry import RetryPolicy
from llmap.operators.context import OpContext
from llmap.run.stats import Stop
from llmap.store.vectors import vector_key

__all__ = ["embed_texts"]

#: Embedding requests in flight at once for a remote model.
REMOTE_CONCURRENCY = 4


async def embed_texts(ctx: OpContext, texts: list[str]) -> np.ndarray:
    """Unit vectors of ``texts``, ``(len(texts), dim)`` float32, in order.

    Raises:
        Stop: the run is stopping (a budget cap, a fatal error); what was embedded is kept.
        ProviderError: a batch failed after its retries (the operator stops; a rerun continues).
    """
    emb = ctx.embedder
    if emb is None:
        raise RuntimeError("this operator has no embedding model")
    keys = [vector_key(emb.label, t) for t in texts]
    have = ctx.book.vectors(keys)
    missing = [k for k in dict.fromkeys(keys) if k not in have]
    if missing and ctx.vectors is not None:
        shared = ctx.vectors.get_many(missing)
        if shared:
            ctx.book.put_vectors(emb.label, list(shared.items()))
            have.update(shared)
            missing = [k for k in missing if k not in shared]
    if missing:
        text_of = dict(zip(keys, texts, strict=True))
        batches = [missing[i:i + emb.batch] for i in range(0, len(missing), emb.batch)]
        ctx.say(f"embedding {len(missing):,} texts with {emb.label} ({len(batches):,} requests)")
        gate = asyncio.Semaphore(1 if emb.label.startswith("local:") else REMOTE_CONCURRENCY)

        async def one(batch: list[str]) -> None:
            async with gate:
                vectors = await _request(ctx, [text_of[k] for k in batch])
            items = list(zip(batch, vectors, strict=True))
            ctx.book.put_vectors(emb.label, items)  # durable before it is used
            if ctx.vectors is not None:
                ctx.vectors.put_many(emb.label, items)
            have.update(items)

        await asyncio.gather(*(one(b) for b in batches))
    return np.stack([have[k] for k in keys]) if keys else np.zeros((0, 1), dtype=np.float32)


async def _request(ctx: OpContext, texts: list[str]) -> np.ndarray:
    emb, stats, lim = ctx.embedder, ctx.stats, ctx.spec.limits
    policy = RetryPolicy(max_attempts=lim.max_attempts, base_s=lim.backoff_base_s, cap_s=lim.backoff_cap_s,
                         budget_s=lim.retry_budget_s)
    t0 = time.monotonic()
    attempt = 0
    while True:
        _check_caps(ctx)
        attempt += 1
        ctx.summary["embedding_requests"] = ctx.summary.get("embedding_requests", 0) + 1
        try:
            ans = await emb.embed(texts)
        except E.ProviderError as exc:
            stats.log(emb.label, exc, time.monotonic() - t0, 0, 0, len(texts), path="embeddings")
            decision = policy.decide(exc, attempt, time.monotonic() - t0)
            if decision.stop_run:
                stats.halt(str(exc))
                raise Stop from exc
            if not decision.retry:
                raise
            await asyncio.sleep(decision.delay_s)
            continue
        tokens = ans.prompt_tokens or sum(math.ceil(len(t) / 4) for t in texts)
        cost = tokens * ctx.spec.embeddings.price_in / 1e6
        stats.prompt_tokens += tokens
        stats.cost_usd += cost
        stats.log(emb.label, None, ans.latency_s, tokens, 0, len(texts), cost, path="embeddings")
        ctx.summary["embedded"] = ctx.summary.get("embedded", 0) + len(texts)
        return ans.vectors


def _check_caps(ctx: OpContext) -> None:
    """Stop before a request once a budget cap is reached (as the dispatcher does for chat requests)."""
    st, lim = ctx.stats, ctx.spec.limits
    if lim.max_cost_usd is not None and st.cost_usd >= lim.max_cost_usd:
        st.halt(f"budget cap reached: limits.max_cost_usd = {lim.max_cost_usd:g} USD (spent {st.cost_usd:.4f} USD)")
    elif lim.max_tokens is not None and st.prompt_tokens + st.completion_tokens >= lim.max_tokens:
        st.halt(f"budget cap reached: limits.max_tokens = {lim.max_tokens:,} "
                f"(spent {st.prompt_tokens + st.completion_tokens:,} tokens)")
    if st.stop.is_set():
        raise Stop
