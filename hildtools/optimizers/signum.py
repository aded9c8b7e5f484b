"""Signum: the sign of an exponential moving average of gradients (Bernstein et al., 2018), on Lion's core."""

from __future__ import annotations

import torch  # noqa: F401  (the docstring example uses it)
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT, required

from hildtools._checks import check_beta, check_flag, check_number, check_path_flags
from hildtools.optimizers._common import backfill
from hildtools.optimizers.lion import Lion

__all__ = ["Signum"]


class Signum(Lion):
    r"""Signum (signSGD with momentum), arXiv:1802.04434: Lion with ``betas = (b, b)``.

    With :math:`g_t` the gradient (negated when ``maximize``) and ``b`` the momentum, each step is

    .. code-block:: text

        m_t = b m_{t-1} + (1 - b) g_t                  # m_0 = 0
        d_t = m_t                                      # nesterov: d_t = b m_t + (1 - b) g_t
        p_t = p_{t-1} (1 - lr wd) - lr sign(d_t)       # decoupled weight decay, as in Lion

    A thin layer over :class:`~hildtools.optimizers.Lion` (the one sign-momentum core), as torch
    builds AdamW on Adam:
    ``Signum(momentum=b)`` is exactly ``Lion(betas=(b, b))``, and the Nesterov variant is
    ``Lion(betas=(b*b, b))`` (since ``sign`` ignores the positive factor ``1 + b``; equal to the form
    above up to rounding). ``momentum=0`` is signSGD (no state). The buffer is a zero-initialised
    average, so damped and undamped buffers give the same signs; torch SGD's buffer, initialised to
    the first gradient, would not.

    Args:
        params: iterable of parameters or param groups.
        lr: learning rate, >= 0 (no default: sign methods need a problem-specific lr; it may be given
            in every param group instead).
        momentum: ``b`` in [0, 1).
        weight_decay: decoupled weight decay, >= 0.
        nesterov: take the sign of ``b m_t + (1 - b) g_t`` instead of ``m_t``; needs ``momentum > 0``.
        maximize: maximize the objective instead of minimizing it.
        foreach: use multi-tensor kernels; ``None`` picks them on CUDA.
        compiled: run the multi-tensor step through ``torch.compile``, as in :class:`Lion`.

    Raises:
        ValueError: lr or weight_decay negative, momentum outside [0, 1), nesterov with zero momentum,
            or ``foreach`` and ``compiled`` both True.
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
        lr: float | Tensor = required,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        compiled: bool = False,
    ) -> None:
        if lr is not required:
            check_number("lr", lr)
        check_beta("momentum", momentum)
        check_number("weight_decay", weight_decay)
        check_flag("nesterov", nesterov)
        check_path_flags(maximize, foreach, compiled)
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum in (0, 1)")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "compiled": compiled,
        }
        Optimizer.__init__(self, params, defaults)  # Lion's defaults differ (betas), its step is shared

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group; its ``lr`` is checked like the constructor's."""
        if "lr" in param_group:
            check_number("lr", param_group["lr"])
        super().add_param_group(param_group)

    buffer_name = "momentum_buffer"

    def betas(self, group: dict) -> tuple[float, float]:
        """``(b*b, b)`` with Nesterov, ``(b, b)`` without; ``b`` the group's momentum."""
        momentum = group["momentum"]
        return (momentum * momentum if group["nesterov"] else momentum), momentum

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        backfill(self, nesterov=False)
