"""100 repeated measurements of each monitor leave memory flat: no retained autograd graph, no hook, no growing
history. Resident memory after 100 more measurements stays within a bound far below what keeping one
measurement's graph per call would cost (several MB each here)."""

import gc

import pytest
import torch
from torch import nn

from hildtools.callbacks import EdgeOfStabilityMonitor, HessianEigenMonitor

MONITORS = {
    "hessian": lambda batch: HessianEigenMonitor(k=2, every_n_steps=1, probe_data=batch, max_iter=2, trace=True,
                                                 trace_samples=3),
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
