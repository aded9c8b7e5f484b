"""FeatureCapture: default layer, input/output, pooling, projection, hook removal, bad input."""

import pytest
import torch
from torch import nn

from hildtools.metrics import FeatureCapture


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)
        self.classifier = nn.Linear(5, 3)

    def forward(self, x):
        return self.classifier(torch.relu(self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))))


def test_default_is_the_input_of_the_last_linear():
    torch.manual_seed(0)
    net, x = ConvNet(), torch.randn(6, 3, 8, 8)
    with FeatureCapture(net) as capture:
        net(x[:4])
        net(x[4:])
    penultimate = torch.relu(net.fc(net.pool(torch.relu(net.conv(x))).flatten(1)))
    assert capture.layers == ["classifier"]
    torch.testing.assert_close(capture.features["classifier"], penultimate)


def test_conv_maps_pooled_or_flattened():
    torch.manual_seed(1)
    net, x = ConvNet(), torch.randn(2, 3, 8, 8)
    maps = net.conv(x).detach()
    with (
        FeatureCapture(net, "conv", capture="output") as avg,
        FeatureCapture(net, ["conv"], "output", "flatten") as flat,
    ):
        net(x)
    torch.testing.assert_close(avg.features["conv"], maps.mean((2, 3)))
    torch.testing.assert_close(flat.features["conv"], maps.flatten(1))


def test_linear_on_tokens_pools_over_tokens_and_upcasts():
    layer = nn.Linear(4, 6).to(torch.bfloat16)
    x = torch.randn(3, 5, 4, dtype=torch.bfloat16)
    with FeatureCapture(nn.Sequential(layer), "0", capture="output") as capture:
        out = layer(x)
    assert capture.features["0"].dtype == torch.float32
    torch.testing.assert_close(capture.features["0"], out.float().mean(1))


def test_seeded_projection_is_fixed_and_preserves_distances():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(400, 400), nn.Linear(400, 2))
    x = torch.randn(20, 400)
    runs = []
    for seed in (7, 7, 8):
        with FeatureCapture(net, projection_dim=200, seed=seed) as capture:
            net(x)
        runs.append(capture.features["1"])
    assert runs[0].shape == (20, 200)
    torch.testing.assert_close(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])
    full = net[0](x).detach()
    ratio = torch.pdist(runs[0]) / torch.pdist(full)
    assert (ratio - 1).abs().max() < 0.35


def test_hooks_are_removed_even_when_forward_raises():
    net = ConvNet()
    with pytest.raises(RuntimeError), FeatureCapture(net, ["conv", "fc"]):
        net(torch.randn(2, 5, 8, 8))  # wrong channel count
    assert all(not module._forward_hooks for module in net.modules())


def test_bad_input():
    net = ConvNet()
    with pytest.raises(ValueError, match=r"'nonexistent'.*available modules: 'conv', 'pool', 'fc', 'classifier'"):
        FeatureCapture(net, ["conv", "nonexistent"])
    with pytest.raises(ValueError, match="no nn.Linear"):
        FeatureCapture(nn.Sequential(nn.ReLU()))
    bad = (
        ({"capture": "in"}, "capture"),
        ({"pool": "max"}, "pool"),
        ({"projection_dim": 0}, "projection_dim"),
        ({"projection_dim": True}, "projection_dim"),
        ({"capture": ["input"]}, "capture"),
    )
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            FeatureCapture(net, **kwargs)
    with pytest.raises(ValueError, match="at least one"):
        FeatureCapture(net, [])


def test_pool_none_keeps_token_positions_and_projects_the_feature_dimension():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 30), nn.Linear(30, 2))
    x = torch.randn(3, 5, 4)
    projected = FeatureCapture(net, "1", pool="none", projection_dim=8)
    with FeatureCapture(net, "1", pool="none") as tokens, projected as small:
        net(x)
    hidden = net[0](x).detach()
    torch.testing.assert_close(tokens.features["1"], hidden)
    projection = small._projections["1"]
    torch.testing.assert_close(small.features["1"], hidden @ projection)
    assert small.features["1"].shape == (3, 5, 8)


def test_default_layer_prefers_the_output_embeddings_of_a_hugging_face_style_model():
    class LanguageModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(4, 10)
            self.value_head = nn.Linear(4, 1)  # registered last: not the head whose input is the hidden state

        def get_output_embeddings(self):
            return self.lm_head

    wrapper = nn.Module()
    wrapper.model = LanguageModel()
    with FeatureCapture(wrapper) as capture:
        wrapper.model.lm_head(torch.randn(2, 4))
    assert capture.layers == ["model.lm_head"]
