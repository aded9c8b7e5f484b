"""Collectives for diagnostics under torch.distributed; each is a no-op in a single process. Also :func:`unwrap`,
the module under DDP / DataParallel wrappers (no collective).

Every other function here runs one collective and must be called on every rank (a collective on one rank hangs).
Results are identical on all ranks, so every rank takes the same decisions (stopping rules, skips).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def is_distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and (torch.distributed.get_world_size() > 1)
    )


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Mean over ranks (a new tensor; the input is left alone)."""
    if not is_distributed():
        return tensor
    out = tensor.clone()
    torch.distributed.all_reduce(out)
    return out / torch.distributed.get_world_size()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over ranks (a new tensor; the input is left alone)."""
    if not is_distributed():
        return tensor
    out = tensor.clone()
    torch.distributed.all_reduce(out)
    return out


def sharded_inner(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for vectors whose entries are split across ranks: the local products, summed over ranks (one
    collective; the full vectors are never gathered). Identical on every rank."""
    return all_reduce_sum(a @ b)


def all_reduce_weighted_mean(tensor: Tensor, weight: float) -> Tensor:
    """``sum_r w_r t_r / sum_r w_r``: the mean of a per-example average when ranks hold ``w_r`` examples each."""
    if not is_distributed():
        return tensor
    packed = torch.cat([tensor.reshape(-1) * weight, tensor.new_tensor([float(weight)])])
    torch.distributed.all_reduce(packed)
    return (packed[:-1] / packed[-1]).reshape(tensor.shape)


def all_finite(tensor: Tensor) -> bool:
    """True when ``tensor`` is finite on every rank (one collective, so all ranks agree on skipping)."""
    bad = (~torch.isfinite(tensor.detach())).any().to(torch.float32).reshape(1)
    if is_distributed():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return not bool(bad.item())


def all_reduce_max(value: int, device: torch.device | str = "cpu") -> int:
    """The largest of the ranks' integers ``value`` (``device``: where the process group's backend works)."""
    if not is_distributed():
        return value
    packed = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MAX)
    return int(packed.item())


def unwrap(module: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel / DataParallel wrappers (their forward runs collectives)."""
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module
