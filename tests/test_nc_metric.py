"""Neural collapse: functional and Metric forms against a dense fp64 reference and closed forms."""

import itertools
import math

import pytest
import torch

from hildtools.metrics import NeuralCollapse, neural_collapse


def simplex_etf(num_classes, dim, norm=1.0, seed=0):
    """(C, D) class means forming a simplex ETF of the given norm, in a random C-dim subspace."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, num_classes, generator=generator, dtype=torch.float64))
    centred = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    return norm * math.sqrt(num_classes / (num_classes - 1)) * centred @ basis.T


def planted(num_classes=6, dim=20, per_class=50, sigma=0.3, norm=1.0, offset=0.0, seed=0):
    generator = torch.Generator().manual_seed(seed + 1)
    means = simplex_etf(num_classes, dim, norm, seed) + offset
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    noise = sigma * torch.randn(len(labels), dim, generator=generator, dtype=torch.float64)
    return means[labels] + noise, labels


def dense_reference(features, labels, classifier_weight=None, predictions=None):
    """Papyan's measures with explicit D x D covariances, a pinv and loops over pairs (fp64)."""
    h = features.double()
    classes = sorted(set(labels.tolist()))
    means = torch.stack([h[labels == c].mean(0) for c in classes])
    centred = means - means.mean(0)
    residual = h - means[[classes.index(c) for c in labels.tolist()]]
    sigma_w = residual.T @ residual / len(h)
    sigma_b = centred.T @ centred / len(classes)
    nc1 = torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, hermitian=True, rtol=1e-10)) / len(classes)
    norms = centred.norm(dim=1)
    pairs = list(itertools.combinations(range(len(classes)), 2))
    cosines = torch.stack([centred[a] @ centred[b] / (norms[a] * norms[b]) for a, b in pairs])
    variances = [(residual[labels == c].square().sum(1)).mean() for c in classes]
    cdnv = torch.stack(
        [(variances[a] + variances[b]) / (2 * (means[a] - means[b]).square().sum()) for a, b in pairs]
    ).mean()
    result = {
        "nc1": nc1,
        "nc2_equinorm": norms.std(correction=0) / norms.mean(),
        "nc2_equiangular": cosines.std(correction=0),
        "nc2_max_angle": (cosines + 1 / (len(classes) - 1)).abs().mean(),
        "cdnv": cdnv,
    }
    if classifier_weight is not None:
        w = classifier_weight.double()[classes]
        result["nc3"] = ((w / w.norm() - centred / centred.norm()) ** 2).sum()
        result["nc2_equinorm_weights"] = w.norm(dim=1).std(correction=0) / w.norm(dim=1).mean()
    if predictions is not None:
        nearest = torch.tensor([classes[int(torch.cdist(row[None], means).argmin())] for row in h])
        result["nc4"] = (nearest != predictions).double().mean()
    return result


def assert_close_dicts(actual, expected, rtol=1e-10, atol=1e-12):
    assert set(expected) <= set(actual)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value.double(), rtol=rtol, atol=atol, msg=key)


def test_matches_dense_reference():
    features, labels = planted(sigma=0.5, seed=3)
    weight = torch.randn(6, 20, dtype=torch.float64)
    predictions = torch.randint(0, 6, labels.shape, generator=torch.Generator().manual_seed(0))
    predictions[::2] = labels[::2]
    result = neural_collapse(features, labels, 6, classifier_weight=weight, predictions=predictions)
    assert_close_dicts(result, dense_reference(features, labels, weight, predictions))
    assert 0 < result["nc4"] < 1


def test_large_sample_limit_of_nc1():
    """ETF means of norm rho plus isotropic noise: Sigma_B has C-1 eigenvalues rho^2/(C-1), so
    Tr(Sigma_W Sigma_B^+)/C = sigma^2 (C-1)^2 / (C rho^2)."""
    num_classes, sigma, rho = 5, 0.2, 2.0
    features, labels = planted(num_classes, dim=8, per_class=4000, sigma=sigma, norm=rho, seed=1)
    result = neural_collapse(features, labels, num_classes)
    expected = sigma**2 * (num_classes - 1) ** 2 / (num_classes * rho**2)
    assert result["nc1"].item() == pytest.approx(expected, rel=0.03)
    assert_close_dicts(result, dense_reference(features, labels))


def test_exact_etf_gives_zero():
    means = simplex_etf(7, 12, norm=3.0)
    labels = torch.arange(7).repeat(3)
    result = neural_collapse(means[labels], labels, 7, classifier_weight=means, predictions=labels)
    for key in (
        "nc1",
        "nc2_equinorm",
        "nc2_equiangular",
        "nc2_max_angle",
        "nc2_equinorm_weights",
        "nc3",
        "nc4",
        "cdnv",
    ):
        assert abs(result[key].item()) < 1e-12, key


def test_nc3_of_aligned_classifier_and_invariances():
    features, labels = planted(seed=5, offset=4.0)  # large common offset: cancellation-prone
    means = torch.stack([features[labels == c].mean(0) for c in range(6)])
    aligned = 2.5 * (means - means.mean(0))
    assert neural_collapse(features, labels, 6, classifier_weight=aligned)["nc3"].item() < 1e-20
    rotation, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    base = neural_collapse(features, labels, 6)
    rotated = neural_collapse(features @ rotation, labels, 6)
    assert_close_dicts(rotated, base, rtol=1e-9)


