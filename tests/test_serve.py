"""``bbdecoder serve``: a training subprocess writes a store, the dashboard serves it on a free
127.0.0.1 port, headless Chromium sees the latest step advance without a reload; requests without
the token get 401, a wrong token 403; no path leaves the run folders; the server opens the store
read-only and never changes it."""

from __future__ import annotations

import hashlib
import json
import os
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bbdecoder
from bbdecoder.monitor import Analyzer
from bbdecoder.serve import Dashboard, ReadOnlyRunReader, discover_runs
from bbdecoder.store import open_run
from tests.test_report_browser import DevTools, ensure_chromium
from tests.test_report_interactive import Page

TRAIN = """
import sys, time
from pathlib import Path
import torch
from torch import nn
from torch.nn import functional as F
from bbdecoder.monitor import Analyzer

out, stop = sys.argv[1], Path(sys.argv[2])
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
with Analyzer(net, out, input_size=(1, 1, 4, 4)) as analyzer:
    for step in range(3000):  # bounded: about 5 minutes at most
        if stop.exists():
            break
        x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
        loss = F.cross_entropy(analyzer.forward_propagation(x), y)
        optimizer.zero_grad()
        analyzer.backward_propagation(loss)
        optimizer.step()
        if (step + 1) % 20 == 0:
            analyzer.end_epoch()
        time.sleep(0.1)
"""


def _env() -> dict[str, str]:
    src = str(Path(bbdecoder.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}  # fmt: skip


def _small_run(root: Path, steps: int = 3) -> Path:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with Analyzer(net, root) as analyzer:
        for _ in range(steps):
            loss = F.cross_entropy(analyzer.forward_propagation(torch.randn(5, 4)), torch.randint(0, 2, (5,)))
            optimizer.zero_grad()
            analyzer.backward_propagation(loss)
            optimizer.step()
    return root


def _first_line(process: subprocess.Popen, timeout: float = 120.0) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([process.stdout], [], [], remaining)[0]:
            raise AssertionError(f"serve printed no URL within {timeout} s")
        chunk = os.read(process.stdout.fileno(), 1)
        if not chunk:
            raise AssertionError(f"serve exited early: {process.wait()}")
        line += chunk
    return line.decode().strip()


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _raw_get(host: str, port: int, path: str) -> int:
    """A request whose path is sent exactly as given (urllib would normalise ``../``)."""
    import http.client

    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.name in {"run.sqlite", "run.sqlite-wal"}
    }


