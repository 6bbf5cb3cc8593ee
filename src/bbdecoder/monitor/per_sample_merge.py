"""Per-sample statistics over the global batch of a ``torch.distributed`` run (DDP, FSDP2).

Each rank computes its samples' gradients ``g_i`` (:class:`~bbdecoder.monitor.per_sample.PerSampleGradients`
on its local forward/backward passes: layer inputs and output gradients are local and full-sized
under DDP and FSDP2 alike). What the contract's statistics need over all ``N = sum_r B_r`` samples
are sums, so they merge exactly with one ``all_reduce`` (SUM) of, per tensor,
``sum_i ||g_i||``, ``sum_i ||g_i||^2`` and the vector ``sum_i g_i`` (float64, the parameter's full
shape), plus ``N`` and the whole model's ``sum_i ||g_i||``:

- ``sample_norm_mean = (1/N) sum_i ||g_i||``,
- ``G = (1/N) sum_i g_i``, ``sample_grad_sq = ||G||^2``,
- ``sample_var = (1/N) sum_i ||g_i||^2 - ||G||^2``.

``G`` is the gradient of the mean of all ``N`` per-sample losses; it is DDP's averaged gradient when
every rank has the same number of samples (with unequal local batches it is the exact global-batch
mean, which DDP's average of the ranks' means is not). The vector sum costs one ``all_reduce`` the
size of the covered parameters (float64) on the per-sample steps only (``per_sample=k``).

Before it, one ``all_gather`` of two numbers (tensor count and elements) checks that every rank
covers the same tensors (a layer left out on one rank only would garble the merge); a mismatch
raises :class:`~bbdecoder.monitor.per_sample.PerSampleError` on every rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from bbdecoder.monitor.per_sample import PerSampleError, PerSampleStats


def merge_across_ranks(stats: PerSampleStats, group: Any = None, *, nccl: bool = False) -> PerSampleStats:
    """``stats`` of this rank's samples -> the statistics of every rank's samples together
    (collective: every rank calls it with the statistics of the same tensors). ``group``: the process
    group (``None``: the default one); ``nccl``: reduce on the tensors' CUDA device."""
    if stats.sums is None or len(stats.grad_sums) != len(stats.names):
        raise PerSampleError(
            "these per-sample statistics carry no sums to merge (computed by an old version?)"
        )
    device = stats.table.device if nccl else torch.device("cpu")
    world = dist.get_world_size(group)
    numel = sum(g.numel() for g in stats.grad_sums)
    header = torch.tensor([float(len(stats.names)), float(numel)], dtype=torch.float64, device=device)
    headers = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(headers, header, group=group)
    if any(not torch.equal(h, header) for h in headers):
        seen = sorted({(int(h[0]), int(h[1])) for h in headers})
        raise PerSampleError(
            f"the ranks cover different parameter tensors in this per-sample step ((tensors, elements) per "
            f"rank: {seen}); every rank must run the same layers, and a layer left out on one rank (see the "
            "warnings) is left out everywhere only when it fails on every rank"
        )
    local_n = stats.sample_sq_norms.numel()
    model_norm_sum = stats.sample_sq_norms.double().sqrt().sum()
    payload = torch.cat(
        [
            torch.stack([model_norm_sum.new_tensor(float(local_n)), model_norm_sum]).to(device),
            stats.sums.double().reshape(-1).to(device),
            *(g.double().reshape(-1).to(device) for g in stats.grad_sums),
        ]
    )
    dist.all_reduce(payload, op=dist.ReduceOp.SUM, group=group)
    payload = payload.to(stats.table.device)
    n_tensors = len(stats.names)
    total, model_norm = float(payload[0]), payload[1]
    sums = payload[2 : 2 + 2 * n_tensors].reshape(n_tensors, 2)
    grad_sums, offset = [], 2 + 2 * n_tensors
    for g in stats.grad_sums:
        grad_sums.append(payload[offset : offset + g.numel()].reshape(g.shape))
        offset += g.numel()
    grad_sq = torch.stack([(g / total).pow(2).sum() for g in grad_sums])
    var = (sums[:, 1] / total - grad_sq).clamp_min(0.0)
    table = torch.stack([sums[:, 0] / total, var, grad_sq], 1)
    return PerSampleStats(
        list(stats.names),
        table,
        stats.sample_sq_norms,
        dict(stats.skipped),
        sums,
        grad_sums,
        merged=(round(total), float(model_norm / total)),
    )


__all__ = ["merge_across_ranks"]
