"""A real headless Chromium driven over the DevTools protocol (CDP), for report tests.

Chromium is started with `--remote-debugging-pipe`: CDP messages (JSON, each ended by a
NUL byte) go in on its fd 3 and come out on its fd 4, so no websocket library, port or
browser download is needed, only Debian's `chromium` package. `Page` collects console
errors, uncaught exceptions and failed loads while it is open.

Example:
    with Chromium() as browser, browser.page(width=390, height=844, mobile=True) as page:
        page.goto("file:///tmp/report.html")
        page.evaluate("document.title")
        png = page.screenshot()
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["Chromium", "ChromiumError", "Page", "find_chromium"]


class ChromiumError(RuntimeError):
    """Chromium is missing, died, or answered a command with an error."""


def find_chromium() -> str | None:
    """Path of a Chromium binary (`$CHROMIUM`, /usr/bin/chromium, or on PATH), or None."""
    for c in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def _above_nine(fd: int) -> int:
    import fcntl

    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


class Chromium:
    """One headless Chromium process (its own throw-away profile).

    Args:
        exe: The binary (default `find_chromium()`).
        timeout_s: Longest wait for any one CDP answer or page load.
    """

    def __init__(self, exe: str | None = None, *, timeout_s: float = 30.0) -> None:
        exe = exe or find_chromium()
        if exe is None:
            raise ChromiumError("Chromium is not installed; install Debian's chromium package")
        self.timeout_s = timeout_s
        self._profile = tempfile.mkdtemp(prefix="streamvg-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # The child's ends go above 9, so moving them onto 3 and 4 cannot clobber one another.
        to_child_r, from_child_w = (_above_nine(fd) for fd in (to_child_r, from_child_w))
        flags = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
            "--disable-background-networking", "--remote-debugging-pipe", f"--user-data-dir={self._profile}",
            "about:blank",
        ]
        # bash (dash takes single-digit fds only) moves the pipe ends onto fds 3 and 4, where
        # Chromium expects them.
        script = f'exec "$0" "$@" 3<&{to_child_r} 4>&{from_child_w} {to_child_r}<&- {from_child_w}>&-'
        self.proc = subprocess.Popen(
            [shutil.which("bash") or "/bin/bash", "-c", script, exe, *flags], pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._ids = itertools.count(1)
        self._waiting: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._listeners: dict[str, list[queue.Queue[dict[str, Any]]]] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_loop, name="chromium-cdp", daemon=True)
        self._reader.start()
        self.version = self.send("Browser.getVersion")

    # --- transport -----------------------------------------------------------------

    def _read_loop(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_child, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                with self._lock:
                    if "id" in msg and msg["id"] in self._waiting:
                        self._waiting.pop(msg["id"]).put(msg)
                        continue
                    listeners = list(self._listeners.get(msg.get("sessionId", ""), ()))
                for q in listeners:
                    q.put(msg)
        with self._lock:  # Chromium is gone: wake everyone who waits
            for q in self._waiting.values():
                q.put({"error": {"message": "Chromium exited"}})
            self._waiting.clear()

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send one CDP command and return its result.

        Raises:
            ChromiumError: Chromium answered with an error, died, or did not answer in time.
        """
        mid = next(self._ids)
        q: queue.Queue[dict[str, Any]] = queue.Queue()
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        with self._lock:
            self._waiting[mid] = q
        with self._write_lock:
            try:
                os.write(self._to_child, json.dumps(msg).encode() + b"\0")
            except OSError as exc:
                raise ChromiumError(f"Chromium is gone ({exc.strerror})") from exc
        try:
            reply = q.get(timeout=self.timeout_s)
        except queue.Empty:
            raise ChromiumError(f"Chromium did not answer {method} within {self.timeout_s:.0f}s") from None
        if "error" in reply:
            raise ChromiumError(f"{method} failed: {reply['error'].get('message')}")
        return dict(reply.get("result", {}))

    def _listen(self, session: str) -> queue.Queue[dict[str, Any]]:
        q: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            self._listeners.setdefault(session, []).append(q)
        return q

    # --- pages ---------------------------------------------------------------------

    def page(self, *, width: int = 1280, height: int = 900, mobile: bool = False, scale: float = 1.0) -> Page:
        """A new tab emulating a screen `width` x `height` CSS pixels (a phone with `mobile`)."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        return Page(self, target, session, width=width, height=height, mobile=mobile, scale=scale)

    def close(self) -> None:
        """Close the browser and delete its profile."""
        if self.proc.poll() is None:
            with contextlib.suppress(ChromiumError):
                self.send("Browser.close")
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for fd in (self._to_child, self._from_child):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Page:
    """One tab. `errors` lists console errors, uncaught exceptions and failed loads seen."""

    def __init__(
        self, browser: Chromium, target: str, session: str, *, width: int, height: int, mobile: bool, scale: float,
    ) -> None:
        self.browser, self.target, self.session = browser, target, session
        self._events = browser._listen(session)
        self.errors: list[str] = []
        self._loaded = threading.Event()
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile,
        })
        if mobile:
            self.send("Emulation.setTouchEmulationEnabled", {"enabled": True})

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        result = self.browser.send(method, params, self.session)
        self._drain()
        return result

    def _drain(self, until: str | None = None, timeout_s: float = 0.0) -> bool:
        """Record pending events; with `until`, wait for that event (True when seen)."""
        import time

        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                msg = self._events.get(timeout=max(0.0, remaining)) if until else self._events.get_nowait()
            except queue.Empty:
                return False
            method, p = msg.get("method", ""), msg.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                self.errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                self.errors.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
            elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                e = p["entry"]
                self.errors.append(f"log: {e.get('text')} {e.get('url', '')}".strip())
            elif method == "Network.loadingFailed":
                self.errors.append(f"load failed: {p.get('errorText')}")
            if until and method == until:
                return True

    def goto(self, url: str) -> None:
        """Open `url` and wait for its load event (images included)."""
        self.send("Page.navigate", {"url": url})
        if not self._drain("Page.loadEventFired", self.browser.timeout_s):
            raise ChromiumError(f"{url} did not finish loading within {self.browser.timeout_s:.0f}s")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable values)."""
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise ChromiumError(f"evaluating {expression[:60]!r} threw: {r['exceptionDetails'].get('text')}")
        return r.get("result", {}).get("value")

    def screenshot(self, *, full_page: bool = False) -> bytes:
        """A PNG of the viewport (or of the whole page with `full_page`)."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            size = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1})
        return base64.b64decode(self.send("Page.captureScreenshot", params)["data"])

    def close(self) -> None:
        with contextlib.suppress(ChromiumError):
            self.browser.send("Target.closeTarget", {"targetId": self.target})

    def __enter__(self) -> Page:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