def test_collapsed_features_far_from_origin_keep_their_variance():
    """Within-class variance 1e-18 of ||h||^2: the naive one-pass fp64 formula loses it, the shifted one does not."""
    features, labels = planted(sigma=1e-5, offset=1e4, seed=2)
    naive = (features[labels == 0].square().sum(1).mean() - features[labels == 0].mean(0).square().sum()).item()
    true = (features[labels == 0] - features[labels == 0].mean(0)).square().sum(1).mean().item()
    assert abs(naive - true) > 0.5 * true
    result = neural_collapse(features, labels, 6)
    assert_close_dicts(result, dense_reference(features, labels), rtol=1e-6)


def test_streaming_in_shuffled_batches_equals_one_shot():
    features, labels = planted(seed=7)
    weight = torch.randn(6, 20, dtype=torch.float64)
    predictions = (features @ weight.T).argmax(1)
    one_shot = neural_collapse(features, labels, 6, classifier_weight=weight, predictions=predictions)
    metric = NeuralCollapse(6, 20, classifier_weight=weight)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        order = torch.randperm(len(labels), generator=generator)
        for chunk in order.split(37):
            metric.update(features[chunk].float(), labels[chunk], predictions=predictions[chunk])
        if "nc1" not in metric.compute():
            metric.start_second_pass()
    streamed = metric.compute()
    assert_close_dicts(streamed, one_shot, rtol=1e-6)  # fp32 inputs
    metric.reset()  # a fresh first pass keeps the old reference as shift, but stale means give no nc1
    metric.update(features[:100].float() + 1.0, labels[:100])
    assert "nc1" not in metric.compute() and "nc4" not in metric.compute()


def test_forward_accumulates_like_update():
    features, labels = planted(seed=6)
    metric = NeuralCollapse(6, 20)
    for chunk in torch.arange(len(labels)).split(100):
        batch_value = metric(features[chunk], labels[chunk])
        assert set(batch_value) >= {"nc2_equinorm", "cdnv"}
    expected = {k: v for k, v in dense_reference(features, labels).items() if k != "nc1"}
    assert_close_dicts(metric.compute(), expected)


def test_one_pass_reports_what_needs_no_second_pass():
    features, labels = planted(seed=8)
    metric = NeuralCollapse(6, 20)
    metric.update(features, labels)
    result = metric.compute()
    assert "nc1" not in result and "nc4" not in result
    assert_close_dicts(result, {k: v for k, v in dense_reference(features, labels).items() if k != "nc1"})


def test_empty_class_is_left_out():
    features, labels = planted(num_classes=4, seed=9)
    weight = torch.randn(5, 20, dtype=torch.float64)
    result = neural_collapse(features, labels, 5, classifier_weight=weight, predictions=labels)
    assert result["num_classes_present"].item() == 4
    assert all(torch.isfinite(v) for v in result.values())
    assert_close_dicts(result, dense_reference(features, labels, weight, labels))


def test_single_class_warns_without_nan():
    with pytest.warns(UserWarning, match=">= 2 classes"):
        result = neural_collapse(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), 3)
    assert result == {"num_classes_present": torch.tensor(1.0, dtype=torch.float64)}


def test_coinciding_class_means_give_infinite_nc1():
    result = neural_collapse(torch.ones(4, 3), torch.tensor([0, 1, 0, 1]), 2)
    assert result["nc1"].item() == math.inf
    assert all(torch.isfinite(result[k]) for k in ("nc2_equinorm", "nc2_equiangular", "nc2_max_angle", "cdnv"))


def test_nonfinite_features_skip_the_measurement():
    features, labels = planted(seed=4)
    features[3, 2] = float("nan")
    with pytest.warns(UserWarning, match="NaN/inf"):
        assert neural_collapse(features, labels, 6) == {}
    metric = NeuralCollapse(6, 20)
    metric.update(features, labels)
    with pytest.warns(UserWarning, match="NaN/inf"):
        assert metric.compute() == {}


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"num_classes": 1, "num_features": 4}, "num_classes"),
        ({"num_classes": 2.0, "num_features": 4}, "num_classes"),
        ({"num_classes": 3, "num_features": 0}, "num_features"),
        ({"num_classes": 3, "num_features": 4, "rtol": 0.0}, "rtol"),
        ({"num_classes": 3, "num_features": 4, "classifier_weight": torch.zeros(2, 4)}, "classifier_weight"),
    ],
)
def test_bad_constructor_arguments(kwargs, error):
    with pytest.raises(ValueError, match=error):
        NeuralCollapse(**kwargs)


def test_bad_inputs():
    metric = NeuralCollapse(3, 2)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        metric.update(torch.randn(4, 2), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        neural_collapse(torch.randn(4, 2), torch.tensor([0, -1, 2, 1]), 3)
    with pytest.raises(TypeError, match="integer"):
        metric.update(torch.randn(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="features"):
        metric.update(torch.randn(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="predictions"):
        metric.update(torch.randn(4, 2), torch.zeros(4, dtype=torch.long), predictions=torch.zeros(3))
    with pytest.raises(ValueError, match="2 columns"):
        metric.update(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="classifier_weight"):
        neural_collapse(torch.randn(6, 2), torch.tensor([0, 1, 2] * 2), 3, classifier_weight=torch.zeros(3, 5))
