"""Counters of what the simulator saw, served as JSON at ``GET /stats``.

Shape of :meth:`SimStats.snapshot`::

    {
      "requests": 120,                 # chat completion requests received
      "by_status": {"200": 100, "429": 20},
      "hung": 0,                       # requests never answered (hang_rate)
      "malformed": 0,                  # 200s sent with a broken body
      "tokens": {"prompt": 5400, "completion": 900,    # of 200 answers
                 "cache_read": 0, "cache_write": 0},   # of the prompt: /v1/messages prompt-cache reads, writes
      "cache_reads": 0,                # 200 answers that read a cached prefix (/v1/messages)
      "by_model": {"sim": 120},
      "admitted_per_second": [40, 40, 20],  # 200 answers per whole second
      "rate_limited_at": [0.02, 0.02],  # seconds after the first request of each 429 (the first 10,000)
      "started_at": 1714560000.0,      # Unix time of start or last reset
      "batches": {"created": 2, "refused": 1, "lines": 300, "refused_lines": 200,   # batch APIs
                  "custom_ids": 300, "custom_ids_repeated": 0, "bodies_repeated": 0,
                  "failed_lines": 9, "expired": 0, "cancelled": 0}
    }
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from llmap.sim.limits import Clock

__all__ = ["BatchCounts", "SimStats"]

#: The most 429 times ``rate_limited_at`` keeps.
_MOST_TIMES = 10_000


class BatchCounts:
    """What the simulated batch APIs saw (OpenAI Batch, Anthropic Message Batches).

    ``lines`` counts the requests of batches accepted for processing (not
    refused at validation); ``custom_ids_repeated`` and ``bodies_repeated``
    count custom ids and request bodies seen in more than one accepted line:
    a client that submits a row twice shows here.
    """

    def __init__(self) -> None:
        self.created = self.refused = self.lines = self.refused_lines = 0
        self.failed_lines = self.expired = self.cancelled = 0
        self.ids: Counter[str] = Counter()
        self.bodies: Counter[str] = Counter()

    def accepted(self, lines: list[tuple[str, str]]) -> None:
        """A batch accepted for processing: its ``(custom id, body digest)`` lines."""
        self.created += 1
        self.lines += len(lines)
        for cid, digest in lines:
            self.ids[cid] += 1
            self.bodies[digest] += 1

    def snapshot(self) -> dict[str, Any]:
        return {"created": self.created, "refused": self.refused, "lines": self.lines,
                "refused_lines": self.refused_lines, "custom_ids": len(self.ids),
                "custom_ids_repeated": sum(1 for n in self.ids.values() if n > 1),
                "bodies_repeated": sum(1 for n in self.bodies.values() if n > 1),
                "failed_lines": self.failed_lines, "expired": self.expired, "cancelled": self.cancelled}


class SimStats:
    """Counters of one simulator, all mutated on its event loop thread.

    Args:
        clock: monotonic seconds, for ``admitted_per_second`` buckets.
        wall_clock: Unix seconds, for ``started_at``.
    """

    def __init__(self, clock: Clock = time.monotonic, wall_clock: Clock = time.time) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self.reset()

    def reset(self) -> None:
        """Zero every counter and restart the per-second series from now."""
        self.requests = 0
        self.by_status: dict[int, int] = {}
        self.hung = 0
        self.malformed = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cache_read_tokens = 0
        self.cache_write_tokens = 0
        self.cache_reads = 0
        self.by_model: dict[str, int] = {}
        self.batches = BatchCounts()
        self.admitted: list[int] = []
        self.first_request: float | None = None
        self.limited_at: list[float] = []
        self.started = self._clock()
        self.started_at = self._wall_clock()

    def record_model(self, model: str) -> None:
        """Count one request for ``model``."""
        if self.first_request is None:
            self.first_request = self._clock()
        self.by_model[model] = self.by_model.get(model, 0) + 1

    def record_status(self, status: int) -> None:
        """Count one answer with HTTP ``status``."""
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if status == 429 and len(self.limited_at) < _MOST_TIMES:
            self.limited_at.append(round(self._clock() - (self.first_request or self.started), 3))

    def record_success(self, prompt: int, completion: int, *, cache_read: int = 0, cache_write: int = 0) -> None:
        """Count the tokens of one 200 answer (``cache_read``/``cache_write``: of ``prompt``, from / to the
        prompt cache) and its second since start."""
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        self.cache_read_tokens += cache_read
        self.cache_write_tokens += cache_write
        self.cache_reads += 1 if cache_read else 0
        second = int(self._clock() - self.started)
        admitted = self.admitted
        if second >= len(admitted):
            admitted.extend([0] * (second + 1 - len(admitted)))
        admitted[second] += 1

    def snapshot(self) -> dict[str, Any]:
        """The counters as a JSON-ready dict (see the module docstring)."""
        return {
            "requests": self.requests,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "hung": self.hung,
            "malformed": self.malformed,
            "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens,
                       "cache_read": self.cache_read_tokens, "cache_write": self.cache_write_tokens},
            "cache_reads": self.cache_reads,
            "by_model": dict(self.by_model),
            "admitted_per_second": list(self.admitted),
            "rate_limited_at": list(self.limited_at),
            "started_at": self.started_at,
            "batches": self.batches.snapshot(),
        }
