"""SAM: Sharpness-Aware Minimization (Foret et al., 2021) and ASAM (Kwon et al., 2021) around any optimizer."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from hildtools._checks import check_flag, check_number
from hildtools.norm_layers import RUNNING_STAT_NORMS
from hildtools.optimizers._common import (
    accumulation_dtype,
    by_device_and_dtype,
    check_unsharded,
    groups_with_grad,
    real_views,
    squared_norm,
    use_foreach,
)
from hildtools.sharding import sharding

__all__ = ["SAM", "check_lightning_compat", "frozen_norm_stats"]

_NORM_EPS = 1e-12  # added to ||g||, as in davda54/sam and pytorch-optimizer

_NO_CLOSURE = (
    "SAM.step needs a closure: it evaluates the loss twice, at w and at w + e. In a manual loop call "
    "first_step() and second_step() instead. Under Lightning this means the precision plugin stepped "
    "without the closure: precision='16-mixed' (GradScaler) and DeepSpeed are not supported with "
    "automatic optimization; use '32-true' or 'bf16-mixed'."
)


class SAM(Optimizer):
    r"""Sharpness-Aware Minimization around a base optimizer (the davda54 call signature).

    One step, with ``g`` the gradient of the minibatch loss at ``w``:

    .. code-block:: text

        e     = rho g / (||g|| + 1e-12)                        # adaptive=False (SAM)
        e     = rho T^2 g / (||T g|| + 1e-12),  T = |w| + eta  # adaptive=True (ASAM, elementwise)
        g_sam = gradient at w + e (same minibatch)
        w     = base_step(w, g_sam)                            # applied at w, restored from a saved copy

    ``||.||`` is over all parameter groups; ``rho``, ``adaptive`` and ``eta`` may differ per group.
    With ``maximize=True`` in the base optimizer the perturbation is ``-e``.

    ASAM convention: ``eta=0`` (default) scales every parameter by ``|w|``, as davda54/sam and
    pytorch-optimizer do. The official SamsungLabs ASAM uses ``eta=0.01`` and ``T = 1`` for
    parameters whose name does not contain "weight"; reproduce it with ``eta=0.01`` and those
    parameters in a group with ``adaptive=False``. ASAM is usually run with a larger ``rho`` (0.5-2).

    ``step(closure)`` calls the closure first (as torch optimizers and Lightning's automatic
    optimization expect), perturbs, zeroes the gradients, calls the closure again, restores ``w``
    by copy (exact in bf16, unlike subtraction), and steps the base optimizer. It returns the first
    (clean) loss. ``param_groups`` and ``state`` are the base optimizer's, so checkpoints keep its
    momentum and LR schedulers act on it. Step hooks (global ones and SAM's own) fire once per
    ``step``: the base's step then runs without torch's hook wrapper, so hooks registered on
    ``sam.base_optimizer`` fire only in manual loops (:meth:`second_step`). A complex parameter is
    perturbed as the pair of its real and imaginary parts (``||g||`` sums ``|g|^2``).

    ``model`` (optional, also settable as ``sam.model``) makes ``step`` correct for models with
    state in the forward pass: BatchNorm (any layer with running statistics) running statistics are restored after
    the second pass, so they move once per step; and if ``model`` is a ``DistributedDataParallel``,
    the first pass runs under ``model.no_sync()``, so each rank perturbs along its own gradient, as
    in the paper (the second pass is synchronised as usual; weights stay equal across ranks because
    they are restored before the synchronised base step). Without ``model`` both passes update
    BatchNorm statistics and, under DDP, both passes all-reduce (a globally synced perturbation).

    Args:
        params: iterable of parameters or param groups.
        base_optimizer: the base optimizer class, or any callable ``params -> Optimizer`` (a
            ``functools.partial``, or a LightningCLI nested ``class_path``).
        rho: radius of the perturbation, >= 0 (``rho=0`` is the base optimizer with twice the passes).
        adaptive: ASAM instead of SAM.
        eta: ASAM offset in ``T = |w| + eta``, >= 0.
        model: the module the closure runs (see above).
        **base_kwargs: keyword arguments of the base optimizer (``lr``, ``momentum``, ``maximize``,
            ``foreach``, ...). SAM's own tensor operations follow the base's ``foreach`` setting.

    Raises:
        ValueError: rho or eta negative.
        TypeError: ``base_optimizer`` is an optimizer instance or does not build an Optimizer.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = (model(x) - y).square().mean()
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
    """

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: Callable[[Iterable], Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        eta: float = 0.0,
        model: nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(base_optimizer, Optimizer):
            raise TypeError("base_optimizer must be an optimizer class or factory, not an optimizer instance")
        if not callable(base_optimizer):
            raise TypeError(f"base_optimizer must be an optimizer class or factory, got {base_optimizer!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        super().__init__(params, {"rho": rho, "adaptive": adaptive, "eta": eta})
        check_unsharded("SAM", self)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        if not isinstance(self.base_optimizer, Optimizer):
            raise TypeError(f"base_optimizer built a {type(self.base_optimizer).__name__}, not a torch Optimizer")
        self._link_base()
        self.defaults.update(self.base_optimizer.defaults)
        self.model = model
        self._perturbed: tuple[list[Tensor], list[Tensor]] | None = None
        self._backups: dict[Tensor, Tensor] = {}

    def _link_base(self) -> None:
        # One list of groups and one state dict, shared: checkpoints hold the base momentum.
        self.base_optimizer.__setstate__({"state": self.state, "param_groups": self.param_groups})
        self.param_groups = self.base_optimizer.param_groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (to SAM and the base optimizer); ``rho``, ``adaptive``, ``eta`` may be set per group."""
        for key in ("rho", "adaptive", "eta"):
            if key in self.defaults:
                param_group.setdefault(key, self.defaults[key])
        check_number("rho", param_group["rho"])
        check_flag("adaptive", param_group["adaptive"])
        check_number("eta", param_group["eta"])
        if hasattr(self, "base_optimizer"):
            self.base_optimizer.add_param_group(param_group)
        else:
            super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict (SAM's, or the base optimizer's) and re-link the base optimizer to it."""
        super().load_state_dict(state_dict)
        self._link_base()

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "base_optimizer": self.base_optimizer}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("model", None)  # a pickled or copied SAM does not hold the model
        self._perturbed = None
        self._backups = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One SAM step: closure at w, perturb, closure at w + e, restore, base step.

        Args:
            closure: callable that zeroes the gradients, computes the loss, calls ``backward`` and
                returns the loss (Lightning passes one).

        Returns:
            The loss of the first (unperturbed) closure call.

        Raises:
            RuntimeError: no closure (see :meth:`first_step` / :meth:`second_step` for manual loops).
        """
        if closure is None:
            raise RuntimeError(_NO_CLOSURE)
        no_sync = getattr(self.model, "no_sync", None)
        with no_sync() if callable(no_sync) else contextlib.nullcontext(), torch.enable_grad():
            loss = closure()
        self.first_step(zero_grad=True)
        frozen = frozen_norm_stats(self.model) if self.model is not None else contextlib.nullcontext()
        with frozen, torch.enable_grad():
            closure()
        self._restore()
        # torch wraps every optimizer's step with the global and instance step hooks; this step already
        # ran them for SAM, so the base's step runs unwrapped (global hooks fire once per SAM step)
        base_step = type(self.base_optimizer).step
        getattr(base_step, "__wrapped__", base_step)(self.base_optimizer)
        return loss

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Save the weights and move them to ``w + e``, using the gradients now in ``.grad``.

        ``e`` does not depend on a positive gradient scale, so this may run on GradScaler-scaled
        gradients (no ``unscale_`` needed). Parameters without a gradient are left unperturbed.

        Args:
            zero_grad: zero the gradients afterwards (set to None), ready for the second pass.

        Raises:
            RuntimeError: called twice without :meth:`second_step` in between.
        """
        if self._perturbed is not None:
            raise RuntimeError("first_step was called twice; call second_step before the next first_step")
        groups = groups_with_grad(self.param_groups)
        params = [p for _, group_params, _ in groups for p in group_params]
        backups = [self._backup_for(p) for p in params]
        self._perturbed = (params, backups)
        if params:
            _copy(backups, params, use_foreach(groups[0][0].get("foreach"), params))
            _perturb(groups)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler: torch.amp.GradScaler | None = None) -> None:
        """Restore the weights saved by :meth:`first_step`, then step the base optimizer.

        Args:
            zero_grad: zero the gradients afterwards.
            scaler: a ``GradScaler``: step through ``scaler.step(base_optimizer)`` (unscale, skip on
                inf/NaN); the weights are restored first, so a skipped step leaves them at ``w``.
                Call ``scaler.update()`` yourself afterwards.

        Raises:
            RuntimeError: no :meth:`first_step` before.
        """
        self._restore()
        if scaler is not None:
            scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        self._opt_called = True  # an LR scheduler attached to SAM then knows the optimizer stepped
        if zero_grad:
            self.zero_grad()

    def _restore(self) -> None:
        """Copy back the weights saved by :meth:`first_step`."""
        if self._perturbed is None:
            raise RuntimeError("second_step needs a first_step before it")
        params, backups = self._perturbed
        self._perturbed = None
        if params:
            _copy(params, backups, use_foreach(self.param_groups[0].get("foreach"), params))

    def _backup_for(self, param: Tensor) -> Tensor:
        # One persistent buffer per parameter, outside `state` (transient, never checkpointed).
        backup = self._backups.get(param)
        if (
            backup is None
            or backup.shape != param.shape
            or backup.dtype != param.dtype
            or backup.device != param.device
        ):
            backup = self._backups[param] = torch.empty_like(param, memory_format=torch.preserve_format)
        return backup


def _copy(targets: list[Tensor], sources: list[Tensor], foreach: bool) -> None:
    if foreach:
        for device_targets, device_sources in by_device_and_dtype(targets, sources):
            torch._foreach_copy_(device_targets, device_sources)
    else:
        for target, source in zip(targets, sources, strict=True):
            target.copy_(source)


def _perturb(groups: list[tuple[dict, list[Tensor], list[Tensor]]]) -> None:
    """``p += sign * rho * T^2 g / (||T g|| + eps)`` per group, with one global norm and no host sync."""
    prepared = []
    for group, params, grads in groups:
        params, grads = real_views(params), real_views(grads)  # a complex number is a pair of reals
        foreach = use_foreach(group.get("foreach"), params)
        weights = _asam_weights(params, group["eta"], foreach) if group["adaptive"] else None
        scaled = _multiply(grads, weights, foreach) if weights is not None else grads
        prepared.append((group, params, weights, scaled, foreach))
    all_scaled = [t for *_, scaled, _ in prepared for t in scaled]
    norm = squared_norm(all_scaled, accumulation_dtype(all_scaled), all_scaled[0].device).sqrt()
    for group, params, weights, scaled, foreach in prepared:
        scale = group["rho"] / (norm + _NORM_EPS)
        if group.get("maximize", False):
            scale = -scale
        perturbation = _multiply(scaled, weights, foreach) if weights is not None else scaled
        _add_scaled(params, perturbation, scale, foreach)


def _asam_weights(params: list[Tensor], eta: float, foreach: bool) -> list[Tensor]:
    if foreach:
        weights = torch._foreach_abs(params)
        if eta != 0:
            torch._foreach_add_(weights, eta)
        return weights
    return [p.abs().add_(eta) for p in params]


def _multiply(tensors: list[Tensor], others: list[Tensor], foreach: bool) -> list[Tensor]:
    if foreach:
        return torch._foreach_mul(tensors, others)
    return [t * o for t, o in zip(tensors, others, strict=True)]


def _add_scaled(params: list[Tensor], tensors: list[Tensor], scale: Tensor, foreach: bool) -> None:
    if foreach:
        for device_params, device_tensors in by_device_and_dtype(params, tensors):
            torch._foreach_add_(device_params, torch._foreach_mul(device_tensors, scale.to(device_params[0].device)))
    else:
        for param, tensor in zip(params, tensors, strict=True):
            param.addcmul_(tensor, scale.to(param.device))


@contextlib.contextmanager
def frozen_norm_stats(model: nn.Module) -> Iterator[None]:
    """Restore the running statistics of every normalization layer of ``model`` on exit.

    Use it around SAM's second forward **and backward** pass in a manual loop, so BatchNorm (and any
    layers with running statistics: SyncBatchNorm, InstanceNorm with tracking) statistics move once per step. The
    backward must run inside the block: autograd saved the statistics, and restoring them in place
    before the backward fails its version check. The layers stay in their mode (batch statistics
    are still used for normalization in training mode).

    Args:
        model: the module (or a DDP wrapper around it).
    """
    buffers = [
        buffer
        for module in model.modules()
        if isinstance(module, RUNNING_STAT_NORMS) and module.track_running_stats
        for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
        if buffer is not None
    ]
    with torch.no_grad():
        saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved, strict=True):
                buffer.copy_(value)


def check_lightning_compat(trainer: Any) -> None:
    """Check a Lightning ``Trainer`` for settings under which SAM cannot be correct; hand SAM the model.

    Call it from ``LightningModule.on_fit_start`` (``check_lightning_compat(self.trainer)``). For every
    :class:`SAM` among ``trainer.optimizers`` it raises for:

    - automatic optimization with a GradScaler (``precision="16-mixed"``, also under FSDP): Lightning
      runs the closure once itself and steps without it;
    - automatic optimization with ``accumulate_grad_batches > 1``: the closure does not zero the
      gradients between micro-batches, so the second pass would add to the first;
    - DeepSpeed, which steps without the closure;
    - FSDP: each rank holds a shard of the gradient, so rho g/||g|| would use the shard's norm.

    It also sets ``sam.model = trainer.model`` where SAM has no model, so BatchNorm statistics move
    once per step and, under DDP, the first pass skips the gradient all-reduce.
    (Without this call, ``16-mixed`` still fails at the first step with SAM's missing-closure error.)

    Args:
        trainer: a ``lightning.pytorch.Trainer`` after ``configure_optimizers`` ran.

    Raises:
        ValueError: one of the settings above.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy

    sams = [opt for opt in trainer.optimizers if isinstance(opt, SAM)]
    if not sams:
        return
    if isinstance(trainer.strategy, DeepSpeedStrategy):
        raise ValueError("SAM does not support DeepSpeed: it steps the optimizer without the closure")
    if sharding(trainer) is not None:
        raise ValueError(
            f"SAM does not support {type(trainer.strategy).__name__}: under FSDP each rank holds a shard of the "
            "gradient, so the perturbation rho g/||g|| would use the shard's norm. Use strategy='ddp'."
        )
    if trainer.lightning_module.automatic_optimization:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                "SAM cannot run with a GradScaler (precision='16-mixed') under automatic optimization: "
                "Lightning calls optimizer.step() without the closure. Use precision='bf16-mixed' or "
                "'32-true', or manual optimization with first_step()/second_step(scaler=...)."
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"SAM needs accumulate_grad_batches=1 under automatic optimization (got "
                f"{trainer.accumulate_grad_batches}): the second pass would add to the accumulated gradient."
            )
    for sam in sams:
        if sam.model is None:
            sam.model = trainer.model
