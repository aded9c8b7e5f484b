"""Rank of a feature matrix: PCA rank at an energy threshold, effective rank and stable rank.

For features X (N x D), centred as chosen, with singular values s_1 >= s_2 >= ... (lambda_k = s_k^2):

- ``pca_rank``: the number of principal components needed for the cumulative energy to exceed
  ``threshold``: ``#{k : sum_{j<=k} lambda_j <= threshold * sum_j lambda_j} + 1`` (the SAM
  low-rank-features paper's code, Andriushchenko et al. 2023);
- ``effective_rank`` = exp(-sum_k p_k log p_k) with p_k = s_k / sum_j s_j (singular values,
  L1-normalised; Roy & Vetterli 2007);
- ``stable_rank`` = sum_k s_k^2 / s_1^2.

Centering: ``"row"`` subtracts each example's mean over its features (the SAM code's choice, the
default), ``"column"`` subtracts the mean example (ordinary PCA), ``None`` leaves X as is.

The spectrum comes from the Gram matrix of the smaller side (X X^T or X^T X, accumulated in fp64
in chunks) and ``eigvalsh``; eigenvalues below ``size * eps_fp64 * lambda_1`` (size of the Gram) are rounding
noise and set to zero. All three ranks are 0 for an all-zero (centred) feature matrix.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from hildtools._checks import (
    check_choice,
    check_fraction,
    check_matrix,
    check_optional_int,
)

_CENTERINGS = ("row", "column", None)
_CHUNK = 1024


def check_rank_args(threshold: Any, center: Any) -> None:
    """Raise ValueError for a ``threshold`` outside (0, 1) or an unknown ``center``."""
    check_fraction("threshold", threshold)
    check_choice("center", center, _CENTERINGS)


def _gram_spectrum(features: Tensor, center: str | None) -> Tensor:
    """Eigenvalues (descending, fp64) of the Gram matrix of the centred features, smaller side."""
    n, d = features.shape
    x = features.detach()
    row_mean = x.sum(1, dtype=torch.float64)[:, None] / d if center == "row" else None
    col_mean = x.sum(0, dtype=torch.float64)[None, :] / n if center == "column" else None
    rows_side = n > d  # Gram X^T X (d x d), chunks of rows; otherwise X X^T (n x n), chunks of columns
    gram = x.new_zeros((d, d) if rows_side else (n, n), dtype=torch.float64)
    for start in range(0, n if rows_side else d, _CHUNK):
        part = slice(start, start + _CHUNK)
        block = (x[part] if rows_side else x[:, part]).to(torch.float64)
        if row_mean is not None:
            block = block - (row_mean[part] if rows_side else row_mean)
        if col_mean is not None:
            block = block - (col_mean if rows_side else col_mean[:, part])
        if rows_side:
            gram.addmm_(block.T, block)
        else:
            gram.addmm_(block, block.T)
    return _spectrum(gram)


def _spectrum(gram: Tensor) -> Tensor:
    values = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
    noise = values[0] * len(values) * torch.finfo(torch.float64).eps
    return torch.where(values > noise, values, 0.0)


def _rank_measures(values: Tensor, threshold: float) -> dict[str, Tensor]:
    """PCA rank, effective rank and stable rank from descending eigenvalues lambda_k = s_k^2."""
    total = values.sum()
    if total <= 0:
        zero = values.new_zeros(())
        return {"pca_rank": zero, "effective_rank": zero.clone(), "stable_rank": zero.clone()}
    nonzero = values[values > 0]
    pca_rank = (torch.cumsum(nonzero, 0) <= threshold * total).sum() + 1
    singular = nonzero.sqrt()
    p = singular / singular.sum()
    return {
        "pca_rank": pca_rank.clamp_max(len(nonzero)).to(torch.float64),
        "effective_rank": torch.exp(-(p * p.log()).sum()),
        "stable_rank": total / values[0],
    }


def _warn_nonfinite(count: int) -> dict[str, Tensor]:
    warnings.warn(f"feature rank skipped: {count} feature rows contain NaN/inf", stacklevel=3)
    return {}


def feature_rank(features: Tensor, threshold: float = 0.99, center: str | None = "row") -> dict[str, Tensor]:
    """PCA rank at ``threshold``, effective rank and stable rank of a feature matrix.

    Definitions and centering conventions are in the module docstring; cost O(N D min(N, D)) plus
    an eigendecomposition of the min(N, D)-sized Gram matrix, both in fp64.

    Args:
        features: (N, D) features (one row per example; flatten or pool conv maps first).
        threshold: energy fraction in (0, 1); 0.99 in the SAM paper.
        center: ``"row"`` (SAM code, default), ``"column"`` (PCA) or ``None``.

    Returns:
        Dict of fp64 scalars ``pca_rank``, ``effective_rank``, ``stable_rank``; empty, with a
        warning, when a feature is NaN/inf.

    Raises:
        ValueError: for a non-2-D ``features``, a ``threshold`` outside (0, 1) or an unknown ``center``.

    Example:
        >>> x = torch.eye(6)[:, :4] * 3.0  # four equal singular values
        >>> {k: v.item() for k, v in feature_rank(x, center=None).items()}
        {'pca_rank': 4.0, 'effective_rank': 4.0, 'stable_rank': 4.0}
    """
    check_rank_args(threshold, center)
    check_matrix("features", features)
    nonfinite = int((~torch.isfinite(features).all(dim=1)).sum())
    if nonfinite:
        return _warn_nonfinite(nonfinite)
    return _rank_measures(_gram_spectrum(features, center), threshold)


class FeatureRank(Metric):
    """Streaming, DDP-synchronised :func:`feature_rank`.

    Two storage modes:

    - ``num_features=None`` (default): keeps the features (a ``"cat"`` list state, N x D memory),
      then uses the Gram matrix of the smaller side. Best for probe sets with N <= D.
    - ``num_features=D``: accumulates the fp64 D x D second moment, the feature sum and the count
      (``"sum"`` states, D^2 memory whatever N); column centering uses
      ``sum x x^T - N xbar xbar^T`` in fp64. Best when N > D.

    Rows with NaN/inf features are skipped and make ``compute`` return ``{}`` with a warning.
    After ``compute``, ``spectrum`` holds the squared singular values (descending, fp64).

    Args:
        threshold: energy fraction in (0, 1) for ``pca_rank``.
        center: ``"row"`` (SAM code, default), ``"column"`` (PCA) or ``None``.
        num_features: feature dimension D to switch to the D x D second-moment mode.
        kwargs: torchmetrics ``Metric`` keyword arguments.

    Raises:
        ValueError: on bad arguments or features of the wrong shape.

    Example:
        >>> from hildtools.metrics import FeatureRank
        >>> metric = FeatureRank(center=None, num_features=4)
        >>> for rows in torch.eye(6)[:, :4].split(3):
        ...     metric.update(rows)
        >>> metric.compute()["pca_rank"].item()
        4.0
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(
        self, threshold: float = 0.99, center: str | None = "row", num_features: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        check_rank_args(threshold, center)
        check_optional_int("num_features", num_features, 1)
        self.threshold, self.center, self.num_features = threshold, center, num_features
        self.spectrum: Tensor | None = None
        if num_features is None:
            self.add_state("features", [], dist_reduce_fx="cat")
        else:
            self.add_state("second_moment", torch.zeros(num_features, num_features, dtype=torch.float64), "sum")
            self.add_state("feature_sum", torch.zeros(num_features, dtype=torch.float64), "sum")
            self.add_state("count", torch.zeros((), dtype=torch.float64), "sum")
        self.add_state("nonfinite", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, features: Tensor) -> None:
        """Add a batch of (N, D) features."""
        check_matrix("features", features)
        if self.num_features is not None and features.shape[1] != self.num_features:
            raise ValueError(f"`features` must have {self.num_features} columns, got {features.shape[1]}")
        finite = torch.isfinite(features).all(dim=1)
        self.nonfinite = self.nonfinite + (~finite).sum()
        if self.num_features is None:
            self.features.append(features.detach()[finite].to(torch.promote_types(features.dtype, torch.float32)))
            return
        x = features.detach()[finite].to(torch.float64)
        if self.center == "row":
            x = x - x.mean(1, keepdim=True)
        self.second_moment = self.second_moment + x.T @ x
        self.feature_sum = self.feature_sum + x.sum(0)
        self.count = self.count + len(x)

    def compute(self) -> dict[str, Tensor]:
        """``pca_rank``, ``effective_rank`` and ``stable_rank`` of all features seen."""
        if self.nonfinite > 0:
            return _warn_nonfinite(int(self.nonfinite))
        if self.num_features is None:
            self.spectrum = _gram_spectrum(dim_zero_cat(self.features), self.center)
        else:
            moment = self.second_moment
            if self.center == "column":
                mean = self.feature_sum / self.count.clamp_min(1)
                moment = moment - self.count * torch.outer(mean, mean)
            self.spectrum = _spectrum(moment)
        return _rank_measures(self.spectrum, self.threshold)
