"""Token-level neural collapse (Wu & Papyan 2024): every position a sample, of the class of the token it predicts;
streamed over positions and checked against the dense reference on all positions flattened (fp64)."""

import importlib

import lightning.pytorch as pl
import pytest
import torch
from test_nc_metric import assert_close_dicts, dense_reference
from torch.nn import functional as F

from hildtools.callbacks import NeuralCollapseMonitor
from hildtools.metrics import NeuralCollapse, neural_collapse
from hildtools.metrics.capture import default_layer
from hildtools.metrics.neural_collapse import shift_labels

transformers = pytest.importorskip("transformers")
nc_module = importlib.import_module("hildtools.metrics.neural_collapse")  # the package attribute is the function


def token_data(num_seq=8, length=10, dim=6, num_classes=7, seed=0):
    """(N, T, D) fp64 features clustered by the class of the next token, (N, T) labels with -100 padding."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (num_seq, length), generator=generator)
    labels[::3, -3:] = -100  # padded tails
    means = 2 * torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    next_class = torch.cat([labels[:, 1:], torch.zeros(num_seq, 1, dtype=torch.long)], 1).clamp_min(0)
    features = means[next_class] + torch.randn(num_seq, length, dim, generator=generator, dtype=torch.float64)
    scores = torch.randn(num_seq, length, num_classes, generator=generator, dtype=torch.float64)
    return features, labels, scores


def flattened_positions(features, labels, scores):
    """The dense reference's samples, built by hand: position t of a sequence with class labels[t + 1]."""
    rows, classes, predicted = [], [], []
    for n in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[n, t + 1] != -100:
                rows.append(features[n, t]), classes.append(int(labels[n, t + 1]))
                predicted.append(int(scores[n, t].argmax()))
    return torch.stack(rows), torch.tensor(classes), torch.tensor(predicted)


@pytest.mark.parametrize("block_elements", [nc_module.BLOCK_ELEMENTS, 5])
def test_streamed_token_collapse_equals_dense_reference_on_flattened_positions(monkeypatch, block_elements):
    """Small BLOCK_ELEMENTS forces the blocked class-pair Grams and NC4 distances (one row per block)."""
    monkeypatch.setattr(nc_module, "BLOCK_ELEMENTS", block_elements)
    features, labels, scores = token_data()
    weight = torch.randn(7, 6, dtype=torch.float64)
    rows, classes, predicted = flattened_positions(features, labels, scores)
    expected = dense_reference(rows, classes, weight, predicted)

    targets = shift_labels(labels)
    metric = NeuralCollapse(7, 6, classifier_weight=weight, ignore_index=-100)
    for second in (False, True):
        for chunk in torch.arange(len(labels)).split(3):  # three sequences at a time, fp32 as captured
            metric.update(features[chunk].float(), targets[chunk], predictions=scores[chunk].float())
        if not second:
            metric.start_second_pass()
    assert_close_dicts(metric.compute(), expected, rtol=1e-5, atol=1e-7)
    one_shot = neural_collapse(features, targets, 7, weight, scores, ignore_index=-100)
    assert_close_dicts(one_shot, expected)
    assert metric.counts.sum() == len(classes)  # ignored and last positions left out


def test_shift_labels_and_unshifted_positions():
    labels = torch.tensor([[5, 6, 7, -100], [1, 2, 3, 4]])
    assert shift_labels(labels).tolist() == [[6, 7, -100, -100], [2, 3, 4, -100]]
    features, labels, _ = token_data(seed=1)
    keep = labels != -100
    aligned = neural_collapse(features, labels, 7, ignore_index=-100)  # no shift: position t has class labels[t]
    assert_close_dicts(aligned, dense_reference(features[keep], labels[keep]))


def test_state_memory_is_linear_in_the_number_of_classes():
    """Vocabulary-sized C: the states are O(C x D) (no C x C scatter); the blocked pair sums equal one block."""
    num_classes, dim = 3000, 8
    metric = NeuralCollapse(num_classes, dim, ignore_index=-100)
    sizes = sum(state.numel() for state in metric.metric_state.values())
    assert sizes <= num_classes * dim + 2 * num_classes + dim + 3
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes, (40, 64), generator=generator)
    features = torch.randn(num_classes, dim, generator=generator)[labels] + 0.1 * torch.randn(40, 64, dim)
    result = neural_collapse(features, labels, num_classes)
    assert result["num_classes_present"] > 0.5 * num_classes
    assert sum(buffer.numel() for buffer in metric.buffers()) <= 2 * num_classes * dim + dim * dim + dim + 1


class TinyGPT2(pl.LightningModule):
    def __init__(self):
        super().__init__()
        config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=256, n_positions=64)
        self.model = transformers.GPT2LMHeadModel(config)

    def forward(self, input_ids):
        return self.model(input_ids=input_ids)  # a ModelOutput: the monitor reads its .logits

    def training_step(self, batch, batch_idx):
        input_ids, labels = batch
        return F.cross_entropy(self(input_ids).logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def token_probe(num_seq=64, length=32):
    """Token ids drawn from 40 of GPT-2's 256 classes; labels = input_ids with some -100 padded tails."""
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, 40, (num_seq, length), generator=generator)
    labels = input_ids.clone()
    labels[::4, -5:] = -100
    return input_ids, labels


