"""EdgeOfStabilityMonitor: sharpness of the probe loss against the optimizer's own stability threshold.

Under full-batch gradient descent, sharpness (the top Hessian eigenvalue) rises until it reaches 2/lr and then
hovers there (Cohen et al. 2021). The threshold depends on the optimizer and comes from
:func:`hildtools.curvature.stability_threshold` (GD 2/lr, heavy ball, Nesterov, Adam/AdamW, NGN; SAM is compared
against its base optimizer's threshold, so ``ratio`` then reads "how close to the base optimizer's edge"). For Adam
the sharpness is the preconditioned one, lambda_1(P^-1/2 H P^-1/2), with P the diagonal Adam divides by (Cohen et
al. 2022). For optimizers without a known threshold (Lion, Signum, Rprop, ...) only the sharpness is logged, after
one warning; param groups with different settings raise (choose one with ``param_group``). Logged under ``eos/``:
``sharpness``, ``threshold``, ``ratio`` (= sharpness / threshold), ``at_edge`` (1 when ``ratio >= edge_ratio``,
else 0) and ``sharpness_err``, the a-posteriori bound on the sharpness error
(:attr:`hildtools.curvature.Eigenpairs.error_bounds`).

Cheap by design: top-1 Lanczos warm-started from the previous top eigenvector, on a small probe (see the README
for its measured overhead). The default ``tol=1e-3`` bounds every measurement's Ritz residual, hence its error, by
1e-3 relative (a looser 3e-2 left up to half the measurements of an edge-of-stability run more than 1e-3 low, by
up to 14%: a Ritz value is always low, so ``ratio`` read low exactly at the edge).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from hildtools._checks import check_int, check_optional_int, check_positive
from hildtools.callbacks._curvature import CurvatureMonitor
from hildtools.callbacks._monitor import SkipMeasurement, default_schedule
from hildtools.curvature import adam_preconditioner, stability_threshold
from hildtools.curvature.lanczos import lanczos
from hildtools.curvature.thresholds import UnknownThresholdError, unwrap_optimizer

ADAM_LIKE = (torch.optim.Adam, torch.optim.AdamW)


class EdgeOfStabilityMonitor(CurvatureMonitor):
    """Track sharpness against the stability threshold of the trainer's optimizer.

    Args:
        every_n_steps: measure after every ``every_n_steps`` optimizer steps (default 100 when neither
            ``every_n_steps`` nor ``every_n_epochs`` is given).
        every_n_epochs: measure at the end of every ``every_n_epochs`` training epochs instead.
        probe_size: examples in the fixed probe set drawn from the train dataloader at fit start (default 64:
            cheap; a larger probe estimates the full-batch sharpness better, at proportional cost).
        tol: Ritz-residual tolerance, > 0; default 1e-3, which gives the sharpness to 1e-3 relative or better on
            every measurement (the residual bounds the error; ``eos/sharpness_err`` logs the tighter ``r^2 / gap``
            bound when it applies, typically ~1e-6 relative).
        max_iter: cap on Hessian-vector products per measurement (default 40; about 6-7 are typical warm, 12-20
            cold).
        edge_ratio: ``at_edge`` is 1 when sharpness >= ``edge_ratio`` x threshold; in (0, 2].
        optimizer_index: which of ``trainer.optimizers`` sets the threshold.
        param_group: the param group whose settings set the threshold; by default all groups must agree.
        bn_mode: ``"train"`` (default) or ``"eval"``; see :class:`hildtools.probe.Probe`.
        measure_at_start: also measure before the first update (off by default: Adam has no preconditioner yet).
        hvp: ``"auto"`` (default), ``"autograd"`` or ``"finite_difference"``: how Hessian-vector products are
            computed, see :class:`hildtools.callbacks._curvature.CurvatureMonitor`.
        **kwargs: ``probe_data``, ``loss_fn``, ``unpack``.

    Raises:
        ValueError: invalid ``tol``, ``max_iter``, ``edge_ratio``, ``param_group`` or shared argument; at fit start,
            param groups with different settings and no ``param_group``.

    Example::

        trainer = Trainer(callbacks=[EdgeOfStabilityMonitor(every_n_steps=25)])
    """

    namespace = "eos"

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        probe_size: int = 64,
        tol: float = 1e-3,
        max_iter: int = 40,
        edge_ratio: float = 0.9,
        optimizer_index: int = 0,
        param_group: int | None = None,
        bn_mode: str = "train",
        measure_at_start: bool = False,
        hvp: str = "auto",
        **kwargs: Any,
    ) -> None:
        if check_positive("edge_ratio", edge_ratio) > 2:
            raise ValueError(f"edge_ratio must be in (0, 2], got {edge_ratio!r}")
        check_int("optimizer_index", optimizer_index, 0)
        check_optional_int("param_group", param_group, 0)
        every_n_steps, every_n_epochs = default_schedule(every_n_steps, every_n_epochs, steps=100)
        super().__init__(
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            probe_size=probe_size,
            tol=tol,
            max_iter=max_iter,
            bn_mode=bn_mode,
            measure_at_start=measure_at_start,
            hvp=hvp,
            **kwargs,
        )
        self.edge_ratio = float(edge_ratio)
        self.optimizer_index = optimizer_index
        self.param_group = param_group
        self.vector = None

    def optimizer(self, trainer: pl.Trainer) -> torch.optim.Optimizer:
        optimizers = trainer.optimizers
        if self.optimizer_index >= len(optimizers):
            raise ValueError(f"optimizer_index={self.optimizer_index} but the trainer has {len(optimizers)} optimizers")
        optimizer = optimizers[self.optimizer_index]
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        return unwrap_optimizer(optimizer)  # SAM: the base optimizer's update rule

    def threshold(self, optimizer: torch.optim.Optimizer) -> float | None:
        """The optimizer's stability threshold now, or ``None`` when none is known for it."""
        try:
            return stability_threshold(optimizer, self.param_group)
        except UnknownThresholdError:
            return None

    def on_fit_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = self.optimizer(trainer)
        if self.threshold(optimizer) is None:
            rank_zero_warn(
                f"EdgeOfStabilityMonitor: no known stability threshold for {type(optimizer).__name__}; "
                "logging eos/sharpness only (thresholds: SGD, heavy ball, Nesterov, Adam/AdamW, NGN)"
            )
        super().on_fit_setup(trainer, pl_module)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, module: Any, batch: Any) -> dict:
        optimizer = self.optimizer(trainer)
        preconditioner = None
        if isinstance(optimizer, ADAM_LIKE):
            params = [p for p in module.parameters() if p.requires_grad]
            if any("exp_avg_sq" not in optimizer.state.get(p, {}) for p in params):
                raise SkipMeasurement("Adam has taken no step yet, so its preconditioner is undefined")
            preconditioner = adam_preconditioner(optimizer, params)
        operator = self.guarded(self.operator, trainer, module, batch, preconditioner=preconditioner)
        result = lanczos(
            operator.matvec,
            operator.size,
            1,
            tol=self.tol,
            max_iter=self.max_iter,
            init=self.warm_start(self.vector, operator),
            seed=self.last_step,
            device=operator.device,
            dtype=operator.dtype,
            inner=operator.inner,
            product_error=lambda: operator.product_error,
        )
        self.vector = result.eigenvectors
        sharpness = float(result.eigenvalues[0])
        metrics = {"sharpness": sharpness, "sharpness_err": float(result.error_bounds[0]), "num_hvp": result.num_hvp}
        try:
            threshold = self.threshold(optimizer)
        except ValueError as error:  # groups that agreed at fit start diverged (e.g. per-group LR schedules)
            rank_zero_warn(f"EdgeOfStabilityMonitor: no threshold at step {trainer.global_step}: {error}")
            threshold = None
        if threshold is not None and math.isfinite(threshold):  # infinite at lr = 0 or NGN's gamma = 0
            ratio = sharpness / threshold
            metrics.update(threshold=threshold, ratio=ratio, at_edge=float(ratio >= self.edge_ratio))
        return metrics

    def extra_state_dict(self) -> dict:
        return {"vector": None if self.vector is None else self.vector.cpu()}

    def load_extra_state_dict(self, state: dict) -> None:
        self.vector = state.get("vector")
