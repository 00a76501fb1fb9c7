"""A headless Chromium for the page's tests, driven over the Chrome DevTools Protocol (a websocket, with aiohttp).

Debian's ``chromium`` package (``.ci/run`` installs it when missing); nothing is downloaded. Each browser gets a
fresh profile folder and the flags this machine needs (no sandbox as root, no GPU, no background traffic).
JavaScript dialogs (``alert``) are recorded in :attr:`Chromium.dialogs` and dismissed; uncaught exceptions and
console errors in :attr:`Chromium.errors`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
         "--disable-extensions", "--mute-audio", "--window-size=1400,1000", "--remote-debugging-port=0"]


def chromium_path() -> str | None:
    """The Chromium on this machine (Debian's package first), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium:
    """One headless Chromium with one page.

    Args:
        profile: an empty folder for the browser's profile (``--user-data-dir``).
    """

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.proc: asyncio.subprocess.Process | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._loaded = asyncio.Event()
        self.dialogs: list[str] = []
        self.errors: list[str] = []

    async def start(self, timeout: float = 60.0) -> Chromium:
        exe = chromium_path()
        if exe is None:
            raise RuntimeError("no chromium on this machine: apt-get install -y chromium (.ci/run does it)")
        self.proc = await asyncio.create_subprocess_exec(
            exe, *FLAGS, f"--user-data-dir={self.profile}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if self.proc.returncode is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode} before it listened")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for chromium's DevToolsActivePort")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        self.session = aiohttp.ClientSession()
        while True:
            async with self.session.get(f"http://127.0.0.1:{port}/json/list") as r:
                pages = [t for t in await r.json(content_type=None) if t.get("type") == "page"]
            if pages:
                break
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for chromium's first page")
            await asyncio.sleep(0.05)
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        for domain in ("Page", "Runtime", "Log"):
            await self.send(f"{domain}.enable")
        return self

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._waiting.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Page.loadEventFired":
                self._loaded.set()
            elif method == "Page.javascriptDialogOpening":
                self.dialogs.append(params.get("message", ""))
                asyncio.create_task(self.send("Page.handleJavaScriptDialog", accept=False))
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                self.errors.append(str(details.get("exception", {}).get("description") or details.get("text")))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                self.errors.append(params["entry"].get("text", ""))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result.

        Raises:
            RuntimeError: the browser answered with an error.
        """
        assert self.ws is not None
        i = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[i] = fut
        await self.ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
        data = await asyncio.wait_for(fut, timeout=60)
        if "error" in data:
            raise RuntimeError(f"{method}: {data['error']}")
        return data.get("result", {})

    async def goto(self, url: str, timeout: float = 30.0) -> None:
        """Open ``url`` and wait for its load event."""
        self._loaded.clear()
        await self.send("Page.navigate", url=url)
        await asyncio.wait_for(self._loaded.wait(), timeout)

    async def js(self, expression: str) -> Any:
        """Evaluate JavaScript in the page (promises awaited); its value.

        Raises:
            RuntimeError: the expression threw.
        """
        res = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression!r} threw: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    async def wait(self, expression: str, what: str, timeout: float = 30.0) -> Any:
        """Poll ``expression`` until it is truthy; its value. Fails naming ``what`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting until {what} (last: {value!r})")
            await asyncio.sleep(0.05)

    async def text(self, selector: str) -> str | None:
        return await self.js(f"(document.querySelector({json.dumps(selector)}) || {{}}).textContent")

    async def click(self, selector: str) -> None:
        await self.js(f"document.querySelector({json.dumps(selector)}).click()")

    async def key(self, key: str) -> None:
        """Press and release one key, as a person would (``y``, ``ArrowRight``, ``Enter``, ``1``)."""
        text = key if len(key) == 1 else ("\r" if key == "Enter" else "")
        named = {"ArrowRight": 39, "ArrowLeft": 37, "Enter": 13, "Escape": 27}
        code = named.get(key, ord(key.upper()) if len(key) == 1 else 0)
        base = {"key": key, "windowsVirtualKeyCode": code, "nativeVirtualKeyCode": code}
        await self.send("Input.dispatchKeyEvent", type="keyDown", text=text, **base)
        await self.send("Input.dispatchKeyEvent", type="keyUp", **base)

    async def type(self, selector: str, text: str) -> None:
        """Focus an input and type ``text`` into it."""
        await self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        await self.send("Input.insertText", text=text)

    async def screenshot(self, path: Path) -> Path:
        data = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        with contextlib.suppress(Exception):
            if self.ws is not None:
                await self.ws.close()
        if self.session is not None:
            await self.session.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
