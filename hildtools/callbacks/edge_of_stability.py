"""EdgeOfStabilityMonitor: sharpness of the probe loss against the optimizer's own stability threshold.

Under full-batch gradient descent, sharpness (the top Hessian eigenvalue) rises until it reaches 2/lr and then
hovers there (Cohen et al. 2021). The threshold depends on the optimizer (read from its param groups, see
:func:`hildtools.curvature.stability_threshold`): GD 2/lr, heavy ball (2+2b)/lr, Nesterov (2+2b)/((1+2b) lr),
Adam/AdamW (2+2b1)/((1-b1) lr). For Adam the sharpness is the preconditioned one, lambda_1(P^-1/2 H P^-1/2), with
P the diagonal Adam divides by (Cohen et al. 2022). An optimizer wrapping a base one (SAM's ``base_optimizer``) is
compared against its base optimizer's threshold: SAM's own, lower edge depends on rho and the gradient norm
(Long & Bartlett 2024), so ``ratio`` then reads "how close to the base optimizer's edge". NGN is gradient descent
with the self-tuned step gamma (heavy ball with step (1-b) gamma for NGN-M), so its threshold is 2/gamma
((2+2b)/((1-b) gamma)) at the last step's gamma of the first param group. For optimizers without a known
threshold (Lion, Signum, Rprop, ...) only the sharpness is logged, after one warning. Logged under ``eos/``: ``sharpness``, ``threshold``,
``ratio`` (= sharpness / threshold) and ``at_edge`` (1 when ``ratio >= edge_ratio``, else 0).

Cheap by design: top-1 Lanczos at a loose tolerance, warm-started from the previous top eigenvector, on a small
probe (see the README for its measured overhead).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from hildtools._checks import check_int, check_positive
from hildtools.callbacks._curvature import CurvatureMonitor
from hildtools.callbacks._monitor import SkipMeasurement
from hildtools.curvature import (
    adam_preconditioner,
    hessian_eigenpairs,
    stability_threshold,
)
from hildtools.optimizers import NGN

ADAM_LIKE = (torch.optim.Adam, torch.optim.AdamW)


class EdgeOfStabilityMonitor(CurvatureMonitor):
    """Track sharpness against the stability threshold of the trainer's optimizer.

    Args:
        every_n_steps: measure after every ``every_n_steps`` optimizer steps (default 100).
        probe_size: examples in the fixed probe set drawn from the train dataloader at fit start (default 64:
            cheap; a larger probe estimates the full-batch sharpness better, at proportional cost).
        tol: Ritz-residual tolerance, > 0; default 3e-2, which gives the sharpness to about 1e-3 relative (the
            eigenvalue error is of order residual^2 / gap).
        max_iter: cap on Hessian-vector products per measurement (default 30; about 6-8 are typical warm).
        edge_ratio: ``at_edge`` is 1 when sharpness >= ``edge_ratio`` x threshold; in (0, 2].
        optimizer_index: which of ``trainer.optimizers`` sets the threshold.
        bn_mode: ``"train"`` (default) or ``"eval"``; see :class:`hildtools.probe.Probe`.
        measure_at_start: also measure before the first update (off by default: Adam has no preconditioner yet).
        hvp: ``"auto"`` (default), ``"autograd"`` or ``"finite_difference"``: how Hessian-vector products are
            computed, see :class:`hildtools.callbacks._curvature.CurvatureMonitor`.
        **kwargs: ``probe_data``, ``loss_fn``, ``unpack``, ``every_n_epochs``.

    Raises:
        ValueError: invalid ``tol``, ``max_iter``, ``edge_ratio`` or shared argument.

    Example::

        trainer = Trainer(callbacks=[EdgeOfStabilityMonitor(every_n_steps=25)])
    """

    namespace = "eos"

    def __init__(
        self,
        *,
        every_n_steps: int | None = 100,
        probe_size: int = 64,
        tol: float = 3e-2,
        max_iter: int = 30,
        edge_ratio: float = 0.9,
        optimizer_index: int = 0,
        bn_mode: str = "train",
        measure_at_start: bool = False,
        hvp: str = "auto",
        **kwargs: Any,
    ) -> None:
        if check_positive("edge_ratio", edge_ratio) > 2:
            raise ValueError(f"edge_ratio must be in (0, 2], got {edge_ratio!r}")
        check_int("optimizer_index", optimizer_index, 0)
        super().__init__(
            every_n_steps=every_n_steps, probe_size=probe_size, tol=tol, max_iter=max_iter, bn_mode=bn_mode,
            measure_at_start=measure_at_start, hvp=hvp, **kwargs,
        )
        self.edge_ratio = float(edge_ratio)
        self.optimizer_index = optimizer_index
        self.vector = None

    def optimizer(self, trainer: pl.Trainer) -> torch.optim.Optimizer:
        optimizers = trainer.optimizers
        if self.optimizer_index >= len(optimizers):
            raise ValueError(f"optimizer_index={self.optimizer_index} but the trainer has {len(optimizers)} optimizers")
        optimizer = optimizers[self.optimizer_index]
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the user's
        return getattr(optimizer, "base_optimizer", optimizer)  # SAM: the base optimizer's update rule

    @staticmethod
    def threshold(optimizer: torch.optim.Optimizer) -> float | None:
        """The optimizer's stability threshold now, or ``None`` when none is known for it."""
        if isinstance(optimizer, NGN):
            group = optimizer.param_groups[0]
            gamma, momentum = float(group.get("gamma", group["lr"])), float(group["momentum"])
            return math.inf if gamma == 0 else (2 + 2 * momentum) / ((1 - momentum) * gamma)
        try:
            return stability_threshold(optimizer)
        except ValueError:
            return None

    def on_fit_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer = self.optimizer(trainer)
        if self.threshold(optimizer) is None:
            rank_zero_warn(f"EdgeOfStabilityMonitor: no known stability threshold for {type(optimizer).__name__}; "
                           "logging eos/sharpness only (thresholds: SGD, heavy ball, Nesterov, Adam/AdamW, NGN)")
        super().on_fit_setup(trainer, pl_module)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, module: Any, batch: Any) -> dict:
        optimizer = self.optimizer(trainer)
        preconditioner = None
        if isinstance(optimizer, ADAM_LIKE):
            params = [p for p in module.parameters() if p.requires_grad]
            if any("exp_avg_sq" not in optimizer.state.get(p, {}) for p in params):
                raise SkipMeasurement("Adam has taken no step yet, so its preconditioner is undefined")
            preconditioner = adam_preconditioner(optimizer, params)
        model, loss = self.model_and_loss(trainer, module)
        result = self.guarded(
            hessian_eigenpairs, model, loss, batch, k=1, tol=self.tol, max_iter=self.max_iter,
            init=self.vector, preconditioner=preconditioner, seed=self.last_step, hvp=self.method or self.hvp,
        )
        self.vector = result.eigenvectors
        sharpness = float(result.eigenvalues[0])
        metrics = {"sharpness": sharpness, "num_hvp": result.num_hvp}
        threshold = self.threshold(optimizer)
        if threshold is not None and math.isfinite(threshold):  # infinite at lr = 0 or NGN's gamma = 0
            ratio = sharpness / threshold
            metrics.update(threshold=threshold, ratio=ratio, at_edge=float(ratio >= self.edge_ratio))
        return metrics

    def extra_state_dict(self) -> dict:
        return {"vector": None if self.vector is None else self.vector.cpu()}

    def load_extra_state_dict(self, state: dict) -> None:
        self.vector = state.get("vector")
