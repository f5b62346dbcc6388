"""A headless Chromium driven over the DevTools protocol: the suite's browser harness.

One browser per test module (``launch()``), a fresh tab per page (``Browser.new_page``), JavaScript
evaluated in it (``Page.eval``), what the page logged or threw kept per tab (``Page.problems``), and
screenshots (``Page.screenshot``). Debian's Chromium, installed by ``./dev setup``; without it the caller
skips (or fails under FONANA_WS_REQUIRE_SERVICES=1). DevTools listens on loopback only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import websockets

from .conftest import need_service

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
)
JS_TIMEOUT = 10.0  # seconds for anything the page must see


def js(value: Any) -> str:
    """A Python value as a JavaScript literal."""
    return orjson.dumps(value).decode()


# -- Chromium -----------------------------------------------------------------------------------------------


def chromium_binary() -> str:
    """Debian's Chromium (chromium), installed by ``./dev setup`` (which CI runs), never by a test."""
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if not found:
        need_service("Chromium", "not installed: run ./dev setup (apt-get install chromium) as root")
    return found  # type: ignore[return-value]


class CDP:
    """One DevTools WebSocket: numbered commands, replies matched by id, flat sessions for pages."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: dict[str | None, list[dict[str, Any]]] = {}
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                message = orjson.loads(raw)
                if "method" in message:  # an event: kept for the page (session) it came from
                    self.events.setdefault(message.get("sessionId"), []).append(message)
                    continue
                future = self.pending.pop(message.get("id", -1), None)
                if future is not None and not future.done():
                    future.set_result(message)
        except websockets.ConnectionClosed:
            pass
        finally:
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("the DevTools connection closed"))
            self.pending.clear()

    async def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float = 10,
    ) -> dict[str, Any]:
        self.next_id += 1
        command: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session is not None:
            command["sessionId"] = session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        try:
            await self.ws.send(orjson.dumps(command).decode())
            reply = await asyncio.wait_for(future, timeout)
        finally:
            self.pending.pop(command["id"], None)
        assert "error" not in reply, f"{method}: {reply['error']}"
        return reply["result"]

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.wait_for(self.reader, 5)


class Page:
    """A tab, attached through a flat session on the browser's DevTools connection."""

    def __init__(self, cdp: CDP, target_id: str, session: str) -> None:
        self.cdp = cdp
        self.target_id = target_id
        self.session = session

    async def eval(self, expression: str, timeout: float = JS_TIMEOUT + 5) -> Any:
        """Run JavaScript in the page, await its promise, and return the value (JSON-serialisable)."""
        result = await self.cdp.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            self.session,
            timeout,
        )
        details = result.get("exceptionDetails")
        assert details is None, f"JavaScript failed: {details.get('exception', details)}"
        return result["result"].get("value")

    def problems(self) -> list[str]:
        """What the page threw or logged as an error (console.error, uncaught exceptions, failed loads)."""
        found = []
        for event in self.cdp.events.get(self.session, []):
            params = event.get("params", {})
            if event["method"] == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                thrown = details.get("exception", {}).get("description") or details.get("text")
                found.append(f"exception: {thrown}")
            elif event["method"] == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                args = params.get("args", [])
                shown = " ".join(str(a.get("value", a.get("description"))) for a in args)
                found.append(f"console.error: {shown}")
            elif event["method"] == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        return found

    async def screenshot(self, path: Path, width: int = 1280, height: int = 860) -> Path:
        """A PNG of the tab at a fixed size, written to ``path``."""
        await self.cdp.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            self.session,
        )
        shot = await self.cdp.send("Page.captureScreenshot", {"format": "png"}, self.session, timeout=20)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    async def close(self) -> None:
        await self.cdp.send("Target.closeTarget", {"targetId": self.target_id})


class Browser:
    def __init__(self, cdp: CDP, version: str) -> None:
        self.cdp = cdp
        self.version = version

    async def new_page(self, url: str, script: str | None = None) -> Page:
        """A new tab showing ``url``, once its document has loaded; ``script`` is then run in it.

        The tab is created blank and navigated after Runtime and Log are on, so that errors thrown
        while the page loads are in ``Page.problems()`` too.
        """
        target_id = (await self.cdp.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        attached = await self.cdp.send("Target.attachToTarget", {"targetId": target_id, "flatten": True})
        page = Page(self.cdp, target_id, attached["sessionId"])
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            await self.cdp.send(domain, {}, page.session)
        await self.cdp.send("Page.navigate", {"url": url}, page.session)
        deadline = time.monotonic() + JS_TIMEOUT
        while True:
            try:
                state = await page.eval("[location.href, document.readyState]", timeout=2)
                if state == [url, "complete"]:
                    break
            except (AssertionError, TimeoutError):
                state = "navigating"  # the context is replaced while the page loads
            assert time.monotonic() < deadline, f"{url} did not load in the tab: {state}"
            await asyncio.sleep(0.05)
        if script:
            await page.eval(script)
        return page


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def devtools_url(proc: asyncio.subprocess.Process, log: Path, timeout: float = 30) -> str:
    """The browser's DevTools WebSocket URL, from the line Chromium prints on stderr."""
    deadline = time.monotonic() + timeout
    while True:
        text = read_log(log)
        if match := re.search(r"DevTools listening on (ws://\S+)", text):
            return match.group(1)
        assert proc.returncode is None, f"chromium exited with {proc.returncode}:\n{text[-2000:]}"
        assert time.monotonic() < deadline, f"no DevTools URL from chromium in {timeout} s:\n{text[-2000:]}"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def launch() -> AsyncIterator[Browser]:
    """One headless Chromium for the module, its DevTools endpoint on loopback; killed and removed after."""
    binary = await asyncio.to_thread(chromium_binary)
    home = Path(tempfile.mkdtemp(prefix="fonana-ws-chromium-"))
    log = home / "chromium.log"
    proc: asyncio.subprocess.Process | None = None
    cdp: CDP | None = None
    try:
        with open(log, "wb") as err:
            proc = await asyncio.create_subprocess_exec(
                binary,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={home / 'profile'}",
                "about:blank",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # its own process group: the zygote and renderers die with it
            )
        url = await devtools_url(proc, log)
        assert url.startswith("ws://127.0.0.1:"), f"DevTools must listen on loopback only: {url}"
        ws = await asyncio.wait_for(websockets.connect(url, max_size=None, close_timeout=2), 10)
        cdp = CDP(ws)
        version = (await cdp.send("Browser.getVersion"))["product"]
        yield Browser(cdp, version)
    finally:
        if cdp is not None:
            try:
                await cdp.send("Browser.close", timeout=5)
            except Exception:
                pass  # it may close the connection before it answers
            try:
                await cdp.close()
            except Exception:
                pass
        if proc is not None:
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group we started: leftover helpers too
            except ProcessLookupError:
                pass
            if proc.returncode is None:
                await asyncio.wait_for(proc.wait(), 10)
        shutil.rmtree(home, ignore_errors=True)
