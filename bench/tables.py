"""Markdown tables for BENCHMARKS.md from ``bench/results/*.json`` (FullGrad and IG).

Usage: ``python bench/tables.py`` (no torch needed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
FULLGRAD_METHODS = ("plain", "input_grad", "ours", "fast_prototype", "gradcam")


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _ratio(entry: dict[str, Any]) -> str:
    return f"{entry['median_of_ratios']:.2f}x ({entry['q1']:.2f}-{entry['q3']:.2f})"


def fullgrad_table(suffix: str = "") -> list[str]:
    lines = [
        "| threads | batch | plain | input_grad | ours | fast prototype | grad-cam | ours/plain | "
        "grad-cam/ours | grad-cam/fast | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for threads in (1, 2):
        result = _load(f"fullgrad_t{threads}{suffix}")
        if result is None:
            continue
        load = result["environment"]["loadavg_at_start"][0]
        for key, entry in result["timing"].items():
            times = " | ".join(
                f"{entry[m]['median_s'] * 1e3:.0f} ms" if m in entry else "-" for m in FULLGRAD_METHODS
            )
            ratios = entry["ratios"]
            fast = _ratio(ratios["gradcam/fast_prototype"]) if "gradcam/fast_prototype" in ratios else "-"
            lines.append(
                f"| {threads} | {key.removeprefix('batch')} | {times} | {_ratio(ratios['ours/plain'])} | "
                f"{_ratio(ratios['gradcam/ours'])} | {fast} | {load:.1f} |"
            )
    return lines


def fullgrad_memory() -> list[str]:
    lines = ["| threads | " + " | ".join(FULLGRAD_METHODS) + " |", "|---" * (len(FULLGRAD_METHODS) + 1) + "|"]
    for threads in (1, 2):
        result = _load(f"fullgrad_t{threads}")
        if result is None or "peak_memory_mib" not in result:
            continue
        memory = result["peak_memory_mib"]
        cells = [
            f"{memory[f'{m}-b8']['peak_mib']:.0f} MiB" if f"{m}-b8" in memory else "-"
            for m in FULLGRAD_METHODS
        ]
        lines.append(f"| {threads} | " + " | ".join(cells) + " |")
    return lines


def ig_table() -> list[str]:
    lines = [
        "| threads | case | ours | Captum | ours/Captum | load avg |",
        "|---|---|---|---|---|---|",
    ]
    for threads in (1, 2):
        result = _load(f"integrated_gradients_t{threads}")
        if result is None:
            continue
        load = result["environment"]["loadavg_at_start"][0]
        for key, entry in result["timing"].items():
            lines.append(
                f"| {threads} | {key} | {entry['ours']['median_s'] * 1e3:.0f} ms | "
                f"{entry['captum']['median_s'] * 1e3:.0f} ms | {_ratio(entry['ours/captum'])} | {load:.1f} |"
            )
    return lines


def ig_memory() -> list[str]:
    lines = ["| threads | internal_batch_size | ours | Captum |", "|---|---|---|---|"]
    for threads in (1, 2):
        result = _load(f"integrated_gradients_t{threads}")
        if result is None or "peak_memory_mib" not in result:
            continue
        cases = result["peak_memory_mib"]["cases"]
        chunks = sorted(
            {case.split(":")[1] for case in cases},
            key=lambda c: (c != "default", int(c) if c.isdigit() else 0),
        )
        for chunk in chunks:
            ours, captum = cases.get(f"ours:{chunk}"), cases.get(f"captum:{chunk}")
            cell = [f"{c['peak_mib']:.0f} MiB" if c else "-" for c in (ours, captum)]
            lines.append(f"| {threads} | {chunk} | {cell[0]} | {cell[1]} |")
    return lines


def main() -> None:
    for title, lines in (
        ("FullGrad timing (224x224)", fullgrad_table()),
        (
            "FullGrad before the aggregation change (ours = library then; fast = bench prototype)",
            fullgrad_table("_before_fix"),
        ),
        ("FullGrad peak memory (batch 8)", fullgrad_memory()),
        ("IG timing (50 steps, gausslegendre)", ig_table()),
        ("IG peak memory (64x64, batch 2, 100 rows)", ig_memory()),
    ):
        print(f"\n### {title}\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
