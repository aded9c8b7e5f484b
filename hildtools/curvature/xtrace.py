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

    The ``size x s`` algebra (the QR of ``Y``, four Gram matrices) runs in the products' dtype, at least float32:
    its rounding (about 1e-6 relative) is far below the estimator's own error. The deflated quadratic forms are
    expanded into those Gram matrices, so no deflated vector is formed:
    ``u_i^T H u_i = w_i^T y_i - w_i^T Z m_i - m_i^T R e_i + m_i^T (Q^T Z) m_i`` with ``u_i = w_i - Q m_i``,
    ``m_i = Q^T w_i - s_i (s_i^T Q^T w_i)`` and ``Q^T Y = R``. The ``s x s`` algebra runs in float64.
    """
    count = probes.shape[1]
    work = torch.promote_types(probes.dtype, torch.float32)
    omega = probes.to(work)
    products = matmat(probes).to(work)  # Y = H Omega
    basis, triangular = torch.linalg.qr(products)
    projected = matmat(basis.to(probes.dtype)).to(work)  # Z = H Q
    compressed = (basis.T @ projected).double()  # Q^T H Q
    coordinates = (basis.T @ omega).double()  # Q^T w_i
    cross = (omega.T @ projected).double()  # w_i^T Z
    diagonal = (omega * products).sum(0).double()  # w_i^T y_i
    triangular = triangular.double()
    symmetric = (compressed + compressed.T) / 2
    duals = torch.linalg.inv(triangular.T)
    duals = duals / torch.linalg.vector_norm(duals, dim=0, keepdim=True)  # the s_i
    deflation = coordinates - duals * (duals * coordinates).sum(0)  # the m_i
    quadratic = (
        diagonal
        - (cross * deflation.T).sum(1)
        - (deflation * triangular).sum(0)
        + (deflation * (compressed @ deflation)).sum(0)
    )  # u_i^T H u_i
    estimates = torch.trace(symmetric) - (duals * (symmetric @ duals)).sum(0) + quadratic
    error = (estimates.std() / math.sqrt(count)).item() if count > 1 else math.nan
    return estimates.mean().item(), error
