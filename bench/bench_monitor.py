"""Per-step overhead of the training monitor on a ResNet-18-shaped net (CPU, 32x32, batch 64).

Configurations, each with its own copy of the same model and optimizer, measured interleaved
(round-robin, order rotated every round) so that machine noise hits all of them alike:

- ``plain``: forward, loss, zero_grad, backward, optimizer.step
- ``grads``: + ``Analyzer(weights=False).step()``: all six gradient statistics, every layer, every step
- ``grads+weights``: + update ratios ||dW||/||W|| of every parameter, every step
- ``wandb``: ``wandb.watch(model, log="all", log_freq=1)`` offline (when wandb is importable)

Reports medians, ratios to ``plain``, and the median time of the analyzer call alone; writes
``bench/results/monitor.json``. Run::

    OMP_NUM_THREADS=1 WANDB_MODE=offline WANDB_DIR=/tmp/wandb-bench \\
        .venv-bench/bin/python bench/bench_monitor.py --rounds 15 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bbdecoder.monitor import Analyzer


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), BasicBlock x [2, 2, 2, 2]."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Config:
    def __init__(self, name: str, base: nn.Module, tmp: Path) -> None:
        self.name = name
        self.model = copy.deepcopy(base)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.times: list[float] = []
        self.hook_times: list[float] = []
        self.analyzer: Analyzer | None = None
        self.after_backward: Callable[[], None] | None = None
        self.log: Callable[[float], None] | None = None
        if name in {"grads", "grads+weights"}:
            self.analyzer = Analyzer(self.model, tmp / name, weights=name == "grads+weights")
            self.after_backward = self.analyzer.step
        elif name == "wandb":
            import wandb

            self.run = wandb.init(project="bbdecoder-bench", mode="offline", dir=str(tmp), reinit=True)
            wandb.watch(self.model, log="all", log_freq=1)
            self.log = lambda loss: self.run.log({"loss": loss})

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        t0 = time.perf_counter()
        loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.after_backward is not None:
            t1 = time.perf_counter()
            self.after_backward()
            self.hook_times.append(time.perf_counter() - t1)
        self.opt.step()
        value = float(loss.detach())
        if self.log is not None:
            self.log(value)
        self.times.append(time.perf_counter() - t0)

    def close(self) -> None:
        if self.analyzer is not None:
            self.analyzer.close()
        if self.name == "wandb":
            self.run.finish()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-wandb", action="store_true")
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up (a smoke run)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "monitor.json"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.warmup = 3, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = ResNet18()
    names = ["plain", "grads", "grads+weights"]
    if not args.no_wandb:
        try:
            import wandb  # noqa: F401

            names.append("wandb")
        except ImportError:
            print("wandb is not installed: not measured")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        configs = [Config(n, base, Path(tmp)) for n in names]
        for r in range(args.warmup + args.rounds):
            order = configs[r % len(configs) :] + configs[: r % len(configs)]
            for c in order:
                c.step(x, y)
            if r == args.warmup - 1:
                for c in configs:
                    c.times.clear()
                    c.hook_times.clear()
        for c in configs:
            c.close()
    plain = statistics.median(configs[0].times)
    result = {
        "torch": torch.__version__,
        "threads": args.threads,
        "batch": args.batch,
        "rounds": args.rounds,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "params": sum(p.numel() for p in base.parameters()),
        "tensors": len(list(base.parameters())),
        "configs": {},
    }
    print(
        f"\n== monitor: ResNet-18 (32x32), batch {args.batch}, {args.threads} thread(s), "
        f"median of {args.rounds} interleaved steps, torch {torch.__version__} =="
    )
    print(f"{'config':<15} {'median step s':>14} {'ratio':>7} {'analyzer call s':>16} {'call/plain':>11}")
    for c in configs:
        med = statistics.median(c.times)
        hook = statistics.median(c.hook_times) if c.hook_times else None
        result["configs"][c.name] = {
            "median_step_s": med,
            "ratio_to_plain": med / plain,
            "median_analyzer_call_s": hook,
            "analyzer_call_over_plain": hook / plain if hook is not None else None,
            "steps_s": c.times,
        }
        hook_txt = f"{hook:16.4f} {hook / plain:11.4f}" if hook is not None else f"{'-':>16} {'-':>11}"
        print(f"{c.name:<15} {med:14.4f} {med / plain:7.3f} {hook_txt}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    Path(tempfile.gettempdir(), "bbdecoder-monitor-bench.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
