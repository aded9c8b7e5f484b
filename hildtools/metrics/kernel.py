"""Kernel metrics: target alignment, alignment between kernels, relative change, trace, spectrum, effective rank.

All metrics take a kernel ``K`` (a symmetric PSD matrix such as :func:`hildtools.metrics.empirical_ntk`'s) and are
computed in fp64.

Targets. ``y`` holds one entry per example (n of them): integer class labels (one-hot encoded: ``Y[i, c] = 1``
for ``c = y_i``), a float vector (regression, ``Y = y`` as one column) or a float (n, B) matrix. For an n x n
kernel the target kernel is ``T = Y Y^T`` (for labels: ``T_ij = 1`` when ``y_i = y_j``, else 0; the number of
one-hot columns does not matter). For an (nC) x (nC) kernel (``output="full"``, rows ordered ``i*C + a``) the
target kernel is ``T = vec(Y) vec(Y)^T`` with ``Y`` of shape (n, C) (labels one-hot over the C outputs), so
``||T||_F = ||Y||_F^2`` (Baratin et al. 2021).

- ``kernel_alignment(K, y) = <K, T>_F / (||K||_F ||T||_F)`` (Cristianini et al. 2001), in [-1, 1] and in [0, 1]
  for PSD kernels; the silent-alignment paper's (Atanasov et al. 2022) task alignment is the uncentered one.
- ``centered=True``: the same with ``K_c = H K H`` and ``T_c = H T H``, ``H = I_n - 1 1^T / n`` (Cortes, Mohri &
  Rostamizadeh 2012), acting on the example index (``H (x) I_C`` for a full kernel). Centering removes the constant
  mode, which dominates uncentered alignments (a constant target is trivially "aligned" with any kernel whose
  entries share a sign). Alignments with a zero kernel or zero (centered) target are NaN.
- ``kernel_alignment_between(K1, K2) = <K1, K2>_F / (||K1||_F ||K2||_F)``;
  ``relative_change(K_t, K_0) = ||K_t - K_0||_F / ||K_0||_F``.
- ``kernel_effective_rank(K) = exp(-sum_k p_k log p_k)``, ``p_k = lambda_k / sum_j lambda_j`` over the eigenvalues
  of K (Roy & Vetterli 2007 applied to K itself; negative rounding noise clipped to 0). For K = J J^T this is the
  entropy rank of the squared singular values of J, whereas :func:`hildtools.metrics.feature_rank` applies it to the
  singular values of the feature matrix.
- :func:`target_alignment_numerator` gives ``<K, T>`` for a model's NTK without forming K: for a scalar output and
  a target vector, ``y^T K y = ||J^T y||^2``, one backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from hildtools._checks import check_int
from hildtools.metrics.ntk import TangentModel, check_ntk_args


def _check_kernel(kernel: Any, name: str = "K") -> Tensor:
    if not isinstance(kernel, Tensor) or kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"{name} must be a square (m, m) tensor, got {getattr(kernel, 'shape', type(kernel))}")
    return kernel.detach().to(torch.float64)


def target_matrix(y: Tensor, num_classes: int | None = None) -> Tensor:
    """``y`` as an fp64 (n, B) matrix: integer labels one-hot (``num_classes`` columns, default ``max + 1``), a float
    vector as one column, a float matrix as is."""
    if not isinstance(y, Tensor) or y.dim() not in (1, 2) or len(y) == 0 or y.dtype == torch.bool:
        raise ValueError(f"y must be a non-empty (n,) or (n, B) tensor of labels or targets, got {y!r:.80}")
    if y.is_floating_point():
        return (y[:, None] if y.dim() == 1 else y).detach().to(torch.float64)
    if y.dim() != 1 or y.min() < 0:
        raise ValueError("y: integer labels must be a (n,) vector of class indices >= 0")
    classes = int(y.max()) + 1 if num_classes is None else num_classes
    if int(y.max()) >= classes:
        raise ValueError(f"y: label {int(y.max())} out of range for {classes} classes")
    return nn.functional.one_hot(y.long(), classes).to(torch.float64)


def _targets_for(size: int, y: Tensor) -> tuple[Tensor, int]:
    """The target matrix for a kernel of ``size`` rows, and C (1 for an n x n kernel, else the outputs of a full
    one)."""
    n = len(y)
    if size == n:
        return target_matrix(y), 1
    if size % n:
        raise ValueError(f"K has {size} rows: neither n = {n} (len(y)) nor a multiple n*C of it")
    outputs = size // n
    targets = target_matrix(y, num_classes=outputs if not y.is_floating_point() else None)
    if targets.shape[1] != outputs:
        raise ValueError(f"y: a full ({size} x {size}) kernel needs (n, {outputs}) targets, got {tuple(y.shape)}")
    return targets, outputs


def center_kernel(kernel: Tensor, num_outputs: int = 1) -> Tensor:
    """``(H (x) I_C) K (H (x) I_C)``: the kernel centred over the example index (rows ordered ``i*C + a``)."""
    kernel = _check_kernel(kernel)
    check_int("num_outputs", num_outputs, 1)
    if kernel.shape[0] % num_outputs:
        raise ValueError(f"num_outputs={num_outputs} does not divide the kernel size {kernel.shape[0]}")
    n = kernel.shape[0] // num_outputs
    k = kernel.view(n, num_outputs, n, num_outputs)
    centered = k - k.mean(0, keepdim=True) - k.mean(2, keepdim=True) + k.mean((0, 2), keepdim=True)
    return centered.reshape(kernel.shape)


def _divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``, NaN when the denominator is zero."""
    return numerator / denominator if denominator > 0 else torch.full_like(numerator, math.nan)


