"""Neural collapse (Papyan, Han & Donoho 2020) from streaming class statistics.

Conventions (all sums in fp64). Let ``P`` be the classes present in the data (``n_c > 0``) and
``C' = |P|``; classes with no sample are left out of every quantity (and out of ``C'``), so an empty
class never produces a NaN.

- class means ``mu_c``; global mean ``mu_G`` = unweighted mean of the class means (Papyan's code);
  centred means ``M = [mu_c - mu_G]`` (D x C').
- ``Sigma_W = 1/N sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T`` (population, N = all samples);
  ``Sigma_B = M M^T / C'``.
- ``nc1 = Tr(Sigma_W Sigma_B^+) / C'`` (Papyan's definition; his code omits ``/C``). With
  ``M M^T = sum_k lambda_k u_k u_k^T`` (from the smaller of the Grams ``M M^T``, ``M^T M``),
  ``nc1 = sum_k u_k^T Sigma_W u_k / lambda_k`` over ``lambda_k > rtol * lambda_max``: exact, with no D x D
  pseudo-inverse and only the diagonal of ``U^T Sigma_W U`` accumulated. If all class means coincide,
  ``nc1 = inf``.
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

Samples are rows: features (N, D) with labels (N,), or per-token features (N, T, D) with labels (N, T)
(every position a sample; Wu & Papyan 2024). ``ignore_index`` leaves rows out (e.g. -100, padding);
:func:`shift_labels` gives a causal language model's next-token classes. Memory O(C x D): see
:class:`NeuralCollapse`.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torchmetrics import Metric

from hildtools._checks import check_fraction, check_ignore_index, check_int, check_shape

_STAT_NAMES = ("counts", "sums", "squares", "scatter", "mismatches", "predicted", "nonfinite")
_TINY = torch.finfo(torch.float64).tiny
BLOCK_ELEMENTS = 2**20  # entries of the largest (rows x classes) temporary: distances to class means, class-pair Grams


class _Reference(NamedTuple):
    """Class means of a previous pass: the per-class shift and an orthonormal basis of the between-class span."""

    means: Tensor  # (C, D): shift r_c of class c (0 for absent classes)
    present: Tensor  # (C,) bool
    basis: Tensor  # (D, k), k = min(C, D): orthonormal u_j with M M^T = sum_j lambda_j u_j u_j^T (M: centred means)
    eigenvalues: Tensor  # (k,): lambda_j (0 for padding columns)
    spread: Tensor  # (): largest norm of a centred mean


def _make_reference(means: Tensor, present: Tensor) -> _Reference:
    """Reference of the class means: the eigenpairs of M M^T from the smaller of the D x D and C' x C' Grams of the
    present classes' centred means (cost O(D C' min(D, C'))), padded with zeros to k = min(C, D) columns."""
    means = torch.where(present[:, None], means, 0.0)
    num_classes, num_features = means.shape
    centred = (means[present] - means[present].mean(0)).T  # M: (D, C')
    if num_features <= centred.shape[1]:
        eigenvalues, basis = torch.linalg.eigh(centred @ centred.T)
    else:  # M = U S V^T: from M^T M = V S^2 V^T, u_j = M v_j / s_j
        eigenvalues, vectors = torch.linalg.eigh(centred.T @ centred)
        scale = torch.where(eigenvalues > 0, eigenvalues.clamp_min(_TINY).rsqrt(), 0.0)
        basis = centred @ vectors * scale
    k = min(num_classes, num_features)
    padded_basis, padded_values = means.new_zeros(num_features, k), means.new_zeros(k)
    padded_basis[:, : basis.shape[1]], padded_values[: len(eigenvalues)] = basis, eigenvalues.clamp_min(0)
    spread = centred.norm(dim=0).max() if centred.numel() else means.new_zeros(())
    return _Reference(means, present, padded_basis, padded_values, spread)


def _check_inputs(
    features: Tensor, labels: Tensor, num_classes: int, predictions: Tensor | None, validate: bool,
    ignore_index: int | None,
) -> None:  # fmt: skip
    if not isinstance(features, Tensor) or features.dim() < 2:
        shape = getattr(features, "shape", type(features))
        raise ValueError(f"`features` must be a (N, D) or (N, T, D) tensor, got {shape}")
    rows = tuple(features.shape[:-1])
    if not isinstance(labels, Tensor) or tuple(labels.shape) != rows:
        shape = getattr(labels, "shape", labels)
        raise ValueError(f"`labels` must be a {rows} tensor (features.shape[:-1]), got {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"`labels` must be an integer tensor, got {labels.dtype}")
    if predictions is not None and (
        not isinstance(predictions, Tensor) or tuple(predictions.shape) not in (rows, (*rows, num_classes))
    ):
        raise ValueError(
            f"`predictions` must be class indices {rows} or scores {(*rows, num_classes)},"
            f" got {getattr(predictions, 'shape', predictions)}"
        )
    kept = labels if ignore_index is None else labels[labels != ignore_index]
    if validate and kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= num_classes):
        ignored = "" if ignore_index is None else f" (or the ignore_index {ignore_index})"
        raise ValueError(
            f"`labels` must lie in [0, {num_classes}){ignored}, got values in [{int(kept.min())}, {int(kept.max())}]"
        )


def shift_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Next-token classes of a causal language model: ``out[..., t] = labels[..., t + 1]``, last position ignored.

    Hugging Face causal LMs take ``labels = input_ids`` and shift inside the model, so the class of position t
    (the token its hidden state predicts) is ``labels[t + 1]``; the last position predicts nothing seen.
    """
    shifted = torch.full_like(labels, ignore_index)
    shifted[..., :-1] = labels[..., 1:]
    return shifted


def _nearest_class(h: Tensor, reference: _Reference) -> Tensor:
    """Index of the nearest present reference class mean of each row, in row blocks (memory O(block x C'))."""
    classes = reference.present.nonzero().squeeze(1)  # only the C' present classes can be nearest
    means = reference.means[classes]
    block = max(1, BLOCK_ELEMENTS // max(1, len(classes)))
    nearest = [classes[(means.square().sum(1) - 2 * rows @ means.T).argmin(1)] for rows in h.split(block)]
    return torch.cat(nearest) if nearest else h.new_zeros(0, dtype=torch.long)


def _neural_collapse_update(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    reference: _Reference | None = None,
    predictions: Tensor | None = None,
    ignore_index: int | None = None,
    stats: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Sufficient statistics of one batch, in fp64, shifted by the reference class means, added in place to
    ``stats`` (e.g. a Metric's states: no per-batch (C, D) temporaries) or to new zeros.

    ``features`` (..., D) with ``labels`` (...) are taken row by row (token positions included); rows labelled
    ``ignore_index`` contribute nothing; rows with a NaN/inf feature contribute nothing and are counted in
    ``nonfinite``.

    Returns:
        ``counts`` (C,), ``sums`` (C, D) of ``h - r_y``, ``squares`` (C,) of ``||h - r_y||^2``,
        ``scatter`` (k,) = sum of ``(u_j^T (h - r_y))^2`` over the reference basis (zero without a reference),
        ``mismatches`` and ``predicted`` (NCC vs prediction disagreements, rows compared) and
        ``nonfinite`` (labelled rows skipped).
    """
    h = features.detach().reshape(-1, features.shape[-1])
    labels = labels.reshape(-1).to(h.device, torch.long)
    finite = torch.isfinite(h).all(dim=1)
    labelled = labels != ignore_index if ignore_index is not None else torch.ones_like(finite)
    kept = finite & labelled
    labels = torch.where(labelled, labels, 0)
    h = torch.where(kept[:, None], h.to(torch.float64), 0.0)
    shift = reference.means[labels] if reference is not None else torch.zeros_like(h)
    diff = torch.where(kept[:, None], h - shift, 0.0)
    weight = kept.to(torch.float64)
    if stats is None:
        stats = _zero_stats(num_classes, h.shape[1], h.device)

    stats["counts"].index_add_(0, labels, weight)
    stats["sums"].index_add_(0, labels, diff)
    stats["squares"].index_add_(0, labels, diff.square().sum(1))
    stats["nonfinite"] += (~finite & labelled).sum()
    if reference is not None:
        stats["scatter"] += (diff @ reference.basis).square().sum(0)
        if predictions is not None:
            scores = predictions.dim() == features.dim()  # (..., C) scores, else (...) class indices
            predicted = (predictions.argmax(-1) if scores else predictions).reshape(-1).to(h.device)
            stats["mismatches"] += ((_nearest_class(h, reference) != predicted) & kept).sum()
            stats["predicted"] += weight.sum()
    return stats


def _zero_stats(num_classes: int, num_features: int, device: torch.device | None = None) -> dict[str, Tensor]:
    """Empty fp64 statistics: counts, sums, squares, scatter (k = min(C, D)), mismatches, predicted, nonfinite."""
    shapes = {
        "counts": (num_classes,),
        "sums": (num_classes, num_features),
        "squares": (num_classes,),
        "scatter": (min(num_classes, num_features),),
        "mismatches": (),
        "predicted": (),
        "nonfinite": (),
    }
    return {name: torch.zeros(shapes[name], dtype=torch.float64, device=device) for name in _STAT_NAMES}


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


def _pair_statistics(centred: Tensor, variances: Tensor) -> dict[str, Tensor]:
    """NC2 angles and CDNV over the pairs c < c' of centred class means (C', D), in row blocks of the Gram.

    Memory O(block x C') instead of O(C'^2); the std of the cosines merges the blocks' means and squared
    deviations (Chan et al.), so it does not cancel when the cosines are nearly equal.
    """
    num = centred.shape[0]
    squared = centred.square().sum(1)
    norms = squared.sqrt()
    block = max(1, BLOCK_ELEMENTS // num)
    count, mean, deviations = 0, centred.new_zeros(()), centred.new_zeros(())
    angle_sum, cdnv_sum = centred.new_zeros(()), centred.new_zeros(())
    columns = torch.arange(num, device=centred.device)
    for start in range(0, num - 1, block):
        rows = columns[start : start + block]
        gram = centred[rows] @ centred.T
        upper = columns[None, :] > rows[:, None]
        cosines = (gram / (norms[rows, None] * norms[None, :]).clamp_min(_TINY))[upper]
        distances = (squared[rows, None] + squared[None, :] - 2 * gram).clamp_min(0)[upper]
        pair_variances = (variances[rows, None] + variances[None, :])[upper]
        block_mean = cosines.mean()
        block_deviations = (cosines - block_mean).square().sum()
        total = count + cosines.numel()
        delta = block_mean - mean
        deviations = deviations + block_deviations + delta.square() * count * cosines.numel() / total
        mean, count = mean + delta * cosines.numel() / total, total
        angle_sum = angle_sum + (cosines + 1 / (num - 1)).abs().sum()
        cdnv_sum = cdnv_sum + (pair_variances / (2 * distances).clamp_min(_TINY)).sum()
    return {
        "nc2_equiangular": (deviations / count).sqrt(),
        "nc2_max_angle": angle_sum / count,
        "cdnv": cdnv_sum / count,
    }


def _nc1(stats: dict[str, Tensor], reference: _Reference, present: Tensor, rtol: float) -> Tensor:
    """Tr(Sigma_W Sigma_B^+)/C' = sum_j u_j^T Sigma_W u_j / lambda_j over the reference basis (lambda_j > rtol max)."""
    counts, offsets = stats["counts"][present], stats["sums"][present] / stats["counts"][present, None]
    projected_offsets = offsets @ reference.basis  # (C', k): u_j^T (mu_c - r_c)
    within = (stats["scatter"] - (counts[:, None] * projected_offsets.square()).sum(0)) / counts.sum()
    eigenvalues = reference.eigenvalues
    if eigenvalues.max() <= 0:
        return within.new_tensor(float("inf"))
    kept = eigenvalues > rtol * eigenvalues.max()
    return (within[kept] / eigenvalues[kept]).sum()


def _reference_matches(stats: dict[str, Tensor], reference: _Reference, present: Tensor) -> bool:
    """True when the reference means are this pass's class means (a second pass over the same data)."""
    if not torch.equal(present, reference.present):
        return False
    offsets = stats["sums"][present] / stats["counts"][present, None]
    return bool(offsets.norm(dim=1).max() <= 1e-6 * reference.spread)


def _neural_collapse_compute(
    stats: dict[str, Tensor],
    reference: _Reference | None,
    classifier_weight: Tensor | None = None,
    rtol: float = 1e-10,
) -> dict[str, Tensor]:
    """Neural-collapse measures from accumulated statistics (see the module docstring)."""
    if stats["nonfinite"] > 0:
        warnings.warn(f"neural collapse skipped: {int(stats['nonfinite'])} feature rows contain NaN/inf", stacklevel=3)
        return {}
    present = stats["counts"] > 0
    num_present = int(present.sum())
    result = {"num_classes_present": stats["counts"].new_tensor(float(num_present))}
    if num_present < 2:
        warnings.warn(f"neural collapse needs samples of >= 2 classes, got {num_present}", stacklevel=3)
        return result

    counts = stats["counts"][present]
    offsets = stats["sums"][present] / counts[:, None]  # class means minus the reference shift
    means = offsets + reference.means[present] if reference is not None else offsets
    centred = means - means.mean(0)
    variances = (stats["squares"][present] / counts - offsets.square().sum(1)).clamp_min(0)

    result["nc2_equinorm"] = _std_over_mean(centred.norm(dim=1))
    result.update(_pair_statistics(centred, variances))
    if classifier_weight is not None:
        weight = classifier_weight.detach().to(means.device, torch.float64)
        check_shape("classifier_weight", weight, (present.numel(), means.shape[1]))
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
    ignore_index: int | None = None,
) -> dict[str, Tensor]:
    """Neural-collapse measures NC1-NC4 and CDNV of one set of features (two passes over it).

    Conventions are in the module docstring: population covariances, global mean = mean of the
    class means, ``nc1 = Tr(Sigma_W Sigma_B^+)/C'`` over the classes present.

    Args:
        features: (N, D) features, e.g. the input of the final classifier layer, or (N, T, D) per-token
            features (every position is a sample).
        labels: (N,) or (N, T) integer class labels in [0, num_classes) (see :func:`shift_labels` for
            next-token classes of a causal language model).
        num_classes: number of classes C (>= 2).
        classifier_weight: optional (C, D) classifier weight (no bias); adds ``nc3`` and
            ``nc2_equinorm_weights``.
        predictions: optional class indices shaped like ``labels`` or scores (``labels.shape + (C,)``) of the
            model; adds ``nc4``.
        rtol: eigenvalues of the Gram of centred class means below ``rtol`` times the largest are
            treated as zero in the pseudo-inverse of Sigma_B.
        ignore_index: label of samples to leave out (e.g. -100, Hugging Face's padding label), or None.

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
    check_int("num_classes", num_classes, 2)
    check_fraction("rtol", rtol)
    check_ignore_index(ignore_index, num_classes)
    _check_inputs(features, labels, num_classes, predictions, True, ignore_index)
    first = _neural_collapse_update(features, labels, num_classes, ignore_index=ignore_index)
    if first["nonfinite"] > 0:
        return _neural_collapse_compute(first, None)
    reference = _make_reference(*_class_means(first, None))
    second = _neural_collapse_update(features, labels, num_classes, reference, predictions, ignore_index)
    return _neural_collapse_compute(second, reference, classifier_weight, rtol)


class NeuralCollapse(Metric):
    """Streaming, DDP-synchronised neural-collapse measures (NC1-NC4, CDNV).

    ``update(features, labels, predictions=None)`` accumulates per-class counts, sums and squared
    norms in fp64, shifted by the class means of the previous pass (so the variance does not
    cancel catastrophically when the classes collapse), and, once a reference exists, the
    within-class scatter projected on the between-class span and the nearest-class-centre
    disagreements. Every state is a sum (``dist_reduce_fx="sum"``).

    Memory is O(C x D) (the per-class sums and the reference means; the between-class basis is D x min(C, D)),
    so vocabulary-sized C works: C = 50,257 classes of D = 768 features take 2 x 0.3 GB in fp64. ``update``
    streams: features of any leading shape (e.g. (N, T, D) token positions) are taken row by row, and the
    (rows x C') distances of NC4 and the (C' x C') class-pair Grams of ``compute`` are formed in blocks of
    :data:`BLOCK_ELEMENTS` entries (C' = classes present). Time per pass O(rows x D x min(C, D)), plus
    O(rows x C' x D) for NC4; ``compute`` O(C'^2 x D).

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
        ignore_index: label of rows to leave out (e.g. -100 for padding and the last position of a causal
            LM, see :func:`shift_labels`), or None; must not be a class index.
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
        ignore_index: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_int("num_classes", num_classes, 2)
        check_int("num_features", num_features, 1)
        check_fraction("rtol", rtol)
        check_ignore_index(ignore_index, num_classes)
        if classifier_weight is not None:
            check_shape("classifier_weight", classifier_weight, (num_classes, num_features))
        self.num_classes, self.num_features = num_classes, num_features
        self.classifier_weight = classifier_weight.detach() if classifier_weight is not None else None
        self.rtol = rtol
        self.validate_args = validate_args
        self.ignore_index = ignore_index
        c, k = num_classes, min(num_classes, num_features)  # reference buffers: means (C, D), basis (D, k)
        for name, zeros in _zero_stats(num_classes, num_features).items():
            self.add_state(name, zeros, dist_reduce_fx="sum")
        empty = _Reference(
            torch.zeros(c, num_features, dtype=torch.float64), torch.zeros(c, dtype=torch.bool),
            torch.zeros(num_features, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64),
            torch.zeros((), dtype=torch.float64),
        )  # fmt: skip
        for name, value in empty._asdict().items():
            self.register_buffer(f"reference_{name}", value, persistent=False)

    def _reference(self) -> _Reference | None:
        if not bool(self.reference_present.any()):
            return None
        return _Reference(*(getattr(self, f"reference_{name}") for name in _Reference._fields))

    def update(self, features: Tensor, labels: Tensor, predictions: Tensor | None = None) -> None:
        """Accumulate features (N, D) or (N, T, D) with labels (N,) or (N, T) and optional model predictions."""
        _check_inputs(features, labels, self.num_classes, predictions, self.validate_args, self.ignore_index)
        if features.shape[-1] != self.num_features:
            raise ValueError(f"`features` must have {self.num_features} columns, got {features.shape[-1]}")
        _neural_collapse_update(
            features, labels, self.num_classes, self._reference(), predictions, self.ignore_index, self._stats()
        )

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
        for name, value in _make_reference(means, present)._asdict().items():
            setattr(self, f"reference_{name}", value)

    def compute(self) -> dict[str, Tensor]:
        """Neural-collapse measures of the accumulated statistics (see the class docstring)."""
        return _neural_collapse_compute(self._stats(), self._reference(), self.classifier_weight, self.rtol)
