"""``hessian_trace``: stochastic estimates of ``tr(H)`` from Hessian-vector products (Hutchinson, Hutch++).

Hutchinson: ``tr(H) ~ mean_i z_i^T H z_i`` with Rademacher ``z_i`` (unbiased; variance ``2 ||H||_F^2 -
2 sum_i H_ii^2`` per probe). Hutch++ (Meyer, Musco, Musco & Woodruff 2021) spends a third of the products on a
sketch ``Q = orth(H S)`` of the dominant range, takes ``tr(Q^T H Q)`` exactly (another third) and applies
Hutchinson to the deflated rest ``(I - QQ^T) H (I - QQ^T)`` (the last third): unbiased too, with far lower
variance when a few eigenvalues dominate, as in neural-network Hessians. The standard error is the sample
standard deviation of the Hutchinson part over the square root of its number of probes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hildtools._checks import check_choice, check_int
from hildtools.curvature._random import rademacher_vector
from hildtools.curvature.hvp import HessianOperator, LossFn
from hildtools.curvature.lanczos import MatVec

METHODS = ("hutch++", "hutchinson")


@dataclass
class TraceEstimate:
    """A trace estimate: ``estimate`` +- ``standard_error`` (NaN with fewer than two Hutchinson probes)."""

    estimate: float
    standard_error: float
    num_hvp: int
    method: str


def _mean_and_error(samples: list[Tensor]) -> tuple[float, float]:
    values = torch.stack(samples).double().cpu()
    error = (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else math.nan
    return values.mean().item(), error


def operator_trace(matvec: MatVec, size: int, *, num_samples: int = 30, method: str = "hutch++", seed: int = 0,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> TraceEstimate:
    """Trace of the symmetric operator ``matvec`` from ``num_samples`` products (see the module docstring).

    Raises:
        ValueError: ``num_samples`` below 3 (Hutch++) or 2 (Hutchinson), or an unknown ``method``.
    """
    check_choice("method", method, METHODS)
    check_int("num_samples", num_samples, 3 if method == "hutch++" else 2)
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(device)

    def probe() -> Tensor:
        return rademacher_vector(size, generator, device, dtype)

    if method == "hutchinson":
        samples = []
        for _ in range(num_samples):
            z = probe()
            samples.append(torch.dot(z, matvec(z)))
        estimate, error = _mean_and_error(samples)
        return TraceEstimate(estimate, error, num_samples, method)
    sketch_size = num_samples // 3
    sketch = torch.stack([matvec(probe()) for _ in range(sketch_size)], 1)
    basis = torch.linalg.qr(sketch.double()).Q.to(dtype)
    low_rank = sum(torch.dot(q, matvec(q)).double() for q in basis.T)
    samples = []
    for _ in range(num_samples - 2 * sketch_size):
        z = probe()
        z = z - basis @ (basis.T @ z)
        samples.append(torch.dot(z, matvec(z)))
    estimate, error = _mean_and_error(samples)
    return TraceEstimate(low_rank.item() + estimate, error, num_samples, method)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    num_samples: int = 30,
    method: str = "hutch++",
    seed: int = 0,
    params: Iterable[Tensor] | None = None,
    backend: str = "autograd",
    hvp: str = "auto",
    dtype: torch.dtype | None = None,
) -> TraceEstimate:
    """Estimate ``tr(H)`` of the Hessian of ``loss_fn(model, batch)`` from ``num_samples`` Hessian-vector products.

    Args:
        model, loss_fn, batch, params, backend, hvp, dtype: as in :class:`HessianOperator`.
        num_samples: Hessian-vector products to spend, >= 3 for Hutch++ (split in thirds), >= 2 for Hutchinson.
        method: ``"hutch++"`` (default, lower variance) or ``"hutchinson"``.
        seed: seed of the private generator for the Rademacher probes.

    Returns:
        :class:`TraceEstimate` (``estimate``, ``standard_error``, ``num_hvp``, ``method``).

    Raises:
        ValueError: bad ``num_samples``/``method``/``backend``/``hvp``, or a sharded (FSDP) model (not supported).
        NonFiniteLossError: the loss is NaN or infinite.

    Example:
        >>> model = nn.Linear(3, 1)
        >>> batch = (torch.randn(16, 3), torch.randn(16, 1))
        >>> result = hessian_trace(model, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), batch, num_samples=12)
        >>> result.num_hvp
        12
    """
    check_choice("method", method, METHODS)
    check_int("num_samples", num_samples, 3 if method == "hutch++" else 2)
    operator = HessianOperator(model, loss_fn, batch, params=params, backend=backend, hvp=hvp, dtype=dtype)
    if operator.sharded:
        raise ValueError("hessian_trace does not support sharded (FSDP) models yet: Hutch++ orthogonalises its "
                         "sketch with a QR factorisation of whole vectors")
    return operator_trace(operator.matvec, operator.size, num_samples=num_samples, method=method, seed=seed,
                          device=operator.device, dtype=operator.dtype)
