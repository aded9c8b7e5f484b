"""What the Hessian-based monitors share: the Lanczos accuracy arguments, the NaN guard, the double-backward check."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from hildtools._checks import check_int, check_positive
from hildtools.callbacks._monitor import Monitor, SkipMeasurement
from hildtools.curvature import HessianOperator, NonFiniteLossError


class CurvatureMonitor(Monitor):
    """A :class:`Monitor` whose measurement runs Lanczos on Hessian-vector products of the probe loss.

    Args:
        tol: relative Ritz-residual tolerance of Lanczos, > 0.
        max_iter: cap on Lanczos steps per measurement, >= ``min_iter``.
        min_iter: the smallest admissible ``max_iter`` (the number of eigenpairs sought).
    """

    def __init__(self, *, tol: float, max_iter: int, min_iter: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tol = check_positive("tol", tol)
        self.max_iter = check_int("max_iter", max_iter, min_iter)

    def guarded(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call a curvature function; a non-finite probe loss becomes a skipped measurement."""
        try:
            return fn(*args, **kwargs)
        except NonFiniteLossError as error:
            raise SkipMeasurement(str(error)) from error

    def on_fit_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fail early, with the way out, when the model has no double backward (e.g. fused attention kernels)."""
        with self.probe.session(pl_module) as module:
            batch = self.probe.prepare_batch()
            try:
                operator = HessianOperator(module, self.probe.loss, batch)
                operator.matvec(torch.zeros(operator.size, device=operator.device, dtype=operator.dtype))
            except NonFiniteLossError:
                return  # reported (and skipped) by the measurement itself
            except RuntimeError as error:
                if "derivative" not in str(error) and "double backward" not in str(error):
                    raise
                raise RuntimeError(
                    f"{type(self).__name__}: this model has an operation without double backward, so Hessian-vector "
                    f"products are impossible ({error}). Replace the fused op in the probed model by a twice-"
                    "differentiable one (the probe already runs scaled_dot_product_attention on its math kernel), "
                    "or use the first-order monitors (NTK, neural collapse, feature rank, invariant sets)."
                ) from error
