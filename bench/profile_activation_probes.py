"""What the activation probes add to a training step's forward pass, part by part (1 thread, or
``--threads``).

Each configuration has its own copy of the same model, weights and optimizer; rounds are
interleaved (one step of each configuration per round, the order rotated) and each configuration's
forward, backward and optimizer step are timed; reported are medians and the median of the
per-round ratios of the forward to ``plain``'s. Configurations, the probes hooked on every
activation module (``activations=True``'s choice: the ReLUs of the CNNs, BERT-mini's GELUs, which
have no saturation count):

- ``plain``: no hooks; ``hooks``: a forward hook that does nothing; ``one-read``: a hook that
  sums each output (``out.sum()``), the cheapest full read of it and so the least a probe can cost;
- ``probes-signs``: the saturation count as it was before, a sum of signs
  (``n - sum(sign(y))``), whose float temporary as large as the output is allocated per forward;
- ``probes-torch``: the count by torch's boolean ``(y <= 0).sum()``;
- ``probes-numpy``: the torch reductions with the count by NumPy comparisons into one reused
  :class:`~bbdecoder.monitor.element_counts.MaskBuffer` (the probes before the fused kernel);
- ``probes``: :class:`~bbdecoder.monitor.activations.ActivationProbe` as
  ``Analyzer(activations=True)`` runs it: with the fused kernels one read of each output
  (:mod:`~bbdecoder.monitor.probe_kernel`), split over torch's threads;
- ``probes-onethread``: the same kernel on the forward's thread alone;
- ``probes-nosaturation``: the torch path without the saturation count (its per-channel max and
  mean only).

Run::

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/profile_activation_probes.py --rounds 41 mnist bert
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_monitor import _workload
from common import environment, kernels_on_one_thread, pin_threads, save_results, thread_arg

from bbdecoder.monitor.activations import ACTIVATION_FUNCTIONS, ActivationProbe
from bbdecoder.monitor.element_counts import MaskBuffer

CONFIGS = (
    "plain",
    "hooks",
    "one-read",
    "probes-signs",
    "probes-torch",
    "probes-numpy",
    "probes",
    "probes-onethread",
    "probes-nosaturation",
)


def _one_read(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
    out.detach().sum()  # returns nothing: a hook's return value would replace the output


def _hook_probes(model: nn.Module, name: str, dim: int) -> None:
    buffer = MaskBuffer() if name in ("probes", "probes-onethread", "probes-numpy") else None
    one_thread = name == "probes-onethread"
    for module in model.modules():
        if not isinstance(module, ACTIVATION_FUNCTIONS):
            continue
        if name == "hooks":
            module.register_forward_hook(lambda _m, _i, _o: None)
            continue
        if name == "one-read":
            module.register_forward_hook(_one_read)
            continue
        probe = ActivationProbe(module, 0.0, 1e-3, dim, dead=True)
        if name == "probes-nosaturation":
            probe.saturation = None
        elif name == "probes-numpy":  # the reductions in torch, the count in NumPy: not the kernel
            probe.fused.update = lambda _probe, _y: False  # type: ignore[method-assign]
        elif name == "probes-signs" and isinstance(module, nn.ReLU):  # the zero count as it was
            probe.saturation = lambda y, _buffer: y.numel() - torch.sign(y).sum().double()

        def hook(_m: nn.Module, _i: object, out: torch.Tensor, probe: ActivationProbe = probe) -> None:
            with kernels_on_one_thread(one_thread):  # as the analyzer's hook: no no_grad block
                probe.update(out, buffer)

        module.register_forward_hook(hook)


def measure(workload: str, rounds: int, warmup: int) -> dict:
    torch.manual_seed(0)
    base, make_opt, (x, y), loss_fn = _workload(workload)
    runs = []
    for name in CONFIGS:
        model = copy.deepcopy(base)
        if name != "plain":
            _hook_probes(model, name, -1 if workload == "bert" else 1)  # (N, L, D) / (N, C, ...)
        runs.append((name, model, make_opt(model), {"forward": [], "backward": [], "optimizer": []}))
    for r in range(warmup + rounds):
        shift = r % len(runs)
        for _name, model, opt, times in runs[shift:] + runs[:shift]:
            t0 = time.perf_counter()
            loss = loss_fn(model(x), y)
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            if r >= warmup:
                times["forward"].append(t1 - t0)
                times["backward"].append(t2 - t1)
                times["optimizer"].append(t3 - t2)
    plain = runs[0][3]
    out: dict = {}
    print(f"\n== {workload}: forward / backward / optimizer medians (ms), forward ratio to plain ==")
    for name, _, _, times in runs:
        ratios = [a / b for a, b in zip(times["forward"], plain["forward"], strict=True)]
        whole = [sum(parts) for parts in zip(*times.values(), strict=True)]
        plain_whole = [sum(parts) for parts in zip(*plain.values(), strict=True)]
        entry = {part: statistics.median(v) for part, v in times.items()}
        entry["forward_ratio"] = statistics.median(ratios)
        entry["step_ratio"] = statistics.median(a / b for a, b in zip(whole, plain_whole, strict=True))
        out[name] = entry
        print(
            f"  {name:<20} {entry['forward'] * 1e3:7.2f} {entry['backward'] * 1e3:7.2f} "
            f"{entry['optimizer'] * 1e3:7.2f}   forward x{entry['forward_ratio']:.3f}"
            f"   step x{entry['step_ratio']:.3f}"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workloads", nargs="*", default=["mnist", "bert"])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--warmup", type=int, default=3)
    thread_arg(parser, default=1)
    args = parser.parse_args()
    pin_threads(args.threads)
    results = {w: measure(w, args.rounds, args.warmup) for w in args.workloads}
    path = save_results(
        f"activation_probe_profile_t{args.threads}",
        {"environment": environment(), "rounds": args.rounds, "workloads": results},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
