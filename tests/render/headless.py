"""A headless Chromium driven over the DevTools protocol: open a page, record console errors and network
requests, measure elements and screenshot them.

Debian's ``chromium`` (``.ci/run`` installs it) and the ``websocket-client`` package (the dev extra) are all it
needs. Where either is missing the tests skip with the reason, except under CI (``CI`` set), where they fail:
CI installs both, so a skip there would hide a broken install.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-port=0",
)


def chromium_path() -> str:
    """The browser binary, or skip (fail under CI) saying what to install."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    why = "no chromium on PATH: apt-get install -y chromium (.ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


def _websocket():
    try:
        import websocket
    except ImportError:
        why = "websocket-client is missing: pip install -e '.[dev]'"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return websocket


class Browser:
    """One Chromium process with a fresh profile; :meth:`open` gives a :class:`Page`."""

    def __init__(self, binary: str, *, width: int = 1280, height: int = 900):
        self.profile = tempfile.mkdtemp(prefix="wg-chromium-")
        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.url = self._devtools_url()
        self.ws = _websocket().create_connection(self.url, timeout=30, suppress_origin=True)
        self._ids = itertools.count(1)

    def _devtools_url(self) -> str:
        deadline = time.monotonic() + 30
        seen = []
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                if self.proc.poll() is not None:
                    break
                continue
            seen.append(line)
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                return m.group(1)
        self.close()
        raise RuntimeError("chromium did not start its DevTools endpoint:\n" + "".join(seen[-20:]))

    def call(self, method: str, params: dict | None = None, *, session: str | None = None, events=None) -> dict:
        """Send one command and wait for its answer; events that arrive meanwhile go to ``events``."""
        mid = next(self._ids)
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        while True:
            data = json.loads(self.ws.recv())
            if data.get("id") == mid:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})
            if events is not None and "method" in data:
                events.append(data)

    def open(self, url: str) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Runtime", "Log", "Network"):
            page.call(f"{domain}.enable")
        page.navigate(url)
        return page

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """A tab: its events (console, exceptions, requests) are recorded from before the navigation on."""

    def __init__(self, browser: Browser, session: str):
        self.browser, self.session = browser, session
        self.events: list[dict] = []

    def call(self, method: str, params: dict | None = None) -> dict:
        return self.browser.call(method, params, session=self.session, events=self.events)

    def navigate(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})
        deadline = time.monotonic() + 30
        while not any(e["method"] == "Page.loadEventFired" for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish loading in 30 s")
            data = json.loads(self.browser.ws.recv())
            if "method" in data:
                self.events.append(data)
        self.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")

    def evaluate(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries, as text."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif e["method"] == "Runtime.exceptionThrown":
                out.append(json.dumps(p.get("exceptionDetails", {}))[:500])
            elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(p["entry"].get("text", ""))
        return out

    def requests(self) -> list[str]:
        """URLs of every request the page made (the page itself included)."""
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def screenshot(self, clip: dict | None = None):  # -> PIL.Image.Image
        """The whole page (or ``clip``: x, y, width, height in page pixels) as a PIL image."""
        from PIL import Image

        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": True}
        if clip is None:
            w, h = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            clip = {"x": 0, "y": 0, "width": w, "height": h}
        params["clip"] = {**clip, "scale": 1}
        data = base64.b64decode(self.call("Page.captureScreenshot", params)["data"])
        return Image.open(io.BytesIO(data)).convert("RGB")


def blank_fraction(img) -> tuple[float, int]:
    """(fraction of near-white pixels, number of distinct colours) of an image: a drawn figure has few
    near-white pixels relative to a blank one and more than a handful of colours."""
    small = img.convert("RGB")
    colours = small.getcolors(maxcolors=1 << 20) or []
    total = small.width * small.height
    white = sum(n for n, (r, g, b) in colours if r > 245 and g > 245 and b > 245)
    return white / max(total, 1), len(colours)


def save(img, name: str) -> Path | None:
    """Keep a screenshot where ``WEIGHTGEO_SCREENSHOTS`` points (for a reader to look at); None otherwise."""
    where = os.environ.get("WEIGHTGEO_SCREENSHOTS")
    if not where:
        return None
    path = Path(where) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
