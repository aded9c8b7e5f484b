"""HessianEigenMonitor: top-k Hessian eigenpairs of the probe loss during training, and how their span moves.

Measured every ``every_n_steps`` optimizer steps on a fixed probe set: the k largest (algebraic) eigenvalues by
Lanczos with a residual stopping rule, warm-started from the previous eigenvectors. Logged under ``hessian/``:

* ``eig_{i}`` (i = 0 … k-1, descending), ``eig_{i}_err`` (a-posteriori bound on its error, see
  :attr:`hildtools.curvature.Eigenpairs.error_bounds`) and ``num_hvp`` (Hessian-vector products used);
* ``overlap_prev`` and ``overlap_init``: subspace overlaps ``||U_t^T U_s||_F^2 / k`` in [0, 1] of the top-k
  eigenspace now against the previous and the first measurement ("Hessian inertia"; a random k-dimensional
  subspace scores about k/P). Subspaces, not single eigenvectors: near-equal eigenvalues swap their vectors;
* optionally ``trace`` (XTrace) and the spectral density (stochastic Lanczos quadrature) as a picture.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from hildtools._checks import check_int
from hildtools.callbacks._curvature import CurvatureMonitor
from hildtools.callbacks._monitor import default_schedule
from hildtools.curvature import SpectralDensity, subspace_overlap
from hildtools.curvature.density import lanczos_quadrature
from hildtools.curvature.lanczos import lanczos
from hildtools.curvature.trace import operator_trace
from hildtools.logging import log_figure, new_figure
from hildtools.sharding import sharding


class HessianEigenMonitor(CurvatureMonitor):
    """Track the top-k Hessian eigenvalues and eigenvectors of the probe loss.

    Args:
        k: number of top eigenpairs (>= 1).
        every_n_steps: measure after every ``every_n_steps`` optimizer steps (default 100 when neither
            ``every_n_steps`` nor ``every_n_epochs`` is given).
        every_n_epochs: measure at the end of every ``every_n_epochs`` training epochs instead.
        probe_size: examples in the fixed probe set drawn from the train dataloader at fit start.
        tol: relative accuracy of the eigenvalues: Lanczos stops when every Ritz residual is at most
            ``tol * |eigenvalue|`` (a bound on the eigenvalue error), > 0.
        max_iter: cap on Lanczos steps (Hessian-vector products) per measurement; default ``max(60, 10 k)``.
        trace: also log ``hessian/trace`` (XTrace with ``trace_samples`` Hessian-vector products).
        density: also log the spectral density (a picture: W&B image or a PNG file beside the logs).
        bn_mode: ``"train"`` (default: BatchNorm with probe-batch statistics, the loss the optimizer sees) or
            ``"eval"`` (running statistics, PyHessian's convention). The two can differ several-fold.
        hvp: ``"auto"`` (default), ``"autograd"`` or ``"finite_difference"``: how Hessian-vector products are
            computed, see :class:`hildtools.callbacks._curvature.CurvatureMonitor`. Under FSDP (finite
            differences) ``trace`` is not supported.
        **kwargs: ``probe_data``, ``loss_fn``, ``unpack``, ``measure_at_start``; see
            :class:`hildtools.callbacks._monitor.Monitor`.

    Raises:
        ValueError: ``k < 1``, ``tol <= 0``, ``max_iter < k``, ``trace_samples < 3`` or an invalid shared argument.

    Example::

        trainer = Trainer(callbacks=[HessianEigenMonitor(k=5, every_n_steps=200)])
    """

    namespace = "hessian"

    def __init__(
        self,
        k: int = 5,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        probe_size: int = 256,
        tol: float = 1e-3,
        max_iter: int | None = None,
        trace: bool = False,
        trace_samples: int = 30,
        density: bool = False,
        bn_mode: str = "train",
        hvp: str = "auto",
        **kwargs: Any,
    ) -> None:
        check_int("k", k, 1)
        check_int("trace_samples", trace_samples, 3)
        max_iter = max(60, 10 * k) if max_iter is None else max_iter
        every_n_steps, every_n_epochs = default_schedule(every_n_steps, every_n_epochs, steps=100)
        super().__init__(
            every_n_steps=every_n_steps,
            every_n_epochs=every_n_epochs,
            probe_size=probe_size,
            tol=tol,
            max_iter=max_iter,
            min_iter=k,
            bn_mode=bn_mode,
            hvp=hvp,
            **kwargs,
        )
        self.k = k
        self.trace = trace
        self.trace_samples = trace_samples
        self.density = density
        self.vectors = None
        self.init_vectors = None

    def key_fields(self) -> dict:
        return {"k": self.k}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.trace and sharding(trainer) is not None:
            raise RuntimeError(
                f"HessianEigenMonitor(trace=True) does not support {type(trainer.strategy).__name__} "
                "yet (XTrace and Hutch++ factorise whole vectors); use trace=False under FSDP"
            )

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, module: Any, batch: Any) -> dict:
        operator = self.guarded(self.operator, trainer, module, batch)  # one graph for every product
        on = {"device": operator.device, "dtype": operator.dtype}
        init = self.warm_start(self.vectors, operator)
        result = lanczos(
            operator.matvec,
            operator.size,
            self.k,
            tol=self.tol,
            max_iter=self.max_iter,
            init=init,
            seed=self.last_step,
            inner=operator.inner,
            product_error=lambda: operator.product_error,
            **on,
        )
        values, vectors = result.eigenvalues, result.eigenvectors
        metrics = {f"eig_{i}": value for i, value in enumerate(values)}
        metrics.update({f"eig_{i}_err": bound for i, bound in enumerate(result.error_bounds.tolist())})
        metrics["num_hvp"] = result.num_hvp
        if init is not None and init.shape == vectors.shape:
            metrics["overlap_prev"] = subspace_overlap(vectors, init, inner=operator.inner)
        if self.init_vectors is None or self.init_vectors.shape[0] != operator.size:
            self.init_vectors = vectors
        metrics["overlap_init"] = subspace_overlap(vectors, self.init_vectors, inner=operator.inner)
        self.vectors = vectors
        if self.trace:
            method = "xtrace" if self.trace_samples >= 4 else "hutch++"  # XTrace needs two pairs of products
            estimate = operator_trace(
                operator.matvec,
                operator.size,
                num_samples=self.trace_samples,
                method=method,
                seed=self.last_step,
                matmat=operator.matmat,
                **on,
            )
            metrics["trace"] = estimate.estimate
        if self.density:
            density = lanczos_quadrature(
                operator.matvec, operator.size, seed=self.last_step, inner=operator.inner, **on
            )
            self.log_density(trainer, density, float(values[0]))
        return metrics

    def log_density(self, trainer: pl.Trainer, density: SpectralDensity, top: float) -> None:
        """Smoothed density on a log axis spanning 6 decades below its peak (not a numerical floor), with the top
        eigenvalue from Lanczos marked."""
        figure_axes = new_figure(figsize=(5, 3), layout="constrained")
        if figure_axes is None:
            return
        figure, axes = figure_axes
        grid, values = density.smooth()
        axes.semilogy(grid.cpu(), values.cpu())
        peak = float(values.max())
        if peak > 0:
            axes.set_ylim(peak * 1e-6, peak * 2)
        axes.axvline(top, color="C3", linestyle="--", label=f"top eigenvalue {top:.3g}")
        axes.legend(fontsize="x-small")
        axes.set(xlabel="eigenvalue", ylabel="density", title=f"Hessian spectrum, step {trainer.global_step}")
        log_figure(trainer, "hessian/density", figure)

    def extra_state_dict(self) -> dict:
        return {
            "vectors": None if self.vectors is None else self.vectors.cpu(),
            "init_vectors": None if self.init_vectors is None else self.init_vectors.cpu(),
        }

    def load_extra_state_dict(self, state: dict) -> None:
        self.vectors = state.get("vectors")
        self.init_vectors = state.get("init_vectors")
