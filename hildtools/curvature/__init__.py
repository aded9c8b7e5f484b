"""Curvature of a loss on a batch, in plain PyTorch: Hessian-vector products, top eigenpairs by Lanczos, trace,
spectral density, and optimizers' stability thresholds (edge of stability).

Conventions: the Hessian is that of ``loss_fn(model, batch)`` (a scalar, normally a mean over the batch) with
respect to the trainable parameters, flattened and concatenated in ``model.parameters()`` order; "top"
eigenvalues are the largest algebraic ones (not largest magnitude); the model is evaluated as it is (its
train/eval modes decide BatchNorm and dropout), and nothing about it changes.
"""

from hildtools.curvature.density import SpectralDensity, spectral_density
from hildtools.curvature.eigenpairs import hessian_eigenpairs
from hildtools.curvature.hvp import HessianOperator, NonFiniteLossError
from hildtools.curvature.lanczos import Eigenpairs
from hildtools.curvature.subspace import subspace_overlap
from hildtools.curvature.thresholds import adam_preconditioner, stability_threshold
from hildtools.curvature.trace import TraceEstimate, hessian_trace

__all__ = [
    "Eigenpairs",
    "HessianOperator",
    "NonFiniteLossError",
    "SpectralDensity",
    "TraceEstimate",
    "adam_preconditioner",
    "hessian_eigenpairs",
    "hessian_trace",
    "spectral_density",
    "stability_threshold",
    "subspace_overlap",
]
