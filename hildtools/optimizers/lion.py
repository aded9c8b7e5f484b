"""Lion: sign of an interpolated momentum, with decoupled weight decay (Chen et al., 2023)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from hildtools.optimizers._common import (
    by_device_and_dtype,
    check_betas,
    check_number,
    check_path_flags,
    compiled,
    evaluate,
    params_with_grad,
    scalar,
    use_foreach,
    zeros_state,
)

__all__ = ["Lion", "lion"]


class Lion(Optimizer):
    r"""Lion (EvoLved Sign Momentum), arXiv:2302.06675.

    With :math:`g_t` the gradient (negated when ``maximize``), :math:`\eta` the lr and :math:`\lambda`
    the weight decay, each step is

    .. code-block:: text

        c_t = b1 m_{t-1} + (1 - b1) g_t
        p_t = p_{t-1} (1 - lr wd) - lr sign(c_t)      # decoupled weight decay, scaled by the current lr
        m_t = b2 m_{t-1} + (1 - b2) g_t                # m_0 = 0

    The weight decay is the paper's and lion-pytorch's default convention (``p *= 1 - lr * wd``), not
    the "fully decoupled" ``1 - (lr / lr0) * wd``: use a 3-10x smaller lr and a 3-10x larger
    weight decay than for AdamW. One state buffer per parameter (``exp_avg``), half of AdamW's.
    ``Lion(b, b)`` is :class:`~hildtools.optimizers.Signum` with momentum ``b``.

    Args:
        params: iterable of parameters or param groups.
        lr: learning rate, >= 0.
        betas: ``(b1, b2)``, each in [0, 1): interpolation for the update, decay of the momentum.
        weight_decay: decoupled weight decay, >= 0.
        maximize: maximize the objective instead of minimizing it.
        foreach: use multi-tensor kernels; ``None`` picks them on CUDA.
        fused: run a ``torch.compile``'d multi-tensor step (one fused kernel pass; hyper-parameters
            enter as device tensors so schedules never recompile). Meant for CUDA; compiles once
            per parameter set, needs a working ``torch.compile`` (Triton on CUDA, a C++ compiler on CPU).

    Raises:
        ValueError: lr or weight_decay negative, a beta outside [0, 1), or ``foreach`` and ``fused`` both True.
        TypeError: an argument has the wrong type.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = Lion(model.parameters(), lr=1e-4, weight_decay=1.0)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        check_number("lr", lr)
        check_betas(betas)
        check_number("weight_decay", weight_decay)
        check_path_flags(maximize, foreach, fused)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "weight_decay": weight_decay,
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
            beta1, beta2 = group["betas"]
            lion(
                params,
                grads,
                zeros_state(self.state, params, "exp_avg"),
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                foreach=group["foreach"],
                fused=group["fused"],
            )
        return loss


def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> None:
    """Functional Lion step, in place on ``params`` and ``exp_avgs``. See :class:`Lion`."""
    if not params:
        return
    if fused:
        step_fn = _fused_lion
    elif use_foreach(foreach, params):
        step_fn = _multi_tensor_lion
    else:
        step_fn = _single_tensor_lion
    step_fn(params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize)


def _single_tensor_lion(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize):
    lr = float(lr)
    for param, grad, exp_avg in zip(params, grads, exp_avgs, strict=True):
        if maximize:
            grad = -grad
        update = exp_avg.lerp(grad, 1 - beta1).sign_()
        if weight_decay != 0:
            param.mul_(1 - lr * weight_decay)
        param.add_(update, alpha=-lr)
        exp_avg.lerp_(grad, 1 - beta2)


def _multi_tensor_lion(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize):
    lr = float(lr)
    for device_params, device_grads, device_exp_avgs in by_device_and_dtype(params, grads, exp_avgs):
        if maximize:
            device_grads = torch._foreach_neg(device_grads)
        updates = torch._foreach_lerp(device_exp_avgs, device_grads, 1 - beta1)
        torch._foreach_sign_(updates)
        if weight_decay != 0:
            torch._foreach_mul_(device_params, 1 - lr * weight_decay)
        torch._foreach_add_(device_params, updates, alpha=-lr)
        torch._foreach_lerp_(device_exp_avgs, device_grads, 1 - beta2)


def _fused_lion(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize):
    for device_params, device_grads, device_exp_avgs in by_device_and_dtype(params, grads, exp_avgs):
        like = device_params[0]
        compiled(_lion_kernel)(
            device_params,
            device_grads,
            device_exp_avgs,
            scalar(lr, like),
            scalar(beta1, like),
            scalar(beta2, like),
            scalar(weight_decay, like),
            maximize,
        )


def _lion_kernel(params, grads, exp_avgs, lr, beta1, beta2, weight_decay, maximize):
    # Traced by torch.compile into fused multi-tensor kernels; hyper-parameters are 0-dim tensors.
    if maximize:
        grads = torch._foreach_neg(grads)
    updates = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(updates, torch._foreach_mul(grads, 1 - beta1))
    torch._foreach_sign_(updates)
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_add_(params, torch._foreach_mul(updates, -lr))
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, torch._foreach_mul(grads, 1 - beta2))
