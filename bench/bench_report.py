"""Report page weight, build time and time to first render in headless Chromium; dashboard latency.

Runs: the demo (``bbdecoder demo --quick`` unless ``--full-demo``) and a synthetic store of
``--layers`` layers (a weight and a bias each) over ``--steps`` steps with every statistic the
Analyzer records per step (6 gradient statistics and the update ratio). Time to first render is
``performance.now()`` when every chart of the page is drawn (ms since navigation start), median of
``--loads`` page loads. Dashboard latency: a writer commits a step every 0.5 s while the page of
``bbdecoder serve`` (poll interval 1 s) is open; latency = the time the page shows the step minus
the time it was committed (same machine clock), median over the steps.

Usage: ``python bench/bench_report.py [--quick]``; needs Debian's chromium. Writes
``bench/results/report.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the DevTools client of the browser tests

from tests.test_report_browser import DevTools, ensure_chromium  # noqa: E402
from tests.test_report_interactive import Page  # noqa: E402

from bbdecoder.report import build_report  # noqa: E402
from bbdecoder.store import RunWriter  # noqa: E402

GRAD_STATS = ["mean", "mean_abs", "max_abs", "var", "l1", "l2"]


def synthetic_store(folder: Path, layers: int, steps: int, seed: int = 0) -> Path:
    """A store shaped like an Analyzer run: per step, 6 gradient statistics and the update ratio of
    every parameter tensor (``2 * layers`` of them), a loss, epoch aggregates every 500 steps."""
    rng = np.random.default_rng(seed)
    writer = RunWriter(folder)
    writer.set_layers([(i, f"blocks.{i}.linear", "Linear", 4160, "[32, 64]") for i in range(layers)])
    series = [
        (i, writer.series_id(i, f"blocks.{i}.linear.{p}")) for i in range(layers) for p in ("weight", "bias")
    ]
    stat_ids = [writer.stat_id(s) for s in GRAD_STATS]
    ratio_id = writer.stat_id("update_ratio")
    scale = np.exp(rng.normal(0, 1.5, len(series)))
    walk = np.zeros(len(series))
    for step in range(steps):
        epoch = step // 500
        walk += rng.normal(0, 0.05, len(series))
        norm = scale * np.exp(walk) * (30.0 if step == steps // 2 else 1.0)  # one planted spike
        rows = []
        for k, (_layer, sid) in enumerate(series):
            n = float(norm[k])
            values = (n * 1e-3, n * 5e-3, n * 2e-2, n * n * 1e-5, n * 40.0, n)
            rows += [(step, epoch, sid, st, v) for st, v in zip(stat_ids, values, strict=True)]
            rows.append((step, epoch, sid, ratio_id, 1e-3 * float(np.exp(rng.normal(0, 0.3)))))
        writer.add_step(step, epoch, float(2.0 * np.exp(-step / steps) + rng.normal(0, 0.02)))
        writer.add_scalars(rows)
        if step % 200 == 199:
            writer.flush()
    writer.close()
    return folder


def first_render(binary: str, page: Path, profile: Path, loads: int) -> list[float]:
    times = []
    browser = DevTools(binary, profile)
    try:
        tab = Page(browser)
        for _ in range(loads):
            tab.send("Page.navigate", {"url": page.resolve().as_uri()})
            times.append(float(tab.wait_js("window.bbd && window.bbd.renderedAt", timeout=300)))
        assert tab.errors() == []
    finally:
        browser.close()
    return times


def dashboard_latency(binary: str, folder: Path, profile: Path, steps: int = 12) -> list[float]:
    from bbdecoder.serve import Dashboard, make_server, url_of

    writer = RunWriter(folder)
    writer.set_layers([(0, "fc", "Linear", 10, "[1, 10]")])
    sid, l2 = writer.series_id(0, "fc.weight"), writer.stat_id("l2")
    writer.add_step(0, 0, 1.0)
    writer.add_scalars([(0, 0, sid, l2, 1.0)])
    writer.flush()
    dashboard = Dashboard(folder, interval_ms=1000)
    server = make_server(dashboard, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    browser = DevTools(binary, profile)
    committed: dict[int, float] = {}
    try:
        tab = Page(browser)
        tab.send("Page.navigate", {"url": url_of(server, dashboard)})
        tab.wait_js("(document.getElementById('latest-step') || {}).textContent === '0'", timeout=60)
        tab.js(
            "window.__seen = {}; const e = document.getElementById('latest-step');"
            " new MutationObserver(() => { const t = e.textContent;"
            " if (!(t in window.__seen)) window.__seen[t] = Date.now() / 1000; })"
            ".observe(e, {childList: true, characterData: true, subtree: true})"
        )
        for step in range(1, steps + 1):
            time.sleep(0.5)
            writer.add_step(step, 0, 1.0 / step)
            writer.add_scalars([(step, 0, sid, l2, 1.0 + step)])
            writer.flush()
            committed[step] = time.time()
        tab.wait_js(f"window.__seen['{steps}']", timeout=60)
        seen = tab.js("window.__seen")
    finally:
        browser.close()
        server.shutdown()
        server.server_close()
        dashboard.close()
        writer.close()
    # per committed step: until the page first shows it or a later step (a poll may skip a step)
    shown = sorted((int(k), float(v)) for k, v in seen.items())
    return [min(t for k, t in shown if k >= s) - committed[s] for s in committed]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="20 layers x 1000 steps, 2 loads")
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--full-demo", action="store_true", help="the demo at its make-demo setting")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.steps, args.loads = 20, 1000, 2
    binary = ensure_chromium()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bbd-bench-report-") as tmp:
        tmp_path = Path(tmp)
        from bbdecoder.cli import main as cli

        demo = tmp_path / "demo"
        start = time.perf_counter()
        cli(["demo", "--out", str(demo), "--no-progress", *([] if args.full_demo else ["--quick"])])
        print(f"demo written in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        synth = synthetic_store(tmp_path / "synthetic", args.layers, args.steps)
        print(f"synthetic store written in {time.perf_counter() - start:.1f} s")
        for name, run in (("demo", demo), (f"synthetic_{args.layers}x{args.steps}", synth)):
            start = time.perf_counter()
            page = build_report(run, tmp_path / f"{name}.html")
            build_s = time.perf_counter() - start
            renders = first_render(binary, page, tmp_path / f"profile-{name}", args.loads)
            results[name] = {
                "page_bytes": page.stat().st_size,
                "store_bytes": (run / "run.sqlite").stat().st_size,
                "build_s": round(build_s, 2),
                "first_render_ms_median": round(statistics.median(renders), 1),
                "first_render_ms": [round(t, 1) for t in renders],
            }
            print(name, results[name])
        latency = dashboard_latency(binary, tmp_path / "live", tmp_path / "profile-live")
        results["dashboard_latency_s"] = {
            "median": round(statistics.median(latency), 3),
            "max": round(max(latency), 3),
            "n": len(latency),
            "poll_interval_s": 1.0,
        }
        print("dashboard latency", results["dashboard_latency_s"])
    out = ROOT / "bench" / "results" / "report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"== report ==\n{json.dumps(results, indent=2)}")


if __name__ == "__main__":
    main()
