"""Cost of the per-sample gradient statistics against a plain step and a per-sample backward loop.

Configurations on the same MNIST-sized CNN (batch 32, 1x28x28, SGD), measured interleaved (one call
each per round, order rotated every round), medians and the median of the per-round ratios:

- ``plain``: forward, loss, zero_grad, backward, optimizer.step
- ``per_sample``: the same step with :class:`bbdecoder.monitor.per_sample.PerSampleGradients`
  capturing and ``compute()`` (per tensor sample_norm_mean, sample_var, sample_grad_sq)
- ``loop``: the same statistics from one backward per sample (what the per-sample hooks replace)

BackPACK/Cockpit comparisons need the bench venv and are not in this script. Writes
``bench/results/per_sample_tN.json``. Run::

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/bench_per_sample.py --rounds 15 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bbdecoder.monitor.per_sample import PerSampleGradients


def small_cnn() -> nn.Module:
    """The MNIST-sized CNN of both per-sample benches (seed 0)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def _configs(batch: int) -> dict[str, Callable[[], None]]:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 1, 28, 28, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    models = {name: small_cnn() for name in ("plain", "per_sample", "loop")}
    opts = {name: torch.optim.SGD(m.parameters(), lr=0.0) for name, m in models.items()}
    grads = PerSampleGradients(models["per_sample"])

    def plain() -> None:
        opts["plain"].zero_grad()
        F.cross_entropy(models["plain"](x), y).backward()
        opts["plain"].step()

    def per_sample() -> None:
        grads.arm()
        opts["per_sample"].zero_grad()
        F.cross_entropy(models["per_sample"](x), y).backward()
        grads.compute().table.cpu()
        opts["per_sample"].step()

    def loop() -> None:
        model = models["loop"]
        params = [p for p in model.parameters() if p.requires_grad]
        per = []
        for i in range(batch):
            g = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
            per.append(torch.cat([t.flatten() for t in g]))
        stacked = torch.stack(per)
        mean = stacked.mean(0)
        torch.stack([stacked.norm(dim=1).mean(), (stacked - mean).pow(2).sum(1).mean(), mean.pow(2).sum()])
        opts["loop"].zero_grad()
        F.cross_entropy(model(x), y).backward()
        opts["loop"].step()

    return {"plain": plain, "per_sample": per_sample, "loop": loop}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = _configs(args.batch)
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
    result = {
        "batch": args.batch,
        "threads": args.threads,
        "rounds": args.rounds,
        "median_ms": {n: 1e3 * statistics.median(t) for n, t in times.items()},
        "ratio_to_plain": {
            n: statistics.median(a / b for a, b in zip(t, times["plain"], strict=True))
            for n, t in times.items()
        },
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).resolve().parent / "results" / f"per_sample_t{args.threads}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
