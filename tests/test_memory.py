"""100 repeated measurements of each monitor leave memory flat: no retained autograd graph, no hook, no growing
history. Resident memory after 100 more measurements stays within a bound far below what keeping one
measurement's graph per call would cost (several MB each here)."""

import gc

import pytest
import torch
from torch import nn

from hildtools.callbacks import (
    EdgeOfStabilityMonitor,
    FeatureRankMonitor,
    HessianEigenMonitor,
    InvariantSetMonitor,
    NeuralCollapseMonitor,
    NTKAlignmentMonitor,
)

MONITORS = {
    "hessian": lambda batch: HessianEigenMonitor(
        k=2, every_n_steps=1, probe_data=batch, max_iter=2, trace=True, trace_samples=3
    ),
    "eos": lambda batch: EdgeOfStabilityMonitor(every_n_steps=1, probe_data=batch, max_iter=2),
}


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class FakeTrainer:
    """The few trainer attributes a monitor's measurement reads (no logger: values stay in ``last_metrics``)."""

    def __init__(self, optimizer):
        self.global_step, self.loggers, self.optimizers = 0, [], [optimizer]
        self.fit_loop = None


class Module(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(256, 256), nn.BatchNorm1d(256), nn.Tanh(), nn.Linear(256, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])


@pytest.mark.parametrize("name", sorted(MONITORS))
def test_repeated_measurements_leave_memory_flat(name):
    torch.manual_seed(0)
    module = Module()
    batch = (torch.randn(256, 256), torch.randint(0, 10, (256,)))  # one measurement's graph: about 1 MB
    monitor = MONITORS[name](batch)
    trainer = FakeTrainer(torch.optim.SGD(module.parameters(), lr=0.1))
    monitor.probe.prepare(trainer, module)

    def measure(times):
        for _ in range(times):
            trainer.global_step += 1
            assert monitor.run(trainer, module)
        gc.collect()

    measure(10)
    before = resident_mb()
    measure(100)
    growth = resident_mb() - before
    assert growth < 25, f"resident memory grew by {growth:.1f} MB over 100 measurements"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


def rss_recorder(last):
    """A callback reading resident memory after step 10 and after the last step."""
    import lightning.pytorch as pl

    class RSSRecorder(pl.Callback):
        readings = {}

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step in (10, last):
                gc.collect()
                self.readings[trainer.global_step] = resident_mb()

    return RSSRecorder()


DATA_MONITORS = {
    "ntk": lambda: NTKAlignmentMonitor(every_n_steps=1, probe_size=16),
    "neural_collapse": lambda: NeuralCollapseMonitor(num_classes=10, every_n_steps=1, probe_size=256),
    "feature_rank": lambda: FeatureRankMonitor(every_n_steps=1, probe_size=256),
    "invariant_sets": lambda: InvariantSetMonitor(every_n_steps=1),
}


@pytest.mark.parametrize("name", sorted(DATA_MONITORS))
def test_repeated_measurements_of_the_other_monitors_leave_memory_flat(name):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    class LitModule(Module, pl.LightningModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(512, 256), torch.randint(0, 10, (512,)))
    module = LitModule()
    recorder = rss_recorder(last=110)
    monitor = DATA_MONITORS[name]()
    trainer = pl.Trainer(
        max_steps=110,
        callbacks=[monitor, recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=64))
    growth = recorder.readings[110] - recorder.readings[10]
    assert monitor.last_metrics and monitor.last_step == 110
    # one measurement's captured features or Jacobian is >= 256 KB here: 100 leaked ones would show as >= 25 MB
    assert growth < 10, f"resident memory grew by {growth:.1f} MB over 100 measurements"
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())
