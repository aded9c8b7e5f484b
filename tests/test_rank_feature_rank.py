"""Feature rank: planted ranks, known spectra, an SVD reference, streaming forms and bad input."""

import math

import pytest
import torch

from hildtools.metrics import FeatureRank, feature_rank


def orthonormal_without_mean(rows, cols, generator):
    """(rows, cols) orthonormal columns orthogonal to the all-ones vector (centering is a no-op)."""
    matrix = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    matrix = matrix - matrix.mean(0)
    return torch.linalg.qr(matrix).Q


def with_spectrum(singular_values, n, d, seed=0):
    generator = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    left, right = orthonormal_without_mean(n, k, generator), orthonormal_without_mean(d, k, generator)
    return left @ torch.diag(torch.as_tensor(singular_values, dtype=torch.float64)) @ right.T


def reference_measures(features, threshold, center):
    """The definitions written out from an fp64 SVD."""
    x = features.double()
    if center == "row":
        x = x - x.mean(1, keepdim=True)
    elif center == "column":
        x = x - x.mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    s = s[s > s[0] * 1e-7]  # drop the rounding-level tail
    energy = (s**2).tolist()
    total, cumulative, pca_rank = sum(energy), 0.0, 0
    for value in energy:  # SAM: #{k : cumsum_k <= q * total} + 1
        cumulative += value
        pca_rank += cumulative <= threshold * total
    p = [v / sum(s.tolist()) for v in s.tolist()]
    return {
        "pca_rank": min(pca_rank + 1, len(energy)),
        "effective_rank": math.exp(-sum(q * math.log(q) for q in p)),
        "stable_rank": total / energy[0],
    }


@pytest.mark.parametrize("rank", [1, 7, 50, 99])
@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
@pytest.mark.parametrize("center", ["row", "column", None])
def test_planted_rank_with_equal_singular_values(rank, shape, center):
    features = with_spectrum([2.5] * rank, *shape, seed=rank).float()
    result = feature_rank(features, center=center)
    assert result["pca_rank"].item() == rank
    assert result["effective_rank"].item() == pytest.approx(rank, rel=1e-6)
    assert result["stable_rank"].item() == pytest.approx(rank, rel=1e-5)


def test_known_decaying_spectrum():
    s = [math.exp(-k / 8) for k in range(60)]
    energy = [v * v for v in s]
    expected_pca = next(k + 1 for k in range(60) if sum(energy[: k + 1]) > 0.99 * sum(energy))
    p = [v / sum(s) for v in s]
    result = feature_rank(with_spectrum(s, 200, 90), center=None)
    assert expected_pca == 19
    assert result["pca_rank"].item() == expected_pca
    assert result["effective_rank"].item() == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)), rel=1e-9)
    assert result["stable_rank"].item() == pytest.approx(sum(energy) / energy[0], rel=1e-9)


@pytest.mark.parametrize("center", ["row", "column", None])
@pytest.mark.parametrize("threshold", [0.9, 0.99])
def test_matches_svd_reference_on_random_features(center, threshold):
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(150, 40, generator=generator) @ torch.randn(40, 40, generator=generator).tril() + 3.0
    result = feature_rank(features, threshold=threshold, center=center)
    expected = reference_measures(features, threshold, center)
    assert result["pca_rank"].item() == expected["pca_rank"]
    for key in ("effective_rank", "stable_rank"):
        assert result[key].item() == pytest.approx(expected[key], rel=1e-9)


def test_invariant_to_rotation_and_scale():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(80, 30, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 3, 30)
    rotation = torch.linalg.qr(torch.randn(30, 30, generator=generator, dtype=torch.float64)).Q
    base = feature_rank(features, center="column")
    for other in (feature_rank(features @ rotation, center="column"), feature_rank(7 * features, center="column")):
        for key, value in base.items():
            torch.testing.assert_close(other[key], value, rtol=1e-9, atol=0)


@pytest.mark.parametrize("num_features", [None, 24])
@pytest.mark.parametrize("center", ["row", "column", None])
def test_streaming_metric_equals_one_shot(num_features, center):
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(100, 24, generator=generator) * torch.linspace(0.05, 2, 24) + 1.0
    metric = FeatureRank(center=center, num_features=num_features)
    for chunk in features.split(17):
        metric.update(chunk)
    one_shot = feature_rank(features, center=center)
    for key, value in metric.compute().items():
        torch.testing.assert_close(value, one_shot[key], rtol=1e-9, atol=1e-9)


def test_zero_features_give_zero_ranks():
    assert all(v.item() == 0 for v in feature_rank(torch.ones(5, 3), center="row").values())


def test_nonfinite_features_skip_the_measurement():
    features = torch.randn(10, 4)
    features[2, 1] = float("inf")
    with pytest.warns(UserWarning, match="NaN/inf"):
        assert feature_rank(features) == {}
    metric = FeatureRank(num_features=4)
    metric.update(features)
    with pytest.warns(UserWarning, match="NaN/inf"):
        assert metric.compute() == {}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": 0}, "threshold"),
        ({"threshold": 1.0}, "threshold"),
        ({"threshold": "0.9"}, "threshold"),
        ({"center": "rows"}, "center"),
        ({"num_features": 0}, "num_features"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FeatureRank(**kwargs)
    if "num_features" not in kwargs:
        with pytest.raises(ValueError, match=match):
            feature_rank(torch.randn(4, 3), **kwargs)


def test_bad_feature_shapes():
    with pytest.raises(ValueError, match="features"):
        feature_rank(torch.randn(5))
    with pytest.raises(ValueError, match="columns"):
        FeatureRank(num_features=3).update(torch.randn(4, 5))
