"""Run every ``bench/bench_*.py`` (each in its own process) and print one summary.

Usage: ``python bench/run_all.py [--threads 2] [--quick] [--only fullgrad,ig]``. Each script writes
``bench/results/NAME_tTHREADS.json`` and prints its own summary block (from the line ``== ... ==``
on), which is collected here. ``make bench`` runs this in ``.venv-bench``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def discover(only: list[str] | None) -> list[Path]:
    scripts = sorted(BENCH_DIR.glob("bench_*.py"))
    if only:
        scripts = [s for s in scripts if any(key in s.stem for key in only)]
    return scripts


def child_env() -> dict[str, str]:
    """The scripts' environment: wandb (compared in bench_monitor.py) offline, never online."""
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("WANDB_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "wandb-bench"))
    env.setdefault("MPLBACKEND", "Agg")
    return env


def accepts(script: Path, flag: str) -> bool:
    """Whether the script defines ``flag`` itself or through ``common.thread_arg`` (``--threads``)."""
    text = script.read_text()
    return f'"{flag}"' in text or (flag == "--threads" and "thread_arg(" in text)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads for every script (default 2)")
    parser.add_argument("--quick", action="store_true", help="pass --quick to scripts that accept it")
    parser.add_argument("--only", help="comma-separated substrings of script names to run")
    args = parser.parse_args()

    scripts = discover(args.only.split(",") if args.only else None)
    if not scripts:
        print("no bench_*.py scripts found", file=sys.stderr)
        return 1
    summaries: list[tuple[str, int, float, str]] = []
    for script in scripts:
        command = [sys.executable, str(script)]
        if accepts(script, "--threads"):
            command += ["--threads", str(args.threads)]
        if args.quick and accepts(script, "--quick"):
            command.append("--quick")
        print(f"\n### {script.name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=child_env())
        elapsed = time.perf_counter() - start
        output = done.stdout + (done.stderr if done.returncode else "")
        print(output[-6000:], flush=True)
        marker = output.find("\n== ")
        summary = output[marker + 1 :] if marker >= 0 else output[-1500:]
        summaries.append((script.name, done.returncode, elapsed, summary.strip()))

    print("\n" + "=" * 30 + " SUMMARY " + "=" * 30)
    for name, code, elapsed, summary in summaries:
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        print(f"\n--- {name}: {status}, {elapsed:.0f} s")
        print(summary)
    return 0 if all(code == 0 for _, code, _, _ in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
