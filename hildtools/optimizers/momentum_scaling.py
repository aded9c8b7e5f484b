"""Momentum scaling 1 - beta = C lr^(2/3) (Cowsik, Can & Glorioso, "Flatter, faster", arXiv:2210.16400).

The paper studies SGD with label noise and heavy-ball momentum on overparameterized models whose
global minima form a degenerate manifold: a fast phase reaches the manifold, then label noise drives
a slow drift along it towards flatter minima. The speed-up is largest when the two time scales
match, which gives ``1 - beta ∝ lr^(2/3)``. ``C`` is an O(1), problem-dependent constant (the paper
gives no universal value); the claim is for that regime, not a general rule for every model.

Two ways to use it:

- :class:`MomentumScaling` attaches to any optimizer whose param groups have ``momentum`` (SGD,
  RMSprop, Signum, NGN) or ``betas`` (Adam, AdamW, Lion) and re-sets beta before every step from
  the group's current lr, so it follows any LR scheduler.
- :class:`ScaledMomentumSGD` is heavy-ball ``torch.optim.SGD`` (dampening 0, the paper's form
  ``v <- beta v + g; w <- w - lr v``) with the rule built in: an optimizer class, usable by
  ``class_path`` in LightningCLI.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.optim import SGD, Optimizer
from torch.optim.optimizer import ParamsT

from hildtools._checks import check_beta, check_number

__all__ = ["MomentumScaling", "ScaledMomentumSGD", "momentum_constant", "scaled_beta"]

_TWO_THIRDS = 2.0 / 3.0


def momentum_constant(
    C: float | None = None,
    lr0: float | None = None,
    beta0: float | None = None,
    exponent: float = _TWO_THIRDS,
) -> float:
    """The constant ``C`` of ``1 - beta = C lr^exponent``, given directly or by a reference pair.

    Args:
        C: the constant, > 0.
        lr0: reference lr, > 0 (with ``beta0``).
        beta0: momentum wanted at ``lr0``, in [0, 1): ``C = (1 - beta0) / lr0^exponent``.
        exponent: the power of the lr, > 0.

    Returns:
        ``C``.

    Raises:
        ValueError: both or neither of ``C`` and ``(lr0, beta0)`` given, or a value out of range.
    """
    check_number("exponent", exponent)
    if exponent == 0:
        raise ValueError("exponent must be > 0, got 0")
    if C is not None:
        if lr0 is not None or beta0 is not None:
            raise ValueError("give either C or the reference pair (lr0, beta0), not both")
        check_number("C", C)
        if C == 0:
            raise ValueError("C must be > 0 (C = 0 gives beta = 1 at every lr)")
        return float(C)
    if lr0 is None or beta0 is None:
        raise ValueError("give C, or both lr0 and beta0")
    check_number("lr0", lr0)
    if lr0 == 0:
        raise ValueError("lr0 must be > 0, got 0")
    check_beta("beta0", beta0)
    return (1.0 - float(beta0)) / float(lr0) ** exponent


def scaled_beta(lr: float | Tensor, C: float, exponent: float = _TWO_THIRDS) -> float | None:
    """``beta = 1 - C lr^exponent``, or None at ``lr = 0`` (nothing moves; keep the current beta).

    Raises:
        ValueError: ``C lr^exponent > 1``, i.e. beta < 0 (``C`` too large for this lr).
    """
    lr = float(lr)
    if lr == 0:
        return None
    beta = 1.0 - C * lr**exponent
    if not (0.0 <= beta < 1.0 and math.isfinite(beta)):
        raise ValueError(
            f"C={C:.6g} puts beta = 1 - C lr^{exponent:.4g} = {beta:.6g} outside [0, 1) at lr={lr:.6g}; "
            f"C must be <= lr^-{exponent:.4g} = {lr**-exponent:.6g} for the largest lr of the schedule"
        )
    return beta


def _set_beta(group: dict[str, Any], beta: float, beta_index: int) -> None:
    if "momentum" in group:
        group["momentum"] = beta
    else:
        betas = list(group["betas"])
        betas[beta_index] = beta
        group["betas"] = tuple(betas)


class MomentumScaling:
    """Keep ``1 - beta = C lr^(2/3)`` in every param group of an optimizer, following its lr.

    Beta is set at construction and again before every ``optimizer.step()`` (a step pre-hook), from
    the lr the step is about to use, so it follows StepLR, cosine, warm-up or any other schedule.
    At ``lr = 0`` the previous beta is kept. For :class:`~hildtools.optimizers.SAM`, attach it to
    ``sam.base_optimizer`` (which steps in both ``step(closure)`` and ``second_step``).

    Args:
        optimizer: an optimizer whose groups have ``momentum`` or ``betas``.
        C: the constant, > 0; or give ``lr0`` and ``beta0`` instead.
        lr0: reference lr, > 0.
        beta0: momentum at ``lr0``, in [0, 1).
        exponent: power of the lr (the paper's 2/3).
        beta_index: which entry of ``betas`` to set (0: Adam's first moment; for Lion, 1 is the
            momentum memory and 0 the interpolation).

    Raises:
        ValueError: bad constants (see :func:`momentum_constant`), a group without ``momentum`` or
            ``betas``, or a C that puts beta outside [0, 1) at a group's lr (also raised at a later
            step if the lr grows that far).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> scaling = MomentumScaling(opt, lr0=0.1, beta0=0.9)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step(); sched.step(); opt.step()
        >>> round(opt.param_groups[0]["momentum"], 6)  # 1 - 0.1 * 0.5^(2/3)
        0.937004
    """

    def __init__(
        self,
        optimizer: Optimizer,
        C: float | None = None,
        *,
        lr0: float | None = None,
        beta0: float | None = None,
        exponent: float = _TWO_THIRDS,
        beta_index: int = 0,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch Optimizer, got {type(optimizer).__name__}")
        if beta_index not in (0, 1) or isinstance(beta_index, bool):
            raise ValueError(f"beta_index must be 0 or 1, got {beta_index!r}")
        for group in optimizer.param_groups:
            if "momentum" not in group and "betas" not in group:
                raise ValueError(f"{type(optimizer).__name__} has no 'momentum' or 'betas' in its param groups")
        self.optimizer = optimizer
        self.C = momentum_constant(C, lr0, beta0, exponent)
        self.exponent = float(exponent)
        self.beta_index = beta_index
        self.apply()
        self._handle = optimizer.register_step_pre_hook(self._before_step)

    def apply(self) -> None:
        """Set beta from the current lr in every param group (done automatically before each step)."""
        for group in self.optimizer.param_groups:
            beta = scaled_beta(group["lr"], self.C, self.exponent)
            if beta is not None:
                _set_beta(group, beta, self.beta_index)

    def _before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.apply()

    def remove(self) -> None:
        """Detach from the optimizer; beta then stays at its last value."""
        self._handle.remove()

    def state_dict(self) -> dict[str, Any]:
        """The constants (``C``, ``exponent``, ``beta_index``)."""
        return {"C": self.C, "exponent": self.exponent, "beta_index": self.beta_index}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the constants from :meth:`state_dict`."""
        self.C = float(state_dict["C"])
        self.exponent = float(state_dict["exponent"])
        self.beta_index = int(state_dict["beta_index"])


