"""The report in headless Chromium: it loads without console errors or network requests, every
image decodes (naturalWidth > 0 after ``img.decode()``), every interactive chart draws its canvas,
and a screenshot is taken.

Chromium is driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``: JSON
messages separated by NUL bytes on file descriptors 3 and 4), so nothing is injected into the
report and no websocket library is needed. Debian's ``chromium`` is installed when absent, if we
run as root and ``CI`` or ``BBDECODER_INSTALL_CHROMIUM=1`` allows it; otherwise the test skips.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from bbdecoder.report import build_report
from tests.test_report import make_report_run


@pytest.fixture(scope="module")
def report_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_report_run(tmp_path_factory.mktemp("browser_run"))


CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
    "--window-size=1280,900",
]


def ensure_chromium() -> str:
    found = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if found:
        return found
    allowed = os.environ.get("CI") or os.environ.get("BBDECODER_INSTALL_CHROMIUM") == "1"
    if os.geteuid() != 0 or not allowed:
        pytest.skip(
            "chromium is not installed; install Debian's chromium (apt-get install -y chromium), or run as "
            "root with CI=1 or BBDECODER_INSTALL_CHROMIUM=1 to let the test set-up install it"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            pytest.skip(f"could not install chromium ({' '.join(command)}): {done.stderr[-300:]}")
    return CHROMIUM


def _onto_3_and_4(read_end: int, write_end: int) -> None:
    """In the child: the command pipe's read end on fd 3, the reply pipe's write end on fd 4."""
    read_copy, write_copy = os.dup(read_end), os.dup(write_end)  # safe even if either is 3 or 4
    os.dup2(read_copy, 3)
    os.dup2(write_copy, 4)


class DevTools:
    """A minimal DevTools-protocol client over Chromium's debugging pipe."""

    def __init__(self, binary: str, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The browser reads commands on fd 3 and writes replies on fd 4.
        self.process = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            # close_fds runs after preexec_fn: keep 3 and 4 open through it.
            pass_fds=(3, 4, to_browser_r, from_browser_w),
            preexec_fn=lambda: _onto_3_and_4(to_browser_r, from_browser_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._from_browser], [], [], remaining)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the debugging pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60):
        self._next_id += 1
        command: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            command["sessionId"] = session
        os.write(self._to_browser, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            message = self._read_message(deadline)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method} failed: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            message = self._read_message(deadline)
            self.events.append(message)
            if message.get("method") == method:
                return message

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close", timeout=10)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


DECODE_ALL = """
Promise.all(Array.from(document.images).map(img =>
    img.decode().then(() => true, () => false).then(decoded =>
        ({decoded: decoded, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
          alt: img.alt}))))
"""


def inspect_page(binary: str, page: Path, profile: Path, screenshot: Path) -> dict[str, Any]:
    """Load ``page``; return the console errors, exceptions, requests, image states and sections."""
    browser = DevTools(binary, profile)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        images = browser.send(
            "Runtime.evaluate",
            {"expression": DECODE_ALL, "awaitPromise": True, "returnByValue": True},
            session=session,
        )["result"]["value"]
        sections = browser.send(
            "Runtime.evaluate",
            {
                "expression": "Array.from(document.querySelectorAll('section')).map(s => s.id)",
                "returnByValue": True,
            },
            session=session,
        )["result"]["value"]
        charts = browser.send(
            "Runtime.evaluate",
            {
                "expression": "Array.from(document.querySelectorAll('.bbd-chart')).map(c => "
                "({id: c.dataset.chart, canvas: !!c.querySelector('canvas'), width: c.clientWidth}))",
                "returnByValue": True,
            },
            session=session,
        )["result"]["value"]
        height = browser.send(
            "Runtime.evaluate",
            {"expression": "document.documentElement.scrollHeight", "returnByValue": True},
            session=session,
        )["result"]["value"]
        browser.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": min(int(height), 16000), "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        shot = browser.send("Page.captureScreenshot", {"format": "png"}, session=session)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        events = browser.events
    finally:
        browser.close()
    console_errors = [
        e["params"]
        for e in events
        if e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") in {"error", "assert"}
    ]
    log_errors = [
        e["params"]["entry"]
        for e in events
        if e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error"
    ]
    exceptions = [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"]
    requests = [
        e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"
    ]
    return {
        "console_errors": console_errors + log_errors,
        "exceptions": exceptions,
        "requests": requests,
        "images": images,
        "sections": sections,
        "charts": charts,
    }


def test_report_loads_cleanly_in_headless_chromium(report_run: Path, tmp_path: Path) -> None:
    binary = ensure_chromium()
    page = build_report(report_run, tmp_path / "report.html")
    screenshot = Path(os.environ.get("BBDECODER_SCREENSHOT", tmp_path / "report.png"))
    result = inspect_page(binary, page, tmp_path / "profile", screenshot)
    assert result["console_errors"] == []
    assert result["exceptions"] == []
    # Only the page itself is fetched: images are data URIs, nothing goes to the network.
    assert [url for url in result["requests"] if not url.startswith(("file:", "data:"))] == []
    images = result["images"]
    assert len(images) == page.read_text().count("<img ")
    assert len(images) >= 3  # weight histograms, saliency grid, bias figure; curves are charts now
    charts = result["charts"]
    assert len(charts) == page.read_text().count('class="bbd-chart"') >= 6
    assert all(c["canvas"] and c["width"] > 300 for c in charts)  # every chart was drawn
    bad = [image for image in images if not (image["decoded"] and image["complete"] and image["width"] > 0)]
    assert bad == []
    assert {"summary", "layers", "gradient-flow", "weights", "saliency", "metrics", "bias"} <= set(
        result["sections"]
    )
    with open(screenshot, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 20_000  # a blank page compresses to a few kB
