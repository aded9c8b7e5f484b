"""Invariant sets: planted vanishing/identical neurons, BatchNorm folding, chunking, graph reasons."""

import pytest
import torch
from scipy.sparse.csgraph import connected_components
from torch import nn

from hildtools.metrics import invariant_sets
from hildtools.metrics.invariant_sets import batchnorm_affine


def planted_mlp():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.Linear(32, 16), nn.Dropout(0.1), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        first, second = mlp[0], mlp[2]
        for vanishing in (0, 1, 2):
            first.weight[vanishing], first.bias[vanishing], second.weight[:, vanishing] = 0, 0, 0
        for source, copies in ((4, (5, 6, 7)), (10, (11,))):
            for copy in copies:
                first.weight[copy] = first.weight[source] + 1e-4 * torch.randn(10)
                first.bias[copy] = first.bias[source]
                second.weight[:, copy] = second.weight[:, source]
    return mlp


class PlantedCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3)
        self.head = nn.Linear(12 * 4, 5)
        with torch.no_grad():
            self.bn1.running_mean.uniform_(-1, 1)
            self.bn1.running_var.uniform_(0.5, 2)
            self.bn1.weight.uniform_(0.5, 2)
            self.bn1.bias.uniform_(-1, 1)
            # channel 0 vanishes only once BatchNorm is folded in (gamma = beta = 0, no outgoing weight)
            self.bn1.weight[0], self.bn1.bias[0], self.conv2.weight[:, 0] = 0, 0, 0
            # channel 3 equals channel 2 after folding: weights x2, running var x4, running mean x2
            self.conv1.weight[3], self.conv1.bias[3] = 2 * self.conv1.weight[2], 2 * self.conv1.bias[2]
            self.bn1.running_mean[3] = 2 * self.bn1.running_mean[2]
            self.bn1.running_var[3] = 4 * (self.bn1.running_var[2] + self.bn1.eps) - self.bn1.eps
            self.bn1.weight[3], self.bn1.bias[3] = self.bn1.weight[2], self.bn1.bias[2]
            self.conv2.weight[:, 3] = self.conv2.weight[:, 2]
            # conv2: channel 6 copies channel 5 (outgoing block through pool + flatten); channel 9 vanishes
            self.conv2.weight[6], self.conv2.bias[6] = self.conv2.weight[5], self.conv2.bias[5]
            self.head.weight[:, 24:28] = self.head.weight[:, 20:24]
            self.conv2.weight[9], self.conv2.bias[9], self.head.weight[:, 36:40] = 0, 0, 0

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.adaptive_avg_pool2d(nn.functional.gelu(self.conv2(x)), 2)
        return self.head(x.view(x.size(0), -1))


def summary(layer):
    return layer.num_neurons, layer.num_vanishing, layer.group_sizes, layer.num_independent


def test_planted_mlp_counted_exactly():
    report = invariant_sets(planted_mlp())
    assert summary(report.layers["0"]) == (32, 3, [4, 2], 25)
    assert report.layers["0"].independent_fraction == 25 / 32
    assert report.layers["0"].consumer == "2" and report.layers["0"].num_identical_groups == 2
    assert summary(report.layers["2"]) == (16, 0, [], 16)
    assert "network output" in report.skipped["5"]
    nearest = report.layers["0"].nearest_distance
    assert torch.isinf(nearest[:3]).all() and (nearest[4:8] < 1e-6).all() and (nearest[12:] > 0.1).all()


def test_planted_cnn_counted_exactly_with_batchnorm_folded():
    report = invariant_sets(PlantedCNN())
    assert summary(report.layers["conv1"]) == (8, 1, [2], 6)
    assert summary(report.layers["conv2"]) == (12, 1, [2], 10)
    assert report.layers["conv2"].consumer == "head"
    assert set(report.skipped) == {"head"}


def test_batchnorm_folding_preserves_the_function():
    torch.manual_seed(2)
    conv, bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.running_mean.normal_(), bn.running_var.uniform_(0.2, 3), bn.weight.normal_(), bn.bias.normal_()
    bn.eval()
    scale, shift = batchnorm_affine(bn)
    folded = nn.Conv2d(3, 5, 3).double()
    with torch.no_grad():
        folded.weight.copy_(conv.weight.double() * scale[:, None, None, None])
        folded.bias.copy_(conv.bias.double() * scale + shift)
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(folded(x), bn.double()(conv.double()(x)), rtol=1e-12, atol=1e-12)


