"""Hedged requests in the run's tail ("The Tail at Scale", Dean and Barroso, CACM 2013), within a budget.

In the run's tail (every row handed out) a request still unanswered after the
lane's p95 latency gets a second copy, and the first answer wins, so a
straggler row waits for the faster of two tries instead of a hang's timeout.
The dispatcher (:mod:`llmap.run.dispatch`) decides when a row may be hedged
(the tail, spare capacity, no 429 on the row); this module sends the copy
within ``[limits] hedge_budget``: hedged copies are at most that share of the
run's requests. The copy that loses is cancelled with :data:`HEDGE_LOST`, and
the dispatcher bills its estimated tokens: a provider bills what it processed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from llmap.control.lanes import Lane
from llmap.providers.base import Completion, Request
from llmap.run.stats import DispatchStats

__all__ = ["HEDGE_LOST", "allowed", "hedged"]

#: The cancel message of the copy that lost a hedge race (its estimated cost is billed).
HEDGE_LOST = "llmap: hedged copy lost the race"


def allowed(stats: DispatchStats, budget: float) -> bool:
    """True while one more hedged copy keeps the run's copies within ``budget`` (a fraction) of its requests."""
    return stats.hedged + 1 <= budget * stats.requests


async def hedged(send: Callable[[Lane, Request], Awaitable[Completion]], lane: Lane, req: Request, delay_s: float,
                 stats: DispatchStats, budget: float) -> Completion:
    """Send ``req`` on ``lane``, and a second copy after ``delay_s`` seconds if no answer came and the lane
    has spare capacity and the budget allows (:func:`allowed`); the first answer wins.

    After an error, the other copy gets at most the p95 latency more (it may be a hang); then the error goes
    to the retry policy.

    Raises:
        ProviderError: no copy answered; the first error.
    """
    first = asyncio.create_task(send(lane, req))
    tasks = [first]
    settled = False
    try:
        done, _ = await asyncio.wait(tasks, timeout=delay_s)
        if not done and lane.in_flight * 2 < lane.limit and allowed(stats, budget):
            stats.hedged += 1
            tasks.append(asyncio.create_task(send(lane, req)))
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        first = done.pop()
        settled = True
        if first.exception() is None or not pending:
            return first.result()
        done, _ = await asyncio.wait(pending, timeout=lane.timeout.quantile(0.95))
        if done and done.pop().exception() is None:
            return next(iter(pending)).result()
        return first.result()  # raises the first error
    finally:
        for t in tasks:
            if not t.done():
                t.cancel(HEDGE_LOST if settled else None)
        await asyncio.gather(*tasks, return_exceptions=True)
