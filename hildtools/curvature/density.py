"""``spectral_density``: the Hessian eigenvalue density by stochastic Lanczos quadrature (SLQ).

For a unit start vector ``q`` and ``m`` Lanczos steps, the eigenvalues ``theta_j`` of the tridiagonal ``T_m``
(nodes) and the squared first components ``tau_j = s_{1j}^2`` of its eigenvectors (weights, summing to 1) form
the Gauss quadrature of the measure ``sum_i (q^T u_i)^2 delta(x - lambda_i)``: ``sum_j tau_j f(theta_j) =
q^T f(H) q`` exactly for polynomials f of degree < 2m. With ``q = z / sqrt(P)``, ``z`` Rademacher,
``E[q^T H^j q] = tr(H^j) / P``, so averaging over probes estimates the spectral density
``phi(x) = (1/P) sum_i delta(x - lambda_i)`` (Lin, Saad & Yang 2016; Ghorbani, Krishnan & Xiao 2019).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hildtools._checks import check_int, check_positive
from hildtools.curvature._random import rademacher_vector
from hildtools.curvature.hvp import HessianOperator, LossFn
from hildtools.curvature.lanczos import Inner, LanczosProcess, MatVec, local_inner


@dataclass
class SpectralDensity:
    """Quadrature nodes and weights, one row per probe (float64, CPU); every row of ``weights`` sums to 1.

    Rows of probes whose Krylov space was exhausted early are padded with zero-weight nodes.
    """

    nodes: Tensor
    weights: Tensor
    num_hvp: int

    def moment(self, power: int) -> float:
        """``mean over probes of sum_j tau_j theta_j^power``, an estimate of ``tr(H^power) / P``."""
        return (self.weights * self.nodes**power).sum(1).mean().item()

    def smooth(
        self, grid: Tensor | None = None, *, num_points: int = 512, sigma: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """The density broadened by a Gaussian of width ``sigma``: ``phi(x) = mean_probes sum_j tau_j N(x;
        theta_j, sigma^2)``, which integrates to 1.

        Args:
            grid: where to evaluate (default: ``num_points`` points spanning the nodes +- 5 sigma).
            num_points: grid size when ``grid`` is None.
            sigma: broadening (default: 1% of the node range, or of the largest |node| if all coincide).

        Returns:
            ``(grid, density)``, float64 tensors.
        """
        low, high = self.nodes.min().item(), self.nodes.max().item()
        if sigma is None:
            sigma = 0.01 * ((high - low) or max(abs(high), 1.0))
        sigma = check_positive("sigma", sigma)
        if grid is None:
            grid = torch.linspace(
                low - 5 * sigma, high + 5 * sigma, check_int("num_points", num_points, 2), dtype=torch.float64
            )
        grid = torch.as_tensor(grid, dtype=torch.float64)
        gauss = torch.exp(-0.5 * ((grid[:, None] - self.nodes.reshape(1, -1)) / sigma) ** 2)
        gauss = gauss / (sigma * (2 * torch.pi) ** 0.5)
        return grid, gauss @ self.weights.reshape(-1) / self.nodes.shape[0]


def lanczos_quadrature(
    matvec: MatVec,
    size: int,
    *,
    num_probes: int = 1,
    num_steps: int = 80,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    basis_device: torch.device | str | None = None,
    inner: Inner = local_inner,
) -> SpectralDensity:
    """SLQ nodes and weights of the symmetric operator ``matvec`` (``num_probes * num_steps`` products at most);
    ``inner`` as in :func:`hildtools.curvature.lanczos.lanczos` (for sharded vectors ``size`` is the local count).

    Raises:
        ValueError: ``num_probes`` or ``num_steps`` below 1.
    """
    check_int("num_probes", num_probes, 1)
    ones = torch.ones(size, device=device, dtype=torch.float64)
    dimension = size if inner is local_inner else round(inner(ones, ones).item())
    num_steps = min(check_int("num_steps", num_steps, 1), dimension)
    generator = torch.Generator().manual_seed(seed)
    nodes = torch.zeros(num_probes, num_steps, dtype=torch.float64)
    weights = torch.zeros(num_probes, num_steps, dtype=torch.float64)
    num_hvp = 0
    for row in range(num_probes):
        process = LanczosProcess(
            matvec, rademacher_vector(size, generator, torch.device(device), dtype), basis_device, inner
        )
        while process.length < num_steps:
            beta = process.step()
            if beta <= 1e3 * torch.finfo(dtype).eps * max(abs(a) for a in process.alphas):
                break  # the Krylov space is invariant: the quadrature is already exact
        theta, vectors = torch.linalg.eigh(process.tridiagonal())
        nodes[row, : len(theta)], nodes[row, len(theta) :] = theta, theta[-1]
        weights[row, : len(theta)] = vectors[0] ** 2
        num_hvp += process.length
    return SpectralDensity(nodes, weights, num_hvp)


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    num_probes: int = 1,
    num_steps: int = 80,
    seed: int = 0,
    params: Iterable[Tensor] | None = None,
    backend: str = "autograd",
    hvp: str = "auto",
    dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
) -> SpectralDensity:
    """Hessian spectral density of ``loss_fn(model, batch)`` by stochastic Lanczos quadrature.

    Args:
        model, loss_fn, batch, params, backend, hvp, dtype: as in :class:`HessianOperator`.
        num_probes: independent Rademacher start vectors (density estimates averaged), >= 1.
        num_steps: Lanczos steps per probe, >= 1 (moments up to ``2 num_steps - 1`` are exact per probe).
        seed: seed of the private generator for the probes.
        basis_device: where to keep each probe's Lanczos basis.

    Returns:
        :class:`SpectralDensity` (``nodes``, ``weights``, ``moment(j)``, ``smooth()``).

    Raises:
        ValueError: bad ``num_probes``/``num_steps``/``backend``.
        NonFiniteLossError: the loss is NaN or infinite.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> batch = (torch.randn(32, 4), torch.randn(32, 1))
        >>> density = spectral_density(model, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), batch, num_steps=20)
        >>> grid, values = density.smooth()
        >>> round(density.moment(0), 6)
        1.0
    """
    check_int("num_probes", num_probes, 1)
    check_int("num_steps", num_steps, 1)
    operator = HessianOperator(model, loss_fn, batch, params=params, backend=backend, hvp=hvp, dtype=dtype)
    return lanczos_quadrature(
        operator.matvec,
        operator.size,
        num_probes=num_probes,
        num_steps=num_steps,
        seed=seed,
        device=operator.device,
        dtype=operator.dtype,
        basis_device=basis_device,
        inner=operator.inner,
    )
