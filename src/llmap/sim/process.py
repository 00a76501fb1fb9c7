"""Run the simulator as a child process (for benchmarks), so it has its own CPU.

::

    with start_simulator_process(rpm=600, latency_median=0.2) as sim:
        run_benchmark(base_url=sim.base_url)
        print(sim.stats()["admitted_per_second"])

The child is ``python -m llmap.sim --port 0 ...``; its first line of output,
``llmap simulator listening on http://127.0.0.1:PORT/v1``, gives the URL.
Children still running at interpreter exit are terminated.
"""

from __future__ import annotations

import atexit
import json
import re
import subprocess
import sys
import threading
import urllib.request
from types import TracebackType
from typing import Any

from llmap.sim.config import SimConfig

__all__ = ["SimProcess", "SimulatorStartError", "start_simulator_process"]

_LISTENING = re.compile(r"listening on (http://\S+/v1)\s*$")
_LIVE: set[SimProcess] = set()


class SimulatorStartError(RuntimeError):
    """The simulator child process did not print its listening line in time."""


class SimProcess:
    """A running simulator child process.

    Args:
        popen: the child process.
        base_url: its OpenAI base URL, ``http://127.0.0.1:PORT/v1``.
    """

    def __init__(self, popen: subprocess.Popen[str], base_url: str) -> None:
        self.popen = popen
        self.base_url = base_url
        self.url = base_url.removesuffix("/v1")

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.popen.pid

    def _request(self, path: str, data: Any = None, timeout: float = 10.0) -> Any:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(
            self.url + path,
            data=body,
            method="GET" if data is None else "POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        """``GET /stats`` (see :mod:`llmap.sim.stats` for the shape).

        Raises:
            urllib.error.URLError: the child does not answer.
        """
        return self._request("/stats")

    def reset_stats(self) -> dict[str, Any]:
        """``POST /stats/reset``: zero the stats, refill limits and quota."""
        return self._request("/stats/reset", {})

    def reconfigure(self, **changes: Any) -> dict[str, Any]:
        """``POST /config``: change settings while serving; returns the new config.

        Raises:
            urllib.error.HTTPError: 400 on an unknown field or a bad value.
        """
        if isinstance(changes.get("outage"), tuple):
            changes["outage"] = list(changes["outage"])
        return self._request("/config", changes)

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the child (kill it after ``timeout`` seconds); idempotent."""
        _LIVE.discard(self)
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        if self.popen.stdout is not None:
            self.popen.stdout.close()

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_simulator_process(
    *, startup_timeout: float = 30.0, python: str | None = None, **config_kwargs: Any
) -> SimProcess:
    """Start ``python -m llmap.sim`` and wait for its listening line.

    Args:
        startup_timeout: seconds to wait for the child to print its URL.
        python: interpreter to run; the current one by default.
        **config_kwargs: :class:`SimConfig` fields, e.g. ``rpm=600``; ``port``
            defaults to 0 (ephemeral).

    Returns:
        The running :class:`SimProcess`.

    Raises:
        TypeError: an unknown config field.
        ValueError: a config value out of range.
        SimulatorStartError: the child exited or stayed silent past
            ``startup_timeout``.
    """
    config_kwargs.setdefault("port", 0)
    config = SimConfig(**config_kwargs)
    argv = [python or sys.executable, "-m", "llmap.sim", *config.to_argv()]
    popen = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, bufsize=1)
    line: list[str] = []
    reader = threading.Thread(
        target=lambda: line.append(popen.stdout.readline()),  # type: ignore[union-attr]
        daemon=True,
    )
    reader.start()
    reader.join(startup_timeout)
    match = _LISTENING.search(line[0]) if line else None
    if match is None:
        proc = SimProcess(popen, "")
        proc.stop()
        got = repr(line[0]) if line else "nothing"
        raise SimulatorStartError(
            f"simulator did not start within {startup_timeout}s "
            f"(exit code {popen.returncode}, first line {got}); command: {' '.join(argv)}"
        )
    proc = SimProcess(popen, match.group(1))
    _LIVE.add(proc)
    return proc


@atexit.register
def _stop_all() -> None:
    for proc in list(_LIVE):
        proc.stop(timeout=2.0)
