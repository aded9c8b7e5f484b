"""What the Hessian-based monitors share: the Lanczos accuracy arguments, the NaN guard, the choice of
Hessian-vector product (double backward or finite differences, once at fit start) and running under FSDP."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from hildtools._checks import check_choice, check_int, check_positive
from hildtools.callbacks._monitor import Monitor, SkipMeasurement
from hildtools.curvature import HessianOperator, NonFiniteLossError
from hildtools.curvature.hvp import HVP_METHODS
from hildtools.sharding import redirected_loss, sharding


class CurvatureMonitor(Monitor):
    """A :class:`Monitor` whose measurement runs Lanczos on Hessian-vector products of the probe loss.

    Args:
        tol: relative Ritz-residual tolerance of Lanczos, > 0.
        max_iter: cap on Lanczos steps per measurement, >= ``min_iter``.
        min_iter: the smallest admissible ``max_iter`` (the number of eigenpairs sought).
        hvp: ``"auto"`` (default), ``"autograd"`` or ``"finite_difference"``; see
            :class:`hildtools.curvature.HessianOperator`. Resolved once at fit start (``method``): under FSDP
            finite differences, else double backward unless it fails or disagrees with finite differences on the
            probe (then finite differences, with a warning). With finite differences the probe keeps the fused
            attention kernels training uses; with double backward it runs SDPA on its math kernel.
    """

    runs_under_fsdp = True  # with finite differences; hvp="autograd" is refused in setup

    def __init__(self, *, tol: float, max_iter: int, min_iter: int = 1, hvp: str = "auto", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tol = check_positive("tol", tol)
        self.max_iter = check_int("max_iter", max_iter, min_iter)
        self.hvp = check_choice("hvp", hvp, HVP_METHODS)
        self.method: str | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if sharding(trainer) is not None and self.hvp == "autograd":
            raise RuntimeError(
                f"{type(self).__name__}(hvp='autograd') does not support {type(trainer.strategy).__name__}: double "
                "backward cannot run through sharded parameters; use hvp='auto' or 'finite_difference'"
            )

    def guarded(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call a curvature function; a non-finite probe loss becomes a skipped measurement."""
        try:
            return fn(*args, **kwargs)
        except NonFiniteLossError as error:
            raise SkipMeasurement(str(error)) from error

    def model_and_loss(self, trainer: pl.Trainer, module: Any) -> tuple[Any, Any]:
        """The module to differentiate and the probe loss on it: under FSDP1 the root wrapper, whose forward
        gathers the root's own parameters, running the probe loss inside it."""
        if sharding(trainer) == "fsdp":
            return trainer.strategy.model, redirected_loss(module, self.probe.loss)
        return module, self.probe.loss

    def operator(self, trainer: pl.Trainer, module: Any, batch: Any, **kwargs: Any) -> HessianOperator:
        """The Hessian operator of the probe loss with the method chosen at fit start."""
        model, loss = self.model_and_loss(trainer, module)
        return HessianOperator(model, loss, batch, hvp=self.method or self.hvp, **kwargs)

    @staticmethod
    def warm_start(vectors: torch.Tensor | None, operator: HessianOperator) -> torch.Tensor | None:
        """Previous eigenvectors as Lanczos' warm start, or None where they do not fit this operator (restored from
        a checkpoint that holds rank 0's shard on a rank whose shard differs, or after the model changed)."""
        return vectors if vectors is not None and vectors.shape[0] == operator.size else None

    def on_fit_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Choose the Hessian-vector product once; fail early, with the way out, when ``hvp="autograd"`` and the
        model has no double backward (e.g. fused attention kernels)."""
        self.probe.math_attention = self.hvp != "finite_difference"
        with self.probe.session(pl_module) as module:
            batch = self.probe.prepare_batch()
            try:
                operator = self.operator(trainer, module, batch)
                if operator.hvp == "autograd":
                    operator.matvec(torch.zeros(operator.size, device=operator.device, dtype=operator.dtype))
            except NonFiniteLossError:
                return  # reported (and skipped) by the measurement itself; the method is chosen then
            except RuntimeError as error:
                if "derivative" not in str(error) and "double backward" not in str(error):
                    raise
                raise RuntimeError(
                    f"{type(self).__name__}: this model has an operation without double backward, so Hessian-vector "
                    f"products by double backward are impossible ({error}). Use hvp='finite_difference' (or "
                    "'auto'), or replace the fused op in the probed model by a twice-differentiable one."
                ) from error
        self.method = operator.hvp
        self.probe.math_attention = self.method == "autograd"
