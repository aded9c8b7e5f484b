"""Outside the optimizers, hildtools uses its dependencies' public APIs; the one private attribute it reads
(Lightning's logging row index) is guarded by a fallback, tested here, with a canary that fails when Lightning
drops it."""

import types

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hildtools.callbacks import EdgeOfStabilityMonitor, InvariantSetMonitor
from hildtools.logging import log_step
from hildtools.metrics import NeuralCollapse, neural_collapse


def planted(n=120, classes=3, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    means = 3 * torch.randn(classes, dim, generator=g, dtype=torch.float64)
    return means[labels] + torch.randn(n, dim, generator=g, dtype=torch.float64), labels


@pytest.mark.parametrize("sync_on_compute", [True, False])
def test_neural_collapse_second_pass_syncs_as_compute_does(sync_on_compute, monkeypatch):
    metric = NeuralCollapse(3, 5, sync_on_compute=sync_on_compute)
    features, labels = planted()
    metric.update(features, labels)
    reference = neural_collapse(features, labels, 3)
    seen = []
    original = metric.sync_context

    def spy(*args, should_sync=True, **kwargs):
        seen.append(should_sync)
        return original(*args, should_sync=should_sync, **kwargs)

    monkeypatch.setattr(metric, "sync_context", spy)
    metric._to_sync = not sync_on_compute  # torchmetrics' private flag (as inside forward): must not be read
    metric.start_second_pass()
    assert seen == [sync_on_compute]
    metric._to_sync = sync_on_compute
    metric.update(features, labels)  # the second pass
    assert float(metric.compute()["nc1"]) == pytest.approx(float(reference["nc1"]), rel=1e-9)


def test_eos_monitor_unwraps_a_lightning_optimizer_through_its_public_property():
    sgd = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    trainer = types.SimpleNamespace(optimizers=[LightningOptimizer(sgd)])
    assert EdgeOfStabilityMonitor().optimizer(trainer) is sgd


def test_log_step_falls_back_to_global_step_without_lightnings_private_counter():
    trainer = types.SimpleNamespace(global_step=7, fit_loop=types.SimpleNamespace(epoch_loop=object()))
    assert log_step(trainer) == 7


def test_canary_lightning_still_has_the_row_index_log_step_reads():
    """Fails when Lightning renames ``_batches_that_stepped``: log_step would then fall back to global_step."""

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(Module(), DataLoader(TensorDataset(torch.randn(6, 2)), batch_size=2))
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == log_step(trainer) == 3


@pytest.mark.parametrize(
    "make", [lambda: EdgeOfStabilityMonitor(every_n_epochs=2), lambda: InvariantSetMonitor(["net.0"], every_n_steps=3)]
)
def test_state_key_keeps_lightnings_format_without_its_protected_helper(make):
    """Checkpoints written before keep loading: the key equals what Callback._generate_state_key gave."""
    monitor = make()
    fields = {"every_n_steps": monitor.every_n_steps, "every_n_epochs": monitor.every_n_epochs, **monitor.key_fields()}
    assert monitor.state_key == pl.Callback._generate_state_key(monitor, **fields)


def test_norm_layer_tuples_cover_torchs_private_bases():
    """hildtools names normalisation layers by public classes (hildtools.norm_layers); every torch.nn layer built
    on the private bases it replaces must be covered."""
    from torch.nn.modules import batchnorm

    from hildtools.norm_layers import BATCH_NORMS, RUNNING_STAT_NORMS

    layers = [c for c in vars(nn).values() if isinstance(c, type) and issubclass(c, nn.Module)]
    for private, public in (("_NormBase", RUNNING_STAT_NORMS), ("_BatchNorm", BATCH_NORMS)):
        base = getattr(batchnorm, private, None)
        if base is None:  # torch renamed its private base: nothing left to compare against
            continue
        assert all(issubclass(c, public) for c in layers if issubclass(c, base)), private
