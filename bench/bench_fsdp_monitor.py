"""Per-step overhead of ``DistributedAnalyzer`` on an FSDP2 (``fully_shard``) model, two CPU ranks (gloo).

Each rank builds two copies of the same model, sharded the same way: ``plain`` (forward, backward,
optimizer step) and ``monitored`` (the same plus ``analyzer.step()``: the six gradient statistics and
update ratios of every tensor from the local shards, one ``all_gather`` per step, rank 0 writes the
store), and ``per_sample`` (the monitored step with ``per_sample=True``: per-sample statistics and the
noise scale of the global batch, merged across the ranks). Steps of the three alternate (order
rotated every round); rank 0 reports the medians, the median of the per-round ratios and the load
average. Writes ``bench/results/fsdp_monitor_tN_flushF.json``. Run::

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/bench_fsdp_monitor.py --rounds 20 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn


def _model(width: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def _sharded(width: int) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model(width)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _worker(rank: int, world: int, init: str, store: str, args: argparse.Namespace) -> None:
    from bbdecoder.integrations.ddp import DistributedAnalyzer

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(rank)
        x, y = (
            torch.randn(args.batch, args.width, generator=gen),
            torch.randint(0, 10, (args.batch,), generator=gen),
        )
        models = {n: _sharded(args.width) for n in ("plain", "monitored", "per_sample")}
        opts = {n: torch.optim.SGD(m.parameters(), lr=1e-3) for n, m in models.items()}
        analyzers = {
            "monitored": DistributedAnalyzer(models["monitored"], f"{store}_m", flush_every=args.flush_every),
            "per_sample": DistributedAnalyzer(
                models["per_sample"], f"{store}_p", flush_every=args.flush_every, per_sample=True
            ),
        }
        load_before = os.getloadavg()

        def step(name: str) -> float:
            dist.barrier()
            start = time.perf_counter()
            opts[name].zero_grad()
            F.cross_entropy(models[name](x), y).backward()
            if name in analyzers:
                analyzers[name].step()
            opts[name].step()
            dist.barrier()
            return time.perf_counter() - start

        for name in models:  # warm-up
            step(name)
        times: dict[str, list[float]] = {n: [] for n in models}
        names = list(models)
        for r in range(args.rounds):
            for name in names[r % 3 :] + names[: r % 3]:
                times[name].append(step(name))
        for analyzer in analyzers.values():
            analyzer.close()
        if rank == 0:
            result = {
                "ranks": world,
                "threads": args.threads,
                "width": args.width,
                "batch_per_rank": args.batch,
                "rounds": args.rounds,
                "flush_every": args.flush_every,
                "median_ms": {n: 1e3 * statistics.median(t) for n, t in times.items()},
                "ratio_to_plain": {
                    n: statistics.median(a / b for a, b in zip(times[n], times["plain"], strict=True))
                    for n in analyzers
                },
                "load_average_before_after": [load_before, os.getloadavg()],
            }
            print(json.dumps(result, indent=2))
            name = f"fsdp_monitor_t{args.threads}_flush{args.flush_every}.json"
            out = Path(__file__).resolve().parent / "results" / name
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--flush-every", type=int, default=1, help="store writes every N steps")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _worker, args=(2, f"{tmp}/init", f"{tmp}/run", args), nprocs=2, join=True, start_method="spawn"
        )


if __name__ == "__main__":
    main()
