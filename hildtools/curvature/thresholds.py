"""Stability thresholds of optimizers on a quadratic, and Adam's diagonal preconditioner.

On ``L = lambda x^2 / 2`` an optimizer's linearised update is stable iff the curvature ``lambda`` (for Adam the
preconditioned curvature, an eigenvalue of ``P^{-1} H``) is below its threshold; full-batch training drives the
sharpness up to that threshold and holds it there (edge of stability, Cohen et al. 2021, 2022). With PyTorch's
update rules (``eta`` the learning rate, ``b`` the momentum):

==============================  ================================  ================
optimizer                       threshold                         at b = 0.9
==============================  ================================  ================
SGD                             ``2 / eta``                       ``2 / eta``
SGD, momentum b (heavy ball)    ``(2 + 2b) / eta``                ``3.8 / eta``
SGD, momentum b, dampening d    ``(2 + 2b) / ((1 - d) eta)``
SGD, Nesterov momentum b        ``(2 + 2b) / ((1 + 2b) eta)``     ``1.357 / eta``
Adam / AdamW, betas (b1, b2)    ``(2 + 2b1) / ((1 - b1) eta)``    ``38 / eta``
hildtools NGN (step gamma)      ``2 / gamma``                     ``2 / gamma``
hildtools NGN-M, momentum b     ``(2 + 2b) / ((1 - b) gamma)``    ``38 / gamma``
==============================  ================================  ================

Each is the learning rate-curvature product at which an eigenvalue of the two-step iteration matrix reaches -1.
Weight decay is not included: coupled decay ``wd`` adds ``wd`` to every curvature (compare ``lambda_max + wd``),
decoupled decay (AdamW) multiplies the threshold by ``1 - eta wd / 2``; both are negligible at usual settings.

NGN is gradient descent with its self-tuned step ``gamma <= lr`` (NGN-M: heavy ball with step ``(1 - b) gamma``);
the threshold uses the last step's ``gamma`` (``param_group["gamma"]``), or ``lr`` before the first step (a lower
bound). A wrapper that steps through a ``base_optimizer`` (SAM) gets its base optimizer's threshold: SAM's own,
lower edge depends on rho and the gradient norm (Long & Bartlett 2024). Optimizers are recognised without importing
them: torch's by class, hildtools' NGN by its class name and package, wrappers by their ``base_optimizer``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

SUPPORTED = (
    "torch.optim.SGD (plain, momentum, dampening, nesterov)",
    "torch.optim.Adam",
    "torch.optim.AdamW",
    "hildtools NGN",
    "wrappers with a base_optimizer (SAM)",
)


class UnknownThresholdError(ValueError):
    """No stability threshold is known for the optimizer's update rule (other errors mean bad settings)."""


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer whose update rule sets the threshold: a wrapper's ``base_optimizer`` (SAM), else itself."""
    while isinstance(getattr(optimizer, "base_optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.base_optimizer
    return optimizer


def _is_ngn(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is (a subclass of) hildtools' NGN; by name, so this module imports no optimizer."""
    return any(cls.__name__ == "NGN" and cls.__module__.startswith("hildtools.optimizers")
               for cls in type(optimizer).__mro__)  # fmt: skip


def _plain(value: object) -> object:
    """A setting as plain floats (learning rates and betas may be tensors)."""
    if isinstance(value, (tuple, list)):
        return tuple(float(v) for v in value)
    return value if isinstance(value, bool) else float(value)


def _group(optimizer: torch.optim.Optimizer, keys: tuple[str, ...], param_group: int | None) -> dict:
    """The param group whose settings define the threshold: ``param_group``, or the one all groups share."""
    if param_group is not None:
        count = len(optimizer.param_groups)
        if isinstance(param_group, bool) or not isinstance(param_group, int) or not 0 <= param_group < count:
            raise ValueError(f"param_group must be an index in [0, {count}), got {param_group!r}")
        return optimizer.param_groups[param_group]
    groups = [g for g in optimizer.param_groups if g["params"]]
    if len({tuple(_plain(g[key]) for key in ("lr", *keys)) for g in groups}) > 1:
        raise ValueError(
            f"stability_threshold: the param groups of {type(optimizer).__name__} differ in lr or "
            f"{', '.join(keys)}, so there is no single threshold; pass param_group=i for the threshold of group i"
        )
    return groups[0]


def stability_threshold(optimizer: torch.optim.Optimizer, param_group: int | None = None) -> float:
    """The largest stable curvature of ``optimizer`` (see the module table), read from its param groups.

    Compare it with the top Hessian eigenvalue for SGD, and with the preconditioned one,
    ``lambda_1(P^{-1/2} H P^{-1/2})`` with ``s = P^{-1/2}`` from :func:`adam_preconditioner`, for Adam/AdamW.

    Args:
        optimizer: a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` (subclasses included), hildtools' ``NGN``, or a
            wrapper with a ``base_optimizer`` (SAM: the base optimizer's threshold).
        param_group: use this param group; by default all groups (with parameters) must share their settings.

    Returns:
        The threshold, a float (``inf`` at ``lr = 0``).

    Raises:
        UnknownThresholdError: (a ValueError) an optimizer with no known threshold; the message names the way out.
        ValueError: groups with different settings, or a bad ``param_group``.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> round(stability_threshold(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)), 9)
        38.0
    """
    optimizer = unwrap_optimizer(optimizer)
    if _is_ngn(optimizer):
        group = _group(optimizer, ("momentum",), param_group)
        momentum, gamma = float(group["momentum"]), float(group.get("gamma", group["lr"]))
        return (2 + 2 * momentum) / ((1 - momentum) * gamma) if gamma > 0 else float("inf")
    if isinstance(optimizer, torch.optim.SGD):
        group = _group(optimizer, ("momentum", "dampening", "nesterov"), param_group)
        momentum, dampening = float(group["momentum"]), float(group["dampening"])
        if momentum == 0:
            factor = 2.0
        elif group["nesterov"]:
            factor = (2 + 2 * momentum) / (1 + 2 * momentum)
        else:
            factor = (2 + 2 * momentum) / (1 - dampening)
    elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        group = _group(optimizer, ("betas",), param_group)
        beta1 = float(group["betas"][0])
        factor = (2 + 2 * beta1) / (1 - beta1)
    else:
        raise UnknownThresholdError(
            f"stability_threshold: no known stability threshold for {type(optimizer).__name__}; supported: "
            f"{', '.join(SUPPORTED)}. For other optimizers compute the sharpness with hessian_eigenpairs and "
            "compare it with a threshold derived for that update rule"
        )
    lr = float(group["lr"])
    return factor / lr if lr > 0 else float("inf")


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Iterable[Tensor] | None = None) -> Tensor:
    """The diagonal ``s = P^{-1/2}`` of Adam/AdamW's last step, flat over ``params`` (concatenated in order).

    Derivation from PyTorch's Adam (``t`` = ``state["step"]``, ``v_t`` = ``exp_avg_sq``, or ``max_exp_avg_sq``
    with ``amsgrad``): the step is ``theta -= lr / (1 - b1^t) * m_t / (sqrt(v_t) / sqrt(1 - b2^t) + eps)``, i.e.
    ``theta -= lr * P^{-1} m_t`` with

        ``P = (1 - b1^t) * (sqrt(v_t / (1 - b2^t)) + eps)``  (elementwise).

    With ``P`` frozen, ``m_t`` is EMA momentum on the gradient, and the change of variables ``y = P^{1/2} theta``
    turns the update into EMA-momentum gradient descent on ``P^{-1/2} H P^{-1/2}`` (similar to ``P^{-1} H``, same
    eigenvalues, but symmetric, so Lanczos applies). Hence the preconditioned sharpness
    ``lambda_1(S H S)``, ``S = diag(s)``, is what :func:`stability_threshold` gives the limit of.

    Args:
        optimizer: ``torch.optim.Adam`` or ``AdamW`` that has taken at least one step.
        params: the parameters, in the order of the Hessian's vector layout (default: the optimizer's, in
            param-group order).

    Returns:
        ``s`` as a flat tensor (fp32, or fp64 for fp64 state) on the parameters' device.

    Raises:
        ValueError: not Adam/AdamW, a parameter the optimizer does not hold, or no step taken yet.
    """
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise ValueError(f"adam_preconditioner needs torch.optim.Adam or AdamW, got {type(optimizer).__name__}")
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    if params is None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
    parts = []
    for p in params:
        if id(p) not in group_of:
            raise ValueError("params: a parameter is not held by the optimizer")
        state, group = optimizer.state.get(p, {}), group_of[id(p)]
        if "exp_avg_sq" not in state:
            raise ValueError("adam_preconditioner: Adam has not taken a step yet, so its preconditioner is undefined")
        beta1, beta2 = (float(b) for b in group["betas"])
        step = float(state["step"])
        second = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
        second = second.detach().to(torch.promote_types(second.dtype, torch.float32))
        diagonal = (1 - beta1**step) * ((second / (1 - beta2**step)).sqrt() + float(group["eps"]))
        parts.append(diagonal.rsqrt().reshape(-1))
    return torch.cat(parts)
