"""Neural collapse (Papyan, Han & Donoho 2020) from streaming class statistics.

Conventions (all sums in fp64). Let ``P`` be the classes present in the data (``n_c > 0``) and
``C' = |P|``; classes with no sample are left out of every quantity (and out of ``C'``), so an empty
class never produces a NaN.

- class means ``mu_c``; global mean ``mu_G`` = unweighted mean of the class means (Papyan's code);
  centred means ``M = [mu_c - mu_G]`` (D x C').
- ``Sigma_W = 1/N sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T`` (population, N = all samples);
  ``Sigma_B = M M^T / C'``.
- ``nc1 = Tr(Sigma_W Sigma_B^+) / C'`` (Papyan's definition; his code omits ``/C``). ``Sigma_B`` has
  rank <= C'-1, so ``nc1 = sum_k v_k^T (M^T Sigma_W M) v_k / lambda_k^2`` over the eigenpairs
  ``(lambda_k, v_k)`` of the C' x C' Gram ``M^T M`` with ``lambda_k > rtol * lambda_max``: exact,
  with no D x D pseudo-inverse. If all class means coincide, ``nc1 = inf``.
- ``nc2_equinorm`` = std_c ||mu_c - mu_G|| / mean_c ||mu_c - mu_G||; ``nc2_equinorm_weights`` the
  same for the classifier rows ``w_c``.
- ``nc2_equiangular`` = std over pairs c < c' of cos(mu_c - mu_G, mu_c' - mu_G); ``nc2_max_angle``
  = mean over pairs of |cos + 1/(C'-1)| (0 for a simplex equiangular tight frame).
  Every std is the population std (ddof=0); Papyan's code uses ddof=1 (multiply by sqrt(k/(k-1))).
- ``nc3 = || W/||W||_F - M^T/||M||_F ||_F^2`` (squared, as in Papyan's code; W is C x D without
  bias, rows of absent classes dropped); in [0, 4].
- ``nc4`` = fraction of samples whose nearest class mean (Euclidean, present classes) differs from
  the model's prediction.
- ``cdnv`` = mean over pairs c < c' of (sigma_c^2 + sigma_c'^2) / (2 ||mu_c - mu_c'||^2) with
  ``sigma_c^2 = mean_{i in c} ||h_i - mu_c||^2`` (Galanti et al. 2022).

``nc1`` and ``nc4`` need the class means before they can look at the samples, so they come from a
second pass over the same data (see :class:`NeuralCollapse`); :func:`neural_collapse` makes both
passes over an in-memory tensor.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torchmetrics import Metric

_STAT_NAMES = ("counts", "sums", "squares", "scatter", "mismatches", "predicted", "nonfinite")
_TINY = torch.finfo(torch.float64).tiny


class _Reference(NamedTuple):
    """Class means of a previous pass: the per-class shift and the basis of the between-class span."""

    means: Tensor  # (C, D): shift r_c of class c (0 for absent classes)
    present: Tensor  # (C,) bool
    basis: Tensor  # (D, C): centred means r_c - r_G, zero columns for absent classes


def _make_reference(means: Tensor, present: Tensor) -> _Reference:
    means = torch.where(present[:, None], means, 0.0)
    centre = means[present].mean(0) if bool(present.any()) else means.new_zeros(means.shape[1])
    basis = torch.where(present[:, None], means - centre, 0.0).T
    return _Reference(means, present, basis)


def _check_num_classes(num_classes: Any) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}")


def _check_rtol(rtol: Any) -> None:
    if not isinstance(rtol, (int, float)) or not 0 < rtol < 1:
        raise ValueError(f"`rtol` must be a float in (0, 1), got {rtol!r}")


def _check_inputs(
    features: Tensor, labels: Tensor, num_classes: int, predictions: Tensor | None, validate: bool
) -> None:
    if not isinstance(features, Tensor) or features.dim() != 2:
        raise ValueError(f"`features` must be a (N, D) tensor, got {getattr(features, 'shape', type(features))}")
    if not isinstance(labels, Tensor) or labels.shape != features.shape[:1]:
        raise ValueError(f"`labels` must be a ({features.shape[0]},) tensor, got {getattr(labels, 'shape', labels)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"`labels` must be an integer tensor, got {labels.dtype}")
    if predictions is not None and (
        not isinstance(predictions, Tensor)
        or predictions.shape not in (labels.shape, (labels.shape[0], num_classes))
    ):
        raise ValueError(
            f"`predictions` must be class indices ({labels.shape[0]},) or scores ({labels.shape[0]}, {num_classes}),"
            f" got {getattr(predictions, 'shape', predictions)}"
        )
    if validate and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"`labels` must lie in [0, {num_classes}), got values in [{int(labels.min())}, {int(labels.max())}]"
        )


def _neural_collapse_update(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    reference: _Reference | None = None,
    predictions: Tensor | None = None,
) -> dict[str, Tensor]:
    """Sufficient statistics of one batch, in fp64, shifted by the reference class means.

    Rows with a NaN/inf feature contribute nothing and are counted in ``nonfinite``.

    Returns:
        ``counts`` (C,), ``sums`` (C, D) of ``h - r_y``, ``squares`` (C,) of ``||h - r_y||^2``,
        ``scatter`` (C, C) = sum of ``p p^T`` with ``p = B^T (h - r_y)`` (zero without a reference),
        ``mismatches`` and ``predicted`` (NCC vs prediction disagreements, rows compared) and
        ``nonfinite`` (rows skipped).
    """
    finite = torch.isfinite(features.detach()).all(dim=1)
    h = features.detach().to(torch.float64)
    labels = labels.to(h.device, torch.long)
    shift = reference.means[labels] if reference is not None else torch.zeros_like(h)
    diff = torch.where(finite[:, None], h - shift, 0.0)
    weight = finite.to(torch.float64)

    stats = {
        "counts": h.new_zeros(num_classes).index_add_(0, labels, weight),
        "sums": h.new_zeros(num_classes, h.shape[1]).index_add_(0, labels, diff),
        "squares": h.new_zeros(num_classes).index_add_(0, labels, diff.square().sum(1)),
        "scatter": h.new_zeros(num_classes, num_classes),
        "mismatches": h.new_zeros(()),
        "predicted": h.new_zeros(()),
        "nonfinite": (~finite).sum().to(torch.float64),
    }
    if reference is not None:
        projected = diff @ reference.basis
        stats["scatter"] = projected.T @ projected
        if predictions is not None:
            predicted = predictions.argmax(-1) if predictions.dim() == 2 else predictions
            safe_h = torch.where(finite[:, None], h, 0.0)
            distances = reference.means.square().sum(1) - 2 * safe_h @ reference.means.T
            nearest = distances.masked_fill(~reference.present, float("inf")).argmin(1)
            stats["mismatches"] = ((nearest != predicted.to(h.device)) & finite).sum().to(torch.float64)
            stats["predicted"] = weight.sum()
    return stats


def _class_means(stats: dict[str, Tensor], reference: _Reference | None) -> tuple[Tensor, Tensor]:
    """Class means (C, D) and the mask of present classes from accumulated statistics."""
    counts = stats["counts"]
    present = counts > 0
    means = stats["sums"] / counts.clamp_min(1)[:, None]
    if reference is not None:
        means = means + reference.means
    return torch.where(present[:, None], means, 0.0), present


def _std_over_mean(values: Tensor) -> Tensor:
    return values.std(correction=0) / values.mean().clamp_min(_TINY)


def _pairs(matrix: Tensor) -> Tensor:
    """Strict upper triangle of a square matrix as a vector (the pairs c < c')."""
    rows, cols = torch.triu_indices(*matrix.shape, offset=1, device=matrix.device)
    return matrix[rows, cols]


def _nc1(stats: dict[str, Tensor], reference: _Reference, present: Tensor, rtol: float) -> Tensor:
    """Tr(Sigma_W Sigma_B^+)/C' from the scatter projected on the reference's between-class span."""
    counts, offsets = stats["counts"][present], stats["sums"][present] / stats["counts"][present, None]
    basis = reference.basis[:, present]
    projected_offsets = offsets @ basis
    within = stats["scatter"][present][:, present] - (counts[:, None] * projected_offsets).T @ projected_offsets
    within = within / counts.sum()  # B^T Sigma_W B
    gram_values, gram_vectors = torch.linalg.eigh(basis.T @ basis)  # B^T B = V diag(lambda) V^T
    if gram_values[-1] <= 0:
        return within.new_tensor(float("inf"))
    kept = gram_values > rtol * gram_values[-1]
    values, vectors = gram_values[kept], gram_vectors[:, kept]
    return ((vectors * (within @ vectors)).sum(0) / values.square()).sum()


def _reference_matches(stats: dict[str, Tensor], reference: _Reference, present: Tensor) -> bool:
    """True when the reference means are this pass's class means (a second pass over the same data)."""
    if not torch.equal(present, reference.present):
        return False
    offsets = stats["sums"][present] / stats["counts"][present, None]
    spread = reference.basis.norm(dim=0).max()
    return bool(offsets.norm(dim=1).max() <= 1e-6 * spread)


def _neural_collapse_compute(
    stats: dict[str, Tensor],
    reference: _Reference | None,
    classifier_weight: Tensor | None = None,
    rtol: float = 1e-10,
) -> dict[str, Tensor]:
    """Neural-collapse measures from accumulated statistics (see the module docstring)."""
    if stats["nonfinite"] > 0:
        warnings.warn(
            f"neural collapse skipped: {int(stats['nonfinite'])} feature rows contain NaN/inf", stacklevel=3
        )
        return {}
    means, present = _class_means(stats, reference)
    num_present = int(present.sum())
    result = {"num_classes_present": stats["counts"].new_tensor(float(num_present))}
    if num_present < 2:
        warnings.warn(f"neural collapse needs samples of >= 2 classes, got {num_present}", stacklevel=3)
        return result

    counts = stats["counts"][present]
    means = means[present]
    centred = means - means.mean(0)
    gram = centred @ centred.T
    norms = gram.diagonal().sqrt()
    cosines = _pairs(gram / (norms[:, None] * norms[None, :]).clamp_min(_TINY))
    mean_distances = _pairs(gram.diagonal()[:, None] + gram.diagonal()[None, :] - 2 * gram).clamp_min(0)
    offsets = stats["sums"][present] / counts[:, None]
    variances = (stats["squares"][present] / counts - offsets.square().sum(1)).clamp_min(0)
    pair_variances = _pairs(variances[:, None] + variances[None, :])

    result["nc2_equinorm"] = _std_over_mean(norms)
    result["nc2_equiangular"] = cosines.std(correction=0)
    result["nc2_max_angle"] = (cosines + 1 / (num_present - 1)).abs().mean()
    result["cdnv"] = (pair_variances / (2 * mean_distances).clamp_min(_TINY)).mean()
    if classifier_weight is not None:
        weight = classifier_weight.detach().to(means.device, torch.float64)
        if weight.shape != (present.numel(), means.shape[1]):
            raise ValueError(
                f"`classifier_weight` must have shape ({present.numel()}, {means.shape[1]}),"
                f" got {tuple(weight.shape)}"
            )
        weight = weight[present]
        result["nc2_equinorm_weights"] = _std_over_mean(weight.norm(dim=1))
        unit_weight = weight / weight.norm().clamp_min(_TINY)
        result["nc3"] = (unit_weight - centred / centred.norm().clamp_min(_TINY)).square().sum()
    if reference is not None and _reference_matches(stats, reference, present):
        result["nc1"] = _nc1(stats, reference, present, rtol)
        if stats["predicted"] > 0:
            result["nc4"] = stats["mismatches"] / stats["predicted"]
    return result


def neural_collapse(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    classifier_weight: Tensor | None = None,
    predictions: Tensor | None = None,
    rtol: float = 1e-10,
) -> dict[str, Tensor]:
    """Neural-collapse measures NC1-NC4 and CDNV of one set of features (two passes over it).

    Conventions are in the module docstring: population covariances, global mean = mean of the
    class means, ``nc1 = Tr(Sigma_W Sigma_B^+)/C'`` over the classes present.

    Args:
        features: (N, D) features, e.g. the input of the final classifier layer.
        labels: (N,) integer class labels in [0, num_classes).
        num_classes: number of classes C (>= 2).
        classifier_weight: optional (C, D) classifier weight (no bias); adds ``nc3`` and
            ``nc2_equinorm_weights``.
        predictions: optional (N,) predicted classes or (N, C) scores of the model; adds ``nc4``.
        rtol: eigenvalues of the Gram of centred class means below ``rtol`` times the largest are
            treated as zero in the pseudo-inverse of Sigma_B.

    Returns:
        Dict of fp64 scalars: ``nc1``, ``nc2_equinorm``, ``nc2_equiangular``, ``nc2_max_angle``,
        ``cdnv``, ``num_classes_present`` (+ ``nc3``, ``nc2_equinorm_weights``, ``nc4`` when their
        inputs are given). Empty, with a warning, when a feature is NaN/inf; only
        ``num_classes_present`` when fewer than 2 classes have samples.

    Raises:
        ValueError: on bad shapes, labels outside [0, num_classes) or bad ``num_classes``/``rtol``.
        TypeError: when ``labels`` is not an integer tensor.

    Example:
        >>> etf = torch.eye(3) - 1 / 3  # exact simplex ETF: perfect collapse
        >>> out = neural_collapse(etf.repeat(4, 1), torch.arange(3).repeat(4), num_classes=3)
        >>> [round(out[k].item(), 6) for k in ("nc1", "nc2_equinorm", "nc2_max_angle")]
        [0.0, 0.0, 0.0]
    """
    _check_num_classes(num_classes)
    _check_rtol(rtol)
    _check_inputs(features, labels, num_classes, predictions, validate=True)
    first = _neural_collapse_update(features, labels, num_classes)
    if first["nonfinite"] > 0:
        return _neural_collapse_compute(first, None)
    reference = _make_reference(*_class_means(first, None))
    second = _neural_collapse_update(features, labels, num_classes, reference, predictions)
    return _neural_collapse_compute(second, reference, classifier_weight, rtol)


class NeuralCollapse(Metric):
    """Streaming, DDP-synchronised neural-collapse measures (NC1-NC4, CDNV).

    ``update(features, labels, predictions=None)`` accumulates per-class counts, sums and squared
    norms in fp64, shifted by the class means of the previous pass (so the variance does not
    cancel catastrophically when the classes collapse), and, once a reference exists, the
    within-class scatter projected on the between-class span and the nearest-class-centre
    disagreements. Every state is a sum (``dist_reduce_fx="sum"``); memory is O(C x D + C^2).

    One pass gives ``nc2_*``, ``nc3`` and ``cdnv``. ``nc1`` and ``nc4`` need the class means first:
    call :meth:`start_second_pass` after the first pass and run ``update`` again over the same data;
    ``compute`` then reports them as well. They are reported only when the reference means equal
    the class means of the pass (to 1e-6 relative), so they are never computed against stale means.
    Conventions: see :mod:`hildtools.metrics.neural_collapse`. Rows with NaN/inf features are
    skipped and make ``compute`` return ``{}`` with a warning.

    Args:
        num_classes: number of classes C (>= 2).
        num_features: feature dimension D (>= 1).
        classifier_weight: optional (C, D) classifier weight (kept by reference, so a live
            ``model.fc.weight`` is read at ``compute`` time).
        rtol: relative eigenvalue cut-off of the pseudo-inverse of Sigma_B.
        validate_args: check that labels lie in [0, C) (a host sync per ``update``).
        kwargs: torchmetrics ``Metric`` keyword arguments.

    Raises:
        ValueError: on bad constructor arguments or bad inputs to ``update``.

    Example:
        >>> from hildtools.metrics import NeuralCollapse
        >>> features, labels = torch.eye(3).repeat(4, 1), torch.arange(3).repeat(4)
        >>> metric = NeuralCollapse(num_classes=3, num_features=3)
        >>> metric.update(features, labels)
        >>> metric.start_second_pass()
        >>> metric.update(features, labels, predictions=labels)
        >>> sorted(metric.compute())[:4]
        ['cdnv', 'nc1', 'nc2_equiangular', 'nc2_equinorm']
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    counts: Tensor
    sums: Tensor
    squares: Tensor
    scatter: Tensor
    mismatches: Tensor
    predicted: Tensor
    nonfinite: Tensor

    def __init__(
        self,
        num_classes: int,
        num_features: int,
        classifier_weight: Tensor | None = None,
        rtol: float = 1e-10,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_num_classes(num_classes)
        _check_rtol(rtol)
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"`num_features` must be a positive integer, got {num_features!r}")
        if classifier_weight is not None and (
            not isinstance(classifier_weight, Tensor) or classifier_weight.shape != (num_classes, num_features)
        ):
            raise ValueError(f"`classifier_weight` must be a ({num_classes}, {num_features}) tensor")
        self.num_classes, self.num_features = num_classes, num_features
        self.classifier_weight = classifier_weight.detach() if classifier_weight is not None else None
        self.rtol = rtol
        self.validate_args = validate_args
        c = num_classes
        zeros = {"counts": (c,), "sums": (c, num_features), "squares": (c,), "scatter": (c, c)}
        zeros.update(mismatches=(), predicted=(), nonfinite=())
        for name in _STAT_NAMES:
            self.add_state(name, torch.zeros(zeros[name], dtype=torch.float64), dist_reduce_fx="sum")
        self.register_buffer("reference_means", torch.zeros(c, num_features, dtype=torch.float64), persistent=False)
        self.register_buffer("reference_present", torch.zeros(c, dtype=torch.bool), persistent=False)

    def _reference(self) -> _Reference | None:
        if not bool(self.reference_present.any()):
            return None
        return _make_reference(self.reference_means.to(torch.float64), self.reference_present)

    def update(self, features: Tensor, labels: Tensor, predictions: Tensor | None = None) -> None:
        """Accumulate a batch of (N, D) features with (N,) labels and optional model predictions."""
        _check_inputs(features, labels, self.num_classes, predictions, self.validate_args)
        if features.shape[1] != self.num_features:
            raise ValueError(f"`features` must have {self.num_features} columns, got {features.shape[1]}")
        batch = _neural_collapse_update(features, labels, self.num_classes, self._reference(), predictions)
        for name in _STAT_NAMES:
            setattr(self, name, getattr(self, name) + batch[name])

    def _stats(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in _STAT_NAMES}

    def start_second_pass(self) -> None:
        """Keep the class means seen so far (synchronised across processes) as the reference, then reset.

        Call it on every rank between two passes over the same data; the next pass adds ``nc1`` and
        ``nc4`` to ``compute``.
        """
        sync = self.sync_on_compute  # public: as compute() syncs
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=sync, should_unsync=True):
            means, present = _class_means(self._stats(), self._reference())
        self.reset()
        self.reference_means, self.reference_present = means, present

    def compute(self) -> dict[str, Tensor]:
        """Neural-collapse measures of the accumulated statistics (see the class docstring)."""
        return _neural_collapse_compute(self._stats(), self._reference(), self.classifier_weight, self.rtol)
