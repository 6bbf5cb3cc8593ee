"""The interactive report in headless Chromium: hovering a point of the gradient-norm chart shows its
layer, a legend click hides the series, the log toggle and the name filter work, no network request
and no console error. Real mouse and keyboard input through the DevTools protocol (Input domain)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from bbdecoder.report import build_report
from bbdecoder.store import RunWriter
from tests.test_report import make_report_run
from tests.test_report_browser import DevTools, ensure_chromium


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_report_run(tmp_path_factory.mktemp("interactive_run"))
    writer = RunWriter(root)
    writer.add_event("exploding_grad", "exploding gradient at step 4: [4] 4 (4.weight)", step=4, layer_id=4,
                     param="4.weight")  # fmt: skip
    writer.close()
    return build_report(root, root / "report.html")


class Page:
    """One tab of a DevTools browser, with helpers for evaluation and real input events."""

    def __init__(self, browser: DevTools) -> None:
        self.browser = browser
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=self.session)

    def send(self, method: str, params: dict | None = None) -> dict[str, Any]:
        return self.browser.send(method, params, session=self.session)

    def js(self, expression: str) -> Any:
        reply = self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression!r} raised {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_js(self, expression: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression}")

    def mouse(self, kind: str, x: float, y: float, clicks: int = 0) -> None:
        params = {"type": kind, "x": x, "y": y, "button": "left" if kind != "mouseMoved" else "none"}
        if clicks:
            params["clickCount"] = clicks
        self.send("Input.dispatchMouseEvent", params)

    def click(self, x: float, y: float) -> None:
        self.mouse("mouseMoved", x, y)
        self.mouse("mousePressed", x, y, clicks=1)
        self.mouse("mouseReleased", x, y, clicks=1)

    def errors(self) -> list[Any]:
        events = self.browser.events
        console = [
            e["params"] for e in events
            if e.get("method") == "Runtime.consoleAPICalled"
            and e["params"].get("type") in {"error", "assert"}
        ]  # fmt: skip
        logs = [
            e["params"]["entry"] for e in events
            if e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error"
        ]  # fmt: skip
        return console + logs + [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"]

    def requests(self) -> list[str]:
        return [
            e["params"]["request"]["url"]
            for e in self.browser.events
            if e.get("method") == "Network.requestWillBeSent"
        ]


# A point of series j at index idx whose nearest other visible series is > 10 px away.
PICK_POINT = """
(() => {
  const c = window.bbd.charts[%s], u = c.u;
  u.over.scrollIntoView({block: "center"});
  const n = u.data[0].length;
  for (let idx = Math.floor(n / 2); idx < n; idx++) {
    for (let j = 1; j < u.series.length; j++) {
      const v = u.data[j][idx];
      if (v === null || v === undefined) continue;
      const y = u.valToPos(v, "y");
      let gap = Infinity;
      for (let k = 1; k < u.series.length; k++) {
        if (k === j || u.data[k][idx] === null || !u.series[k].show) continue;
        gap = Math.min(gap, Math.abs(u.valToPos(u.data[k][idx], "y") - y));
      }
      if (gap > 10) {
        const r = u.over.getBoundingClientRect();
        return {j: j - 1, idx: idx, x: r.left + u.valToPos(u.data[0][idx], "x"), y: r.top + y,
                layer: c.spec.series[j - 1].layer, param: c.spec.series[j - 1].param,
                step: u.data[0][idx]};
      }
    }
  }
  return null;
})()
"""


def test_hover_legend_log_and_filter_in_chromium(page: Path, tmp_path: Path) -> None:
    binary = ensure_chromium()
    browser = DevTools(binary, tmp_path / "profile")
    try:
        tab = Page(browser)
        tab.send("Page.navigate", {"url": page.resolve().as_uri()})
        browser.wait_for("Page.loadEventFired")
        tab.wait_js("window.bbd && window.bbd.charts['grad-l2'] && !!window.bbd.charts['grad-l2'].u")
        chart_ids = tab.js("Object.keys(window.bbd.charts)")
        assert {"loss", "grad-l2", "grad-l1", "update-ratio", "act-dead_fraction"} <= set(chart_ids)
        assert any(i.startswith("gradient-flow-") for i in chart_ids)

        # hover: the tooltip names the layer and parameter of the point under the mouse
        point = tab.js(PICK_POINT % json.dumps("grad-l2"))
        assert point is not None
        tab.mouse("mouseMoved", point["x"], point["y"])
        tip = tab.wait_js(
            "(() => { const t = window.bbd.charts['grad-l2'].tooltip;"
            " return t.style.display === 'block' ?"
            " {text: t.textContent, series: t.dataset.series} : null; })()"
        )
        assert tip["series"] == str(point["j"])
        assert point["layer"] in tip["text"] and point["param"] in tip["text"]
        assert f"step: {point['step']}" in tip["text"]

        # legend: a real click on entry j hides series j, a second click shows it again
        item = tab.js(
            f"(() => {{ const e = window.bbd.charts['grad-l2'].items[{point['j']}];"
            " e.scrollIntoView({block: 'center'});"
            " const r = e.getBoundingClientRect(); return {x: r.left + 4, y: r.top + r.height / 2}; })()"
        )
        shown = f"window.bbd.charts['grad-l2'].u.series[{point['j'] + 1}].show"
        assert tab.js(shown) is True
        tab.click(item["x"], item["y"])
        assert tab.wait_js(f"{shown} === false")
        assert tab.js(f"window.bbd.charts['grad-l2'].items[{point['j']}].classList.contains('off')")
        tab.click(item["x"], item["y"])
        assert tab.wait_js(f"{shown} === true")

        # log/linear toggle rebuilds the chart with the other y distribution
        assert tab.js("window.bbd.charts['grad-l2'].u.scales.y.distr") == 3
        box = tab.js(
            "(() => { const b = window.bbd.charts['grad-l2'].logBox; b.scrollIntoView({block: 'center'});"
            " const r = b.getBoundingClientRect();"
            " return {x: r.left + r.width / 2, y: r.top + r.height / 2}; })()"
        )
        tab.click(box["x"], box["y"])
        assert tab.wait_js("window.bbd.charts['grad-l2'].u.scales.y.distr === 1")

        # filter by name: typing keeps only the series whose label matches
        labels = tab.js("window.bbd.charts['grad-l2'].spec.series.map(s => s.label)")
        word = point["param"]
        field = tab.js(
            "(() => { const f = window.bbd.charts['grad-l2'].filterBox; f.scrollIntoView({block: 'center'});"
            " const r = f.getBoundingClientRect(); return {x: r.left + 10, y: r.top + r.height / 2}; })()"
        )
        tab.click(field["x"], field["y"])
        tab.send("Input.insertText", {"text": word})
        expected = [word.lower() in label.lower() for label in labels]
        tab.wait_js(f"window.bbd.charts['grad-l2'].filterBox.value === {json.dumps(word)}")
        visible = tab.js("window.bbd.charts['grad-l2'].u.series.slice(1).map(s => s.show)")
        assert visible == expected and 0 < sum(expected) < len(labels)

        # gradient-flow bars: hovering the middle of a bar names its parameter
        bar = tab.js(
            "(() => { const id = Object.keys(window.bbd.charts).find(k => k.startsWith('gradient-flow-'));"
            " const c = window.bbd.charts[id], u = c.u; u.over.scrollIntoView({block: 'center'});"
            " const r = u.over.getBoundingClientRect(); const v = u.data[2][0];"
            " return {id: id, x: r.left + u.valToPos(0, 'x'), y: r.top + u.valToPos(v, 'y') + 2,"
            " param: c.spec.category_info[0].param}; })()"
        )
        tab.mouse("mouseMoved", bar["x"], bar["y"])
        text = tab.wait_js(
            f"(() => {{ const t = window.bbd.charts[{json.dumps(bar['id'])}].tooltip;"
            " return t.style.display === 'block' ? t.textContent : null; })()"
        )
        assert bar["param"] in text
        # the alert table, drawn by the page from the payload
        rows = tab.js(
            "Array.from(document.querySelectorAll('#bbd-alerts tr.bbd-alert'))"
            ".map(r => [r.dataset.kind, r.textContent])"
        )
        assert len(rows) == 1 and rows[0][0] == "exploding_grad" and "4.weight" in rows[0][1]
        assert tab.errors() == []
        assert [u for u in tab.requests() if not u.startswith(("file:", "data:"))] == []
    finally:
        browser.close()