def _wait_for_steps(folder: Path, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (folder / "run.sqlite").exists():
            try:
                with open_run(folder) as reader:
                    if len(reader.steps()) >= n:
                        return
            except Exception:
                pass  # the schema may not be written yet
        time.sleep(0.2)
    raise AssertionError(f"the training subprocess stored fewer than {n} steps in {timeout} s")


def test_live_dashboard_end_to_end(tmp_path: Path) -> None:
    binary = ensure_chromium()
    runs = tmp_path / "runs"
    _small_run(runs / "b")
    stop = tmp_path / "stop"
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    trainer = subprocess.Popen([sys.executable, str(script), str(runs / "a"), str(stop)], env=_env())
    server = None
    try:
        _wait_for_steps(runs / "a", 2)
        server = subprocess.Popen(
            [sys.executable, "-m", "bbdecoder.cli", "serve", str(runs), "--port", "0", "--interval", "0.3"],
            stdout=subprocess.PIPE,
            env=_env(),
        )
        url = _first_line(server)
        assert url.startswith("http://127.0.0.1:") and "?token=" in url
        base, token = url.split("/?token=")
        host, port = base.removeprefix("http://").split(":")

        # the token is required on every route; a wrong one is refused
        for path in ("/", "/api/payload?run=a", "/api/runs"):
            assert _get(base + path)[0] == 401
            sep = "&" if "?" in path else "?"
            assert _get(f"{base}{path}{sep}token=wrong")[0] == 403
            assert _get(f"{base}{path}{sep}token={token}")[0] == 200
        # nothing outside the run table can be named
        for path in (
            f"/../a/run.sqlite?token={token}",
            f"/a/run.sqlite?token={token}",
            f"/%2e%2e/%2e%2e/etc/passwd?token={token}",
            f"/api/payload?run=../a&token={token}",
            f"/api/payload?run=a/../../x&token={token}",
            f"/?run=%2Fetc%2Fpasswd&token={token}",
        ):
            assert _raw_get(host, int(port), path) == 404, path
        status, body = _get(f"{base}/api/runs?token={token}")
        assert status == 200 and sorted(json.loads(body)["runs"]) == ["a", "b"]
        post = urllib.request.Request(f"{base}/?token={token}", method="POST", data=b"x")
        try:
            urllib.request.urlopen(post, timeout=30)
            pytest.fail("POST was accepted")
        except urllib.error.HTTPError as err:
            assert err.code == 405
        _browser_part(binary, tmp_path, url, runs, stop, trainer, server)
    finally:
        stop.touch()
        for process in (trainer, server):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _browser_part(
    binary: str, tmp_path: Path, url: str, runs: Path, stop: Path, trainer: subprocess.Popen, server
) -> None:
    browser = DevTools(binary, tmp_path / "profile")
    try:
        tab = Page(browser)
        tab.send("Page.navigate", {"url": url + "&run=a"})
        browser.wait_for("Page.loadEventFired")
        first = int(
            tab.wait_js(
                "(() => { const e = document.getElementById('latest-step');"
                " return e && /^[0-9]+$/.test(e.textContent) ? e.textContent : null; })()"
            )
        )
        tab.js("window.__same_document = true")
        later = int(
            tab.wait_js(
                "(() => { const n = parseInt(document.getElementById('latest-step').textContent, 10);"
                f" return n > {first} ? String(n) : null; }})()",
                timeout=60,
            )
        )
        assert later > first
        assert tab.js("window.__same_document === true")  # updated in place, no reload
        assert tab.js("window.bbd.charts['grad-l2'].spec.x.length") >= 2
        picker = tab.js("Array.from(document.querySelectorAll('#run-picker a')).map(a => a.textContent)")
        assert sorted(picker) == ["a", "b"]
        assert tab.errors() == []
        origin = url.split("/?")[0]
        assert [u for u in tab.requests() if not u.startswith((origin, "data:"))] == []
    finally:
        browser.close()

    # the store is opened read-only by the server process (the OS sees O_RDONLY on the file) ...
    if Path(f"/proc/{server.pid}/fd").exists():
        modes = []
        for fd in os.listdir(f"/proc/{server.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{server.pid}/fd/{fd}")
            except OSError:
                continue
            if target.endswith("/run.sqlite"):
                flags = next(line for line in Path(f"/proc/{server.pid}/fdinfo/{fd}").read_text().splitlines()
                             if line.startswith("flags"))  # fmt: skip
                modes.append(int(flags.split()[1], 8) & os.O_ACCMODE)
        assert modes and all(mode == os.O_RDONLY for mode in modes)
    # ... and never changes it: after training stopped, more requests leave the files as they were
    stop.touch()
    trainer.wait(timeout=120)
    before = _digest(runs / "a")
    base, token = url.split("/?token=")
    for _ in range(3):
        assert _get(f"{base}/api/payload?run=a&token={token}")[0] == 200
        assert _get(f"{base}/?run=a&token={token}")[0] == 200
    assert _digest(runs / "a") == before


def test_dashboard_in_process_run_table_and_readonly_reader(tmp_path: Path) -> None:
    _small_run(tmp_path / "runs" / "x" / "one")
    _small_run(tmp_path / "runs" / "two")
    assert sorted(discover_runs(tmp_path / "runs")) == ["two", "x/one"]
    assert list(discover_runs(tmp_path / "runs" / "two")) == ["two"]
    dashboard = Dashboard(tmp_path / "runs", token="t0k")
    assert dashboard.authorised("t0k") and not dashboard.authorised("t0") and not dashboard.authorised(None)
    assert dashboard.run("../two") is None and dashboard.run("two") is not None
    payload = json.loads(dashboard.payload(*dashboard.run("two")))
    assert payload["latest_step"] == 2 and payload["run"] == "two" and payload["alerts"] == []
    # an alert stored by training appears in the next payload (the page's alert table shows it)
    from bbdecoder.store import RunWriter

    writer = RunWriter(tmp_path / "runs" / "two")
    writer.add_event("loss_spike", "loss spike at step 2: 9.0", step=2, epoch=0)
    writer.close()
    deadline = time.monotonic() + 60  # rebuilds are spaced by twice the last build time
    while time.monotonic() < deadline:
        payload = json.loads(dashboard.payload(*dashboard.run("two")))
        if payload["alerts"]:
            break
        time.sleep(0.1)
    assert [(a["kind"], a["step"]) for a in payload["alerts"]] == [("loss_spike", 2)]
    dashboard.close()
    reader = ReadOnlyRunReader(tmp_path / "runs" / "two" / "run.sqlite")
    with pytest.raises(Exception, match=r"readonly|read-only|query_only"):
        reader._conn.execute("DELETE FROM steps")
    reader.close()
    with pytest.raises(FileNotFoundError):
        Dashboard(tmp_path / "nothing")
