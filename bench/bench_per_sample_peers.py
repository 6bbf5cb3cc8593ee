"""Per-sample gradient statistics: ours against BackPACK's and Cockpit's, same model, same batch.

Needs the benchmark venv (``backpack-for-pytorch``, ``cockpit-for-pytorch``). The quantities, per
parameter tensor of an MNIST-sized CNN (batch 32, 1x28x28, cross-entropy, mean reduction):
``sample_norm_mean`` = mean_i ||g_i||, ``sample_var`` = (1/B) sum_i ||g_i - G||^2 and ``||G||^2``
(see :mod:`bbdecoder.monitor.per_sample`). Configurations, one call each per round, the order
rotated every round (interleaved), medians and the median of the per-round ratios to ``plain``:

- ``plain``: zero_grad, forward, loss, backward (no optimizer step: every configuration then sees
  the same weights, so the numbers can be compared),
- ``ours``: the same with :class:`bbdecoder.monitor.per_sample.PerSampleGradients` and ``compute()``,
- ``backpack_l2_var``: BackPACK's ``BatchL2Grad`` (per-sample squared norms) and ``Variance``
  (element-wise across-sample variance) in one backward, reduced to the same three numbers,
- ``backpack_batchgrad``: BackPACK's ``BatchGrad`` (every individual gradient materialised),
  reduced to the same numbers,
- ``cockpit_normtest``: Cockpit with its ``NormTest`` quantity every step (per-sample norms through
  BatchGrad plus its hooks), which gives ``theta = sqrt(tr(Sigma)_unbiased / (B ||G||^2))``, checked
  against ours.

The numbers are compared after the timed rounds (float32 and, to separate method from rounding,
float64). Writes ``bench/results/per_sample_peers_tN_bB.json``. Run::

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv-bench/bin/python bench/bench_per_sample_peers.py --rounds 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bbdecoder.monitor.per_sample import PerSampleGradients

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_per_sample import small_cnn  # the same CNN as the per-sample bench


def _shim_pkg_resources() -> None:
    """cockpit 1.0.2 imports ``pkg_resources`` (gone from recent setuptools) only for its version."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")

        class DistributionNotFound(Exception):
            pass

        def get_distribution(name: str) -> Any:
            from importlib.metadata import version

            return types.SimpleNamespace(version=version("cockpit-for-pytorch"))

        shim.DistributionNotFound = DistributionNotFound  # type: ignore[attr-defined]
        shim.get_distribution = get_distribution  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim


Stats = dict[str, tuple[float, float, float]]  # name -> (sample_norm_mean, sample_var, ||G||^2)