class ScaledMomentumSGD(SGD):
    """Heavy-ball SGD with ``momentum = 1 - C lr^(2/3)`` re-evaluated from each group's lr at every step.

    ``v <- beta v + g; w <- w - lr v`` (torch SGD with dampening 0; the effective step
    ``lr / (1 - beta) = lr^(1/3) / C``). ``C`` and ``exponent`` are stored per param group, so they
    are in checkpoints and may differ per group. See the module docstring for the paper's regime.

    Args:
        params: iterable of parameters or param groups.
        lr: learning rate, > 0.
        C: the constant, > 0; or give ``lr0`` and ``beta0`` instead.
        lr0: reference lr, > 0.
        beta0: momentum at ``lr0``, in [0, 1).
        exponent: power of the lr (the paper's 2/3).
        weight_decay: L2 penalty added to the gradient (torch SGD's convention), >= 0.
        nesterov: Nesterov momentum.
        maximize: maximize the objective instead of minimizing it.
        foreach: use multi-tensor kernels; ``None`` picks them on CUDA.
        fused: use torch's fused SGD kernel.

    Raises:
        ValueError: bad constants, lr <= 0, or a C that puts beta outside [0, 1).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = ScaledMomentumSGD(model.parameters(), lr=0.05, lr0=0.1, beta0=0.9)
        >>> round(opt.param_groups[0]["momentum"], 4)
        0.937
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        C: float | None = None,
        *,
        lr0: float | None = None,
        beta0: float | None = None,
        exponent: float = _TWO_THIRDS,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        check_number("lr", lr)
        if lr == 0:
            raise ValueError("lr must be > 0 for ScaledMomentumSGD, got 0")
        constant = momentum_constant(C, lr0, beta0, exponent)
        super().__init__(
            params,
            lr=lr,
            momentum=scaled_beta(lr, constant, exponent),
            dampening=0,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
        )
        self.defaults.update(C=constant, exponent=float(exponent))
        for group in self.param_groups:
            group.setdefault("C", constant)
            group.setdefault("exponent", float(exponent))
        self._set_momenta()

    def _set_momenta(self) -> None:
        for group in self.param_groups:
            beta = scaled_beta(group["lr"], group["C"], group["exponent"])
            if beta is not None:
                group["momentum"] = beta

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Set each group's momentum from its current lr, then take a torch SGD step.

        Args:
            closure: optional callable that recomputes the loss (with its gradients) and returns it.

        Returns:
            The closure's loss, or None.
        """
        self._set_momenta()
        return super().step(closure)
