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
      "started_at": 1714560000.0       # Unix time of start or last reset
    }
"""

from __future__ import annotations

import time
from typing import Any

from llmap.sim.limits import Clock

__all__ = ["SimStats"]


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
        self.admitted: list[int] = []
        self.started = self._clock()
        self.started_at = self._wall_clock()

    def record_model(self, model: str) -> None:
        """Count one request for ``model``."""
        self.by_model[model] = self.by_model.get(model, 0) + 1

    def record_status(self, status: int) -> None:
        """Count one answer with HTTP ``status``."""
        self.by_status[status] = self.by_status.get(status, 0) + 1

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
            "started_at": self.started_at,
        }