def _configs(batch: int, dtype: torch.dtype) -> tuple[dict[str, Callable[[], Any]], torch.Tensor]:
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, BatchL2Grad, Variance

    _shim_pkg_resources()
    from cockpit import Cockpit
    from cockpit.quantities import NormTest

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 28, 28, generator=gen).to(dtype)
    y = torch.randint(0, 10, (batch,), generator=gen)
    models = {
        n: small_cnn().to(dtype)
        for n in ("plain", "ours", "backpack_l2_var", "backpack_batchgrad", "cockpit")
    }
    for name in ("backpack_l2_var", "backpack_batchgrad", "cockpit"):
        models[name] = extend(models[name])
    grads = PerSampleGradients(models["ours"])
    loss_fn = extend(nn.CrossEntropyLoss())
    individual = nn.CrossEntropyLoss(reduction="none")
    normtest = NormTest(track_schedule=lambda _step: True)
    cockpit = Cockpit(list(models["cockpit"].parameters()), quantities=[normtest])
    step = {"cockpit": 0}

    def plain() -> None:
        m = models["plain"]
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()

    def ours() -> Stats:
        m = models["ours"]
        grads.arm()
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
        stats = grads.compute()
        return dict(zip(stats.names, map(tuple, stats.table.cpu().tolist()), strict=True))

    def backpack_l2_var() -> Stats:
        m = models["backpack_l2_var"]
        m.zero_grad()
        loss = loss_fn(m(x), y)
        with backpack(BatchL2Grad(), Variance()):
            loss.backward()
        out = {}
        for name, p in m.named_parameters():
            # BackPACK's individual gradients carry the 1/B of the mean loss: norms times B, variances B^2
            sq, var = p.batch_l2 * batch * batch, p.variance * batch * batch
            out[name] = (float(sq.sqrt().mean()), float(var.sum()), float(p.grad.pow(2).sum()))
        return out

    def backpack_batchgrad() -> Stats:
        m = models["backpack_batchgrad"]
        m.zero_grad()
        loss = loss_fn(m(x), y)
        with backpack(BatchGrad()):
            loss.backward()
        out = {}
        for name, p in m.named_parameters():
            per = p.grad_batch.flatten(1) * batch
            mean = per.mean(0)
            out[name] = (
                float(per.norm(dim=1).mean()),
                float((per - mean).pow(2).sum(1).mean()),
                float(mean.pow(2).sum()),
            )
        return out

    def cockpit_normtest() -> float:
        m = models["cockpit"]
        m.zero_grad()
        out = m(x)
        loss = loss_fn(out, y)
        losses = individual(out, y)
        with cockpit(step["cockpit"], info={"batch_size": batch, "individual_losses": losses, "loss": loss}):
            loss.backward(create_graph=cockpit.create_graph(step["cockpit"]))
        value = normtest.output.pop(step["cockpit"])  # read (and drop) this step's value
        step["cockpit"] += 1
        return float(value)

    configs: dict[str, Callable[[], Any]] = {
        "plain": plain,
        "ours": ours,
        "backpack_l2_var": backpack_l2_var,
        "backpack_batchgrad": backpack_batchgrad,
        "cockpit_normtest": cockpit_normtest,
    }
    return configs, x


def _agreement(configs: dict[str, Callable[[], Any]], batch: int) -> dict[str, Any]:
    """Largest relative difference of each peer's numbers from ours (per tensor and statistic)."""
    ours: Stats = configs["ours"]()
    result: dict[str, Any] = {}
    for peer in ("backpack_l2_var", "backpack_batchgrad"):
        theirs: Stats = configs[peer]()
        worst = {}
        for i, stat in enumerate(("sample_norm_mean", "sample_var", "grad_sq")):
            worst[stat] = max(abs(theirs[n][i] - ours[n][i]) / abs(ours[n][i]) for n in ours)
        result[peer] = worst
    var = sum(v[1] for v in ours.values())
    grad_sq = sum(v[2] for v in ours.values())
    theta_ours = (batch / (batch - 1) * var / (batch * grad_sq)) ** 0.5
    theta_cockpit = configs["cockpit_normtest"]()
    result["cockpit_normtest"] = {
        "ours": theta_ours,
        "cockpit": theta_cockpit,
        "rel_diff": abs(theta_cockpit - theta_ours) / theta_ours,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="3 rounds (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 3
    torch.set_num_threads(args.threads)
    configs, _ = _configs(args.batch, torch.float32)
    names = list(configs)
    for fn in configs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            configs[name]()
            times[name].append(time.perf_counter() - start)
    ratios = {
        n: [a / b for a, b in zip(t, times["plain"], strict=True)] for n, t in times.items() if n != "plain"
    }
    result = {
        "batch": args.batch,
        "threads": args.threads,
        "rounds": args.rounds,
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "median_ms": {n: 1e3 * statistics.median(t) for n, t in times.items()},
        "ratio_to_plain": {n: statistics.median(r) for n, r in ratios.items()},
        "ratio_to_ours": {
            n: statistics.median(a / b for a, b in zip(t, times["ours"], strict=True))
            for n, t in times.items()
            if n not in ("plain", "ours")
        },
        "agreement_float32": _agreement(configs, args.batch),
        "agreement_float64": _agreement(_configs(args.batch, torch.float64)[0], args.batch),
    }
    print(json.dumps(result, indent=2))
    name = f"per_sample_peers_t{args.threads}_b{args.batch}.json"
    out = Path(__file__).resolve().parent / "results" / name
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
