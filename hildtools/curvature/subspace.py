"""``subspace_overlap``: how much two k-dimensional subspaces coincide ("Hessian inertia")."""

from __future__ import annotations

from torch import Tensor

from hildtools.curvature.lanczos import Inner, local_inner


def subspace_overlap(first: Tensor, second: Tensor, inner: Inner = local_inner) -> float:
    """``||U^T V||_F^2 / k`` for orthonormal column blocks ``U`` (P x k1) and ``V`` (P x k2), ``k = min(k1, k2)``.

    1 when one span contains the other, 0 when they are orthogonal, about ``k/P`` for random subspaces
    (Gur-Ari, Roberts & Dyer 2018). Unlike per-vector overlaps it is invariant to sign flips and to rotations
    inside the subspace, so near-equal eigenvalues swapping their eigenvectors do not register as movement.
    Computed in float64 on ``first``'s device; a 1-D tensor counts as one column. ``inner``: for blocks whose
    rows are split across ranks, :func:`hildtools.distributed.sharded_inner`.

    Raises:
        ValueError: the blocks have different numbers of rows.

    Example:
        >>> import torch
        >>> subspace_overlap(torch.eye(4)[:, :2], torch.eye(4)[:, 1:3])
        0.5
    """
    u = (first[:, None] if first.dim() == 1 else first).double()
    v = (second[:, None] if second.dim() == 1 else second).to(u.device, u.dtype)
    if u.shape[0] != v.shape[0]:
        raise ValueError(f"first and second must have the same number of rows, got {u.shape[0]} and {v.shape[0]}")
    return (inner(u.T, v) ** 2).sum().item() / min(u.shape[1], v.shape[1])