def kernel_alignment(kernel: Tensor, y: Tensor, centered: bool = False, numerator: Tensor | None = None) -> Tensor:
    """Kernel-target alignment ``<K, T>_F / (||K||_F ||T||_F)`` (targets and centering in the module docstring).

    Args:
        kernel: (n, n) kernel, or (nC, nC) full kernel.
        y: (n,) integer labels or float targets, or (n, B) float targets ((n, C) for a full kernel).
        centered: centre kernel and target over the examples first (Cortes et al. 2012).
        numerator: ``<K, T>_F`` (centred if ``centered``) computed elsewhere, e.g. exactly by
            :func:`target_alignment_numerator` when ``kernel`` is a sketch; default: from ``kernel``.

    Returns:
        An fp64 scalar; NaN when the kernel or the (centered) target is zero.

    Raises:
        ValueError: a non-square kernel, or targets whose shape does not match it.

    Example:
        >>> y = torch.tensor([1.0, -1.0, 2.0])
        >>> kernel_alignment(3 * torch.outer(y, y), y)
        tensor(1., dtype=torch.float64)
    """
    kernel = _check_kernel(kernel)
    targets, outputs = _targets_for(kernel.shape[0], y)
    targets = targets.to(kernel.device)
    if centered:
        kernel = center_kernel(kernel, outputs)
        targets = targets - targets.mean(0, keepdim=True)
    if outputs == 1:
        inner, target_norm = (targets * (kernel @ targets)).sum(), torch.linalg.norm(targets.T @ targets)
    else:
        flat = targets.reshape(-1)
        inner, target_norm = flat @ kernel @ flat, flat @ flat
    if numerator is not None:
        inner = numerator.to(dtype=torch.float64, device=kernel.device)
    return _divide(inner, torch.linalg.norm(kernel) * target_norm)


def kernel_alignment_between(first: Tensor, second: Tensor, centered: bool = False, num_outputs: int = 1) -> Tensor:
    """``<K1, K2>_F / (||K1||_F ||K2||_F)``; ``centered``: of the kernels centred over examples (``num_outputs``
    per example for full kernels). NaN when a kernel is zero."""
    first, second = _check_kernel(first, "first"), _check_kernel(second, "second")
    if first.shape != second.shape:
        raise ValueError(f"the kernels must have the same shape, got {tuple(first.shape)} and {tuple(second.shape)}")
    if centered:
        first, second = center_kernel(first, num_outputs), center_kernel(second, num_outputs)
    return _divide((first * second).sum(), torch.linalg.norm(first) * torch.linalg.norm(second))


def relative_change(kernel: Tensor, reference: Tensor) -> Tensor:
    """``||K_t - K_0||_F / ||K_0||_F`` (``reference`` = K_0; NaN when it is zero)."""
    kernel, reference = _check_kernel(kernel), _check_kernel(reference, "reference")
    if kernel.shape != reference.shape:
        raise ValueError(
            f"the kernels must have the same shape, got {tuple(kernel.shape)} and {tuple(reference.shape)}"
        )
    return _divide(torch.linalg.norm(kernel - reference), torch.linalg.norm(reference))


