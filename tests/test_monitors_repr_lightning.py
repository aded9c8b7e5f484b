"""NeuralCollapseMonitor, FeatureRankMonitor, InvariantSetMonitor in short Lightning fits."""

import csv
import glob
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from hildtools.callbacks import FeatureRankMonitor, InvariantSetMonitor, NeuralCollapseMonitor
from hildtools.metrics import FeatureCapture, feature_rank, invariant_sets, neural_collapse

NUM_CLASSES = 3


class ConvClassifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.2),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(32, 16), nn.ReLU(),
        )  # fmt: skip
        self.classifier = nn.Linear(16, NUM_CLASSES)

    def forward(self, x):
        return self.classifier(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def dataset(n=48, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(NUM_CLASSES).repeat(n // NUM_CLASSES)
    return TensorDataset(torch.randn(n, 1, 6, 6, generator=generator) + labels[:, None, None, None], labels)


def fit(callbacks, tmp_path, accelerator="cpu", max_epochs=2, logger=False):
    torch.manual_seed(0)
    model = ConvClassifier()
    loader = DataLoader(dataset(), batch_size=12, shuffle=True, generator=torch.Generator().manual_seed(1))
    trainer = pl.Trainer(
        max_epochs=max_epochs, accelerator=accelerator, devices=1, logger=logger, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, loader)
    return model, trainer


def all_monitors(**kwargs):
    return [
        NeuralCollapseMonitor(NUM_CLASSES, ["body.8", "classifier"], every_n_steps=2, probe_size=30, **kwargs),
        FeatureRankMonitor(["body.4", "classifier"], capture="output", every_n_steps=3, probe_size=30, **kwargs),
        InvariantSetMonitor(every_n_steps=2, **kwargs),
    ]


def assert_bitwise_equal(first, second):
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_monitors_leave_training_bitwise_untouched(tmp_path):
    plain, _ = fit([], tmp_path)
    monitors = all_monitors(figures=True)
    monitored, _ = fit(monitors, tmp_path, logger=CSVLogger(tmp_path))
    assert_bitwise_equal(plain, monitored)
    assert all(monitor.last_metrics for monitor in monitors)


def test_logged_keys_values_and_pictures(tmp_path):
    probe = next(iter(DataLoader(dataset(seed=5), batch_size=30)))
    monitors = [
        NeuralCollapseMonitor(NUM_CLASSES, every_n_steps=4, probe_data=probe, figures=True),
        FeatureRankMonitor("body.4", capture="output", pool="flatten", every_n_steps=4, probe_data=probe, figures=True),
        InvariantSetMonitor(every_n_steps=4, figures=True),
    ]
    model, trainer = fit(monitors, tmp_path, logger=CSVLogger(tmp_path))  # 8 steps: last measurement at the end
    model.eval()
    with FeatureCapture(model) as penultimate, FeatureCapture(model, "body.4", "output", "flatten") as maps:
        logits = model(probe[0])
    expected = neural_collapse(penultimate.features["classifier"], probe[1], NUM_CLASSES,
                               model.classifier.weight, logits.argmax(1))  # fmt: skip
    for key in ("nc1", "nc2_equinorm", "nc2_equiangular", "nc2_max_angle", "nc3", "nc4", "cdnv"):
        assert monitors[0].last_metrics[f"nc/classifier/{key}"] == pytest.approx(expected[key].item(), rel=1e-5)
    rank = feature_rank(maps.features["body.4"])
    assert monitors[1].last_metrics["rank/body.4/pca_rank"] == rank["pca_rank"].item()
    collapse = invariant_sets(model).layers["body.0"]
    assert monitors[2].last_metrics["collapse/body.0/independent_fraction"] == collapse.independent_fraction

    with open(os.path.join(trainer.log_dir, "metrics.csv")) as file:
        header = next(csv.reader(file))
    for key in (
        "nc/classifier/nc1",
        "nc/classifier/nc4",
        "rank/body.4/effective_rank",
        "collapse/body.4/num_vanishing",
    ):
        assert key in header
    pictures = {
        os.path.basename(p).rsplit("_", 1)[0] for p in glob.glob(os.path.join(trainer.log_dir, "figures", "*.png"))
    }
    assert pictures == {"nc_classifier_class_mean_cosines", "rank_body.4_spectrum", "collapse_nearest_distance"}


def test_default_schedule_is_every_epoch(tmp_path):
    monitor = FeatureRankMonitor(probe_size=24, measure_at_start=False)
    calls = []
    monitor.measure = lambda *args: calls.append(args[0].global_step) or {}
    fit([monitor], tmp_path, max_epochs=3)
    assert calls == [4, 8, 12]


def test_nonfinite_probe_features_skip_with_a_warning(tmp_path):
    x, y = next(iter(DataLoader(dataset(), batch_size=12)))
    x[0] = float("nan")
    monitor = NeuralCollapseMonitor(NUM_CLASSES, every_n_steps=4, probe_data=(x, y))
    with pytest.warns(UserWarning, match="NaN/inf"):
        fit([monitor], tmp_path, max_epochs=1)
    assert monitor.last_metrics == {}


def test_unknown_layer_names_fail_at_fit_start(tmp_path):
    with pytest.raises(ValueError, match=r"'nope'.*available modules: 'body', 'body.0'"):
        fit([NeuralCollapseMonitor(NUM_CLASSES, ["nope"], probe_size=12)], tmp_path)
    with pytest.raises(ValueError, match=r"cannot be analysed.*classifier.*network output"):
        fit([InvariantSetMonitor(["classifier"])], tmp_path)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: NeuralCollapseMonitor(1), "num_classes"),
        (lambda: NeuralCollapseMonitor(3, capture="inputs"), "capture"),
        (lambda: NeuralCollapseMonitor(3, batch_size=0), "batch_size"),
        (lambda: NeuralCollapseMonitor(3, every_n_steps=2, every_n_epochs=1), "exactly one"),
        (lambda: FeatureRankMonitor(threshold=1.5), "threshold"),
        (lambda: FeatureRankMonitor(pool="max"), "pool"),
        (lambda: FeatureRankMonitor(figures="yes"), "figures"),
        (lambda: InvariantSetMonitor(vanish_threshold=0), "vanish_threshold"),
        (lambda: InvariantSetMonitor(chunk_size=-1), "chunk_size"),
    ],
)
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.gpu
def test_monitors_on_cuda_match_cpu_metrics(tmp_path):
    monitors = all_monitors()
    model, _ = fit(monitors, tmp_path, accelerator="gpu")
    assert all(monitor.last_metrics for monitor in monitors)
    features = torch.randn(200, 24, dtype=torch.float64)
    labels = torch.arange(4).repeat(50)
    on_gpu = neural_collapse(features.cuda(), labels.cuda(), 4, predictions=labels.cuda())
    on_cpu = neural_collapse(features, labels, 4, predictions=labels)
    for key, value in on_cpu.items():
        torch.testing.assert_close(on_gpu[key].cpu(), value, rtol=1e-9, atol=1e-12)
    for key, value in feature_rank(features).items():
        torch.testing.assert_close(feature_rank(features.cuda().float())[key].cpu(), value, rtol=1e-4, atol=1e-4)
    cpu_report, gpu_report = invariant_sets(model.cpu()), invariant_sets(model.cuda())
    for name, layer in cpu_report.layers.items():
        assert gpu_report.layers[name].group_sizes == layer.group_sizes
        assert gpu_report.layers[name].num_vanishing == layer.num_vanishing
