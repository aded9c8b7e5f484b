"""NGN: SGD with Non-negative Gauss-Newton step sizes (Orvieto & Xiao, arXiv:2407.04358), and NGN-M."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from hildtools._checks import check_beta, check_number, check_path_flags
from hildtools.optimizers._common import (
    accumulation_dtype,
    backfill,
    by_device_and_dtype,
    check_unsharded,
    groups_with_grad,
    keep_if,
    real_views,
    squared_norm,
    use_foreach,
    zeros_state,
)

__all__ = ["NGN", "ngn", "ngn_step_size"]


class NGN(Optimizer):
    r"""SGD whose step size adapts to the loss value: the NGN step of Orvieto & Xiao.

    With :math:`f \ge 0` the minibatch loss, :math:`g` its gradient and :math:`\sigma` the ``lr``:

    .. code-block:: text

        gamma = sigma / (1 + sigma ||g||^2 / (2 f))    # computed as 2 sigma f / (2 f + sigma ||g||^2)
        p    <- p (1 - gamma wd) - gamma g             # momentum = 0
        v    <- b v + (1 - b) gamma g,  p <- p (1 - gamma wd) - v      # momentum = b > 0 (NGN-M)

    ``gamma <= sigma`` always, ``gamma -> 2 f / ||g||^2`` (a Polyak-type step) for large sigma, and
    ``gamma = 0`` at ``f = 0``. ``||g||`` is the norm over all parameter groups; sigma, the momentum
    and the weight decay may differ per group. The weight decay is decoupled and scaled by the step
    actually taken (gamma, not sigma), so it shrinks with the step and never exceeds ``sigma * wd``.

    NGN-M (``momentum > 0``) is Algorithm 1 of Islamov, Ajroldi, Orvieto & Lucchi (arXiv:2508.15071),
    heavy ball with the NGN step inside: ``x_{k+1} = x_k - (1 - b) gamma_k g_k + b (x_k - x_{k-1})``,
    ``x_1 = x_0``, gamma_k from the loss and gradient at ``x_k`` (tested against the algorithm written
    out). The paper's algorithm has no weight decay; here the decay ``x <- x - gamma_k wd x`` is applied
    outside the buffer (decoupled, as in AdamW), so the momentum carries only the gradient steps.
    A complex parameter is optimised as the pair of its real and imaginary parts.

    The loss is mandatory: ``step(closure)`` or ``step(loss=loss)``. Under ``torch.distributed`` the
    loss is averaged over ranks first, so every rank computes the same gamma (the gradients are
    already averaged by DDP); FSDP-sharded gradients are not supported. With ``maximize=True`` the
    loss is the objective being maximised and must be <= 0 (NGN then minimises ``-f``).

    ``step`` never synchronises with the device: gamma stays a 0-dim device tensor, readable as
    ``param_group["gamma"]`` after each step (for logging). A step with a NaN/inf loss or gradient
    is skipped (parameters and buffers untouched) and reported with a warning; a negative loss is
    skipped the same way and raises ``ValueError``. On CPU the check is a host read (free) and the
    report comes at the end of that step. On accelerators the step is masked on the device and the
    flags are copied back without blocking, so the report comes at the first later ``step`` call
    that finds the copy done (usually the next one).

    Args:
        params: iterable of parameters or param groups.
        lr: sigma, the largest step size, > 0 (0 would never move; a scheduler may still reach 0).
        momentum: NGN-M momentum ``b`` in [0, 1); 0 is plain NGN.
        weight_decay: decoupled weight decay, >= 0.
        maximize: maximize the objective (a non-positive loss) instead of minimizing it.
        foreach: use multi-tensor kernels; ``None`` picks them on CUDA.

    Raises:
        ValueError: lr not positive, weight_decay negative, or momentum outside [0, 1).
        TypeError: an argument has the wrong type.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = NGN(model.parameters(), lr=1.0)
        >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
        >>> loss = (model(x) - y).square().mean()
        >>> loss.backward()
        >>> opt.step(loss=loss)
        >>> bool(opt.param_groups[0]["gamma"] <= 1.0)
        True
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        check_number("lr", lr, open_low=True)
        check_beta("momentum", momentum)
        check_number("weight_decay", weight_decay)
        check_path_flags(maximize, foreach)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "foreach": foreach,
        }
        super().__init__(params, defaults)
        check_unsharded("NGN", self)
        self._report = _SkipReport()

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group; its ``lr`` (sigma) must be > 0 like the constructor's (a scheduler may later
        lower it to 0, which stops the group)."""
        if "lr" in param_group:
            check_number("lr", param_group["lr"], open_low=True)
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        backfill(self, maximize=False, foreach=None)  # state dicts saved before these flags existed
        self._report = _SkipReport()  # transient, not pickled

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, *, loss: Tensor | float | None = None):
        """Perform one NGN step.

        Args:
            closure: callable that recomputes the loss (with its gradients) and returns it.
            loss: the loss whose gradients are in ``.grad`` (a 0-dim tensor or a number).
                Give exactly one of ``closure`` and ``loss``. Under gradient accumulation, pass
                the mean loss that matches the accumulated gradient.

        Returns:
            The closure's loss, or None when ``loss`` was given.

        Raises:
            ValueError: neither or both of ``closure`` and ``loss`` given, a non-scalar loss, or a
                negative loss reported (see the class docstring for when).
        """
        self._report.poll()
        if (closure is None) == (loss is None):
            raise ValueError("NGN.step needs the loss: pass exactly one of closure or loss=")
        returned = None
        if closure is not None:
            with torch.enable_grad():
                loss = returned = closure()
        groups = groups_with_grad(self.param_groups)
        all_grads = [g for _, _, grads in groups for g in grads]
        if not all_grads:
            return returned
        dtype = accumulation_dtype(all_grads)
        device = all_grads[0].device
        f = _mean_over_ranks(_as_scalar_tensor(loss, device, dtype))
        sq_norm = squared_norm(all_grads, dtype, device)
        for group, params, grads in groups:
            objective = -f if group["maximize"] else f
            gamma, ok = ngn_step_size(objective, sq_norm, group["lr"])
            self._report.record(objective, sq_norm)
            group["gamma"] = gamma
            if ok.device.type == "cpu":  # the flag is host memory: decide here, nothing to mask
                if not ok:
                    continue
                ok = None
            buffers = zeros_state(self.state, params, "momentum_buffer") if group["momentum"] != 0 else []
            ngn(
                params,
                grads,
                buffers,
                gamma=gamma,
                ok=ok,
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                foreach=group["foreach"],
            )
        self._report.check()
        return returned


def ngn_step_size(loss: Tensor, sq_grad_norm: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
    """The NGN step size ``gamma = 2 sigma f / (2 f + sigma ||g||^2)`` and whether to take the step.

    Args:
        loss: the non-negative loss ``f`` (0-dim tensor).
        sq_grad_norm: ``||g||^2`` (0-dim tensor).
        sigma: the lr.

    Returns:
        ``(gamma, ok)``: ``ok`` is false when ``f`` or ``||g||^2`` is not finite or ``f < 0``; then
        ``gamma = 0``. ``gamma = 0`` also at ``f = 0`` (a minimum of a non-negative loss).
    """
    ok = torch.isfinite(loss) & torch.isfinite(sq_grad_norm) & (loss >= 0)
    denominator = 2 * loss + sigma * sq_grad_norm
    gamma = torch.where(ok & (denominator > 0), 2 * sigma * loss / denominator, 0.0)
    return gamma, ok


def ngn(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    gamma: Tensor,
    ok: Tensor | None,
    momentum: float,
    weight_decay: float,
    maximize: bool,
    foreach: bool | None = None,
) -> None:
    """Functional NGN / NGN-M update with a given step size, in place.

    ``ok`` is a 0-dim bool tensor, and the update is masked on the device where it is false (no
    host sync): the gradient term is zeroed bit-wise (NaN/inf gradients included) and the buffer
    decay and parameter update are gated, so nothing changes. ``ok=None`` means the step is known
    to be valid (NGN decides on the host when the flag is in CPU memory) and skips the masking.
    """
    if not params:
        return
    params, grads, momentum_buffers = real_views(params), real_views(grads), real_views(momentum_buffers)
    # The gradient term goes into the parameters (plain NGN) or, as (1 - b) gamma g, into the buffer (NGN-M).
    descent = 1.0 if maximize else -1.0
    grad_scale = descent * gamma if momentum == 0 else -descent * (1 - momentum) * gamma
    buffer_decay = gamma.new_full((), momentum)
    if ok is not None:
        buffer_decay = torch.where(ok, buffer_decay, gamma.new_ones(()))
    step_fn = _multi_tensor_ngn if use_foreach(foreach, params) else _single_tensor_ngn
    step_fn(
        params,
        grads,
        momentum_buffers or grads,
        gamma=gamma,
        ok=ok,
        grad_scale=grad_scale,
        buffer_decay=buffer_decay,
        momentum=momentum,
        weight_decay=weight_decay,
    )


def _single_tensor_ngn(params, grads, buffers, *, gamma, ok, grad_scale, buffer_decay, momentum, weight_decay):
    # The same operations as _multi_tensor_ngn, tensor by tensor, so both paths round alike (also in fp16).
    for param, grad, buf in zip(params, grads, buffers, strict=True):
        device = param.device
        if weight_decay != 0:
            param.sub_(param.mul(gamma.to(device) * weight_decay))
        step = grad.mul(grad_scale.to(device))
        if ok is not None:
            keep_if(ok, [step])
        if momentum == 0:
            param.add_(step)
            continue
        buf.mul_(buffer_decay.to(device)).add_(step)
        param.sub_(buf if ok is None else buf.mul(ok.to(device, gamma.dtype)))


def _multi_tensor_ngn(params, grads, buffers, *, gamma, ok, grad_scale, buffer_decay, momentum, weight_decay):
    for device_params, device_grads, device_buffers in by_device_and_dtype(params, grads, buffers):
        device = device_params[0].device
        if weight_decay != 0:
            torch._foreach_sub_(device_params, torch._foreach_mul(device_params, gamma.to(device) * weight_decay))
        steps = torch._foreach_mul(device_grads, grad_scale.to(device))
        if ok is not None:
            keep_if(ok, steps)
        if momentum == 0:
            torch._foreach_add_(device_params, steps)
            continue
        torch._foreach_mul_(device_buffers, buffer_decay.to(device))
        torch._foreach_add_(device_buffers, steps)
        if ok is not None:
            torch._foreach_sub_(device_params, torch._foreach_mul(device_buffers, ok.to(device, gamma.dtype)))
        else:
            torch._foreach_sub_(device_params, device_buffers)


def _as_scalar_tensor(loss: Tensor | float, device: torch.device, dtype: torch.dtype) -> Tensor:
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(f"NGN needs a scalar loss, got shape {tuple(loss.shape)}")
        return loss.detach().reshape(()).to(device, dtype)
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return torch.full((), float(loss), dtype=dtype, device=device)
    raise TypeError(f"loss must be a tensor or a number, got {type(loss).__name__}")


def _mean_over_ranks(value: Tensor) -> Tensor:
    """Average a scalar over all ranks (identity when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


class _SkipReport:
    """Counts skipped steps on the device and brings the counts to the host without blocking.

    On CPU the counts are read at once. On CUDA they are copied to pinned memory behind an event,
    and read by a later ``poll`` once the event has completed.
    """

    def __init__(self) -> None:
        self._counts: Tensor | None = None  # cumulative [negative losses, non-finite losses/gradients]
        self._seen = [0, 0]
        self._pending: tuple[Tensor, torch.cuda.Event] | None = None

    def record(self, loss: Tensor, sq_grad_norm: Tensor) -> None:
        finite = torch.isfinite(loss) & torch.isfinite(sq_grad_norm)
        new = torch.stack([finite & (loss < 0), ~finite]).long()
        self._counts = new if self._counts is None else self._counts.to(new.device) + new

    def check(self) -> None:
        if self._counts is None:
            return
        if self._counts.device.type != "cuda":
            self._compare(self._counts.tolist())
        elif self._pending is None:
            host = torch.empty(2, dtype=torch.int64, pin_memory=True)
            host.copy_(self._counts, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event)

    def poll(self) -> None:
        if self._pending is not None and self._pending[1].query():
            host, _ = self._pending
            self._pending = None
            self._compare(host.tolist())

    def _compare(self, counts: list[int]) -> None:
        negative, non_finite = (now - before for now, before in zip(counts, self._seen, strict=True))
        self._seen = counts
        if non_finite:
            warnings.warn(
                f"NGN skipped the update of {non_finite} param group(s) with a NaN/inf loss or gradient", stacklevel=3
            )
        if negative:
            raise ValueError(
                f"NGN needs a non-negative loss (a non-positive objective with maximize=True); "
                f"the update of {negative} param group(s) with a negative loss was skipped"
            )
