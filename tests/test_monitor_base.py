"""The monitor base classes: a weight-only monitor has no probe; every monitor logs the wall time of its last
measurement as ``<namespace>/seconds``."""

import time

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers.logger import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hildtools.callbacks import (
    EdgeOfStabilityMonitor,
    FeatureRankMonitor,
    HessianEigenMonitor,
    InvariantSetMonitor,
    NeuralCollapseMonitor,
    NTKAlignmentMonitor,
)
from hildtools.callbacks._monitor import Monitor, ScheduledMonitor
from hildtools.probe import Probe

MONITORS = {
    "hessian": lambda: HessianEigenMonitor(k=1, every_n_steps=2, probe_size=16),
    "eos": lambda: EdgeOfStabilityMonitor(every_n_steps=2, probe_size=16),
    "ntk": lambda: NTKAlignmentMonitor(every_n_steps=2, probe_size=8),
    "nc": lambda: NeuralCollapseMonitor(3, every_n_steps=2, probe_size=24),
    "rank": lambda: FeatureRankMonitor(every_n_steps=2, probe_size=16),
    "collapse": lambda: InvariantSetMonitor(every_n_steps=2),
}


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class MemoryLogger(Logger):
    """Keeps every logged row."""

    def __init__(self):
        super().__init__()
        self.rows = []

    name, version = "memory", 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append(dict(metrics))


def fit(monitors, steps=2):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 6, generator=g), torch.arange(48) % 3)
    logger = MemoryLogger()
    trainer = pl.Trainer(max_steps=steps, callbacks=monitors, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(Classifier(), DataLoader(data, batch_size=12))
    return logger


def test_weight_only_monitor_has_no_probe_and_never_enters_a_probe_session(monkeypatch):
    def no_session(self, module):
        raise AssertionError("a weight-only monitor entered Probe.session")

    monkeypatch.setattr(Probe, "session", no_session)
    monitor = InvariantSetMonitor(every_n_steps=2)
    assert isinstance(monitor, ScheduledMonitor) and not isinstance(monitor, Monitor)
    assert not hasattr(monitor, "probe")
    fit([monitor])
    assert monitor.last_metrics["collapse/net.0/independent_fraction"] == 1.0  # 12 random neurons: all independent
    assert "probe" not in monitor.state_dict()


@pytest.mark.parametrize("name", sorted(MONITORS))
def test_every_monitor_logs_the_seconds_of_its_last_measurement(name):
    monitor = MONITORS[name]()
    collect, pause = monitor.collect, 0.05

    def slow_collect(trainer, pl_module):
        time.sleep(pause)  # a measurement known to take at least `pause` seconds
        return collect(trainer, pl_module)

    monitor.collect = slow_collect
    start = time.perf_counter()
    logger = fit([monitor])
    wall = time.perf_counter() - start
    key = f"{monitor.namespace}/seconds"
    assert monitor.namespace == name
    logged = [row[key] for row in logger.rows if key in row]
    assert len(logged) == 1 + monitor.measure_at_start  # measured at step 2 (and at the start)
    assert logged[-1] == monitor.last_metrics[key]
    assert pause <= logged[-1] < wall


def test_seconds_are_not_logged_for_a_skipped_measurement():
    monitor = EdgeOfStabilityMonitor(every_n_steps=2, probe_size=16, loss_fn=lambda m, b: m(b[0]).sum() * torch.nan)
    with pytest.warns(UserWarning, match="skipped"):
        logger = fit([monitor])
    assert monitor.last_metrics == {} and not any("eos/seconds" in row for row in logger.rows)


def test_seconds_are_not_logged_alone_when_every_value_is_non_finite():
    monitor = InvariantSetMonitor(every_n_steps=2, measure_at_start=False)
    monitor.collect = lambda trainer, pl_module: {"a": float("nan")}
    with pytest.warns(UserWarning, match="non-finite"):
        logger = fit([monitor])
    assert monitor.last_metrics == {} and not any("collapse/seconds" in row for row in logger.rows)
