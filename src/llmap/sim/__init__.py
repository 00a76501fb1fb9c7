"""An OpenAI-compatible simulator for llmap's tests and benchmarks.

It serves ``POST /v1/chat/completions`` on 127.0.0.1 with deterministic
answers derived from the request's JSON schema, OpenAI-style rate limits
(RPM/TPM buckets with ``x-ratelimit-*`` headers) and injectable faults
(5xx, hangs, malformed bodies, outages, dropped or corrupt packed items).

- :class:`Simulator`: in a background thread of this process (tests).
- :func:`start_simulator_process`: in a child process (benchmarks).
- ``llmap simulate`` / ``python -m llmap.sim``: from a shell.
"""

from llmap.sim.config import SimConfig
from llmap.sim.process import SimProcess, SimulatorStartError, start_simulator_process
from llmap.sim.simulator import Simulator

__all__ = [
    "SimConfig",
    "SimProcess",
    "Simulator",
    "SimulatorStartError",
    "start_simulator_process",
]
