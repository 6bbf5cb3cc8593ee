"""A small mutation pass: plant one deliberate bug at a time, run the tests that should catch it,
revert, and print the score. Not run by CI (it runs the relevant tests once per mutation).

    python bench/mutation.py                 # every mutation
    python bench/mutation.py --list          # what each one is
    python bench/mutation.py dead_last_batch rank_merge_min   # some of them

A mutation is a text replacement in one source file; a mutation whose text is no longer in the file
is reported as stale (the code moved: update its ``old`` text). The source file is restored after
each run, also on Ctrl-C. Each run uses ``pytest -x -q -m "not slow"`` on the mutation's test
files, with one thread.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    more: tuple[tuple[str, str], ...] = ()  # further (old, new) replacements in the same file

    def pairs(self) -> list[tuple[str, str]]:
        return [(self.old, self.new), *self.more]


MONITOR = ("tests/test_monitor.py", "tests/test_monitor_activations.py", "tests/test_grad_stats_oracles.py")
CAM_BASE = "src/bbdecoder/attribution/cam/base.py"
CAM_TESTS = (
    "tests/test_gradcam.py",
    "tests/test_cam_layers.py",
    "tests/test_cam_contract.py",
    "tests/test_cam_methods.py",
)
MUTATIONS = [
    Mutation(
        "dead_last_batch",
        "dead units decided from the last batch only (the running max is overwritten)",
        "src/bbdecoder/monitor/activations.py",
        "torch.maximum(self.max, channel_max.float(), out=self.max)",
        "self.max.copy_(channel_max.float())",
        MONITOR,
    ),
    Mutation(
        "rank_merge_min",
        "activation maxima merged across ranks with MIN instead of MAX",
        "src/bbdecoder/integrations/ddp.py",
        "dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=self.group)",
        "dist.all_reduce(maxima, op=dist.ReduceOp.MIN, group=self.group)",
        ("tests/test_monitor_activations.py", "tests/test_ddp.py"),
    ),
    Mutation(
        "one_pass_variance",
        "gradient variance as E[g^2] - E[g]^2 in float32 (cancellation)",
        "src/bbdecoder/monitor/grad_stats.py",
        "var = zeros.index_add(0, seg, centred * centred) / counts",
        "var = zeros.index_add(0, seg, (flat * flat).float()).double() / counts - mean * mean",
        MONITOR,
        (
            (
                "var = centred_sq / n\n",
                "var = (torch.stack([(g.float() ** 2).sum() for g in grads]).double() / n - mean * mean)\n",
            ),
        ),
    ),
    Mutation(
        "max_abs_from_max",
        "max |g| taken as max g (negative extremes ignored)",
        "src/bbdecoder/monitor/grad_stats.py",
        'max_abs = zeros.scatter_reduce(0, seg, magnitude, "amax")',
        'max_abs = zeros.scatter_reduce(0, seg, flat, "amax")',
        MONITOR,
        (("maxima.append(buf.amax())", "maxima.append(g.amax())"),),
    ),
    Mutation(
        "epoch_accumulator_float32",
        "the per-epoch Welford accumulator in float32 instead of float64",
        "src/bbdecoder/monitor/grad_stats.py",
        "        self.mean = np.zeros((n_series, n_stats))\n        self.m2 = np.zeros((n_series, n_stats))",
        "        self.mean = np.zeros((n_series, n_stats), np.float32)\n"
        "        self.m2 = np.zeros((n_series, n_stats), np.float32)",
        MONITOR,
    ),
    Mutation(
        "epoch_sample_variance",
        "per-epoch variance with n - 1 instead of the documented population variance",
        "src/bbdecoder/monitor/grad_stats.py",
        "var = np.where(self.count > 0, self.m2 / self.count, np.nan)",
        "var = np.where(self.count > 1, self.m2 / np.maximum(self.count - 1, 1), np.nan)",
        MONITOR,
    ),
    Mutation(
        "epoch_nonfinite_kept",
        "NaN/Inf steps not skipped in the per-epoch aggregates",
        "src/bbdecoder/monitor/grad_stats.py",
        "finite = np.isfinite(values)",
        "finite = np.ones_like(values, dtype=bool)",
        MONITOR,
    ),
    Mutation(
        "update_ratio_damped",
        "update ratio divided by max(||W||, 1)",
        "src/bbdecoder/monitor/grad_stats.py",
        "ratios = torch.where(before > 0, delta / torch.where(before > 0, before, 1.0), delta)",
        "ratios = delta / before.clamp_min(1.0)",
        MONITOR,
    ),
    Mutation(
        "dead_strict_threshold",
        "a unit at exactly the threshold counted as alive",
        "src/bbdecoder/monitor/activations.py",
        "else self.max <= self.threshold",
        "else self.max < self.threshold",
        MONITOR,
    ),
    Mutation(
        "gradcam_resize_mode",
        "Grad-CAM upsampled with align_corners=True",
        CAM_BASE,
        "return minmax_per_sample(resize_to(maps[0], size, align_corners=False))",
        "return minmax_per_sample(resize_to(maps[0], size, align_corners=True))",
        CAM_TESTS,
    ),
    Mutation(
        "gradcam_batch_minmax",
        "Grad-CAM min-max over the whole batch instead of per image",
        CAM_BASE,
        "return minmax_per_sample(resize_to(maps[0], size, align_corners=False))",
        "up = resize_to(maps[0], size, align_corners=False)\n"
        "            return (up - up.min()) / (up.max() - up.min()).clamp_min(1e-12)",
        CAM_TESTS,
    ),
    Mutation(
        "gradcam_first_call",
        "a module called twice contributes its first call's gradient to Grad-CAM, not its last",
        CAM_BASE,
        "if call == calls[i]:  # only the last call's gradient is kept",
        "if call == 1:",
        CAM_TESTS,
    ),
    Mutation(
        "gradcam_no_relu",
        "Grad-CAM without its ReLU",
        CAM_BASE,
        "maps.append(torch.relu(cam).unsqueeze(1))",
        "maps.append(cam.unsqueeze(1))",
        CAM_TESTS,
    ),
    Mutation(
        "simple_fullgrad_drops_layers",
        "Simple FullGrad drops every layer's map (input-gradient part only)",
        "src/bbdecoder/attribution/fullgrad.py",
        "        for summed in by_resolution.values():",
        "        for summed in by_resolution.values() if use_bias else []:",
        ("tests/test_fullgrad.py", "tests/test_simple_fullgrad_reference.py"),
    ),
    Mutation(
        "fullgrad_resize_mode",
        "FullGrad's layer maps upsampled with align_corners=False",
        "src/bbdecoder/attribution/fullgrad.py",
        "result = result + resize_to(summed, spatial, align_corners=True)",
        "result = result + resize_to(summed, spatial, align_corners=False)",
        ("tests/test_fullgrad.py",),
    ),
    Mutation(
        "minmax_constant_map_nan",
        "a constant map scaled to 0/0 (NaN) instead of zeros",
        "src/bbdecoder/attribution/postprocess.py",
        "return torch.where(span > eps, scaled, torch.zeros_like(scaled))",
        "return (maps - low.view(shape)) / span",
        ("tests/test_fullgrad.py", "tests/test_gradcam.py"),
    ),
    Mutation(
        "weight_quantile_off_by_one",
        "weight quantiles interpolated on n instead of n - 1 positions",
        "src/bbdecoder/monitor/weights.py",
        "* (flat.numel() - 1)",
        "* flat.numel()",
        MONITOR,
    ),
    Mutation(
        "channel_var_not_averaged",
        "channel variance of the last forward only, not averaged over forwards",
        "src/bbdecoder/monitor/activations.py",
        "self.channel_var.add_(channel_mean.var(correction=0))",
        "self.channel_var.copy_(channel_mean.var(correction=0))",
        MONITOR,
    ),
]


def run(mutation: Mutation, timeout: float) -> str:
    """``killed``, ``survived``, ``stale`` or ``timeout``."""
    path = ROOT / mutation.path
    original = path.read_bytes()
    text = original.decode()
    if any(text.count(old) != 1 for old, _ in mutation.pairs()):
        return "stale"
    mutated = text
    for old, new in mutation.pairs():
        mutated = mutated.replace(old, new)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider",
               *mutation.tests]  # fmt: skip
    try:
        path.write_text(mutated)
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=timeout)
        return "survived" if done.returncode == 0 else "killed"
    except subprocess.TimeoutExpired:
        return "timeout"
    finally:
        path.write_bytes(original)


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutation's test run")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:30} {m.what}  [{m.path}; {' '.join(m.tests)}]")
        return 0
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(sorted(unknown))}; see --list")
    results = {}
    for mutation in chosen:
        start = time.monotonic()
        results[mutation.name] = run(mutation, args.timeout)
        took = time.monotonic() - start
        print(f"{results[mutation.name]:9} {mutation.name:30} {took:6.1f} s  {mutation.what}", flush=True)
    counted = [r for r in results.values() if r in ("killed", "survived")]
    killed = counted.count("killed")
    left_out = len(results) - len(counted)
    note = f" ({left_out} stale or timed out)" if left_out else ""
    print(f"\nscore: {killed} of {len(counted)} mutations killed{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
