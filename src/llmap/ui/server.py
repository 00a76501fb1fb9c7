"""The page's server: one job's state (:class:`UiState`), its aiohttp application, and how it is served.

``llmap ui JOB`` serves it in the foreground (:func:`serve_forever`); ``llmap run --ui`` in a daemon thread of the
run's process (:class:`UiThread`), with the run's live counters. Either way a follower thread keeps the page's
index and live figures up to date every :data:`TICK_S` seconds, and the page hears of each change through
server-sent events (within a second of the ledger's commit).

The server binds 127.0.0.1 unless told otherwise; every route needs the URL's token (:mod:`llmap.ui.safety`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from llmap.errors import SpecError
from llmap.prompt.render import Renderer
from llmap.spec import JobSpec
from llmap.store.ledger import open_for_reading
from llmap.ui import quality
from llmap.ui.actions import running_text
from llmap.ui.index import Columns, UiIndex, index_path
from llmap.ui.live import InProcess, LiveView
from llmap.ui.safety import Redactor, guard_middleware, new_token, secrets_of

__all__ = ["TICK_S", "UiOptions", "UiState", "UiThread", "build_app", "serve_forever"]

#: Seconds between two looks at the ledger.
TICK_S = 0.5


@dataclass(frozen=True)
class UiOptions:
    """How the page is served.

    Attributes:
        host: the address to bind (127.0.0.1: this computer only).
        port: the TCP port; 0 picks a free one.
        allow_remote: accept a non-loopback ``host`` (the page is then open to whoever has the URL).
        by: the input column rows are grouped by (default: ``[input] per_group``'s column, if any).
        token: the URL token (default: a new random one; tests may fix it).
    """

    host: str = "127.0.0.1"
    port: int = 0
    allow_remote: bool = False
    by: str | None = None
    token: str | None = None


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback address without ``--allow-remote``.

    Raises:
        SpecError: one line saying what opening the page to the network exposes.
    """
    if host in ("127.0.0.1", "localhost", "::1") or allow_remote:
        return
    raise SpecError(f"--host {host} opens the page to the network: anyone who has its URL (the token) can read every "
                    "row, label answers, re-queue rows and stop the run, over plain HTTP; add --allow-remote to "
                    "do it anyway, or keep the default 127.0.0.1 (an SSH tunnel reaches it from elsewhere)")


class UiState:
    """Everything the routes share for one job.

    Args:
        spec: the job.
        options: how it is served.
        in_process: the live counters of a run in this process (``llmap run --ui``), or None.

    Raises:
        SpecError: no ledger yet, a ledger from an older llmap, or ``--by`` names a column the ledger does not keep.
    """

    def __init__(self, spec: JobSpec, options: UiOptions, *, in_process: InProcess | None = None) -> None:
        self.spec = spec
        self.options = options
        self.ledger_path = spec.ledger_path
        ledger, self.first_plan = open_for_reading(self.ledger_path, job=spec.name)  # checks the schema's version
        try:
            self.data_columns: list[str] = json.loads(ledger.get_meta("data_columns") or "[]")
            self.features = quality.features(ledger.connection)
        finally:
            ledger.close()
        group = options.by or (spec.input.per_group.column if spec.input.per_group else None)
        if group is not None and group not in self.data_columns:
            raise SpecError(f"--by {group!r}: the ledger keeps only the columns {', '.join(self.data_columns)}; "
                            f"add {group!r} to [output] keep and run the job once")
        self.group = group
        self.columns = Columns(tuple(spec.output.fields), group, self.features["confidence"])
        self.index = self._open_index()
        try:
            self.renderer: Renderer | None = Renderer.from_spec(spec.prompt, max_chars=spec.input.max_chars)
        except SpecError:
            self.renderer = None
        self.models = {m.label: m for m in spec.models}
        self.redactor = Redactor(secrets_of(spec.models))
        self.token = options.token or new_token()
        self.csrf = new_token()
        self.port = 0
        self._local = threading.local()
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="llmap-ui")
        self.live = LiveView(self._connect_ledger(), self.index, job=spec.name, cap_usd=spec.limits.max_cost_usd,
                             cap_tokens=spec.limits.max_tokens, pack=spec.prompt.pack, group=group,
                             running=lambda: running_text(self.ledger_path), in_process=in_process)
        self.samples: dict[tuple, list[str]] = {}
        self.message: str | None = None  # the follower's last error, shown on the page
        self._stop = threading.Event()
        self._listeners: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None

    def _open_index(self) -> UiIndex:
        try:
            return UiIndex(self.ledger_path, self.columns)
        except (sqlite3.Error, OSError):  # a read-only folder: the index goes to the temporary folder
            where = Path(tempfile.gettempdir()) / f"llmap-ui-{abs(hash(str(self.ledger_path.resolve())))}"
            where.mkdir(parents=True, exist_ok=True)
            return UiIndex(self.ledger_path, self.columns, path=where / index_path(self.ledger_path).name)

    def _connect_ledger(self) -> sqlite3.Connection:
        db = sqlite3.connect(f"{self.ledger_path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        db.execute("PRAGMA busy_timeout = 5000")
        return db

    # -- per-thread connections (the routes' work runs in :attr:`pool`) --------------------------------------------
    def ledger(self) -> sqlite3.Connection:
        """This thread's read-only connection to the ledger."""
        db = getattr(self._local, "ledger", None)
        if db is None:
            db = self._local.ledger = self._connect_ledger()
        return db

    def index_reader(self) -> sqlite3.Connection:
        """This thread's read-only connection to the index."""
        db = getattr(self._local, "index", None)
        if db is None:
            db = self._local.index = self.index.reader()
        return db

    def plan(self) -> int:
        row = self.ledger().execute("SELECT max(plan) FROM rows").fetchone()
        return row[0] if row and row[0] is not None else self.first_plan

    # -- following the ledger --------------------------------------------------------------------------------------
    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (from the follower thread) after each tick."""
        self._listeners.append(listener)

    def tick(self) -> None:
        """One look at the ledger: the index's catch-up (a few chunks at most) and the live figures."""
        try:
            self.index.sync(max_chunks=3)
            self.live.tick()
            self.message = None
        except sqlite3.Error as exc:  # e.g. the ledger replaced under us: say so, try again next tick
            self.message = f"cannot read the ledger: {exc}"
        except Exception as exc:  # the follower never dies: the page says what went wrong and it tries again
            self.message = f"the page could not follow the ledger: {type(exc).__name__}: {exc}"
        for listener in list(self._listeners):
            listener()

    def start_following(self) -> None:
        """Start the follower thread (a daemon: it never keeps the process alive)."""
        def loop() -> None:
            while not self._stop.is_set():
                started = time.monotonic()
                self.tick()
                behind = self.index.behind or self.live.behind  # a build, a re-plan, a long request log
                wait = 0.0 if behind else max(0.0, TICK_S - (time.monotonic() - started))
                self._stop.wait(wait)

        self._thread = threading.Thread(target=loop, name="llmap-ui-follow", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop following and close every connection of this thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.index.close()
        with contextlib.suppress(sqlite3.Error):
            self.live.db.close()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking work (SQLite) in the page's thread pool."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    @property
    def url(self) -> str:
        host = self.options.host if self.options.host not in ("0.0.0.0", "::") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/{self.token}/"


def build_app(state: UiState) -> web.Application:
    """The aiohttp application of one job's page (routes in :mod:`llmap.ui.routes`)."""
    from llmap.ui.routes import add_routes

    app = web.Application(middlewares=[guard_middleware(state.token, state.csrf, port=lambda: state.port,
                                                        allow_remote=state.options.allow_remote)],
                          client_max_size=1024 * 1024)
    add_routes(app, state)
    return app


async def _start(state: UiState) -> web.AppRunner:
    runner = web.AppRunner(build_app(state), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, state.options.host, state.options.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise SpecError(f"--port {state.options.port} cannot be opened on {state.options.host} "
                        f"({exc.strerror or exc}); choose another port, or 0 for a free one") from None
    state.port = int(runner.addresses[0][1])
    return runner


def serve_forever(state: UiState, on_ready: Callable[[str], None]) -> None:
    """Serve the page until Ctrl-C or SIGTERM (``llmap ui``); ``on_ready`` gets the URL once it answers."""
    async def main() -> None:
        stop = asyncio.Event()
        with contextlib.suppress(NotImplementedError, RuntimeError):  # the main thread of a POSIX process
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        runner = await _start(state)
        state.start_following()
        on_ready(state.url)
        try:
            await stop.wait()
        finally:
            state.close()
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


class UiThread:
    """The page served from a daemon thread of this process (``llmap run --ui``).

    Args:
        state: the job's page state (with the run's :class:`~llmap.ui.live.InProcess` counters).
    """

    def __init__(self, state: UiState) -> None:
        self.state = state
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llmap-ui", daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> str:
        """Serve, start following the ledger, and return the URL.

        Raises:
            SpecError: the port cannot be opened.
        """
        self._thread.start()
        self._runner = asyncio.run_coroutine_threadsafe(_start(self.state), self._loop).result(timeout=30)
        self.state.start_following()
        return self.state.url

    def stop(self) -> None:
        """Stop serving and following (safe to call twice)."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(runner.cleanup(), self._loop).result(timeout=10)
        self.state.close()
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