def clustered_layer(seed=3):
    """A Linear->Linear pair whose neurons form clusters with noise of varied scale (some near threshold)."""
    torch.manual_seed(seed)
    first, second = nn.Linear(20, 60), nn.Linear(60, 7)
    prototypes = torch.randn(9, 20 + 1 + 7)
    which = torch.randint(0, 9, (60,))
    noise = torch.logspace(-3, -0.3, 60)[torch.randperm(60)]
    vectors = prototypes[which] + noise[:, None] * torch.randn(60, 28)
    vectors[:5] *= 0.05  # some vanishing
    with torch.no_grad():
        first.weight.copy_(vectors[:, :20]), first.bias.copy_(vectors[:, 20]), second.weight.copy_(vectors[:, 21:].T)
    return nn.Sequential(first, nn.Tanh(), second), vectors.double()


def test_matches_dense_reference_on_clustered_layer():
    model, vectors = clustered_layer()
    norms = vectors.norm(dim=1)
    vanishing = norms / norms.max() < 0.1
    sq = norms.square()
    distance = 2 * (vectors[:, None] - vectors[None]).square().sum(-1) / (sq[:, None] + sq[None])
    keep = (~vanishing).nonzero().squeeze(1)
    sub = distance[keep][:, keep]
    num_components, labels = connected_components((sub < 0.1).numpy(), directed=False)
    sizes = torch.bincount(torch.as_tensor(labels))
    sub.fill_diagonal_(float("inf"))
    layer = invariant_sets(model).layers["0"]
    assert layer.num_vanishing == int(vanishing.sum())
    assert layer.num_independent == num_components
    assert layer.group_sizes == sorted(sizes[sizes >= 2].tolist(), reverse=True)
    torch.testing.assert_close(layer.nearest_distance[keep], sub.min(1).values, rtol=1e-6, atol=1e-9)
    assert torch.isinf(layer.nearest_distance[vanishing]).all()
    assert len(layer.group_sizes) >= 3  # the reference has non-trivial groups


@pytest.mark.parametrize("chunk_size", [1, 7, 16])
def test_chunked_equals_unchunked(chunk_size):
    model, _ = clustered_layer(seed=4)
    whole = invariant_sets(model, chunk_size=10_000).layers["0"]
    chunked = invariant_sets(model, chunk_size=chunk_size).layers["0"]
    assert summary(chunked) == summary(whole)
    torch.testing.assert_close(chunked.nearest_distance, whole.nearest_distance, rtol=1e-12, atol=1e-12)


def test_thresholds_are_configurable():
    model, _ = clustered_layer(seed=5)
    strict = invariant_sets(model, vanish_threshold=1e-3, identical_threshold=1e-4).layers["0"]
    loose = invariant_sets(model, vanish_threshold=0.1, identical_threshold=0.5).layers["0"]
    assert strict.num_vanishing == 0 and loose.num_vanishing == 5
    assert strict.num_independent > loose.num_independent


class ResidualBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        out = torch.relu(out + x).mean((2, 3))
        return self.head(self.shared(self.shared(out)))


def test_residual_and_shared_layers_are_skipped_with_reasons():
    report = invariant_sets(ResidualBlock())
    assert set(report.layers) == {"conv1"}
    assert "residual" in report.skipped["conv2"]
    assert "more than once" in report.skipped["shared"]
    assert "network output" in report.skipped["head"]


class BatchNormAfterActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(self.bn(torch.relu(self.fc1(x))))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) if x.sum() > 0 else self.fc2(self.fc1(x))


def test_unfoldable_and_untraceable_models_are_reported():
    assert "cannot be folded" in invariant_sets(BatchNormAfterActivation()).skipped["fc1"]
    pooled = nn.Sequential(nn.Linear(3, 8), nn.MaxPool1d(2), nn.Linear(4, 2))
    assert "pools over its neurons" in invariant_sets(pooled).skipped["0"]
    report = invariant_sets(DataDependent())
    assert report.layers == {} and set(report.skipped) == {"fc1", "fc2"}
    assert "torch.fx could not trace" in report.skipped["fc1"]


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        invariant_sets(torch.randn(3))
    for kwargs in ({"vanish_threshold": 0}, {"identical_threshold": -1.0}, {"chunk_size": 0}, {"chunk_size": 2.5}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            invariant_sets(planted_mlp(), **kwargs)
