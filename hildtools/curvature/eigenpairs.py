"""``hessian_eigenpairs``: the top-k Hessian eigenvalues and eigenvectors of a loss on one batch."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hildtools._checks import check_choice, check_int, check_number, check_positive
from hildtools.curvature.hvp import HessianOperator, LossFn
from hildtools.curvature.lanczos import CONFIRM_FRACTION, Eigenpairs, lanczos

BACKENDS = ("autograd", "func", "pyhessian")


def hessian_eigenpairs(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    k: int = 1,
    *,
    tol: float = 1e-3,
    max_iter: int | None = None,
    init: Tensor | None = None,
    smallest: bool = False,
    backend: str = "autograd",
    hvp: str = "auto",
    preconditioner: Tensor | Sequence[Tensor] | None = None,
    params: Iterable[Tensor] | None = None,
    basis_device: torch.device | str | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    confirm: float = CONFIRM_FRACTION,
) -> Eigenpairs:
    """The k largest (algebraic, not largest-magnitude) eigenpairs of the Hessian of ``loss_fn(model, batch)``.

    Lanczos with partial re-orthogonalisation (basis orthonormal to eps^0.75) on Hessian-vector products
    (:class:`HessianOperator`), stopped when every Ritz residual is at most ``tol * |eigenvalue|``: each returned
    eigenvalue is then within ``tol`` (relative) of a true eigenvalue, and ``result.error_bounds`` holds a tighter
    a-posteriori bound (``r^2 / gap`` when the neighbouring Ritz values have converged, else ``r``;
    ``result.bound_kinds`` says which), in practice about ``tol^2``. The Lanczos recurrence runs in float64 while
    the products (and the stored basis) stay in ``dtype``, so fp32 models reach about 1e-7 relative without
    ``dtype=torch.float64``. The
    model is evaluated as it is (its train/eval modes decide BatchNorm and dropout behaviour); parameters, buffers,
    ``.grad`` and the global RNG are left untouched.

    Args:
        model: the module (DDP wrappers are removed); its parameters define the vector layout.
        loss_fn: ``loss_fn(model, batch) -> scalar``, normally a mean over the batch.
        batch: the probe batch, on the model's device.
        k: number of top eigenpairs, >= 1.
        tol: relative Ritz-residual tolerance, > 0.
        max_iter: cap on Hessian-vector products, >= k (default ``max(100, 20 k)``).
        init: warm start from previous eigenvectors, ``(P,)`` or ``(P, j)`` (any device).
        smallest: also compute the smallest (algebraic) eigenpair (``result.smallest_eigenvalue``).
        backend: ``"autograd"`` (double backward, one graph reused), ``"func"`` (torch.func forward-over-reverse)
            or ``"pyhessian"`` (PyHessian's power iteration, for parity with published numbers; it returns the
            largest-MAGNITUDE eigenvalues and supports no ``params``/``preconditioner``/``init``/``smallest``).
        hvp: ``"auto"`` (default: double backward where it runs and is exact, finite differences of gradients for
            sharded models, fused kernels without double backward, ``once_differentiable`` functions; a warning
            says when it switches), ``"autograd"`` or ``"finite_difference"``; see :class:`HessianOperator`. For a
            sharded (FSDP) model, eigenvectors are this rank's local shards and every rank must call.
        preconditioner: diagonal ``s``; the eigenpairs are then those of ``S H S``, ``S = diag(s)`` (for Adam,
            ``s = P^{-1/2}`` from :func:`adam_preconditioner` gives ``lambda(P^{-1} H)`` computed symmetrically).
        params: parameters to differentiate (default: all with ``requires_grad``).
        basis_device: where to keep the Lanczos basis (``"cpu"`` for large models on a GPU).
        seed: seed of the private generator for the start vector.
        dtype: dtype of the products (default: the parameters', fp32 for bf16/fp16 models).
        confirm: confirmation steps after the residual test first passes at step m, as a fraction of m (default
            0.25; ``0`` stops at once, as ARPACK does: fewer products, more risk of missing an eigenvalue close to
            the top ones); see :func:`hildtools.curvature.lanczos.lanczos`.

    Returns:
        :class:`Eigenpairs`: ``vals, vecs = result``, eigenvalues descending (float64, CPU), eigenvectors as the
        columns of a ``(P, k)`` tensor over the concatenated parameters; also ``residuals``, ``error_bounds``,
        ``bound_kinds``, ``converged``,
        ``num_hvp`` and, with ``smallest=True``, ``smallest_eigenvalue``.

    Raises:
        ValueError: ``k < 1``, ``tol <= 0``, ``max_iter < k``, ``confirm < 0``, unknown ``backend`` or ``hvp``,
            ``k`` above the number of parameters.
        NonFiniteLossError: the loss is NaN or infinite.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> batch = (torch.randn(32, 4), torch.randn(32, 1))
        >>> vals, vecs = hessian_eigenpairs(model, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), batch, k=2)
        >>> vecs.shape
        torch.Size([49, 2])
    """
    check_int("k", k, 1)
    tol = check_positive("tol", tol)
    if max_iter is not None:
        check_int("max_iter", max_iter, k)
    check_number("confirm", confirm)
    check_choice("backend", backend, BACKENDS)
    if backend == "pyhessian":
        from hildtools.curvature.pyhessian_backend import pyhessian_eigenpairs

        unsupported = {
            "init": init,
            "preconditioner": preconditioner,
            "params": params,
            "dtype": dtype,
            "basis_device": basis_device,
        }
        given = [name for name, value in unsupported.items() if value is not None] + (["smallest"] if smallest else [])
        if given:
            raise ValueError(f"backend='pyhessian' does not support {', '.join(given)}; use backend='autograd'")
        return pyhessian_eigenpairs(model, loss_fn, batch, k, tol=tol, max_iter=max_iter or 100)
    operator = HessianOperator(
        model, loss_fn, batch, params=params, backend=backend, hvp=hvp, preconditioner=preconditioner, dtype=dtype
    )
    if k > operator.dimension:
        raise ValueError(f"k must be at most the number of parameters ({operator.dimension}), got {k}")
    return lanczos(
        operator.matvec,
        operator.size,
        k,
        tol=tol,
        max_iter=max_iter,
        init=init,
        smallest=smallest,
        basis_device=basis_device,
        seed=seed,
        device=operator.device,
        dtype=operator.dtype,
        inner=operator.inner,
        product_error=lambda: operator.product_error,
        confirm=confirm,
    )
