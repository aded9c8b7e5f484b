"""A run checkpointed mid-way and resumed (checkpoint loaded with weights_only=True) equals the uninterrupted run:
weights, optimizer state and every monitor's measurements, including warm-start eigenvectors."""

import lightning.pytorch as pl
import pytest
import torch
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
from hildtools.optimizers import NGN, SAM, Lion

MONITORS = {
    "hessian": lambda: HessianEigenMonitor(k=2, every_n_steps=3, probe_size=24),
    "eos": lambda: EdgeOfStabilityMonitor(every_n_steps=2, probe_size=24),
    "ntk": lambda: NTKAlignmentMonitor(every_n_steps=3, probe_size=16),
    "nc": lambda: NeuralCollapseMonitor(num_classes=3, every_n_steps=3, probe_size=24),
    "rank": lambda: FeatureRankMonitor(every_n_steps=3, probe_size=24),
    "collapse": lambda: InvariantSetMonitor(every_n_steps=3),
}
OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "sam": lambda p: SAM(p, torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9),
    "ngn": lambda p: NGN(p, lr=0.5, momentum=0.9),
    "lion": lambda p: Lion(p, lr=1e-3),
}


class Net(pl.LightningModule):
    def __init__(self, optimizer):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
        self.make_optimizer = OPTIMIZERS[optimizer]

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


def loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(48, 5, generator=g), torch.randint(0, 3, (48,), generator=g)), batch_size=12
    )  # 4 steps an epoch, fixed order: resuming at an epoch boundary is exact


def fit(optimizer, epochs, root, ckpt_path=None):
    monitors = [make() for make in MONITORS.values()]
    module = Net(optimizer)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=list(monitors),
        default_root_dir=root,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer, module, monitors


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_resumed_run_equals_uninterrupted(optimizer, tmp_path):
    _, full_module, full_monitors = fit(optimizer, 4, tmp_path)
    first, _, _ = fit(optimizer, 2, tmp_path)
    path = tmp_path / "mid.ckpt"
    first.save_checkpoint(path)
    _, resumed_module, resumed_monitors = fit(optimizer, 4, tmp_path, ckpt_path=path)
    for a, b in zip(full_module.state_dict().values(), resumed_module.state_dict().values()):
        assert torch.equal(a, b)
    for full, resumed in zip(full_monitors, resumed_monitors):
        full_values, resumed_values = (
            {k: v for k, v in m.last_metrics.items() if not k.endswith("/seconds")} for m in (full, resumed)
        )
        assert full_values and full_values == pytest.approx(resumed_values, rel=1e-6)
    assert torch.allclose(full_monitors[0].init_vectors, resumed_monitors[0].init_vectors.to(torch.float32))
    assert "ntk/init_alignment" in resumed_monitors[2].last_metrics  # K_0 came back from the checkpoint
