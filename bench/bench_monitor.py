"""Per-step cost of the training monitor on three small training steps (CPU).

Models, each with its own copy of the same weights and optimizer per configuration:

- ``mnist``: a 2-conv MNIST CNN (1x28x28, batch 32, Adam): a ~10 ms step on a fast core (45-60
  ms on the 2-core VM of BENCHMARKS.md)
- ``resnet18``: ResNet-18 layout for 32x32 inputs (3x3 stem, no max-pool), batch 64, SGD momentum
- ``bert``: a BERT-mini-like encoder in plain torch (4 layers, d=256, 4 heads, FF 1024, vocab
  8000, sequence 64, batch 8, AdamW), token classification head

Configurations: ``plain`` (forward, loss, zero_grad, backward, optimizer.step), ``one-read``
(``plain`` with one timed ``torch._foreach_norm(grads, 2)`` right after the backward, where
``Analyzer.step()`` runs: the cheapest full read of the gradients, from the same cold cache), ``analyzer``
(+ ``Analyzer.step()``: six gradient statistics of every parameter, update ratios, the store
write, every step), ``analyzer+act`` (+ activation probes on every activation module),
with ``--ablation`` ``analyzer-inline`` (the default analyzer with a step's bookkeeping, its rows,
epoch aggregates and alert rules, on the training thread instead of the writer thread) and
``analyzer-syncstore`` (also the store's transactions on the training thread, a plain
``RunWriter``), ``analyzer-noprefetch`` (the update ratios measured inside ``step()`` instead of
on the writer thread after ``optimizer.step()``), ``analyzer-nogradread`` (the gradients' moments
read inside ``step()`` instead of on the writer thread during backward) and
``analyzer-noratios`` (``weights=False``: no update-ratio pass at all), with ``--every K``
``analyzer-everyK`` and ``analyzer+act-everyK`` (``every=K``: one step in K recorded, the probes
on its forward only; each configuration then also gets the ratio of its summed step times over
blocks of K rounds, one recorded step per block, whose median is the figure for these), with
``--extra analyzer-flushK`` (or ``analyzer+act-flushK``) ``flush_every=K`` (one transaction and one
writer-thread job per K steps), and ``wandb``
(``wandb.watch(log="all", log_freq=1)`` offline, when wandb is importable).

Rounds are interleaved (one step of each configuration per round, the order rotated), and the
reported ratio is the **median of the per-round ratios** to ``plain`` (so load changes hit both
sides of each ratio alike), with the median ratio of summed step times over blocks of 16 rounds
beside it: with ``flush_every=K`` (K <= 16) every block holds a flush, and the steps that carry
one (the held bookkeeping runs then) are what a median of single rounds leaves out.
``Analyzer.step()`` is also timed alone and compared with one ``torch._foreach_norm(grads, 2)``
over the same gradients two ways: timed right after the step
(after ``optimizer.step()`` has just read the gradients, so from a warm cache: the stricter
reference) and the ``one-read`` norm of the same round, in step()'s place. The load average
is recorded before and after. On a shared machine the CPU-time ratios (``time.process_time`` for
the whole step, all threads of the process, the writer thread included; ``time.thread_time`` for
``step()`` and the norm) are the steadier measure: they leave out the time the process waits for a
core. wandb's own service runs in another process, so its CPU ratio understates it. Run::

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/bench_monitor.py --threads 1 --rounds 21
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, kernels_on_one_thread, pin_threads, save_results

from bbdecoder.monitor import Analyzer

BLOCK = 16
"""Rounds per block of the block ratios: each block holds a flush of every ``flush_every`` <= 16."""


class MnistCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.25)
        self.fc1 = nn.Linear(9216, 128)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))))
        return self.fc2(self.relu3(self.fc1(torch.flatten(x, 1))))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool), BasicBlock x [2, 2, 2, 2]."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MiniBert(nn.Module):
    """BERT-mini shape: token + position embeddings, LayerNorm, 4 post-norm encoder layers, a head."""

    def __init__(self, vocab: int = 8000, dim: int = 256, layers: int = 4, heads: int = 4, length: int = 64):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Parameter(torch.randn(1, length, dim) * 0.02)  # container-owned, as in BERT/ViT
        self.norm = nn.LayerNorm(dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.1, activation=nn.GELU(), batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 9)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.norm(self.tokens(ids) + self.positions)))


def _workload(name: str) -> tuple[nn.Module, Callable[[nn.Module], torch.optim.Optimizer], tuple, Callable]:
    g = torch.Generator().manual_seed(0)
    if name == "mnist":
        x, y = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
        return MnistCNN(), lambda m: torch.optim.Adam(m.parameters(), 1e-3), (x, y), F.cross_entropy
    if name == "resnet18":
        x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
        opt = lambda m: torch.optim.SGD(m.parameters(), 0.01, momentum=0.9)  # noqa: E731
        return ResNet18(), opt, (x, y), F.cross_entropy
    if name == "bert":
        ids, y = torch.randint(0, 8000, (8, 64), generator=g), torch.randint(0, 9, (8, 64), generator=g)

        def token_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))

        return MiniBert(), lambda m: torch.optim.AdamW(m.parameters(), 1e-4), (ids, y), token_loss
    raise ValueError(name)


class Config:
    def __init__(self, name: str, base: nn.Module, make_opt: Callable, loss_fn: Callable, tmp: Path) -> None:
        self.name = name
        self.model = copy.deepcopy(base)
        self.opt = make_opt(self.model)
        self.loss_fn = loss_fn
        self.times: list[float] = []
        self.call_times: list[float] = []
        self.norm_times: list[float] = []
        # CPU time (all threads of the process for the whole step, the calling thread for step()
        # and the norm): what the work costs, without the time the process waits for a core
        self.cpu_times: list[float] = []
        self.call_cpu: list[float] = []
        self.norm_cpu: list[float] = []
        self.analyzer: Analyzer | None = None
        self.run = None
        if name == "analyzer-syncstore":
            from bbdecoder.store.background import ThreadedRunWriter
            from bbdecoder.store.writer import RunWriter

            # every bbdecoder module that opens the threaded writer gets the plain one meanwhile
            users = [
                m
                for n, m in list(sys.modules.items())
                if n.startswith("bbdecoder.") and getattr(m, "ThreadedRunWriter", None) is ThreadedRunWriter
            ]
            for module in users:
                module.ThreadedRunWriter = RunWriter  # type: ignore[attr-defined]
            try:
                self.analyzer = Analyzer(self.model, tmp / name)
            finally:
                for module in users:
                    module.ThreadedRunWriter = ThreadedRunWriter  # type: ignore[attr-defined]
            assert type(self.analyzer.writer) is RunWriter
        elif name == "analyzer-inline":  # the step's bookkeeping on the training thread, as before
            self.analyzer = Analyzer(self.model, tmp / name)
            self.analyzer.writer.run_then_flush = None  # type: ignore[attr-defined]
        elif name == "analyzer-nogradread":  # the gradients read in step(), not during backward
            self.analyzer = Analyzer(self.model, tmp / name)
            self.analyzer._grad_prefetch = None
        elif name == "analyzer-noprefetch":  # the ratios measured in step(), not after the optimizer
            self.analyzer = Analyzer(self.model, tmp / name)
            self.analyzer._prefetch = None
        elif name == "analyzer-anycore":  # the ratio pass off-thread even with every core busy
            self.analyzer = Analyzer(self.model, tmp / name)
            prefetch = self.analyzer._prefetch
            if prefetch is not None:
                prefetch.needs_spare_core = False
        elif name == "analyzer-noratios":  # no update ratios: what their pass costs in the step
            self.analyzer = Analyzer(self.model, tmp / name, weights=False)
        elif name.startswith("analyzer"):  # "-onethread": the fused kernels on the calling thread only
            every = int(name.rsplit("-every", 1)[1]) if "-every" in name else 1
            # "-flushK": flush_every=K; without it the default (1)
            flush = {"flush_every": int(name.rsplit("-flush", 1)[1])} if "-flush" in name else {}
            act = name.startswith("analyzer+act")
            self.analyzer = Analyzer(self.model, tmp / name, activations=act, every=every, **flush)
        elif name == "wandb":
            import wandb

            self.run = wandb.init(project="bbdecoder-bench", mode="offline", dir=str(tmp), reinit=True)
            wandb.watch(self.model, log="all", log_freq=1)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with kernels_on_one_thread(self.name.endswith("-onethread")):
            self._step(x, y)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        loss = self.loss_fn(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.name == "one-read":  # the cheapest full read of the gradients, where step() would run
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            t1, c1 = time.perf_counter(), time.thread_time()
            torch._foreach_norm(grads, 2)
            self.call_times.append(time.perf_counter() - t1)
            self.call_cpu.append(time.thread_time() - c1)
        if self.analyzer is not None:
            t1, c1 = time.perf_counter(), time.thread_time()
            self.analyzer.step(loss=loss)
            self.call_times.append(time.perf_counter() - t1)
            self.call_cpu.append(time.thread_time() - c1)
        self.opt.step()
        value = float(loss.detach())
        if self.run is not None:
            self.run.log({"loss": value})
        self.times.append(time.perf_counter() - t0)
        self.cpu_times.append(time.process_time() - c0)
        if self.analyzer is not None:  # the cheapest full read of the same gradients, outside the step
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            t2, c2 = time.perf_counter(), time.thread_time()
            torch._foreach_norm(grads, 2)
            self.norm_times.append(time.perf_counter() - t2)
            self.norm_cpu.append(time.thread_time() - c2)

    def close(self) -> None:
        if self.analyzer is not None:
            self.analyzer.close()
        if self.run is not None:
            self.run.finish()


def measure(
    workload: str,
    rounds: int,
    warmup: int,
    with_wandb: bool,
    ablation: bool = False,
    extra: tuple[str, ...] = (),
    every: int = 1,
) -> dict:
    torch.manual_seed(0)
    base, make_opt, (x, y), loss_fn = _workload(workload)
    names = ["plain", "one-read", "analyzer", "analyzer+act", *extra]
    names += (
        [
            "analyzer-inline",
            "analyzer-syncstore",
            "analyzer-noprefetch",
            "analyzer-nogradread",
            "analyzer-anycore",
            "analyzer-noratios",
        ]
        if ablation
        else []
    )
    names += [f"analyzer-every{every}", f"analyzer+act-every{every}"] if every > 1 else []
    names += ["wandb"] if with_wandb else []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        configs = [Config(n, base, make_opt, loss_fn, Path(tmp)) for n in names]
        for r in range(warmup + rounds):
            shift = r % len(configs)
            for c in configs[shift:] + configs[:shift]:
                c.step(x, y)
            if r == warmup - 1:
                for c in configs:
                    for series in (c.times, c.call_times, c.norm_times, c.cpu_times, c.call_cpu, c.norm_cpu):
                        series.clear()
        for c in configs:
            c.close()
    plain = configs[0]
    out = {
        "params": sum(p.numel() for p in base.parameters()),
        "tensors": len(list(base.parameters())),
        "plain_median_s": statistics.median(plain.times),
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "configs": {},
    }
    print(
        f"\n== {workload}: {out['params']:,} parameters in {out['tensors']} tensors, "
        f"plain step {out['plain_median_s'] * 1e3:.1f} ms, load {load_before[0]:.1f} =="
    )
    one_read = next(c for c in configs if c.name == "one-read")
    for c in configs[1:]:
        ratios = [a / b for a, b in zip(c.times, plain.times, strict=True)]
        q = statistics.quantiles(ratios, n=4)
        cpu_ratios = [a / b for a, b in zip(c.cpu_times, plain.cpu_times, strict=True)]
        cq = statistics.quantiles(cpu_ratios, n=4)
        entry = {
            "median_step_s": statistics.median(c.times),
            "step_ratio": statistics.median(ratios),
            "step_ratio_q1": q[0],
            "step_ratio_q3": q[2],
            "cpu_step_ratio": statistics.median(cpu_ratios),
            "cpu_step_ratio_q1": cq[0],
            "cpu_step_ratio_q3": cq[2],
        }
        line = (
            f"  {c.name:<13} step x{entry['step_ratio']:.3f} [{q[0]:.3f}, {q[2]:.3f}]"
            f" cpu x{entry['cpu_step_ratio']:.3f} [{cq[0]:.3f}, {cq[2]:.3f}]"
        )
        # each block of `every` rounds holds one recorded step of each every= config; blocks of
        # BLOCK rounds hold at least one flush of each configuration (the flushed steps, whose
        # held bookkeeping runs then, are left out of a median of single rounds)
        size = every if every > 1 else BLOCK
        blocks = [
            sum(c.times[i : i + size]) / sum(plain.times[i : i + size])
            for i in range(0, len(ratios) - size + 1, size)
        ]
        if len(blocks) >= 2:
            bq = statistics.quantiles(blocks, n=4)
            entry.update(
                {
                    "block_rounds": size,
                    "block_ratio": statistics.median(blocks),
                    "block_ratio_q1": bq[0],
                    "block_ratio_q3": bq[2],
                }
            )
            line += f" blocks of {size}: x{entry['block_ratio']:.3f} [{bq[0]:.3f}, {bq[2]:.3f}]"
        prefetch = getattr(c.analyzer, "_prefetch", None)
        if prefetch is not None:  # ratio passes run on the writer thread after optimizer.step()
            entry["ratio_passes_off_thread"] = prefetch.used
            line += f" ({prefetch.used} ratio passes off-thread)"
        reads = getattr(c.analyzer, "_grad_prefetch", None)
        if reads is not None:  # gradients read on the writer thread during backward
            entry["gradient_reads_off_thread"] = reads.used
            line += f" ({reads.used} gradient reads off-thread)"
        if c.call_times and c.norm_times:
            per_round = [a / b for a, b in zip(c.call_times, c.norm_times, strict=True)]
            per_round_cpu = [a / b for a, b in zip(c.call_cpu, c.norm_cpu, strict=True) if b > 0]
            entry.update(
                {
                    "median_call_s": statistics.median(c.call_times),
                    "median_foreach_norm_s": statistics.median(c.norm_times),
                    "call_over_foreach_norm": statistics.median(per_round),
                    "median_call_cpu_s": statistics.median(c.call_cpu),
                    "median_foreach_norm_cpu_s": statistics.median(c.norm_cpu),
                    "call_over_foreach_norm_cpu": statistics.median(per_round_cpu),
                    "call_over_one_read": statistics.median(
                        a / b for a, b in zip(c.call_times, one_read.call_times, strict=True)
                    ),
                    "call_over_one_read_cpu": statistics.median(
                        a / b for a, b in zip(c.call_cpu, one_read.call_cpu, strict=True) if b > 0
                    ),
                    "median_one_read_s": statistics.median(one_read.call_times),
                }
            )
            line += (
                f"  step() {entry['median_call_s'] * 1e3:.2f} ms = "
                f"{entry['call_over_foreach_norm']:.1f}x _foreach_norm "
                f"({entry['median_foreach_norm_s'] * 1e3:.2f} ms); cpu "
                f"{entry['median_call_cpu_s'] * 1e3:.2f} ms = {entry['call_over_foreach_norm_cpu']:.1f}x;"
                f" {entry['call_over_one_read']:.1f}x the same norm in step()'s place"
                f" ({entry['median_one_read_s'] * 1e3:.2f} ms; cpu {entry['call_over_one_read_cpu']:.1f}x)"
            )
        print(line, flush=True)
        out["configs"][c.name] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="mnist,resnet18,bert")
    parser.add_argument("--no-wandb", action="store_true")
    parser.add_argument("--quick", action="store_true", help="5 rounds, 1 warm-up (a smoke run)")
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="also the analyzer with its bookkeeping inline, and with a synchronous store",
    )
    parser.add_argument("--extra", default="", help="ablation configurations to add, comma-separated")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument(
        "--every",
        type=int,
        default=1,
        help="also the analyzer with every=K, with and without activations (-everyK), and every "
        "configuration's ratio of summed step times over blocks of K rounds",
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.warmup = 5, 1
    pin_threads(args.threads)
    with_wandb = False
    if not args.no_wandb:
        try:
            import wandb  # noqa: F401

            with_wandb = True
        except ImportError:
            print("wandb is not installed: not measured")
    result = {"environment": environment(), "rounds": args.rounds, "workloads": {}}
    for workload in args.models.split(","):
        extra = tuple(filter(None, args.extra.split(",")))
        result["workloads"][workload] = measure(
            workload, args.rounds, args.warmup, with_wandb, args.ablation, extra, args.every
        )
        path = save_results(f"monitor_t{args.threads}{args.tag}", result)  # after each workload
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
