#!/usr/bin/env python3
"""Render a quantkit HTML report in headless Chromium and check it loads cleanly.

    python scripts/check_report.py REPORT.html [--screenshot OUT.png] [--width 1280]

Fails (exit 1, one line per problem) when the page logs a console error or throws, when any
<img> did not load (naturalWidth == 0), or when the page requests anything but itself and data:
URIs (a self-contained report makes no request at all). --screenshot writes a PNG of the whole
page. Needs only Python's standard library and Chromium (Debian: ``apt-get install chromium``);
it drives the browser over the DevTools protocol on a pipe (--remote-debugging-pipe), so no port
is opened. Exit 2 when Chromium cannot be found or started.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

# What the page says about its images, once loaded.
IMAGES_JS = """JSON.stringify({
  title: document.title,
  images: Array.from(document.images).map((img, i) => ({
    index: i, alt: img.alt, src: img.getAttribute('src') ? img.getAttribute('src').slice(0, 60) : '',
    complete: img.complete, width: img.naturalWidth, height: img.naturalHeight})),
  height: Math.ceil(document.documentElement.scrollHeight)
})"""


class BrowserError(RuntimeError):
    pass


def find_browser(explicit: str | None) -> str:
    for name in ([explicit] if explicit else [os.environ.get("CHROMIUM", ""), *BROWSERS]):
        if name and (path := shutil.which(name)):
            return path
    raise BrowserError("no Chromium found (install it: apt-get install -y chromium, or pass --browser PATH)")


class DevTools:
    """The DevTools protocol over --remote-debugging-pipe: Chromium reads commands from fd 3 and
    writes replies and events to fd 4, each message JSON terminated by a NUL byte."""

    def __init__(self, browser: str, profile: str, width: int, height: int):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # Park the child's ends above 2 and away from 3/4, then move them to 3/4 in the child.
        hi_r, hi_w = _dup_above(to_child_r, 10), _dup_above(from_child_w, 10)
        os.close(to_child_r)
        os.close(from_child_w)

        def to_3_and_4():
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        args = [browser, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking", "--disable-sync",
                "--hide-scrollbars", "--mute-audio", f"--user-data-dir={profile}",
                f"--window-size={width},{height}", "about:blank"]
        self._log = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                         preexec_fn=to_3_and_4, close_fds=False)
        finally:
            os.close(hi_r)
            os.close(hi_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def browser_log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-3000:]

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._to_child, data):]
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next(deadline, method)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message', reply['error'])}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float) -> dict:
        """The first event called ``method`` (already received or still to come)."""
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        deadline = time.monotonic() + timeout
        while True:
            ev = self._next(deadline, method)
            self.events.append(ev)
            if ev.get("method") == method:
                return ev

    def drain(self, seconds: float) -> None:
        """Collect events for ``seconds`` more (late console messages, image errors)."""
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._next(deadline, "events"))
        except TimeoutError:
            pass

    def _next(self, deadline: float, waiting_for: str) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out waiting for {waiting_for}")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise BrowserError("Chromium closed the DevTools pipe (it exited?)")
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (BrowserError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()


def _dup_above(fd: int, low: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)


def _console_text(params: dict) -> str:
    parts = []
    for arg in params.get("args", []):
        parts.append(str(arg.get("value", arg.get("description", arg.get("type", "?")))))
    return " ".join(parts)


def check(page: Path, screenshot: Path | None = None, browser: str | None = None, width: int = 1280,
          timeout: float = 60.0) -> tuple[list[str], dict]:
    """Load ``page`` in headless Chromium; returns the problems found (empty when clean) and what
    the page says about itself (title, images, height)."""
    page = page.resolve()
    url = page.as_uri()
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="check-report-") as profile:
        tools = DevTools(find_browser(browser), profile, width, 900)
        try:
            try:
                target = tools.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)
                session = tools.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True},
                                     timeout=timeout)["sessionId"]
                for domain in ("Page", "Runtime", "Log", "Network"):
                    tools.send(f"{domain}.enable", session=session, timeout=timeout)
                tools.events.clear()  # anything about about:blank
                tools.send("Page.navigate", {"url": url}, session=session, timeout=timeout)
                tools.wait_for("Page.loadEventFired", timeout)
                tools.drain(0.5)
                info = json.loads(tools.send("Runtime.evaluate", {"expression": IMAGES_JS, "returnByValue": True},
                                             session=session, timeout=timeout)["result"]["value"])
                if screenshot is not None:
                    height = max(int(info["height"]), 200)
                    tools.send("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                               session=session, timeout=timeout)
                    shot = tools.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                                      session=session, timeout=timeout)
                    screenshot.parent.mkdir(parents=True, exist_ok=True)
                    screenshot.write_bytes(base64.b64decode(shot["data"]))
                tools.drain(0.2)
            except (TimeoutError, BrowserError) as e:
                raise BrowserError(f"{e}\n--- Chromium's output ---\n{tools.browser_log()}") from None
        finally:
            tools.close()

    for ev in tools.events:
        method, p = ev.get("method"), ev.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            text = d.get("exception", {}).get("description") or d.get("text", "?")
            problems.append(f"uncaught exception: {text}")
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            problems.append(f"console.{p['type']}: {_console_text(p)}")
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            e = p["entry"]
            problems.append(f"console error ({e.get('source', '?')}): {e.get('text', '')}"
                            + (f" [{e['url'][:100]}]" if e.get("url") else ""))
        elif method == "Network.requestWillBeSent":
            req = p.get("request", {}).get("url", "")
            if not (req.startswith("data:") or req.split("#", 1)[0] == url):
                problems.append(f"request outside the page: {req[:200]}")
        elif method == "Network.loadingFailed" and not p.get("canceled"):
            problems.append(f"failed to load a resource: {p.get('errorText', '?')}")
    for img in info["images"]:
        if not img["complete"] or img["width"] == 0:
            problems.append(f"image {img['index']} ({img['alt'] or img['src']!r}) did not load")
    return list(dict.fromkeys(problems)), info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", type=Path, help="the HTML report (e.g. reports/demo/report.html)")
    ap.add_argument("--screenshot", type=Path, help="write a PNG of the whole rendered page here")
    ap.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels (default 1280)")
    ap.add_argument("--browser", help="Chromium executable (default: $CHROMIUM, then chromium on PATH)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the browser (default 60)")
    a = ap.parse_args(argv)
    if not a.report.is_file():
        print(f"check_report: {a.report}: no such file", file=sys.stderr)
        return 1
    try:
        problems, info = check(a.report, a.screenshot, a.browser, a.width, a.timeout)
    except BrowserError as e:
        print(f"check_report: could not render {a.report}: {e}", file=sys.stderr)
        return 2
    for p in problems:
        print(f"check_report: {a.report}: {p}", file=sys.stderr)
    if problems:
        print(f"check_report: FAILED, {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"check_report: OK: {a.report} ({info['title']!r}) rendered without console errors or requests; "
          f"{len(info['images'])} image(s) loaded, page {info['height']} px tall"
          + (f"; screenshot {a.screenshot}" if a.screenshot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
