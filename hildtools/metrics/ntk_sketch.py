"""Sketched NTK from forward passes only: ``K~ = (J S)(J S)^T``, ``J S`` by finite differences of the outputs.

``J`` is the (n C') x P Jacobian of the selected outputs (the conventions of :mod:`hildtools.metrics.ntk`) and
``S = R / sqrt(k)`` with ``R`` (P x k) of iid N(0, 1) entries, so ``E[S S^T] = I`` and ``E[K~] = J J^T = K``:
the sketch is unbiased. Column ``l`` of ``J S`` is the directional derivative of the outputs along ``r_l``,

    J r_l ~= (f(theta + h r_l) - f(theta - h r_l)) / (2 h),

two forward passes of the whole batch and no backward pass, no double backward and no ``vmap`` through the model,
so it runs wherever the forward runs (sharded parameters, fused kernels, ops without batching rules). The step is
``h = eps^(1/3) * rms(theta)`` (``eps`` of the parameters' dtype; ``rms(theta) = 1`` if theta is zero): each
coordinate moves by about ``eps^(1/3)`` of the parameters' scale, which balances the truncation error ``O(h^2)`` and
the rounding error ``O(eps / h)`` of central differences (relative error about ``eps^(2/3)``: 5e-11 in fp64, 2e-5
in fp32 on smooth models; kinks such as ReLU add an error where a perturbation crosses one). :func:`empirical_ntk`
evaluates bf16/fp16 models on fp32 copies; the in-place variant for sharded models perturbs the shards in their
own dtype, so bf16 shards give about ``eps^(2/3)`` = 4e-2 relative error: keep fp32 master weights for it.

Variance. With ``G_ij = J_i J_j^T`` the (C' x C') block of the output Gram of examples i and j (``K_ij = tr G_ij``
for ``"sum"``), ``Var(K~_ij) = (<G_ii, G_jj>_F + ||G_ij||_F^2) / k``; for one output per example (``"index"``,
``"projection"``, C = 1, and every entry of ``"full"``) ``Var(K~_ij) = (K_ii K_jj + K_ij^2) / k``: the error of an
entry relative to ``sqrt(K_ii K_jj)`` has standard deviation at most ``sqrt(2/k)``, and
``E ||K~ - K||_F^2 = (tr(K)^2 + ||K||_F^2) / k``.

Cost: ``2 k`` forward passes of the batch (memory: one forward, plus ``n x C' x k`` fp64 numbers); the directions
are drawn one column at a time from a generator seeded per column, on the parameters' device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

SKETCH_DIM = 256  # default k for method="sketch"


def column_seeds(seed: int, sketch_dim: int) -> list[int]:
    """The seed of each column's direction, from a CPU generator seeded with ``seed`` (the same on every device)."""
    return torch.randint(2**62, (sketch_dim,), generator=torch.Generator().manual_seed(seed)).tolist()


def direction(params: dict[str, Tensor], column_seed: int) -> dict[str, Tensor]:
    """One column ``r`` of ``R``: iid N(0, 1) entries shaped like ``params``, drawn in their order."""
    first = next(iter(params.values()))
    generator = torch.Generator(device=first.device).manual_seed(column_seed)
    return {
        name: torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype) for name, p in params.items()
    }


def difference_step(params: dict[str, Tensor]) -> float:
    """``h = eps^(1/3) * rms(theta)``, eps of the parameters' dtype."""
    first = next(iter(params.values()))
    squares = sum(p.detach().double().square().sum() for p in params.values())
    rms = math.sqrt(float(squares) / sum(p.numel() for p in params.values()))
    return torch.finfo(first.dtype).eps ** (1 / 3) * (rms if rms > 0 else 1.0)


def directional_derivative(
    outputs: Callable[[dict[str, Tensor]], Tensor], params: dict[str, Tensor], towards: dict[str, Tensor], step: float
) -> Tensor:
    """``(f(theta + h r) - f(theta - h r)) / 2h`` in fp64, ``outputs`` evaluated under ``no_grad``."""
    with torch.no_grad():
        plus = outputs({name: p + step * towards[name] for name, p in params.items()})
        minus = outputs({name: p - step * towards[name] for name, p in params.items()})
    return (plus.double() - minus.double()) / (2 * step)


def sketched_jacobian(
    outputs: Callable[[dict[str, Tensor]], Tensor],
    params: dict[str, Tensor],
    shape: tuple[int, int],
    sketch_dim: int,
    seed: int,
    owned: Callable[[int], bool] = lambda column: True,
) -> Tensor:
    """``J S`` as an (n, C', k) fp64 tensor, ``outputs(params) -> (n, C')`` being the selected outputs as a function
    of the parameters; the columns with ``owned(l)`` are filled, the others left zero (to be summed over ranks)."""
    step = difference_step(params)
    device = next(iter(params.values())).device
    sketched = torch.zeros(*shape, sketch_dim, dtype=torch.float64, device=device)
    for column, column_seed in enumerate(column_seeds(seed, sketch_dim)):
        if owned(column):
            sketched[..., column] = directional_derivative(outputs, params, direction(params, column_seed), step)
    return sketched / math.sqrt(sketch_dim)


def local_tensor(parameter: Tensor) -> Tensor:
    """The locally held part of a parameter: an FSDP2 ``DTensor``'s local shard, else the parameter's data (an
    FSDP1 flat or original parameter is already the local shard outside the forward)."""
    return parameter.to_local() if hasattr(parameter, "to_local") else parameter.data


def sketched_jacobian_in_place(
    outputs: Callable[[], Tensor],
    parameters: list[Tensor],
    sketch_dim: int,
    seed: int,
    rank: int = 0,
    reduce_sum: Callable[[Tensor], Tensor] = lambda tensor: tensor,
) -> Tensor:
    """``J S`` (n, C', k) for a model whose parameters cannot be swapped (FSDP shards): each rank moves its local
    shards in place, ``theta +- h r``, calls ``outputs()`` (the model's own forward, which gathers the shards) and
    restores every shard bitwise from a copy. Every rank must call it with the same batch; each rank draws the
    directions of its own shards (seeded by the column and the rank), so ``S`` has iid N(0, 1) / sqrt(k) entries
    and the whole direction is never formed. ``reduce_sum`` sums over the ranks (for ``rms(theta)`` in the step)."""
    shards = [local_tensor(p) for p in parameters]
    saved = [shard.detach().clone() for shard in shards]
    squares = reduce_sum(sum(shard.double().square().sum() for shard in shards).reshape(1))
    count = reduce_sum(torch.tensor([float(sum(shard.numel() for shard in shards))], device=squares.device))
    rms = math.sqrt(float(squares) / max(float(count), 1.0))
    step = torch.finfo(shards[0].dtype).eps ** (1 / 3) * (rms if rms > 0 else 1.0)
    columns = []
    try:
        for column_seed in column_seeds(seed, sketch_dim):
            generator = torch.Generator(device=shards[0].device).manual_seed((column_seed + 7919 * rank) % 2**62)
            towards = [torch.randn(s.shape, generator=generator, device=s.device, dtype=s.dtype) for s in shards]
            values = []
            with torch.no_grad():
                for sign in (1.0, -1.0):
                    for shard, original, r in zip(shards, saved, towards):
                        shard.copy_(original + sign * step * r)
                    values.append(outputs().double())
            columns.append((values[0] - values[1]) / (2 * step))
    finally:
        with torch.no_grad():
            for shard, original in zip(shards, saved):
                shard.copy_(original)
    return torch.stack(columns, dim=-1) / math.sqrt(sketch_dim)
