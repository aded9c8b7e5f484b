"""XTrace (Epperly, Tropp & Webber 2024): the trace estimator that uses every product both for the low-rank part and
for the Hutchinson correction, by exchangeability.

With test vectors ``Omega = [w_1 .. w_s]`` (Rademacher), ``Y = H Omega = Q R`` and ``Z = H Q``: for each ``i`` let
``Q_i`` be an orthonormal basis of ``Y`` without column ``i``; then ``Q_i Q_i^T = Q (I - s_i s_i^T) Q^T`` where
``s_i`` is the i-th column of ``R^{-T}``, normalised. The i-th estimate is Hutch++ with sketch ``Q_i`` and probe
``w_i`` (independent of ``Q_i``, hence unbiased):

    t_i = tr(Q^T Z) - s_i^T (Q^T Z) s_i + u_i^T H u_i,    u_i = (I - Q_i Q_i^T) w_i,

where ``H u_i = y_i - Z (Q^T w_i) + Z s_i (s_i^T Q^T w_i)`` costs no product. XTrace returns the mean of the ``t_i``
(``2 s`` products), and the standard error is their standard deviation over ``sqrt(s)``. Hutch++ spends a third of
its products on the sketch, a third on ``tr(Q^T H Q)`` and a third on Hutchinson; XTrace gets a sketch of rank
``s - 1`` and ``s`` Hutchinson probes from ``2 s`` products, so its error is lower at the same cost when a few
eigenvalues dominate (as in neural-network Hessians).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

MatMat = Callable[[Tensor], Tensor]


def xtrace(matmat: MatMat, probes: Tensor) -> tuple[float, float]:
    """XTrace estimate and standard error of ``tr(H)`` from the columns of ``probes`` (``size x s``, ``s >= 2``);
    ``matmat(V) = H V`` is called twice, on ``s`` columns each.

    The small ``s x s`` algebra runs in float64.
    """
    count = probes.shape[1]
    products = matmat(probes)
    basis, triangular = torch.linalg.qr(products.double())
    projected = matmat(basis.to(probes.dtype)).double()  # Z = H Q
    compressed = basis.T @ projected  # Q^T H Q
    compressed = (compressed + compressed.T) / 2
    duals = torch.linalg.inv(triangular.T)
    duals = duals / torch.linalg.vector_norm(duals, dim=0, keepdim=True)  # the s_i
    probes64, products64 = probes.double(), products.double()
    coordinates = basis.T @ probes64  # Q^T w_i
    weights = (duals * coordinates).sum(0)  # s_i^T Q^T w_i
    deflated = probes64 - basis @ coordinates + basis @ (duals * weights)  # u_i
    deflated_products = products64 - projected @ coordinates + projected @ (duals * weights)  # H u_i
    estimates = torch.trace(compressed) - (duals * (compressed @ duals)).sum(0) + (deflated * deflated_products).sum(0)
    error = (estimates.std() / math.sqrt(count)).item() if count > 1 else math.nan
    return estimates.mean().item(), error