def kernel_trace(kernel: Tensor) -> Tensor:
    """``tr(K)`` in fp64 (for the NTK: the summed squared norms of the Jacobian rows)."""
    return torch.trace(_check_kernel(kernel))


def kernel_eigenvalues(kernel: Tensor, k: int | None = None) -> Tensor:
    """The ``k`` largest eigenvalues of the symmetric kernel (all by default), descending, fp64."""
    if k is not None:
        check_int("k", k, 1)
    values = torch.linalg.eigvalsh(_check_kernel(kernel)).flip(0)
    return values if k is None else values[:k]


def kernel_effective_rank(kernel: Tensor) -> Tensor:
    """``exp(entropy)`` of the normalised eigenvalues of K, between 1 and m (0 for a zero kernel)."""
    values = kernel_eigenvalues(kernel).clamp_min(0)
    total = values.sum()
    if total <= 0:
        return total.new_zeros(())
    p = values[values > 0] / total
    return torch.exp(-(p * p.log()).sum())


def target_alignment_numerator(
    model: nn.Module,
    x: Any,
    y: Tensor,
    *,
    output: str = "sum",
    output_index: int | None = None,
    centered: bool = False,
    seed: int = 0,
    params: Iterable[str | Tensor] | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """``<K, T>_F`` for the empirical NTK ``K`` of ``model`` on ``x`` (same conventions as :func:`empirical_ntk`),
    from vector-Jacobian products of the batched outputs, without forming K.

    ``<K, Y Y^T> = sum_b sum_a ||J_a^T Y_b||^2`` (J_a: Jacobian of the selected output a over the batch, Y_b: a target
    column), ``/C`` for ``"mean"``; for ``"full"``, ``vec(Y)^T K vec(Y) = ||J^T vec(Y)||^2``. A scalar output and a
    target vector take one backward pass. ``centered=True`` gives the centered numerator ``<H K H, H T H>``, which
    equals ``<K, (HY)(HY)^T>`` since H is idempotent.

    Args:
        model, x, output, output_index, seed, params: as in :func:`empirical_ntk`.
        y: targets as in :func:`kernel_alignment` (integer labels are one-hot over the model's outputs).
        centered: centre the targets over the examples.
        chunk_size: vector-Jacobian products (each a backward pass through the whole batch) computed at once;
            default: those whose gradients fit 1 GiB, divided by n.

    Returns:
        An fp64 scalar.

    Raises:
        ValueError: bad arguments, or targets that do not match the batch.
    """
    check_ntk_args(output, output_index, chunk_size, None, seed)
    tangent = TangentModel(model, x, output=output, output_index=output_index, seed=seed, params=params)
    if len(y) != tangent.n:
        raise ValueError(f"y has {len(y)} entries for {tangent.n} examples")
    targets = target_matrix(y, num_classes=None if y.is_floating_point() else tangent.num_outputs)
    if centered:
        targets = targets - targets.mean(0, keepdim=True)
    targets = targets.to(device=tangent.device, dtype=tangent.dtype)
    if tangent.output == "full":
        if targets.shape[1] != tangent.num_outputs:
            raise ValueError(f"y: output='full' needs (n, {tangent.num_outputs}) targets, got {tuple(y.shape)}")
        cotangents = targets[None]
    else:  # one cotangent per (target column b, selected output a): Y_b placed along S[:, a]
        columns = tangent.selection_columns(range(tangent.num_selected))
        cotangents = (targets.T[:, None, :, None] * columns.T[None, :, None, :]).flatten(0, 1)
    total = torch.zeros((), dtype=torch.float64, device=tangent.device)
    step = chunk_size or tangent.default_chunk_size(whole_batch=True)
    for start in range(0, len(cotangents), step):
        block = cotangents[start : start + step]
        try:
            (grads,) = vmap(tangent.vjp_fn)(block)
        except RuntimeError:  # an op of the backward graph without a batching rule: one backward per cotangent
            parts = [tangent.vjp_fn(cotangent)[0] for cotangent in block]
            grads = {name: torch.stack([part[name] for part in parts]) for name in parts[0]}
        total += sum(g.reshape(len(g), -1).double().square().sum() for g in grads.values())
    return total / tangent.num_outputs if tangent.output == "mean" else total
