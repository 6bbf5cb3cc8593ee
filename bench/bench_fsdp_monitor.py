"""Per-step overhead of ``DistributedAnalyzer`` on an FSDP2 (``fully_shard``) model, two CPU ranks (gloo).

Each rank builds two copies of the same model, sharded the same way: ``plain`` (forward, backward,
optimizer step) and ``monitored`` (the same plus ``analyzer.step()``: the six gradient statistics and
update ratios of every tensor from the local shards, one ``all_gather`` per step, rank 0 writes the
store). Steps of the two alternate (order swapped every round); rank 0 reports the medians and the
median of the per-round ratios. Writes ``bench/results/fsdp_monitor_tN.json``. Run::

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/bench_fsdp_monitor.py --rounds 20 --threads 1
"""

from __future__ import annotations

import argparse
import json
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
        models = {"plain": _sharded(args.width), "monitored": _sharded(args.width)}
        opts = {n: torch.optim.SGD(m.parameters(), lr=1e-3) for n, m in models.items()}
        analyzer = DistributedAnalyzer(models["monitored"], store, flush_every=args.flush_every)

        def step(name: str) -> float:
            dist.barrier()
            start = time.perf_counter()
            opts[name].zero_grad()
            F.cross_entropy(models[name](x), y).backward()
            if name == "monitored":
                analyzer.step()
            opts[name].step()
            dist.barrier()
            return time.perf_counter() - start

        for name in models:  # warm-up
            step(name)
        times: dict[str, list[float]] = {n: [] for n in models}
        for r in range(args.rounds):
            for name in ["plain", "monitored"] if r % 2 == 0 else ["monitored", "plain"]:
                times[name].append(step(name))
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
                "ratio_monitored_to_plain": statistics.median(
                    a / b for a, b in zip(times["monitored"], times["plain"], strict=True)
                ),
            }
            print(json.dumps(result, indent=2))
            out = Path(__file__).resolve().parent / "results" / f"fsdp_monitor_t{args.threads}.json"
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
