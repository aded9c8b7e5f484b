"""Gradient-only Hessian-vector products: central differences of the gradient, Richardson-extrapolated.

For a direction ``v`` and a step ``h``, with ``g`` the gradient of the loss,

    ``D(h) = (g(theta + h v) - g(theta - h v)) / (2 h) = H v + (h^2 / 6) T[v, v, .] + O(h^4)``

(``T`` the third derivative), and Richardson extrapolation cancels the ``h^2`` term:

    ``R = (4 D(h/2) - D(h)) / 3 = H v + O(h^4)``    (four gradients per product).

``(D(h/2) - D(h)) / 3`` is the ``h^2`` term at ``h/2``: its norm estimates the error of ``D(h/2)`` and, in
practice, bounds that of ``R``.

Step: rounding in the perturbed parameters and in the gradients adds a relative error of about
``u ||theta|| / (h ||v||)`` (``u`` the machine epsilon of the compute dtype), truncation about
``(h ||v|| / ||theta||)^p`` with ``p = 4`` extrapolated (``p = 2`` plain), taking the parameters' norm as the scale
on which the curvature changes. Balancing the two gives

    ``h = c u^(1 / (p + 1)) ||theta|| / ||v||``,    ``c = STEP_FACTOR = 0.1``,

a perturbation ``||h v||`` of ``0.1 u^(1/5) ||theta||`` (fp32: 4.1e-3 ``||theta||``) extrapolated and
``0.1 u^(1/3) ||theta||`` (4.9e-4 ``||theta||``) plain; ``||theta||`` is replaced by 1 when the parameters are all
zero. ``c`` is measured: ``||theta||`` overstates the scale of any one layer, and on the test models (tanh MLPs,
BatchNorm in train and eval mode, fp32) top eigenvalue errors are lowest, 1e-6 to 1e-5, for ``c`` in [0.03, 0.3].

Only gradients are needed, so this works wherever training does: sharded parameters (FSDP), fused kernels
without double backward (SDPA flash / memory-efficient attention), ``once_differentiable`` functions. It assumes a
smooth loss: across the kinks of ReLU or max-pooling the two gradients can straddle a kink and the difference is
meaningless (the extrapolation error estimate then is large, which is how :class:`HessianOperator`'s ``"auto"``
check recognises it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hildtools.sharding import local_tensor, reshard

STEP_FACTOR = 0.1
"""``c`` in the step formula (see the module docstring)."""

GradientAt = Callable[[float], Tensor]
"""``gradient(t) = g(theta + t v)`` as a flat vector, for the direction ``v`` of the current product."""


def finite_difference_step(
    dtype: torch.dtype, theta_norm: float, vector_norm: float, extrapolate: bool = True
) -> float:
    """The step ``h = c u^(1/(p+1)) ||theta|| / ||v||`` (see the module docstring), ``p = 4`` or ``2``."""
    order = 4 if extrapolate else 2
    scale = theta_norm if theta_norm > 0 else 1.0
    return STEP_FACTOR * torch.finfo(dtype).eps ** (1 / (order + 1)) * scale / vector_norm


def central_differences(gradient: GradientAt, step: float, extrapolate: bool = True) -> tuple[Tensor, Tensor | None]:
    """``(D(h), D(h/2))`` (``D(h/2)`` is ``None`` without extrapolation); combine with :func:`extrapolated`."""

    def difference(h: float) -> Tensor:
        return (gradient(h) - gradient(-h)) / (2 * h)

    return difference(step), (difference(step / 2) if extrapolate else None)


def extrapolated(coarse: Tensor, fine: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``(R, error)``: Richardson's ``(4 D(h/2) - D(h)) / 3`` and the error estimate ``(D(h/2) - D(h)) / 3``; without
    ``D(h/2)`` the plain central difference and ``None``."""
    if fine is None:
        return coarse, None
    return (4 * fine - coarse) / 3, (fine - coarse) / 3


class InPlaceGradient:
    """``g(theta + t v)`` of a model whose forward uses its own parameter tensors (FSDP's sharded parameters): the
    local shards are shifted in place, the gradient comes from ``.backward()`` (which FSDP reduce-scatters into the
    shards' ``.grad``, averaged over ranks), and afterwards the shards are copied back from a saved copy (bitwise)
    and every ``.grad`` is put back as it was. Call on every rank (the forward and backward run collectives).

    Args:
        model: the module to call (under FSDP1 the root wrapper, whose forward gathers the root's parameters).
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        batch: the probe batch.
        params: the parameters whose local shards form the vector layout (default: all with ``requires_grad``,
            taken with the model resharded: after a forward without backward the root's are still gathered).

    Attributes:
        loss: the loss of the last evaluation (detached).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], Tensor],
        batch: Any,
        params: Sequence[Tensor] | None = None,
    ) -> None:
        reshard(model)
        params = [p for p in model.parameters() if p.requires_grad] if params is None else params
        self.model, self.loss_fn, self.batch, self.params = model, loss_fn, batch, list(params)
        self.saved = [local_tensor(p).clone() for p in self.params]
        self.loss: Tensor | None = None
        # FSDP1 also keeps a flat gradient per wrapper, which .backward() accumulates into: cleared and restored too
        self.holders = self.params + [
            flat for m in model.modules() if (flat := getattr(m, "_flat_param", None)) is not None
        ]

    def __call__(self, pieces: Sequence[Tensor], t: float) -> Tensor:
        grads = [(p, p.grad) for p in self.holders]
        shards = [local_tensor(p) for p in self.params]  # looked up each time: FSDP2 may swap the local tensors
        try:
            with torch.no_grad():
                for shard, saved, piece in zip(shards, self.saved, pieces):
                    shard.copy_(saved).add_(piece.to(shard.dtype), alpha=t)
            for p in self.holders:
                p.grad = None
            loss = self.loss_fn(self.model, self.batch)
            self.loss = loss.detach()
            loss.backward()
            return torch.cat(
                [
                    torch.zeros(shard.numel(), device=shard.device, dtype=shard.dtype)
                    if p.grad is None
                    else local_tensor(p.grad).reshape(-1)
                    for p, shard in zip(self.params, shards)
                ]
            )
        finally:
            shards = [local_tensor(p) for p in self.params]
            with torch.no_grad():
                for shard, saved in zip(shards, self.saved):
                    shard.copy_(saved)
            for p, grad in grads:
                p.grad = grad
