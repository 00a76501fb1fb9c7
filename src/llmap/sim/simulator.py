"""Run the simulator in a background thread with its own event loop (for tests).

::

    with Simulator(SimConfig(rpm=60)) as sim:
        client = SomeClient(base_url=sim.base_url)
        ...
        assert sim.stats()["by_status"]["200"] == 10

The server shares the caller's process (and CPU); benchmarks should use
:func:`llmap.sim.process.start_simulator_process` instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

from llmap.sim.config import SimConfig
from llmap.sim.limits import Clock, Sleep
from llmap.sim.server import SimServer, start_site

__all__ = ["Simulator"]

T = TypeVar("T")


class Simulator:
    """An in-process simulator on ``127.0.0.1`` (by default an ephemeral port).

    Args:
        config: the behaviour; its ``port`` is ignored in favour of ``port``.
        port: TCP port to bind; 0 (the default) picks a free one.
        clock: monotonic seconds for the rate limits, outage window and batch
            timelines (default ``time.monotonic``); ``wall_clock``: Unix seconds
            for timestamps (default ``time.time``); ``sleep``: awaits the answer
            latency on the server's event loop (default ``asyncio.sleep``). Tests
            pass fakes to move time instead of waiting for it.
        **changes: field overrides applied to ``config`` (or to the defaults),
            e.g. ``Simulator(rpm=60, fail_rate=0.1)``.

    Raises:
        TypeError: an unknown config field in ``changes``.
        ValueError: a config value out of range.
    """

    def __init__(self, config: SimConfig | None = None, *, port: int = 0, clock: Clock = time.monotonic,
                 wall_clock: Clock = time.time, sleep: Sleep = asyncio.sleep, **changes: Any) -> None:
        base = config if config is not None else SimConfig()
        self._config = base.replace(port=port, **changes)
        self._times: dict[str, Any] = {"clock": clock, "wall_clock": wall_clock, "sleep": sleep}
        self._server: SimServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        """The OpenAI base URL: ``http://127.0.0.1:PORT/v1``."""
        return f"http://{self._config.host}:{self.port}/v1"

    @property
    def url(self) -> str:
        """The server root: ``http://127.0.0.1:PORT`` (``/stats`` lives here)."""
        return f"http://{self._config.host}:{self.port}"

    @property
    def config(self) -> SimConfig:
        """The current configuration."""
        return self._server.config if self._server is not None else self._config

    def start(self, timeout: float = 10.0) -> Simulator:
        """Start serving in a daemon thread; returns once the port is bound.

        Args:
            timeout: seconds to wait for the server to come up.

        Returns:
            ``self``.

        Raises:
            RuntimeError: already started, or it did not come up in time.
            OSError: the address cannot be bound.
        """
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name="llmap-simulator", daemon=True
        )
        self._thread.start()
        try:
            self.port = ready.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            raise RuntimeError("simulator did not start in time") from exc
        except BaseException:
            self._thread.join(timeout)
            self._thread = None
            raise
        return self

    def _run(self, ready: concurrent.futures.Future[int]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            server = SimServer(self._config, **self._times)
            self._runner, port = loop.run_until_complete(
                start_site(server, self._config.host, self._config.port)
            )
        except BaseException as exc:
            loop.close()
            ready.set_exception(exc)
            return
        self._server, self._loop = server, loop
        ready.set_result(port)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn`` on the server's loop thread and return its result."""
        if self._loop is None or self._server is None:
            raise RuntimeError("simulator is not running")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def call() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller's thread
                future.set_exception(exc)

        self._loop.call_soon_threadsafe(call)
        return future.result(timeout)

    def stats(self) -> dict[str, Any]:
        """The ``/stats`` dict, read on the server thread (no HTTP).

        Raises:
            RuntimeError: the simulator is not running.
        """
        return self._call(lambda: self._server.stats.snapshot())  # type: ignore[union-attr]

    def reset_stats(self) -> None:
        """Zero the stats, refill the rate-limit buckets and the token quota."""
        self._call(lambda: self._server.reset())  # type: ignore[union-attr]

    def reconfigure(self, **changes: Any) -> SimConfig:
        """Change settings while serving (see :meth:`SimServer.reconfigure`).

        Raises:
            TypeError: an unknown field.
            ValueError: a value out of range.
            RuntimeError: the simulator is not running.
        """
        return self._call(lambda: self._server.reconfigure(**changes))  # type: ignore[union-attr]

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and join the thread; hung requests are cancelled.

        Safe to call twice.
        """
        loop, runner, thread = self._loop, self._runner, self._thread
        if loop is None or thread is None:
            return
        if runner is not None:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._loop = self._runner = self._thread = None
        self._server = None

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
