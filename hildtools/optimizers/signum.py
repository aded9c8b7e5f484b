"""Signum: the sign of an exponential moving average of gradients (Bernstein et al., 2018)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from hildtools.optimizers._common import (
    by_device_and_dtype,
    check_beta,
    check_flag,
    check_number,
    check_path_flags,
    compiled,
    evaluate,
    params_with_grad,
    scalar,
    use_foreach,
    zeros_state,
)

__all__ = ["Signum", "signum"]


class Signum(Optimizer):
    r"""Signum (signSGD with momentum), arXiv:1802.04434.

    With :math:`g_t` the gradient (negated when ``maximize``) and ``b`` the momentum, each step is

    .. code-block:: text

        m_t = b m_{t-1} + (1 - b) g_t                  # m_0 = 0
        d_t = m_t                                      # nesterov: d_t = b m_t + (1 - b) g_t
        p_t = p_{t-1} (1 - lr wd) - lr sign(d_t)       # decoupled weight decay, as in Lion

    Relation to :class:`~hildtools.optimizers.Lion`: ``Signum(momentum=b)`` is exactly
    ``Lion(betas=(b, b))``, and the Nesterov variant equals ``Lion(betas=(b*b, b))`` up to rounding,
    since ``sign`` ignores positive scale. ``momentum=0`` is signSGD (no state). The buffer is a
    zero-initialised average, so damped and undamped buffers give the same signs; torch SGD's buffer,
    initialised to the first gradient, would not.

    Args:
        params: iterable of parameters or param groups.
        lr: learning rate, >= 0 (no default: sign methods need a problem-specific lr).
        momentum: ``b`` in [0, 1).
        weight_decay: decoupled weight decay, >= 0.
        nesterov: take the sign of ``b m_t + (1 - b) g_t`` instead of ``m_t``; needs ``momentum > 0``.
        maximize: maximize the objective instead of minimizing it.
        foreach: use multi-tensor kernels; ``None`` picks them on CUDA.
        fused: run a ``torch.compile``'d multi-tensor step, as in :class:`Lion`.

    Raises:
        ValueError: lr or weight_decay negative, momentum outside [0, 1), nesterov with zero momentum,
            or ``foreach`` and ``fused`` both True.
        TypeError: an argument has the wrong type.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = Signum(model.parameters(), lr=1e-3, momentum=0.9)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        check_number("lr", lr)
        check_beta("momentum", momentum)
        check_number("weight_decay", weight_decay)
        check_flag("nesterov", nesterov)
        check_path_flags(maximize, foreach, fused)
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum in (0, 1)")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Perform one optimization step.

        Args:
            closure: optional callable that recomputes the loss (with its gradients) and returns it.

        Returns:
            The closure's loss, or None.
        """
        loss = evaluate(closure)
        for group in self.param_groups:
            params, grads = params_with_grad(group)
            buffers = zeros_state(self.state, params, "momentum_buffer") if group["momentum"] != 0 else []
            signum(
                params,
                grads,
                buffers,
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
                foreach=group["foreach"],
                fused=group["fused"],
            )
        return loss


def signum(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """Functional Signum step, in place on ``params`` and ``momentum_buffers`` (empty when momentum is 0)."""
    if not params:
        return
    if momentum == 0:
        momentum_buffers = grads  # signSGD: d_t = g_t; the buffer argument is never written
    if fused:
        step_fn = _fused_signum
    elif use_foreach(foreach, params):
        step_fn = _multi_tensor_signum
    else:
        step_fn = _single_tensor_signum
    step_fn(
        params,
        grads,
        momentum_buffers,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
    )


def _single_tensor_signum(params, grads, buffers, *, lr, momentum, weight_decay, nesterov, maximize):
    lr = float(lr)
    for param, grad, buf in zip(params, grads, buffers, strict=True):
        if maximize:
            grad = -grad
        if momentum == 0:
            direction = grad.sign()
        else:
            buf.lerp_(grad, 1 - momentum)
            direction = (buf.lerp(grad, 1 - momentum) if nesterov else buf).sign()
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.add_(direction, alpha=-lr)


def _multi_tensor_signum(params, grads, buffers, *, lr, momentum, weight_decay, nesterov, maximize):
    lr = float(lr)
    for device_params, device_grads, device_buffers in by_device_and_dtype(params, grads, buffers):
        if maximize:
            device_grads = torch._foreach_neg(device_grads)
        if momentum == 0:
            directions = torch._foreach_sign(device_grads)
        else:
            torch._foreach_lerp_(device_buffers, device_grads, 1 - momentum)
            if nesterov:
                directions = torch._foreach_lerp(device_buffers, device_grads, 1 - momentum)
                torch._foreach_sign_(directions)
            else:
                directions = torch._foreach_sign(device_buffers)
        if weight_decay != 0:
            torch._foreach_mul_(device_params, 1 - lr * weight_decay)
        torch._foreach_add_(device_params, directions, alpha=-lr)


def _fused_signum(params, grads, buffers, *, lr, momentum, weight_decay, nesterov, maximize):
    for device_params, device_grads, device_buffers in by_device_and_dtype(params, grads, buffers):
        like = device_params[0]
        compiled(_signum_kernel)(
            device_params,
            device_grads,
            device_buffers,
            scalar(lr, like),
            scalar(momentum, like),
            scalar(weight_decay, like),
            momentum == 0,
            nesterov,
            maximize,
        )


def _signum_kernel(params, grads, buffers, lr, momentum, weight_decay, sign_sgd, nesterov, maximize):
    # Traced by torch.compile into fused multi-tensor kernels; hyper-parameters are 0-dim tensors.
    if maximize:
        grads = torch._foreach_neg(grads)
    if sign_sgd:
        directions = grads
    else:
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, torch._foreach_mul(grads, 1 - momentum))
        directions = buffers
        if nesterov:
            directions = torch._foreach_mul(buffers, momentum)
            torch._foreach_add_(directions, torch._foreach_mul(grads, 1 - momentum))
    directions = torch._foreach_sign(directions)
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_add_(params, torch._foreach_mul(directions, -lr))
