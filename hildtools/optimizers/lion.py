"""Lion: sign of an interpolated momentum, with decoupled weight decay (Chen et al., 2023).

The functional :func:`lion` is the one sign-momentum core: :class:`~hildtools.optimizers.Signum` is
a thin layer over it (``Signum(b) = Lion(b, b)``), as torch builds AdamW on Adam.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from hildtools._checks import check_betas, check_number, check_path_flags
from hildtools.optimizers._common import (
    backfill,
    by_device_and_dtype,
    compile_once,
    evaluate,
    params_with_grad,
    real_views,
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
    ``Lion(b, b)`` is :class:`~hildtools.optimizers.Signum` with momentum ``b``. A complex parameter is
    optimised as the pair of its real and imaginary parts (torch.optim's ``view_as_real`` convention),
    so ``sign`` acts on each part.

    Args:
        params: iterable of parameters or param groups.
        lr: learning rate, >= 0; a float or a one-element tensor (kept on its device: a CUDA tensor lr
            costs no host sync).
        betas: ``(b1, b2)``, each in [0, 1): interpolation for the update, decay of the momentum.
        weight_decay: decoupled weight decay, >= 0.
        maximize: maximize the objective instead of minimizing it.
        foreach: use multi-tensor kernels; ``None`` picks them on CUDA.
        compiled: run the multi-tensor step through ``torch.compile`` (a generated kernel, not
            torch.optim's hand-written ``fused=`` kernels; no GradScaler fusion). Hyper-parameters enter
            as device tensors, so schedules never recompile. Meant for CUDA; compiles once per parameter
            set and needs a working ``torch.compile`` (Triton on CUDA, a C++ compiler on CPU).

    Raises:
        ValueError: lr or weight_decay negative, a beta outside [0, 1), or ``foreach`` and ``compiled`` both True.
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
        compiled: bool = False,
    ) -> None:
        check_number("lr", lr)
        check_betas(betas)
        check_number("weight_decay", weight_decay)
        check_path_flags(maximize, foreach, compiled)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "weight_decay": weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "compiled": compiled,
        }
        super().__init__(params, defaults)

    buffer_name = "exp_avg"  # the momentum's key in the optimizer state

    def betas(self, group: dict) -> tuple[float, float]:
        """``(b1, b2)`` of a param group (Signum derives them from its momentum)."""
        return group["betas"]

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            if "fused" in group:  # the old name of compiled
                group.setdefault("compiled", bool(group.pop("fused")))
        backfill(self, maximize=False, foreach=None, compiled=False)

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
            beta1, beta2 = self.betas(group)
            stateless = beta1 == 0 and beta2 == 0  # the update is sign(g); no momentum to keep
            lion(
                params,
                grads,
                None if stateless else zeros_state(self.state, params, self.buffer_name),
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                foreach=group["foreach"],
                compiled=group["compiled"],
            )
        return loss


def lion(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor] | None,
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    maximize: bool,
    foreach: bool | None = None,
    compiled: bool = False,
) -> None:
    """Functional Lion step, in place on ``params`` and ``exp_avgs``. See :class:`Lion`.

    ``exp_avgs=None`` is the stateless case ``beta1 = 0`` (signSGD): the update is ``sign(g)`` and
    no momentum is kept.
    """
    if not params:
        return
    if exp_avgs is None and beta1 != 0:
        raise ValueError("lion without momentum buffers needs beta1 = 0")
    params, grads = real_views(params), real_views(grads)
    exp_avgs = real_views(exp_avgs) if exp_avgs is not None else None
    if compiled:
        step_fn = _compiled_lion
    elif use_foreach(foreach, params):
        step_fn = _multi_tensor_lion
    else:
        step_fn = _single_tensor_lion
    step_fn(params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize)


def _on(value: float | Tensor, device: torch.device) -> float | Tensor:
    # a tensor hyper-parameter moves to the parameters' device (a no-op when it is there already)
    return value.to(device) if isinstance(value, Tensor) else value


def _single_tensor_lion(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize):
    for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
        step_lr = _on(lr, param.device)
        if maximize:
            grad = -grad
        update = grad.sign() if exp_avgs is None else exp_avgs[i].lerp(grad, 1 - beta1).sign_()
        if weight_decay != 0:
            param.mul_(1 - step_lr * weight_decay)
        if isinstance(step_lr, Tensor):  # sign times lr is exact, so both forms give the same bits
            param.sub_(update.mul_(step_lr))
        else:
            param.add_(update, alpha=-step_lr)
        if exp_avgs is not None:
            exp_avgs[i].lerp_(grad, 1 - beta2)


def _multi_tensor_lion(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize):
    lists = (params, grads) if exp_avgs is None else (params, grads, exp_avgs)
    for device_params, device_grads, *device_exp_avgs in by_device_and_dtype(*lists):
        step_lr = _on(lr, device_params[0].device)
        if maximize:
            device_grads = torch._foreach_neg(device_grads)
        if exp_avgs is None:
            updates = torch._foreach_sign(device_grads)
        else:
            updates = torch._foreach_lerp(device_exp_avgs[0], device_grads, 1 - beta1)
            torch._foreach_sign_(updates)
        if weight_decay != 0:
            torch._foreach_mul_(device_params, 1 - step_lr * weight_decay)
        if isinstance(step_lr, Tensor):
            torch._foreach_mul_(updates, step_lr)
            torch._foreach_sub_(device_params, updates)
        else:
            torch._foreach_add_(device_params, updates, alpha=-step_lr)
        if exp_avgs is not None:
            torch._foreach_lerp_(device_exp_avgs[0], device_grads, 1 - beta2)


def _compiled_lion(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize):
    lists = (params, grads) if exp_avgs is None else (params, grads, exp_avgs)
    for device_params, device_grads, *device_exp_avgs in by_device_and_dtype(*lists):
        like = device_params[0]
        compile_once(_lion_kernel)(
            device_params,
            device_grads,
            device_exp_avgs[0] if device_exp_avgs else None,
            scalar(lr, like),
            scalar(beta1, like),
            scalar(beta2, like),
            scalar(weight_decay, like),
            maximize,
        )


def _lion_kernel(params, grads, exp_avgs, lr, beta1, beta2, weight_decay, maximize):
    # Traced by torch.compile into fused multi-tensor kernels; hyper-parameters are 0-dim tensors
    # (lerp takes no tensor weight in its multi-tensor form, hence mul + add).
    if maximize:
        grads = torch._foreach_neg(grads)
    if exp_avgs is None:
        updates = torch._foreach_sign(grads)
    else:
        updates = torch._foreach_mul(exp_avgs, beta1)
        torch._foreach_add_(updates, torch._foreach_mul(grads, 1 - beta1))
        torch._foreach_sign_(updates)
        torch._foreach_mul_(exp_avgs, beta2)
        torch._foreach_add_(exp_avgs, torch._foreach_mul(grads, 1 - beta2))
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_add_(params, torch._foreach_mul(updates, -lr))
