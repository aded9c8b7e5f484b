"""``hessian_trace``: stochastic estimates of ``tr(H)`` from Hessian-vector products (XTrace, Hutch++, Hutchinson).

Hutchinson: ``tr(H) ~ mean_i z_i^T H z_i`` with Rademacher ``z_i`` (unbiased; variance ``2 ||H||_F^2 -
2 sum_i H_ii^2`` per probe). Hutch++ (Meyer, Musco, Musco & Woodruff 2021) spends a third of the products on a
sketch ``Q = orth(H S)`` of the dominant range, takes ``tr(Q^T H Q)`` exactly (another third) and applies
Hutchinson to the deflated rest ``(I - QQ^T) H (I - QQ^T)`` (the last third): unbiased too, with far lower
variance when a few eigenvalues dominate, as in neural-network Hessians. The standard error is the sample
standard deviation of the Hutchinson part over the square root of its number of probes. XTrace (the default, see
:mod:`hildtools.curvature.xtrace`) reuses every product for both parts: at the same number of products its error
was half of Hutch++'s on a synthetic decaying spectrum (RMS 0.37% vs 0.80% at 60 products, 60 seeds; 3.4% vs 4.2%
at 30) and a quarter on a 1.1M-parameter MLP Hessian (0.29% vs 1.1% at 60, measured with curvlinops), for the same
products; so it is the default. Its standard error (spread of its exchangeable estimates) runs somewhat low at
small ``num_samples``.
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
from hildtools.curvature.xtrace import MatMat, xtrace

METHODS = ("xtrace", "hutch++", "hutchinson")
MIN_SAMPLES = {"xtrace": 4, "hutch++": 3, "hutchinson": 2}


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


def columns(matvec: MatVec) -> MatMat:
    """``V -> H V`` one column at a time, for operators without a block product."""
    return lambda block: torch.stack([matvec(column) for column in block.T]).T


def operator_trace(
    matvec: MatVec,
    size: int,
    *,
    num_samples: int = 30,
    method: str = "xtrace",
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    matmat: MatMat | None = None,
) -> TraceEstimate:
    """Trace of the symmetric operator ``matvec`` from ``num_samples`` products (see the module docstring);
    ``matmat(V) = H V`` multiplies blocks of probes at once where given. XTrace uses an even number of products
    (``num_samples`` rounded down).

    Raises:
        ValueError: ``num_samples`` below 4 (XTrace), 3 (Hutch++) or 2 (Hutchinson), or an unknown ``method``.
    """
    check_choice("method", method, METHODS)
    check_int("num_samples", num_samples, MIN_SAMPLES[method])
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    matmat = columns(matvec) if matmat is None else matmat

    def probes(count: int) -> Tensor:
        return torch.stack([rademacher_vector(size, generator, device, dtype) for _ in range(count)]).T

    if method == "xtrace":
        estimate, error = xtrace(matmat, probes(num_samples // 2))
        return TraceEstimate(estimate, error, 2 * (num_samples // 2), method)
    if method == "hutchinson":
        z = probes(num_samples)
        estimate, error = _mean_and_error(list((z * matmat(z)).sum(0)))
        return TraceEstimate(estimate, error, num_samples, method)
    sketch_size = num_samples // 3
    basis = torch.linalg.qr(matmat(probes(sketch_size)).double()).Q.to(dtype)
    low_rank = (basis.double() * matmat(basis).double()).sum()
    z = probes(num_samples - 2 * sketch_size)
    z = z - basis @ (basis.T @ z)
    estimate, error = _mean_and_error(list((z * matmat(z)).sum(0)))
    return TraceEstimate(low_rank.item() + estimate, error, num_samples, method)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    num_samples: int = 30,
    method: str = "xtrace",
    seed: int = 0,
    params: Iterable[Tensor] | None = None,
    backend: str = "autograd",
    hvp: str = "auto",
    dtype: torch.dtype | None = None,
) -> TraceEstimate:
    """Estimate ``tr(H)`` of the Hessian of ``loss_fn(model, batch)`` from ``num_samples`` Hessian-vector products.

    Args:
        model, loss_fn, batch, params, backend, hvp, dtype: as in :class:`HessianOperator`.
        num_samples: Hessian-vector products to spend: >= 4 for XTrace (rounded down to even), >= 3 for Hutch++
            (split in thirds), >= 2 for Hutchinson.
        method: ``"xtrace"`` (default, lowest error at equal cost), ``"hutch++"`` or ``"hutchinson"``.
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
    check_int("num_samples", num_samples, MIN_SAMPLES[method])
    operator = HessianOperator(model, loss_fn, batch, params=params, backend=backend, hvp=hvp, dtype=dtype)
    if operator.sharded:
        raise ValueError(
            "hessian_trace does not support sharded (FSDP) models yet: XTrace and Hutch++ "
            "orthogonalise their sketches with QR factorisations of whole vectors"
        )
    return operator_trace(
        operator.matvec,
        operator.size,
        num_samples=num_samples,
        method=method,
        seed=seed,
        device=operator.device,
        dtype=operator.dtype,
        matmat=operator.matmat,
    )
