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


transformers = pytest.importorskip("transformers")


def gpt2():
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=32, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def test_gpt2_conv1d_mlp_planted_neurons_counted_exactly():
    """Conv1D stores (in, out): a neuron is column i of c_fc's weight, c_fc.bias[i] and row i of c_proj's weight."""
    torch.manual_seed(0)
    model = gpt2()
    mlp = model.transformer.h[1].mlp
    with torch.no_grad():
        mlp.c_fc.bias.normal_(std=0.02)  # the scale of the weights (init std 0.02)
        for vanishing in (3, 9):
            mlp.c_fc.weight[:, vanishing], mlp.c_fc.bias[vanishing], mlp.c_proj.weight[vanishing] = 0, 0, 0
        for copy in (21, 22, 40):
            mlp.c_fc.weight[:, copy], mlp.c_fc.bias[copy] = mlp.c_fc.weight[:, 20], mlp.c_fc.bias[20]
            mlp.c_proj.weight[copy] = mlp.c_proj.weight[20]
    report = invariant_sets(model)
    assert set(report.layers) == {"transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"}
    layer = report.layers["transformer.h.1.mlp.c_fc"]
    assert layer.consumer == "transformer.h.1.mlp.c_proj"
    assert summary(layer) == (64, 2, [4], 64 - 2 - 3)
    assert summary(report.layers["transformer.h.0.mlp.c_fc"]) == (64, 0, [], 64)
    assert "block's output" in report.skipped["transformer.h.1.mlp.c_proj"]
    assert "could not trace" in report.skipped["transformer.h.0.attn.c_attn"]
    assert "lm_head" in report.skipped


def test_bert_intermediate_and_output_paired_across_sibling_blocks():
    torch.manual_seed(1)
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, num_labels=3
    )
    model = transformers.BertForSequenceClassification(config)
    dense_in, dense_out = model.bert.encoder.layer[0].intermediate.dense, model.bert.encoder.layer[0].output.dense
    with torch.no_grad():
        dense_in.bias.normal_(std=0.02)
        dense_in.weight[5], dense_in.bias[5], dense_out.weight[:, 5] = 0, 0, 0
        for source, copy in ((1, 2), (10, 11), (10, 30)):
            dense_in.weight[copy], dense_in.bias[copy] = dense_in.weight[source], dense_in.bias[source]
            dense_out.weight[:, copy] = dense_out.weight[:, source]
    report = invariant_sets(model)
    layer = report.layers["bert.encoder.layer.0.intermediate.dense"]
    assert layer.consumer == "bert.encoder.layer.0.output.dense"
    assert summary(layer) == (48, 1, [3, 2], 48 - 1 - 3)
    assert "residual" in report.skipped["bert.encoder.layer.0.output.dense"]
    assert "bert.pooler.dense" in report.skipped and "classifier" in report.skipped


def test_llama_gated_mlp_neuron_is_gate_row_up_row_down_column():
    torch.manual_seed(2)
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=40,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(config)
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        for vanishing in (0, 7, 8):
            mlp.gate_proj.weight[vanishing], mlp.up_proj.weight[vanishing], mlp.down_proj.weight[:, vanishing] = 0, 0, 0
        for copy in (13, 14):
            mlp.gate_proj.weight[copy], mlp.up_proj.weight[copy] = mlp.gate_proj.weight[12], mlp.up_proj.weight[12]
            mlp.down_proj.weight[:, copy] = mlp.down_proj.weight[:, 12]
        # same gate row and down column as neuron 20, another up row: not identical (the up row is part of it)
        mlp.gate_proj.weight[21], mlp.down_proj.weight[:, 21] = mlp.gate_proj.weight[20], mlp.down_proj.weight[:, 20]
    report = invariant_sets(model)
    layer = report.layers["model.layers.0.mlp.gate_proj"]
    assert (layer.consumer, layer.up_projection) == ("model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj")
    assert summary(layer) == (40, 3, [3], 40 - 3 - 2)
    assert "gated MLP" in report.skipped["model.layers.0.mlp.up_proj"]
    assert "model.layers.0.mlp.up_proj" not in report.layers


def test_gated_neuron_vectors_match_a_dense_reference():
    """Nearest distances of a hand-written gated MLP equal those of the explicit vectors [gate, b, up, b | down]."""
    torch.manual_seed(3)

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = nn.Linear(6, 10), nn.Linear(6, 10), nn.Linear(10, 6)

        def forward(self, x):
            return x + self.down(nn.functional.silu(self.gate(x)) * self.up(x))

    model = nn.Sequential(nn.Linear(6, 6), Gated())
    block = model[1]
    vectors = (
        torch.cat(
            [block.gate.weight, block.gate.bias[:, None], block.up.weight, block.up.bias[:, None], block.down.weight.T],
            1,
        )
        .double()
        .detach()
    )
    sq = vectors.square().sum(1)
    distance = 2 * (vectors[:, None] - vectors[None]).square().sum(-1) / (sq[:, None] + sq[None])
    distance.fill_diagonal_(float("inf"))
    layer = invariant_sets(model).layers["1.gate"]  # the residual add defeats nothing: the block is traced whole
    torch.testing.assert_close(layer.nearest_distance, distance.min(1).values, rtol=1e-10, atol=1e-12)


def test_bilinear_gate_without_activation_is_analysed_once():
    class Bilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.down(self.gate(x) * self.up(x))

    report = invariant_sets(Bilinear())
    assert set(report.layers) == {"gate"} and report.layers["gate"].up_projection == "up"
    assert "analysed with the gate 'gate'" in report.skipped["up"]


def test_invariant_set_monitor_logs_gpt2_mlps():
    import lightning.pytorch as pl

    from hildtools.callbacks import InvariantSetMonitor

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = gpt2()

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(4)
    monitor = InvariantSetMonitor(every_n_steps=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randint(0, 32, (8, 12))), batch_size=4)
    pl.Trainer(
        max_steps=1,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(LM(), loader)
    assert monitor.last_metrics["collapse/model.transformer.h.0.mlp.c_fc/independent_fraction"] == 1.0
    assert monitor.last_metrics["collapse/model.transformer.h.1.mlp.c_fc/num_vanishing"] == 0
