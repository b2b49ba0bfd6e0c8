"""A headless Chromium driven over the DevTools protocol: open a page, collect console errors,
measure its figures and take a full-page screenshot. Only loopback; the browser is ours to stop."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websockets

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
START_TIMEOUT_S = 60
WIDTH = 1400

# Every <figure>: its id, whether its image decoded, and where it sits on the page.
FIGURES_JS = """JSON.stringify([...document.querySelectorAll('figure')].map(f => {
  const img = f.querySelector('img'); const r = f.getBoundingClientRect();
  return {id: f.id, complete: !!img && img.complete, natural: img ? img.naturalWidth : 0,
          x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height};
}))"""


@dataclass
class PageVisit:
    """What a visit to one page produced."""

    screenshot: bytes
    figures: list[dict[str, Any]]
    errors: list[str] = field(default_factory=list)


class _Session:
    def __init__(self, socket: Any):
        self.socket = socket
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    async def wait_for(self, method: str, timeout_s: float) -> None:
        async def loop() -> None:
            if any(e.get("method") == method for e in self.events):
                return
            while True:
                message = json.loads(await self.socket.recv())
                self.events.append(message)
                if message.get("method") == method:
                    return

        await asyncio.wait_for(loop(), timeout_s)

    def errors(self) -> list[str]:
        out = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                out.append("exception: " + params.get("exceptionDetails", {}).get("text", ""))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                out.append("log: " + params["entry"].get("text", ""))
        return out


class Chromium:
    """A headless Chromium process with DevTools on a loopback port (context manager)."""

    def __init__(self) -> None:
        if CHROMIUM is None:
            raise RuntimeError("chromium is not installed (Debian package `chromium`, see the Makefile's APT_PACKAGES)")
        self.profile = tempfile.mkdtemp(prefix="orch-chromium-")
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            # its own temporary files (org.chromium.Chromium.*) inside the profile, removed with it
            env={**os.environ, "TMPDIR": self.profile},
        )
        self.port = self._devtools_port()

    def _devtools_port(self) -> int:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if found:
                return int(found.group(1))
        raise RuntimeError(f"chromium exited ({self.process.wait()}) before DevTools listened")

    def visit(self, url: str, timeout_s: float = 60) -> PageVisit:
        """Open ``url`` in a fresh tab, wait for its load event, and record what happened."""
        return asyncio.run(self._visit(url, timeout_s))

    async def _visit(self, url: str, timeout_s: float) -> PageVisit:
        import urllib.request

        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            target = json.loads(response.read())
        try:
            async with websockets.connect(target["webSocketDebuggerUrl"], max_size=None) as socket:
                session = _Session(socket)
                for domain in ("Page", "Runtime", "Log"):
                    await session.call(f"{domain}.enable")
                await session.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=900, deviceScaleFactor=1, mobile=False)
                await session.call("Page.navigate", url=url)
                await session.wait_for("Page.loadEventFired", timeout_s)
                result = await session.call("Runtime.evaluate", expression=FIGURES_JS, returnByValue=True)
                figures = json.loads(result["result"]["value"])
                shot = await session.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
                return PageVisit(screenshot=base64.b64decode(shot["data"]), figures=figures, errors=session.errors())
        finally:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/close/{target['id']}", timeout=10):  # noqa: S310
                pass

    def close(self) -> None:
        """Stop the browser and remove its profile."""
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ink_fraction(png: bytes, box: tuple[float, float, float, float] | None = None) -> float:
    """Fraction of pixels (inside ``box`` = x, y, w, h) that are not near-white."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("L")
    if box is not None:
        x, y, w, h = box
        image = image.crop((int(x), int(y), int(x + w), int(y + h)))
    histogram = image.histogram()
    total = sum(histogram)
    return sum(histogram[:240]) / total if total else 0.0


def save(png: bytes, path: Path) -> Path:
    """Write a screenshot (for a person to look at)."""
    path.write_bytes(png)
    return path