def dense_token_reference(module, input_ids, labels):
    """Classic NC formulas (fp64) on the final hidden states (lm_head input) of all kept positions, flattened."""
    module.eval()
    with torch.no_grad():
        hidden = module.model.transformer(input_ids=input_ids).last_hidden_state.double()
        logits = module.model.lm_head(hidden.float()).double()
    rows, classes, predicted = flattened_positions(hidden, labels, logits)
    expected = dense_reference(rows, classes, module.model.lm_head.weight.detach(), predicted)
    expected["num_classes_present"] = torch.tensor(float(len(set(classes.tolist()))))
    return expected


def test_monitor_on_gpt2_equals_dense_reference_on_lm_head_inputs(monkeypatch):
    """GPT-2 (Conv1D blocks, tied head): features = final hidden states (lm_head input) of every position, streamed:
    the metric never sees more than one chunk of sequences, and each pass runs its own forwards."""
    updates = []
    original_update = NeuralCollapse.update

    def recording_update(self, features, *args):
        updates.append(tuple(features.shape))
        original_update(self, features, *args)

    monkeypatch.setattr(NeuralCollapse, "update", recording_update)
    torch.manual_seed(0)
    input_ids, labels = token_probe()
    module = TinyGPT2()
    assert default_layer(module) == "model.lm_head"
    monitor = NeuralCollapseMonitor(num_classes=256, every_n_steps=2, probe_data=(input_ids, labels), batch_size=24)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(input_ids, labels), batch_size=16)
    pl.Trainer(
        max_steps=2,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, loader)

    assert updates[-6:] == [(24, 32, 64), (24, 32, 64), (16, 32, 64)] * 2  # last measurement: 2 passes x 3 chunks
    measured = {
        key.removeprefix("nc/model.lm_head/"): value
        for key, value in monitor.last_metrics.items()
        if key != "nc/seconds"
    }
    expected = dense_token_reference(module, input_ids, labels)
    assert set(measured) == set(expected) | {"nc2_equinorm_weights"}
    for key, value in expected.items():
        assert measured[key] == pytest.approx(value.item(), rel=1e-4, abs=1e-6), key


def test_classifier_transformer_keeps_pooled_features():
    """BERT sequence classifier, one label per example: features = the classifier's input (pooled output)."""
    torch.manual_seed(1)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
    )
    bert = transformers.BertForSequenceClassification(config)
    input_ids, labels = torch.randint(0, 50, (30, 8)), torch.arange(30) % 3
    capture_layer = default_layer(bert)
    assert capture_layer == "classifier"

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = bert

        def forward(self, x):
            return self.net(input_ids=x).logits

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    module = Classifier()
    monitor = NeuralCollapseMonitor(num_classes=3, every_n_steps=1, probe_data=(input_ids, labels))
    pl.Trainer(
        max_steps=1,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(input_ids, labels), batch_size=10))
    with torch.no_grad():
        pooled = bert.eval().bert(input_ids=input_ids).pooler_output.double()
        predicted = bert(input_ids=input_ids).logits.argmax(1)
    expected = dense_reference(pooled, labels, bert.classifier.weight.detach(), predicted)
    for key, value in expected.items():
        assert monitor.last_metrics[f"nc/net.classifier/{key}"] == pytest.approx(value.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: NeuralCollapseMonitor(10, shift_labels=1), TypeError, "shift_labels"),
        (lambda: NeuralCollapseMonitor(10, ignore_index=3), ValueError, "ignore_index"),
        (lambda: NeuralCollapseMonitor(10, pool="none"), ValueError, "pool"),
        (lambda: NeuralCollapse(10, 4, ignore_index=0), ValueError, "ignore_index"),
        (lambda: NeuralCollapse(10, 4, ignore_index=True), ValueError, "ignore_index"),
        (lambda: NeuralCollapse(10, 4, rtol=1.0), ValueError, "rtol"),
        (lambda: NeuralCollapse(10, True), ValueError, "num_features"),
        (lambda: NeuralCollapse(3, 4, classifier_weight=torch.zeros(4, 3)), ValueError, "classifier_weight"),
        (lambda: neural_collapse(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), 3), ValueError, "labels"),
    ],
)
def test_bad_arguments_name_the_argument(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_a_layer_the_forward_never_calls_is_reported():
    class Unused(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc, self.spare = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = (torch.randn(8, 3), torch.arange(8) % 2)
    monitor = NeuralCollapseMonitor(2, ["fc", "spare"], every_n_steps=1, probe_data=data)
    trainer = pl.Trainer(
        max_steps=1,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(ValueError, match=r"\['spare'\] were not called"):
        trainer.fit(Unused(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=4))
